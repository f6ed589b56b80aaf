"""The run cache and the one-call `train(cfg)` used by notebooks, the CLI and benchmarks.

A run is keyed by a hash of its full config and of the library code it executes, on disk and as
patched in memory (a changed library must not serve stale runs; see `library_fingerprint`). Its
folder holds `config.json`, `checkpoint.pt`, `log.jsonl` and, once complete, `metrics.json`
(written last). `train(cfg)` returns the cached run when it is complete, resumes it when a
checkpoint exists, and retrains from scratch with `force=True`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import RunConfig, dgnb_home
from ..data.folder import SegFolder
from ..data.loaders import eval_loader, train_loader
from ..data.taxonomy import CLASS_SUBSETS
from ..data.transforms import eval_transform, train_transform
from ..io import atomic_write_json
from ..methods import Method, build_method
from .distributed import barrier, broadcast_module, init_from_env, is_main
from .evaluate import SegMetrics, evaluate
from .train import CHECKPOINT, fit, resolve_amp, resolve_device, seed_everything, write_log


# Modules that cannot change a run's result: presentation, the command line, tools around runs.
_NOT_KEYED = ("viz/", "analysis.py", "cli.py", "engine/bench.py", "data/inspect.py", "course.py")


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


def run_key(cfg: RunConfig) -> str:
    blob = json.dumps(cfg.to_dict(), sort_keys=True, default=str) + library_fingerprint(cfg.method)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def runs_root() -> Path:
    return dgnb_home() / "runs"


def run_dir(cfg: RunConfig, root: Path | None = None) -> Path:
    return (root or runs_root()) / f"{cfg.method}-{cfg.preset}-s{cfg.seed}-{run_key(cfg)}"


@dataclass
class Run:
    dir: Path
    config: RunConfig

    @property
    def metrics(self) -> dict[str, Any] | None:
        p = self.dir / "metrics.json"
        return json.loads(p.read_text()) if p.is_file() else None

    @property
    def complete(self) -> bool:
        return (self.dir / "metrics.json").is_file()

    @property
    def history(self) -> list[dict]:
        p = self.dir / "log.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []

    def load_method(self, device: str = "auto") -> Method:
        """The trained method, in eval mode, from the run's checkpoint."""
        method = make_method(self.config, resolve_device(device))
        state = torch.load(self.dir / CHECKPOINT, map_location=method.device, weights_only=False)
        method.load_checkpoint_state(state["method"], weights_only=True)
        return method.eval()

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a run folder (no config.json); runs live in {runs_root()}")
        return cls(path, RunConfig.from_dict(json.loads((path / "config.json").read_text())))


# ----- data --------------------------------------------------------------------------------------
def prepare_data(cfg: RunConfig, progress: bool = True) -> None:
    """Generate the procedural city domains this run uses, if any are missing (rank 0 only)."""
    if cfg.data.city is None:
        return
    from ..data.city import DOMAINS, ensure_city

    c = cfg.data.city
    sources = [d for d in cfg.data.sources if d in DOMAINS]
    targets = [d for d in cfg.data.targets if d in DOMAINS and d not in sources]
    if is_main():  # sources need train and val; targets only val (an oracle lists its target as a source)
        for names, splits in ((sources, {"train": c["train"], "val": c["val"]}), (targets, {"val": c["val"]})):
            if names:
                ensure_city(cfg.data.root, domains=names, splits=splits, size=tuple(c["size"]), seed=c["seed"],
                            progress=progress)
    barrier()


def domain_set(cfg: RunConfig, name: str, split: str, transform: Any, index: int = 0, limit: int | None = None,
               cache: bool = False) -> SegFolder:
    return SegFolder(cfg.data.root, name, split, transform=transform, domain_index=index, limit=limit, cache=cache)


def make_method(cfg: RunConfig, device: torch.device) -> Method:
    seed_everything(cfg.seed)
    method = build_method(cfg.method, cfg.model, cfg.optim, len(cfg.data.sources), cfg.hparams)
    return method.setup(device, resolve_amp(cfg.train.amp, device))


def evaluate_domains(method: Method, cfg: RunConfig, domains: list[str], split: str = "val",
                     limit: int | None = None) -> dict[str, SegMetrics]:
    """Per-domain metrics of `method` on `split` of each domain (single scale, no flip)."""
    classes = CLASS_SUBSETS[cfg.data.protocol]
    out = {}
    method.eval()
    for name in domains:
        ds = domain_set(cfg, name, split, eval_transform(cfg.data.eval_size), limit=limit)
        out[name] = evaluate(method.predict, eval_loader(ds, cfg.data.eval_batch_size, cfg.data.num_workers),
                             method.device, classes)
    return out


def summarize(metrics: dict[str, SegMetrics], cfg: RunConfig) -> dict[str, Any]:
    """The JSON the benchmark table is made from (mIoU in percent)."""
    src_cm = sum(metrics[d].confusion for d in cfg.data.sources)
    source_val = SegMetrics(src_cm, CLASS_SUBSETS[cfg.data.protocol])
    targets = {d: round(metrics[d].miou, 2) for d in cfg.data.targets}
    return {
        "method": cfg.method, "seed": cfg.seed, "preset": cfg.preset, "sources": cfg.data.sources,
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
    device = resolve_device(cfg.train.device)
    rank, world = init_from_env(device)
    folder = run_dir(cfg, root)
    run = Run(folder, cfg)
    if run.complete and not force:
        return run
    if force and is_main() and folder.exists():
        shutil.rmtree(folder)
    barrier()
    folder.mkdir(parents=True, exist_ok=True)
    if is_main():
        atomic_write_json(folder / "config.json", cfg.to_dict())
    prepare_data(cfg, progress)

    method = make_method(cfg, device)
    broadcast_module(method)
    d = cfg.data
    sources = [domain_set(cfg, n, "train", None, i, d.train_limit, d.cache_images) for i, n in enumerate(d.sources)]
    transform = train_transform(d.crop, d.base_size, d.scale, d.color_jitter)

    def make_loader(start: int):
        return train_loader(sources, transform, d.batch_per_domain, cfg.seed, start, cfg.train.iterations,
                            d.num_workers, rank, world)

    def validate(m: Method) -> dict[str, float]:
        res = evaluate_domains(m, cfg, d.sources, limit=d.val_limit)
        return {"val_miou": round(SegMetrics(sum(r.confusion for r in res.values())).miou, 2)}

    history, seconds = fit(method, make_loader, cfg.train.iterations, folder, validate if is_main() else None,
                           cfg.train.eval_every, cfg.train.checkpoint_every, cfg.train.log_every, progress, stop_at)
    if method.iteration < cfg.train.iterations or not is_main():
        barrier()
        return run
    write_log(folder / "log.jsonl", history)
    summary = summarize(evaluate_domains(method, cfg, d.sources + d.targets, limit=d.eval_limit), cfg)
    summary["train_seconds"] = round(seconds, 1)
    summary["iterations"] = cfg.train.iterations
    summary["device"] = str(device)
    summary["world_size"] = world
    atomic_write_json(folder / "metrics.json", summary)
    barrier()
    return run
