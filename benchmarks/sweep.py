"""Train one method under several config variants in parallel and print source/target mIoU for each.

A tool for calibrating presets (how many iterations, which learning rate...). Each variant is a
JSON object of dotted overrides, e.g.

    python benchmarks/sweep.py --jobs 4 '{}' '{"train.iterations": 1200}' '{"optim.lr": 0.05}'

Results go to benchmarks/results/sweep.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _run(job: tuple[str, str, int, dict, int]) -> dict:
    preset_name, method, seed, over, threads = job
    import torch

    torch.set_num_threads(threads)
    from dgnb.config import preset
    from dgnb.engine.runs import train

    t = time.time()
    run = train(preset(preset_name, method, seed, **over), progress=False)
    m = run.metrics
    return {"overrides": over, "source_val_miou": m["source_val_miou"], "target_miou": m["target_miou"],
            "mean_target_miou": m["mean_target_miou"], "train_seconds": m["train_seconds"],
            "wall": round(time.time() - t, 1), "per_class_source": m["per_class_iou"][m["sources"][0]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="JSON objects of dotted overrides")
    p.add_argument("--preset", default="quick")
    p.add_argument("--method", default="erm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sweep.json"))
    a = p.parse_args()
    from dgnb.config import preset
    from dgnb.engine.runs import prepare_data

    prepare_data(preset(a.preset, a.method, a.seed, **json.loads(a.variants[0])))
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    jobs = [(a.preset, a.method, a.seed, json.loads(v), threads) for v in a.variants]
    with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_run, jobs))
    from dgnb.io import atomic_write_json

    atomic_write_json(a.out, results)
    for r in results:
        tg = " ".join(f"{k}={v:.1f}" for k, v in r["target_miou"].items())
        print(f"{json.dumps(r['overrides'])}: src {r['source_val_miou']:.1f} | {tg} | {r['train_seconds']}s")
        print("   ", " ".join(f"{k[:6]}={v:.0f}" for k, v in r["per_class_source"].items()))


if __name__ == "__main__":
    main()
