"""The run cache and the one-call `train(cfg)` used by notebooks, the CLI and benchmarks.

A run is keyed by a hash of its full config and of the library's source code (a changed library
must not serve stale runs). Its folder holds `config.json`, `checkpoint.pt`, `log.jsonl` and, once
complete, `metrics.json` (written last). `train(cfg)` returns the cached run when it is complete,
resumes it when a checkpoint exists, and retrains from scratch with `force=True`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
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
_NOT_KEYED = ("viz/", "analysis.py", "cli.py", "engine/bench.py", "data/inspect.py", "student.py")


@lru_cache(maxsize=None)
def library_fingerprint(method: str = "") -> str:
    """Hash of the version and of the source files a run of `method` depends on: the whole library except
    presentation code and the *other* methods' modules (editing one method keeps the others' runs cached)."""
    h = hashlib.sha256(__version__.encode())
    pkg = Path(__file__).resolve().parents[1]
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel.startswith(_NOT_KEYED) or (rel.startswith("methods/") and rel not in _method_files(method, pkg)):
            continue
        h.update(rel.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _method_files(method: str, pkg: Path) -> set[str]:
    """`methods/` files a method's module depends on: base, losses, its module, and what that imports."""
    from ..methods import REGISTRY

    keep = {"methods/base.py", "methods/losses.py"}
    cls = REGISTRY.get(method)
    if cls is None:
        return keep
    todo = [Path(inspect.getfile(cls)).resolve()]
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
    def snapshots(self) -> dict[str, Any] | None:
        """What the method kept at each evaluation point (`Method.on_evaluate`), or None:
        {"probe": {image, label, domain}, "snapshots": [{"iteration": t, ...tensors}, ...]}."""
        p = self.dir / SNAPSHOTS
        return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None

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

    validate = with_snapshots(validate, method, cfg, folder)  # what the method keeps at each evaluation
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
