"""Training and inference cost of each method relative to ERM, measured in one process on identical batches.

For every method: parameters (total, and at inference), seconds per training iteration, seconds per
inference batch, and their ratios to ERM. Methods are timed in interleaved rounds so that drifting
machine load hits all of them alike. Writes benchmarks/results/methods_speed.json.

Usage: python benchmarks/bench_methods.py [--methods erm,mldg,pinthemem] [--preset quick] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="erm,mldg,pinthemem")
    p.add_argument("--preset", default="quick")
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="training steps (and inference batches) per round")
    p.add_argument("--out", default=str(RESULTS / "methods_speed.json"))
    a = p.parse_args()
    from dgnb.config import preset
    from dgnb.engine.runs import make_method
    from dgnb.engine.train import resolve_device
    from dgnb.io import atomic_write_json

    device = resolve_device(a.device)
    names = a.methods.split(",")
    cfgs = {m: preset(a.preset, m, 0, **{"train.device": str(device)}) for m in names}
    methods = {m: make_method(c, device) for m, c in cfgs.items()}
    d = cfgs[names[0]].data
    n = d.batch_per_domain * len(d.sources)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(n, 3, *d.crop, generator=g).to(device),
             "label": torch.randint(0, 19, (n, *d.crop), generator=g).to(device),
             "domain": torch.arange(len(d.sources)).repeat_interleave(d.batch_per_domain).to(device)}
    eval_images = torch.rand(8, 3, *tuple(d.base_size), generator=g).to(device)
    train_t = {m: [] for m in names}
    infer_t = {m: [] for m in names}
    for m in names:  # warm-up (and memory initialisation for methods that do it lazily)
        methods[m].train()
        methods[m].training_step(batch)
        methods[m].eval()
        methods[m].predict(eval_images)
    for _ in range(a.rounds):
        for m in names:
            meth = methods[m].train()
            _sync(device)
            t = time.perf_counter()
            for _ in range(a.steps):
                meth.training_step(batch)
            _sync(device)
            train_t[m].append((time.perf_counter() - t) / a.steps)
            meth.eval()
            t = time.perf_counter()
            for _ in range(a.steps):
                meth.predict(eval_images)
            _sync(device)
            infer_t[m].append((time.perf_counter() - t) / a.steps)
    base_train, base_infer = statistics.median(train_t["erm"]), statistics.median(infer_t["erm"])
    base_params = sum(q.numel() for q in methods["erm"].model.parameters())
    rows = {}
    for m in names:
        params = sum(q.numel() for q in methods[m].parameters())
        tr, inf = statistics.median(train_t[m]), statistics.median(infer_t[m])
        rows[m] = {"parameters": params, "parameters_vs_erm": round(params / base_params, 4),
                   "train_s_per_iter": round(tr, 4), "train_vs_erm": round(tr / base_train, 3),
                   "infer_s_per_batch8": round(inf, 4), "infer_vs_erm": round(inf / base_infer, 3)}
    out = {"preset": a.preset, "device": str(device), "threads": torch.get_num_threads(),
           "batch": n, "crop": list(d.crop), "eval_size": list(d.base_size), "methods": rows}
    atomic_write_json(a.out, out)
    print(f"| method | params | vs ERM | train s/iter | vs ERM | inference s/8 images | vs ERM |  ({device})")
    print("|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['parameters']:,} | {r['parameters_vs_erm']:.3f} | {r['train_s_per_iter']:.3f} | "
              f"{r['train_vs_erm']:.2f} | {r['infer_s_per_batch8']:.4f} | {r['infer_vs_erm']:.3f} |")


if __name__ == "__main__":
    main()
