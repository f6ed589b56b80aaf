"""The run cache and the one-call `train(cfg)` used by notebooks, the CLI and benchmarks.

A run is keyed by a hash of its config and of the library code it executes, on disk and as patched in
memory (a changed library must not serve stale runs; see `library_fingerprint`); the evaluation-only
fields (`EVAL_ONLY`: targets, eval limit, class protocol) are left out of the key. Its folder holds
`config.json`, `checkpoint.pt`, `log.jsonl` and, once complete, `metrics.json` (written last, with the
checkpoint's SHA-256). `train(cfg)` returns the cached run when it is complete (after checking its
checkpoint), evaluates it when only evaluation fields changed (`metrics-<eval key>.json`), resumes it
when a checkpoint exists, and retrains with `force=True`. Every dataset name and split is checked
before any generation, download or training.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import RunConfig, dgnb_home
from ..config import validate as validate_config
from ..data.folder import DatasetLayoutError, SegFolder
from ..data.loaders import eval_loader, train_loader
from ..data.taxonomy import CLASS_SUBSETS
from ..data.transforms import BatchAugment, eval_transform
from ..errors import CheckpointError, RunCacheError
from ..io import atomic_write_json
from ..methods import Method, build_method
from .distributed import barrier, broadcast_module, init_from_env, is_main
from .evaluate import SegMetrics, evaluate
from .stages import StageContext, stage_checkpoint
from .train import CHECKPOINT, fit, read_checkpoint, resolve_amp, resolve_device, restore, seed_everything, write_log


# Modules that cannot change a run's result: presentation, the command line, tools around runs, and the
# presets (config.py only produces configuration values, and those are hashed themselves).
_NOT_KEYED = ("viz/", "analysis.py", "cli.py", "engine/bench.py", "data/inspect.py", "config.py", "course.py", "student.py")


def library_fingerprint(method: str = "") -> str:
    """Hash of the code a run of `method` executes: the version, the library's source files except
    presentation code and the *other* methods' modules (editing one method keeps the others' runs cached),
    and every in-memory change to that code.

    Files are read from disk (re-read when one's size or modification time changes). In-memory changes are
    what a notebook does without touching a file: assigning a function or class into a library module
    (`dgnb.methods.pinthemem.feature_cohesion_loss = my_loss`), a method into a library class, a changed
    literal constant, a module edited on disk but not reloaded, or a method class registered from outside
    the library. `dgnb.engine.patches.module_changes` finds them by comparing each imported module of the
    key with a fresh compile of its file, and describes each by its code (stable across sessions, helpers
    it calls included). With nothing patched the hash is that of the files alone; undoing a patch restores it.
    """
    files = _files_fingerprint(method)
    changes = code_changes(method)
    if not changes:
        return files
    h = hashlib.sha256(files.encode())
    for where, text in changes:
        h.update(f"\n{where}\n{text}".encode())
    return h.hexdigest()


_FILES_CACHE: dict[tuple, str] = {}


def _keyed_files(method: str) -> list[tuple[str, Path]]:
    """(path relative to the package, path) of every source file a run of `method` depends on."""
    pkg = Path(__file__).resolve().parents[1]
    keep = _method_files(method, pkg)
    out = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel.startswith(_NOT_KEYED) or (rel.startswith("methods/") and rel not in keep):
            continue
        out.append((rel, path))
    return out


def _files_fingerprint(method: str) -> str:
    files = _keyed_files(method)
    signature = tuple((rel, p.stat().st_mtime_ns, p.stat().st_size) for rel, p in files)
    if signature not in _FILES_CACHE:
        h = hashlib.sha256(__version__.encode())
        for rel, path in files:
            h.update(rel.encode())
            h.update(path.read_bytes())
        _FILES_CACHE[signature] = h.hexdigest()
    return _FILES_CACHE[signature]


def code_changes(method: str = "") -> list[tuple[str, str]]:
    """In-memory changes to the code a run of `method` executes (see `library_fingerprint`): the imported
    keyed modules that differ from their files, and the registered class when it is not the library's."""
    from ..methods import REGISTRY
    from .patches import describe, module_changes

    out = []
    for rel, path in _keyed_files(method):
        name = "dgnb." + rel[: -len(".py")].replace("/", ".")
        module = sys.modules.get(name.removesuffix(".__init__"))
        if module is not None:
            out += module_changes(module, path)
    cls = REGISTRY.get(method)
    if cls is not None and _library_file(cls) is None:  # a method class defined in a notebook or a user module
        out.append((f"REGISTRY[{method!r}]", describe(cls)))
        user_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
        if user_file and Path(user_file).is_file():
            out.append((user_file, hashlib.sha256(Path(user_file).read_bytes()).hexdigest()))
    return out


def _library_file(cls: type) -> Path | None:
    """The library file defining `cls`, or None when it is defined elsewhere (a notebook, a user module)."""
    pkg = Path(__file__).resolve().parents[1]
    try:
        path = Path(inspect.getfile(cls)).resolve()
    except (TypeError, OSError):
        return None
    return path if path.is_relative_to(pkg) else None


def _method_files(method: str, pkg: Path) -> set[str]:
    """`methods/` files a method's module depends on: base, losses, its module, and what that imports
    (for a class defined outside the library: those of the first library class it derives from)."""
    from ..methods import REGISTRY

    keep = {"methods/base.py", "methods/losses.py"}
    cls = REGISTRY.get(method)
    if cls is None:
        return keep
    first = next((p for p in map(_library_file, cls.__mro__) if p is not None), None)
    todo = [first] if first is not None else []
    while todo:
        path = todo.pop()
        rel = path.relative_to(pkg).as_posix()
        keep.add(rel)
        for name in re.findall(r"^from \.(\w+) import", path.read_text(), re.M):
            dep = path.parent / f"{name}.py"
            if dep.is_file() and dep.relative_to(pkg).as_posix() not in keep:
                todo.append(dep)
    return keep


# Fields that only change the final evaluation, not the trained weights: they are left out of the run key, so
# changing them re-evaluates the finished checkpoint instead of retraining (see `train`). A UDA method trains on
# its targets' images, so for it `data.targets` stays in the key.
EVAL_ONLY = ("data.targets", "data.eval_limit", "data.protocol")
# What only a method that reads target images depends on: for any other method (ERM, source_only) these fields
# are left out of the key too, so one source-only run serves every source -> target pair of its source.
TARGET_STREAM = ("data.uda_target", "data.target_batch")


def _eval_only(cfg: RunConfig) -> tuple[str, ...]:
    """Fields left out of the run key. A UDA method trains on `data.uda_target` (in its key); the evaluated
    `data.targets` never change its weights."""
    from ..methods import REGISTRY

    uda = getattr(REGISTRY.get(cfg.method), "uda", False)
    return EVAL_ONLY + (() if uda else TARGET_STREAM)


def training_dict(cfg: RunConfig) -> dict[str, Any]:
    """`cfg` as a dict without the evaluation-only fields: what the trained weights depend on."""
    d = cfg.to_dict()
    for path in _eval_only(cfg):
        section, name = path.split(".")
        d[section].pop(name)
    return d


def run_key(cfg: RunConfig) -> str:
    blob = json.dumps(training_dict(cfg), sort_keys=True, default=str) + library_fingerprint(cfg.method)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def eval_key(cfg: RunConfig) -> str:
    """Hash of the evaluation-only fields: which metrics file of a run belongs to `cfg`."""
    values = {path: getattr(getattr(cfg, path.split(".")[0]), path.split(".")[1]) for path in EVAL_ONLY}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_json(path: Path) -> Any:
    """Read a run-cache JSON file; a torn or edited one is a RunCacheError naming the file and the fix."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fix = ("delete it and rerun the same `dgnb train` command: the finished checkpoint is evaluated again, "
               "not retrained" if Path(path).name.startswith("metrics") else
               "delete the run folder and train it again")
        raise RunCacheError(f"{path} is not valid JSON ({e}); {fix}.") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def runs_root() -> Path:
    return dgnb_home() / "runs"


def run_dir(cfg: RunConfig, root: Path | None = None) -> Path:
    return (root or runs_root()) / f"{cfg.method}-{cfg.preset}-s{cfg.seed}-{run_key(cfg)}"


@dataclass
class Run:
    dir: Path
    config: RunConfig

    @property
    def metrics_path(self) -> Path:
        """`metrics.json` (written when training finished) if it holds this config's evaluation, else
        `metrics-<eval key>.json` (the same weights evaluated on other targets, limits or protocol)."""
        main = self.dir / "metrics.json"
        if not main.is_file() or read_json(main).get("eval_key", eval_key(self.config)) == eval_key(self.config):
            return main
        return self.dir / f"metrics-{eval_key(self.config)}.json"

    @property
    def metrics(self) -> dict[str, Any] | None:
        p = self.metrics_path
        return read_json(p) if p.is_file() else None

    @property
    def complete(self) -> bool:
        return (self.dir / "metrics.json").is_file()

    @property
    def snapshots(self) -> dict[str, Any] | None:
        """What the method kept at each evaluation point (`Method.on_evaluate`), or None:
        {"probe": {image, label, domain}, "snapshots": [{"iteration": t, ...tensors}, ...]}."""
        p = self.dir / SNAPSHOTS
        return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None

    @property
    def history(self) -> list[dict]:
        p = self.dir / "log.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []

    def load_method(self, device: str = "auto", averaged: bool = True, checkpoint: str = CHECKPOINT) -> Method:
        """The trained method, in eval mode, from the run's checkpoint; with the averaged (EMA) weights
        when the run kept them and `averaged` (what the run's metrics were computed with). `checkpoint`
        picks another checkpoint of the run, e.g. `stage_checkpoint(1)`: the weights that ended stage 0."""
        method = make_method(self.config, resolve_device(device))
        path = self.dir / checkpoint
        restore(method, read_checkpoint(path, method.device), path, weights_only=True)
        if averaged and method.ema_state is not None:
            method.load_state_dict(method.ema_state, strict=False)
        if not self.complete and checkpoint == CHECKPOINT:
            warnings.warn(f"{self.dir} is an unfinished run: its checkpoint is at iteration {method.iteration} of "
                          f"{self.config.train.iterations}", stacklevel=2)
        return method.eval()

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a run folder (no config.json); runs live in {runs_root()}")
        try:
            return cls(path, RunConfig.from_dict(read_json(path / "config.json")))
        except (KeyError, TypeError, ValueError) as e:
            raise RunCacheError(f"{path / 'config.json'} is not a valid run config ({type(e).__name__}: {e}); "
                                "delete the run folder and train it again") from e


# ----- data --------------------------------------------------------------------------------------
def prepare_data(cfg: RunConfig, progress: bool = True) -> None:
    """Generate the procedural city domains this run uses, if any are missing (rank 0 only)."""
    if cfg.data.city is None:
        return
    from ..data.city import DOMAINS, ensure_city

    c = cfg.data.city
    sources = [d for d in cfg.data.sources if d in DOMAINS]
    targets = [d for d in cfg.data.targets if d in DOMAINS and d not in sources]
    # sources need train and val; targets only val (an oracle lists its target as a source), except the UDA
    # target of a method that reads it: its train split too (read without labels)
    both = {"train": c["train"], "val": c["val"]}
    adapted = [d for d in [uda_target(cfg)] if d in DOMAINS and d in targets]
    if is_main():
        for names, splits in ((sources, both), ([d for d in targets if d not in adapted], {"val": c["val"]}),
                              (adapted, both)):
            if names:
                ensure_city(cfg.data.root, domains=names, splits=splits, size=tuple(c["size"]), seed=c["seed"],
                            progress=progress)
    barrier()


def uda_target(cfg: RunConfig) -> str | None:
    """The target whose train images this run reads (unlabelled): `data.uda_target` for a UDA method, else None."""
    from ..methods import REGISTRY

    return cfg.data.uda_target if getattr(REGISTRY.get(cfg.method), "uda", False) else None


def domain_set(cfg: RunConfig, name: str, split: str, transform: Any, index: int = 0, limit: int | None = None,
               cache: bool = False, labels: bool = True) -> SegFolder:
    count = _city_count(cfg, name, split)  # a city folder may hold more images than this run asks for
    if count is not None:
        limit = count if limit is None else min(limit, count)
    return SegFolder(cfg.data.root, name, split, transform=transform, domain_index=index, limit=limit, cache=cache,
                     labels=labels)


def target_train_set(cfg: RunConfig, cache: bool = False) -> SegFolder:
    """The UDA target's train split, unlabelled: the dataset holds no label paths, so nothing can read them."""
    name = uda_target(cfg)
    split = Path(cfg.data.root) / name / "train" / "images"
    if not split.is_dir():
        raise DatasetLayoutError(f"UDA target '{name}' has no train split ({split} is missing): adaptation reads the "
                                 "target's train images, unlabelled. Convert or generate its train split (`python -m "
                                 "data_tools convert ...`; the city: `dgnb data generate`), or pick another "
                                 "--uda-target.")
    return domain_set(cfg, name, "train", None, limit=cfg.data.train_limit, cache=cache, labels=False)


def _city_count(cfg: RunConfig, name: str, split: str) -> int | None:
    if cfg.data.city is None or split not in ("train", "val"):
        return None
    from ..data.city import DOMAINS

    return cfg.data.city[split] if name in DOMAINS else None


# ----- checks before any work --------------------------------------------------------------------
def check_inputs(cfg: RunConfig) -> None:
    """Before generating, downloading or training: the data root and every dataset name must make sense."""
    root = Path(cfg.data.root).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetLayoutError(f"data root {root} is a file, not a folder; point --data-root (data.root) at the "
                                 "folder that holds the datasets")
    check_names(cfg, cfg.data.sources, "source")
    check_names(cfg, cfg.data.targets, "target")


def check_names(cfg: RunConfig, names: list[str], role: str) -> None:
    """Each name is a dataset under the data root, or a procedural-city domain this config generates."""
    root = Path(cfg.data.root).expanduser()
    city: dict[str, Any] = {}
    if cfg.data.city is not None:
        from ..data.city import DOMAINS as city
    for name in names:
        if name not in city and not (root / name / "meta.json").is_file():
            raise DatasetLayoutError(_unknown_dataset(role, name, root, list(city)))


def _unknown_dataset(role: str, name: str, root: Path, city: list[str]) -> str:
    import difflib

    found = sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []
    found = [n for n in found if n not in city]
    close = difflib.get_close_matches(name, found + city, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    where = (f"other datasets under {root}: {found or 'none'}" if root.is_dir() else
             f"data root {root} does not exist: set --data-root, or $DGNB_DATA for the paper preset")
    generated = f"procedural city domains: {', '.join(city)}; " if city else ""
    flag = {"source": "--sources", "target": "--targets"}.get(role, "--domains")
    return (f"{role} dataset '{name}' not found ({generated}{where}).{hint} Fix the name ({flag}), or convert the "
            "dataset with `python -m data_tools convert ... --dst DATA_ROOT`.")


def check_splits(cfg: RunConfig) -> None:
    """Every split the run reads exists and agrees with its meta.json (cheap: lists files, reads no pixels)."""
    for name in cfg.data.sources:
        for split in ("train", "val"):
            domain_set(cfg, name, split, None)
    for name in cfg.data.targets:
        domain_set(cfg, name, "val", None)
    if uda_target(cfg) is not None:
        target_train_set(cfg)


def make_method(cfg: RunConfig, device: torch.device) -> Method:
    seed_everything(cfg.seed)
    method = build_method(cfg.method, cfg.model, cfg.optim, len(cfg.data.sources), cfg.hparams)
    method.setup(device, resolve_amp(cfg.train.amp, device))
    if cfg.train.ema_decay > 0:
        method.enable_ema(cfg.train.ema_decay)
    return method


def evaluate_domains(method: Method, cfg: RunConfig, domains: list[str], split: str = "val",
                     limit: int | None = None, datasets: dict[str, SegFolder] | None = None) -> dict[str, SegMetrics]:
    """Per-domain metrics of `method` on `split` of each domain (single scale, no flip); `datasets` may hold
    already-built (cached) evaluation sets by name."""
    classes = CLASS_SUBSETS[cfg.data.protocol]
    out = {}
    method.eval()
    with method.averaged():  # the EMA weights when the run keeps them
        for name in domains:
            ds = (datasets or {}).get(name) or domain_set(cfg, name, split, eval_transform(cfg.data.eval_size),
                                                          limit=limit)
            out[name] = evaluate(method.predict, eval_loader(ds, cfg.data.eval_batch_size, cfg.data.num_workers),
                                 method.device, classes)
    return out


def summarize(metrics: dict[str, SegMetrics], cfg: RunConfig) -> dict[str, Any]:
    """The JSON the benchmark table is made from (mIoU in percent)."""
    src_cm = sum(metrics[d].confusion for d in cfg.data.sources)
    source_val = SegMetrics(src_cm, CLASS_SUBSETS[cfg.data.protocol])
    targets = {d: round(metrics[d].miou, 2) for d in cfg.data.targets}
    return {
        "method": cfg.method, "seed": cfg.seed, "preset": cfg.preset, "setting": cfg.setting,
        "uda_target": uda_target(cfg), "sources": cfg.data.sources,
        "source_val_miou": round(source_val.miou, 2),
        "source_domain_miou": {d: round(metrics[d].miou, 2) for d in cfg.data.sources},
        "target_miou": targets,
        "mean_target_miou": round(sum(targets.values()) / len(targets), 2) if targets else None,
        "per_class_iou": {d: m.per_class() for d, m in metrics.items()},
    }


# ----- training ----------------------------------------------------------------------------------
def train(cfg: RunConfig, force: bool = False, progress: bool = True, root: Path | None = None,
          stop_at: int | None = None) -> Run:
    """Train `cfg` (or return it from the run cache) and evaluate it on every source and target domain."""
    validate_config(cfg)
    device = resolve_device(cfg.train.device)
    rank, world = init_from_env(device)
    folder = run_dir(cfg, root)
    run = Run(folder, cfg)
    if run.complete and not force:
        return _from_cache(run, progress)
    check_inputs(cfg)
    if force and is_main() and folder.exists():
        shutil.rmtree(folder)
    barrier()
    folder.mkdir(parents=True, exist_ok=True)
    if is_main():
        atomic_write_json(folder / "config.json", cfg.to_dict())
    prepare_data(cfg, progress)
    check_splits(cfg)

    method = make_method(cfg, device)
    broadcast_module(method)
    d = cfg.data
    sources = [domain_set(cfg, n, "train", None, i, d.train_limit, d.cache_images) for i, n in enumerate(d.sources)]
    augment = BatchAugment(tuple(d.crop), tuple(d.base_size), tuple(d.scale), d.color_jitter)

    target = target_train_set(cfg, d.cache_images) if method.uda else None
    target_batch = d.target_batch or d.batch_per_domain * len(sources)

    def make_loader(start: int):
        stream = target
        pseudo = method.pseudo_label_root()  # a stage that trains on pseudo labels reads them with the images
        if pseudo is not None:
            stream = SegFolder(folder / pseudo[0], pseudo[1], "train", cache=d.cache_images)
        return train_loader(sources, augment, d.batch_per_domain, cfg.seed, start, cfg.train.iterations,
                            d.num_workers, rank, world, device, target=stream, target_batch=target_batch)

    context = StageContext(target, folder, d.eval_batch_size, d.num_workers) if target is not None else None

    # periodic validation sets, decoded once (kept in memory with `cache_images`)
    val_sets = {n: domain_set(cfg, n, "val", eval_transform(d.eval_size), limit=d.val_limit, cache=d.cache_images)
                for n in d.sources}

    def validate(m: Method) -> dict[str, float]:
        res = evaluate_domains(m, cfg, d.sources, limit=d.val_limit, datasets=val_sets)
        return {"val_miou": round(SegMetrics(sum(r.confusion for r in res.values())).miou, 2)}

    validate = with_snapshots(validate, method, cfg, folder)  # what the method keeps at each evaluation
    history, seconds = fit(method, make_loader, cfg.train.iterations, folder, validate if is_main() else None,
                           cfg.train.eval_every, cfg.train.checkpoint_every, cfg.train.log_every, progress, stop_at,
                           stage_context=context)
    if method.iteration < cfg.train.iterations or not is_main():
        barrier()
        return run
    write_log(folder / "log.jsonl", history)
    summary = summarize(evaluate_domains(method, cfg, d.sources + d.targets, limit=d.eval_limit), cfg)
    summary["stage_results"] = stage_results(run, method)
    summary["train_seconds"] = round(seconds, 1)
    summary["iterations"] = cfg.train.iterations
    summary["device"] = str(device)
    summary["world_size"] = world
    summary["eval_key"] = eval_key(cfg)
    summary["checkpoint_sha256"] = file_sha256(folder / CHECKPOINT)
    atomic_write_json(folder / "metrics.json", summary)
    barrier()
    return run


def stage_results(run: Run, method: Method) -> list[dict[str, Any]]:
    """Target mIoU of the weights that ended each stage but the last (`stage<k>.pt`, k = 1, 2, ...): e.g.
    MRNet's Stage I next to its final Stage II. Empty for single-stage methods."""
    cfg, out = run.config, []
    for k in range(1, len(method.stage_starts()) + 1):
        if not (run.dir / stage_checkpoint(k)).is_file():
            continue
        earlier = run.load_method(str(method.device), checkpoint=stage_checkpoint(k))
        res = evaluate_domains(earlier, cfg, cfg.data.targets, limit=cfg.data.eval_limit)
        targets = {n: round(m.miou, 2) for n, m in res.items()}
        out.append({"stage": k - 1, "iteration": earlier.iteration, "target_miou": targets,
                    "mean_target_miou": round(sum(targets.values()) / len(targets), 2) if targets else None})
    return out


def verify_checkpoint(run: Run) -> dict[str, Any]:
    """A finished run's checkpoint must be the one its metrics.json recorded; returns that metrics.json."""
    main = read_json(run.dir / "metrics.json")
    ckpt = run.dir / CHECKPOINT
    want = main.get("checkpoint_sha256")
    if want is None:  # a run finished before checkpoints were recorded
        return main
    if not ckpt.is_file():
        problem = "is missing"
    elif file_sha256(ckpt) != want:
        problem = "is corrupt or was replaced (its SHA-256 differs from the one metrics.json recorded)"
    else:
        return main
    raise CheckpointError(f"{ckpt} {problem}; the cached run cannot be used. Retrain it: `dgnb train` with the same "
                          "arguments plus --force (Python: train(cfg, force=True)).")


def _from_cache(run: Run, progress: bool) -> Run:
    """A finished run: check its checkpoint; evaluate it if this config's evaluation fields are new to it."""
    main = verify_checkpoint(run)
    if run.metrics_path.is_file():
        return run
    cfg = run.config
    if is_main():
        check_inputs(cfg)
        prepare_data(cfg, progress)
        check_splits(cfg)
        method = run.load_method(cfg.train.device)
        d = cfg.data
        summary = summarize(evaluate_domains(method, cfg, d.sources + d.targets, limit=d.eval_limit), cfg)
        keep = ("train_seconds", "iterations", "device", "world_size", "checkpoint_sha256")
        summary.update({k: main[k] for k in keep if k in main}, eval_key=eval_key(cfg))
        atomic_write_json(run.metrics_path, summary)
    barrier()
    return run


# ----- snapshots over training ----------------------------------------------------------------------
def probe_batch(cfg: RunConfig, per_domain: int = 1) -> dict[str, Any]:
    """The first `per_domain` val images of every source and target domain (images resized to the
    first one's size): the fixed images whose read-outs a method's `on_evaluate` keeps over training.
    Only looked at, under no-grad and in eval mode: nothing here trains on the targets."""
    from torch.nn import functional as F

    images, labels, names = [], [], []
    for name in dict.fromkeys(cfg.data.sources + cfg.data.targets):
        ds = domain_set(cfg, name, "val", eval_transform(cfg.data.eval_size), limit=per_domain)
        for i in range(len(ds)):
            item = ds[i]
            image, label = item["image"].float(), item["label"].long()
            if images and image.shape[-2:] != images[0].shape[-2:]:
                size = images[0].shape[-2:]
                image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
                label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
            images.append(image)
            labels.append(label)
            names.append(name)
    return {"image": torch.stack(images), "label": torch.stack(labels), "domain": names}


SNAPSHOTS = "snapshots.pt"


def with_snapshots(validate, method: Method, cfg: RunConfig, folder: Path):
    """`validate`, preceded at each evaluation point by `method.on_evaluate(probe)`, stored in
    `folder/snapshots.pt` (atomically); `validate` itself for methods that keep nothing. A resumed run
    drops the snapshots taken after its checkpoint and takes them again."""
    if type(method).on_evaluate is Method.on_evaluate:
        return validate
    from ..io import atomic_torch_save

    state: dict[str, Any] = {}

    def take(m: Method) -> None:
        if not state:
            state["probe"] = probe_batch(cfg)
            old = torch.load(folder / SNAPSHOTS, weights_only=False) if (folder / SNAPSHOTS).is_file() else None
            state["snapshots"] = old["snapshots"] if old else []
        probe = state["probe"]
        with torch.no_grad():
            snap = m.on_evaluate({"image": probe["image"].to(m.device), "label": probe["label"].to(m.device)})
        if snap is None:
            return
        kept = [s for s in state["snapshots"] if s["iteration"] < m.iteration]
        state["snapshots"] = kept + [{"iteration": m.iteration,
                                      **{k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in snap.items()}}]
        probe_cpu = {"image": (probe["image"] * 255).round().to(torch.uint8), "label": probe["label"].to(torch.uint8),
                     "domain": probe["domain"]}
        atomic_torch_save(folder / SNAPSHOTS, {"probe": probe_cpu, "snapshots": state["snapshots"]})

    def validate_with_snapshot(m: Method) -> dict[str, float]:
        take(m)
        return validate(m)

    return validate_with_snapshot
