"""What each resolving-power lever costs: time per training iteration of ERM and MLDG, in one run.

`benchmarks/resolving_power.py` measures what the levers buy (the seed sd of the paired difference);
this script measures what they cost, so the quick preset can be chosen *within the budget*: ERM's
quick training at most 3 minutes on 2 cores of the slower reference machine, every method at most 6.

For every lever of `resolving_power.LEVERS` and every method it builds the method on the quick preset
with the lever's overrides, holds a few batches in memory and times `training_step` + `end_iteration`.
The settings are timed in interleaved rounds (lever 1, lever 2, ..., then again), so a slow phase of
the machine hits all of them alike; the figure is the median over rounds. The projected training time
of a quick run is the step-time ratio to the first setting's ERM times a reference ERM quick training
time (`--erm-seconds`, default 190 s: the slower reference machine's measured quick ERM training),
so the projection does not depend on how busy the machine was during the timing; the ratios come from
interleaved rounds, which a busy machine slows alike.

Writes benchmarks/results/lever_cost.{json,md}.

Usage: python benchmarks/lever_cost.py [--rounds 5] [--steps 8] [--methods erm mldg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from resolving_power import COMMON, LEVERS

RESULTS = Path(__file__).resolve().parent / "results"
ERM_BUDGET_S = 180.0    # ERM quick training on the slower reference machine
METHOD_BUDGET_S = 360.0  # any method's quick run


def setting(lever: str, method_name: str):
    """(config, method in train mode, batches held in memory) of one lever and method."""
    from dgnb.config import preset
    from dgnb.data.loaders import train_loader
    from dgnb.data.transforms import BatchAugment
    from dgnb.engine.runs import domain_set, make_method, prepare_data
    from dgnb.engine.train import resolve_device

    overrides = {k: v for k, v in COMMON.items() if k != "train.ema_decay"}
    cfg = preset("quick", method_name, 0, **overrides, **LEVERS[lever])
    prepare_data(cfg)
    d, device = cfg.data, resolve_device(cfg.train.device)
    sources = [domain_set(cfg, s, "train", None, i, d.train_limit, d.cache_images) for i, s in enumerate(d.sources)]
    augment = BatchAugment(tuple(d.crop), tuple(d.base_size), tuple(d.scale), d.color_jitter)
    batches = list(train_loader(sources, augment, d.batch_per_domain, cfg.seed, 0, 6, 0, device=device))
    method = make_method(cfg, device)
    method.train()
    return cfg, method, batches


def time_steps(method, batches: list[dict[str, Any]], steps: int) -> float:
    """Seconds per iteration over `steps` iterations (batches cycled)."""
    t0 = time.perf_counter()
    for t in range(steps):
        method.training_step(batches[t % len(batches)])
        method.end_iteration()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    p.add_argument("--methods", nargs="+", default=["erm", "mldg"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="timed iterations per setting and round")
    p.add_argument("--erm-seconds", type=float, default=190.0,
                   help="quick ERM training seconds on the slower reference machine (the projection's unit)")
    p.add_argument("--out", default=str(RESULTS / "lever_cost.json"))
    a = p.parse_args()
    from dgnb.engine.bench import machine_info
    from dgnb.io import atomic_write_json

    settings = {(lv, m): setting(lv, m) for lv in a.levers for m in a.methods}
    for _, method, batches in settings.values():  # warm-up (allocator, first-call kernels)
        time_steps(method, batches, 2)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in settings}
    for r in range(a.rounds):
        for k, (_, method, batches) in settings.items():
            times[k].append(time_steps(method, batches, a.steps))
        print(f"round {r + 1}/{a.rounds}", flush=True)

    if "erm" not in a.methods:
        raise SystemExit("--methods must include erm: the ratios and projections are relative to ERM's step")
    base = statistics.median(times[(a.levers[0], "erm")])
    rows = []
    for (lever, m), ts in times.items():
        cfg = settings[(lever, m)][0]
        step = statistics.median(ts)
        base_iterations = settings[(a.levers[0], "erm")][0].train.iterations
        projected = a.erm_seconds * (step / base) * cfg.train.iterations / base_iterations
        budget = ERM_BUDGET_S if m == "erm" else METHOD_BUDGET_S
        rows.append({"lever": lever, "method": m, "iterations": cfg.train.iterations,
                     "batch_per_domain": cfg.data.batch_per_domain, "head_channels": cfg.model.head_channels,
                     "step_ms": round(1000 * step, 1), "step_ms_rounds": [round(1000 * t, 1) for t in ts],
                     "step_vs_first_lever_erm": round(step / base, 3),
                     "projected_train_s": round(projected, 1), "budget_s": budget,
                     "within_budget_here": projected <= budget})
    out = {"machine": machine_info(), "reference_erm_seconds": a.erm_seconds, "rounds": a.rounds, "steps": a.steps, "rows": rows}
    atomic_write_json(Path(a.out), out)
    md = ["| setting | method | iterations | batch/domain | F channels | ms per step (median of "
          f"{a.rounds}) | × first setting's ERM step | projected quick training (s) | budget (s) |",
          "|" + "---|" * 9]
    for r in rows:
        md.append(f"| {r['lever']} | {r['method']} | {r['iterations']} | {r['batch_per_domain']} | "
                  f"{r['head_channels']} | {r['step_ms']:.0f} | {r['step_vs_first_lever_erm']:.2f} | "
                  f"{r['projected_train_s']:.0f}{'' if r['within_budget_here'] else ' (over)'} | {r['budget_s']:.0f} |")
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
