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
from ..data.transforms import BatchAugment, eval_transform
from ..io import atomic_write_json
from ..methods import Method, build_method
from .distributed import barrier, broadcast_module, init_from_env, is_main
from .evaluate import SegMetrics, evaluate
from .train import CHECKPOINT, fit, resolve_amp, resolve_device, seed_everything, write_log


# Modules that cannot change a run's result: presentation, the command line, tools around runs, and the
# presets (config.py only produces configuration values, and those are hashed themselves).
_NOT_KEYED = ("viz/", "analysis.py", "cli.py", "engine/bench.py", "data/inspect.py", "config.py")


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
    def history(self) -> list[dict]:
        p = self.dir / "log.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []

    def load_method(self, device: str = "auto", averaged: bool = True) -> Method:
        """The trained method, in eval mode, from the run's checkpoint; with the averaged (EMA) weights
        when the run kept them and `averaged` (what the run's metrics were computed with)."""
        method = make_method(self.config, resolve_device(device))
        state = torch.load(self.dir / CHECKPOINT, map_location=method.device, weights_only=False)
        method.load_checkpoint_state(state["method"], weights_only=True)
        if averaged and method.ema_state is not None:
            method.load_state_dict(method.ema_state, strict=False)
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
    augment = BatchAugment(tuple(d.crop), tuple(d.base_size), tuple(d.scale), d.color_jitter)

    def make_loader(start: int):
        return train_loader(sources, augment, d.batch_per_domain, cfg.seed, start, cfg.train.iterations,
                            d.num_workers, rank, world, device)

    # periodic validation sets, decoded once (kept in memory with `cache_images`)
    val_sets = {n: domain_set(cfg, n, "val", eval_transform(d.eval_size), limit=d.val_limit, cache=d.cache_images)
                for n in d.sources}

    def validate(m: Method) -> dict[str, float]:
        res = evaluate_domains(m, cfg, d.sources, limit=d.val_limit, datasets=val_sets)
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
