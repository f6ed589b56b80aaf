"""`fit`: the training loop shared by every method.

Device and AMP handling, tqdm progress, periodic evaluation, atomic checkpoints and exact resume
(method state, optimizers, schedules and every RNG; batches are a pure function of the iteration,
see `dgnb.data.loaders`). Ctrl-C (a notebook's interrupt) finishes the current iteration, writes a
checkpoint and then stops, so nothing is lost.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..io import atomic_torch_save
from ..methods.base import Method
from .distributed import is_main

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..config import CHECKS

    if not CHECKS["train.device"].ok(name):
        raise ValueError(f"device {name!r} is not valid: use {CHECKS['train.device'].valid} (--device cpu)")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available here; use --device cpu or auto.")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """`auto`: bf16 on CUDA where supported, else fp16; no autocast on CPU (it is slower there)."""
    choices = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in choices:
        raise ValueError(f"unknown amp setting '{amp}'; choose auto, off, bf16 or fp16")
    if choices[amp] is not None and device.type != "cuda":
        raise ValueError(f"amp={amp} needs a CUDA device; on {device.type} use amp=off or auto")
    return choices[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, method: Method, history: list[dict], train_seconds: float) -> None:
    if is_main():
        atomic_torch_save(path, {"method": method.checkpoint_state(), "rng": rng_state(), "history": history,
                                 "train_seconds": train_seconds})


_RETRAIN = ("Retrain the run: `dgnb train` with the same arguments plus --force (Python: train(cfg, force=True)); "
            "or delete the file to restart from scratch.")


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """`torch.load` a dgnb checkpoint; a missing, truncated or foreign file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing: the run never reached its first checkpoint. "
                              "Train it with `dgnb train` (same arguments).")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever torch/pickle/zip raise, the file is unreadable
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {detail}): the file is truncated "
                              f"or corrupt. {_RETRAIN}") from e
    if not isinstance(state, dict) or not isinstance(state.get("method"), dict) or "module" not in state["method"]:
        raise CheckpointError(f"{path} is not a dgnb checkpoint (no 'method' state). {_RETRAIN}")
    return state


def restore(method: Method, state: dict[str, Any], path: Path, weights_only: bool = False) -> None:
    """Load a checkpoint's method state; one from another model or method is a CheckpointError naming the file."""
    try:
        method.load_checkpoint_state(state["method"], weights_only=weights_only)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])[:300]
        raise CheckpointError(f"checkpoint {path} does not fit this run's method/model ({type(e).__name__}: "
                              f"{detail} ...): it was written for another configuration. "
                              f"{_RETRAIN}") from e


def load_checkpoint(path: Path, method: Method) -> tuple[list[dict], float]:
    """Restore everything `save_checkpoint` wrote; returns (history, train seconds so far)."""
    state = read_checkpoint(path, method.device)
    restore(method, state, path)
    try:
        set_rng_state(state["rng"])
        return state["history"], state["train_seconds"]
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} lacks the training state needed to resume ({e!r}). {_RETRAIN}") from e


@contextmanager
def deferred_interrupt() -> Iterator[dict[str, bool]]:
    """Turn SIGINT into a flag checked between iterations (main thread only)."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def fit(
    method: Method,
    make_loader: Callable[[int], Iterable[dict[str, Any]]],
    iterations: int,
    run_dir: Path,
    validate: Callable[[Method], dict[str, float]] | None = None,
    eval_every: int = 0,
    checkpoint_every: int = 100,
    log_every: int = 10,
    progress: bool = True,
    stop_at: int | None = None,
    stage_context: Any = None,
) -> tuple[list[dict], float]:
    """Train `method` up to `iterations`, resuming from `run_dir/checkpoint.pt` if present.

    `make_loader(start)` yields the batches of iterations start, start+1, ...; `validate(method)`
    returns metrics logged every `eval_every` iterations. `stop_at` stops early (as an interruption
    would) after that many iterations, for tests. At a stage boundary of a multi-stage method
    (`Method.stage_starts`) it calls `method.begin_stage(k, stage_context)`, writes a checkpoint (kept
    as `stage<k>.pt` too) and rebuilds the loader for the new stage. Returns (history, training seconds).
    """
    ckpt = run_dir / CHECKPOINT
    history: list[dict] = []
    seconds = 0.0
    if ckpt.is_file():
        history, seconds = load_checkpoint(ckpt, method)
    start = method.iteration
    end = iterations if stop_at is None else min(iterations, stop_at)
    if start >= end:
        return history, seconds
    bar = tqdm(total=iterations, initial=start, desc=method.name, disable=not (progress and is_main()),
               dynamic_ncols=True)
    with deferred_interrupt() as interrupt:
        tick = time.perf_counter()
        while method.iteration < end:
            if method.stage_due():  # a stage boundary: enter the stage, checkpoint, new loader
                seconds += time.perf_counter() - tick
                enter_stage(method, stage_context, ckpt, history, seconds)
                tick = time.perf_counter()
            method.train()
            before = method.iteration
            seconds, tick = _run_stage(method, make_loader, iterations, end, ckpt, history, seconds, tick, validate,
                                       eval_every, checkpoint_every, log_every, bar, interrupt)
            if method.iteration == before:  # the loader ran dry
                break
    bar.close()
    method.eval()
    return history, seconds


def enter_stage(method: Method, context: Any, ckpt: Path, history: list[dict], seconds: float) -> None:
    """`method.begin_stage(k, context)` in eval mode (what it reports is logged as `stage_start`), then a
    checkpoint, also kept as `stage<k>.pt`."""
    import shutil

    from .stages import stage_checkpoint

    stage = method.stage + 1
    if context is None:
        raise ValueError(f"{method.name} begins stage {stage} at iteration {method.iteration} but the run has no "
                         "target to give it (multi-stage methods run in the UDA setting: --setting uda)")
    method.eval()
    info = method.begin_stage(stage, context) or {}
    if method.stage != stage:
        raise RuntimeError(f"{method.name}.begin_stage({stage}) did not set method.stage")
    history.append({"iteration": method.iteration, "stage_start": {"stage": stage, **info}})
    save_checkpoint(ckpt, method, history, seconds)
    if is_main():
        shutil.copyfile(ckpt, ckpt.with_name(stage_checkpoint(stage)))


def _run_stage(method: Method, make_loader: Callable[[int], Iterable[dict[str, Any]]], iterations: int, end: int,
               ckpt: Path, history: list[dict], seconds: float, tick: float,
               validate: Callable[[Method], dict[str, float]] | None, eval_every: int, checkpoint_every: int,
               log_every: int, bar: Any, interrupt: dict[str, bool]) -> tuple[float, float]:
    """Iterations from `method.iteration` until `end` or the next stage boundary; returns (seconds, tick)."""
    for batch in make_loader(method.iteration):
        logs = method.training_step(to_device(batch, method.device))
        method.end_iteration()
        t = method.iteration
        bar.update(1)
        if t % log_every == 0 or t == end:
            history.append({"iteration": t, **{k: round(v, 5) for k, v in logs.items()}})
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "seg")})
        if validate is not None and eval_every and (t % eval_every == 0 or t == iterations):
            method.eval()
            history.append({"iteration": t, **validate(method)})
            method.train()
        if interrupt["stop"] or t % checkpoint_every == 0 or t == end:
            seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            save_checkpoint(ckpt, method, history, seconds)
        if interrupt["stop"]:
            bar.close()
            raise KeyboardInterrupt(f"interrupted at iteration {t}; checkpoint saved to {ckpt}, rerun to resume")
        if t >= end or method.stage_due():
            break
    return seconds, tick


def write_log(path: Path, history: list[dict]) -> None:
    from ..io import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(h) + "\n" for h in history).encode())
