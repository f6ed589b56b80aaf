"""Training and inference cost of each method relative to ERM, measured in one process on identical batches.

For every method: parameters (all trainable tensors and buffers the method keeps), seconds per
training iteration, seconds per inference batch, and their ratios to ERM. Methods are timed in
interleaved rounds so that drifting machine load hits all of them alike. Writes benchmarks/results/methods_speed.json.

A method may carry hyperparameters: `pinthemem:first_order=False` times the paper's second-order
meta-gradient.

In the UDA setting (`--setting uda`) every training batch also carries the target images the method
adapts to (`target_image`, as many as source images), and the reference is usually `source_only`.
MRNet is timed in its Stage I (Stage II's step is a plain self-training step, cheaper than Stage I's).

Usage: python benchmarks/bench_methods.py [--methods erm mldg pinthemem pinthemem:first_order=False]
                                          [--preset quick] [--setting dg] [--device auto] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dgnb.cli import parse_value

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """'pinthemem:first_order=False,use_coh=true' -> ('pinthemem', {'hparams.first_order': False, ...});
    values are read as `dgnb train --set` reads them (`dgnb.cli.parse_value`)."""
    method, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad method spec {spec!r}: write METHOD:HPARAM=VALUE[,HPARAM=VALUE]")
        overrides[f"hparams.{key}"] = parse_value(value)
    return method, overrides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["erm", "mldg", "pinthemem", "pinthemem:first_order=False"],
                   help="method specs; the first is the reference the ratios are taken to")
    p.add_argument("--preset", default="quick")
    p.add_argument("--setting", default="dg", choices=("dg", "uda"))
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="training steps per round")
    p.add_argument("--infer-batches", type=int, default=20, help="inference batches (of 8 images) per round")
    p.add_argument("--out", default=str(RESULTS / "methods_speed.json"))
    a = p.parse_args()
    from dgnb.config import preset
    from dgnb.engine.bench import machine_info
    from dgnb.engine.runs import make_method
    from dgnb.engine.train import resolve_device
    from dgnb.io import atomic_write_json

    device = resolve_device(a.device)
    names = a.methods
    cfgs = {}
    for spec in names:
        method, hp = parse_spec(spec)
        cfgs[spec] = preset(a.preset, method, 0, setting=a.setting, **{"train.device": str(device)}, **hp)
    methods = {m: make_method(c, device) for m, c in cfgs.items()}
    d = cfgs[names[0]].data
    n = d.batch_per_domain * len(d.sources)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(n, 3, *d.crop, generator=g).to(device),
             "label": torch.randint(0, 19, (n, *d.crop), generator=g).to(device),
             "domain": torch.arange(len(d.sources)).repeat_interleave(d.batch_per_domain).to(device)}
    if a.setting == "uda":
        batch["target_image"] = torch.rand(d.target_batch or n, 3, *d.crop, generator=g).to(device)
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
            with torch.no_grad():
                for _ in range(a.infer_batches):
                    meth.predict(eval_images)
            _sync(device)
            infer_t[m].append((time.perf_counter() - t) / a.infer_batches)
    base_train, base_infer = statistics.median(train_t[names[0]]), statistics.median(infer_t[names[0]])
    base_params = sum(q.numel() for q in methods[names[0]].model.parameters())
    rows = {}
    for m in names:
        params = sum(q.numel() for q in methods[m].parameters())
        tr, inf = statistics.median(train_t[m]), statistics.median(infer_t[m])
        rows[m] = {"parameters": params, "parameters_vs_erm": round(params / base_params, 4),
                   "train_s_per_iter": round(tr, 4), "train_vs_erm": round(tr / base_train, 3),
                   "infer_s_per_batch8": round(inf, 4), "infer_vs_erm": round(inf / base_infer, 3)}
    out = {"preset": a.preset, "setting": a.setting, "reference": names[0], "device": str(device), "machine": machine_info(), "threads": torch.get_num_threads(),
           "batch": n, "crop": list(d.crop), "eval_size": list(d.base_size), "methods": rows}
    atomic_write_json(a.out, out)
    print(f"| method | params | vs ref | train s/iter | vs ref | inference s/8 images | vs ref |  ({device})")
    print("|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['parameters']:,} | {r['parameters_vs_erm']:.3f} | {r['train_s_per_iter']:.3f} | "
              f"{r['train_vs_erm']:.2f} | {r['infer_s_per_batch8']:.4f} | {r['infer_vs_erm']:.3f} |")


if __name__ == "__main__":
    main()
