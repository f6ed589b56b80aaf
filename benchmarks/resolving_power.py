"""How many seeds does a comparison need? The quick preset chosen for resolving power.

A claim "method A beats B" is a paired (same-seed) 95% interval over the seeds that excludes zero
(`dgnb.analysis.paired_difference`). Its half-width is t_{0.975, n-1} · sd_d / √n, where sd_d is the
seed standard deviation of the paired difference d = A − B: the smallest difference n seeds can
resolve. This script measures sd_d (MLDG − ERM, mean target mIoU) and the seed sd of each method's
mean target mIoU under the levers that can shrink them, within the CPU budget:

- width of F (`model.head_channels`), batch per domain, training length: one set of runs per setting
  (`--levers`, from LEVERS below);
- weight averaging: every run keeps an exponential moving average of its weights (`train.ema_decay`),
  and is scored both with the final iterate ("raw") and with the average ("ema");
- evaluation set size: every target is scored on its first 150 and on all 300 val images (per-image
  confusion matrices, summed over the subset).

All sets use seeds 0..4 and the same code; the per-run records are written to the results file after
each run (the script resumes from it). Output: benchmarks/results/resolving_power.{json,md}.

Usage: python benchmarks/resolving_power.py [--levers C48 C128 ...] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("erm", "mldg")                          # the lever study: ERM and MLDG
PAIRS = (("mldg", "erm"), ("pinthemem", "erm"), ("pinthemem", "mldg"))  # paired differences reported
EVAL_SIZES = (150, 300)
COMMON = {"train.ema_decay": 0.995, "data.city": {"train": 600, "val": 300, "size": [128, 256], "seed": 0}}
# name -> config overrides of the quick preset (on top of COMMON)
LEVERS: dict[str, dict[str, Any]] = {
    "C48": {"model.head_channels": 48},                                  # the quick preset of stop 7
    "C128": {"model.head_channels": 128},                                # wider F
    "C48-b3": {"model.head_channels": 48, "data.batch_per_domain": 3},   # larger batch
    "C48-1800": {"model.head_channels": 48, "train.iterations": 1800},   # longer training
}


@torch.no_grad()
def target_confusions(method, cfg, weights: str) -> dict[str, torch.Tensor]:
    """Per-image confusion matrices (N, K, K) of every target, with the raw or the averaged weights."""
    from dgnb.data.loaders import eval_loader
    from dgnb.data.transforms import eval_transform
    from dgnb.engine.evaluate import per_image_confusion
    from dgnb.engine.runs import domain_set

    out = {}
    ctx = method.averaged() if weights == "ema" else torch.no_grad()
    with ctx:
        for name in cfg.data.targets:
            ds = domain_set(cfg, name, "val", eval_transform(cfg.data.eval_size), limit=max(EVAL_SIZES))
            cms = [per_image_confusion(method.predict(b["image"]).argmax(1), b["label"])
                   for b in eval_loader(ds, 16)]
            out[name] = torch.cat(cms)
    return out


def record(lever: str, method_name: str, seed: int) -> dict[str, Any]:
    from dgnb.config import preset
    from dgnb.engine.evaluate import SegMetrics
    from dgnb.engine.runs import make_method, train
    from dgnb.engine.train import CHECKPOINT, resolve_device

    cfg = preset("quick", method_name, seed, **COMMON, **LEVERS[lever])
    run = train(cfg, progress=False)
    method = make_method(cfg, resolve_device("cpu"))
    state = torch.load(run.dir / CHECKPOINT, map_location="cpu", weights_only=False)
    method.load_checkpoint_state(state["method"], weights_only=True)
    method.eval()
    rec = {"lever": lever, "method": method_name, "seed": seed, "train_seconds": run.metrics["train_seconds"],
           "run_dir": str(run.dir)}
    for weights in ("raw", "ema"):
        cms = target_confusions(method, cfg, weights)
        for n in EVAL_SIZES:
            per_target = {t: SegMetrics(cm[:n].sum(0)).miou for t, cm in cms.items()}
            rec[f"{weights}{n}"] = {"targets": {t: round(v, 3) for t, v in per_target.items()},
                                   "mean_target": round(statistics.mean(per_target.values()), 3)}
    return rec


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per lever and scoring: each method's seed mean and sd of the mean target mIoU, and for every pair of
    PAIRS present the paired difference, its sd, 95% half-width and the difference detectable at 5 seeds."""
    from dgnb.analysis import detectable_difference, paired_difference

    out = {}
    for lever in dict.fromkeys(r["lever"] for r in records):
        rs = {(r["method"], r["seed"]): r for r in records if r["lever"] == lever}
        methods = list(dict.fromkeys(m for m, _ in rs))
        seeds = {m: sorted(s for (mm, s) in rs if mm == m) for m in methods}
        row: dict[str, Any] = {"seeds": seeds, "train_seconds": {
            m: statistics.mean(rs[(m, s)]["train_seconds"] for s in seeds[m]) for m in methods}}
        for variant in [f"{w}{n}" for w in ("raw", "ema") for n in EVAL_SIZES]:
            v: dict[str, Any] = {}
            for m in methods:
                vals = [rs[(m, s)][variant]["mean_target"] for s in seeds[m]]
                v[f"{m}_mean"] = statistics.mean(vals)
                v[f"{m}_sd"] = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            for a, b in PAIRS:
                common = sorted(set(seeds.get(a, [])) & set(seeds.get(b, [])))
                if len(common) < 2:
                    continue
                diff = paired_difference([rs[(a, s)][variant]["mean_target"] for s in common],
                                         [rs[(b, s)][variant]["mean_target"] for s in common])
                v[f"{a}-{b}"] = {"n": len(common), "mean": diff["mean"], "sd": diff["sd"], "low": diff["low"],
                                 "high": diff["high"], "half_width": diff["half_width"],
                                 "excludes_zero": diff["excludes_zero"],
                                 "detectable_at_5": detectable_difference(diff["sd"], 5)}
            row[variant] = v
        out[lever] = row
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| setting | scoring | pair | seeds | mean target (first, second) | sd of the paired difference | "
             "paired difference [95% CI] | detectable at 5 seeds |", "|" + "---|" * 8]
    for lever, row in summary.items():
        for variant in [f"{w}{n}" for w in ("raw", "ema") for n in EVAL_SIZES]:
            v = row[variant]
            for a, b in PAIRS:
                d = v.get(f"{a}-{b}")
                if d is None:
                    continue
                mark = " ✓" if d["excludes_zero"] else ""
                lines.append(
                    f"| {lever} | {'final weights' if variant.startswith('raw') else 'EMA 0.995'}, {variant[3:]} "
                    f"img/target | {a} − {b} | {d['n']} | {v[f'{a}_mean']:.1f} ± {v[f'{a}_sd']:.1f}, "
                    f"{v[f'{b}_mean']:.1f} ± {v[f'{b}_sd']:.1f} | {d['sd']:.2f} | {d['mean']:+.2f} "
                    f"[{d['low']:+.2f}, {d['high']:+.2f}]{mark} | {d['detectable_at_5']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="methods per lever (pinthemem adds the memory method, scored the same ways)")
    p.add_argument("--out", default=str(RESULTS / "resolving_power.json"))
    p.add_argument("--bench-out", help="also write the first lever's method comparison in dgnb bench's JSON format")
    a = p.parse_args()
    from dgnb.engine.bench import machine_info
    from dgnb.io import atomic_write_json

    out = Path(a.out)
    records = json.loads(out.read_text())["records"] if out.is_file() else []
    done = {(r["lever"], r["method"], r["seed"]) for r in records}
    for lever in a.levers:
        for seed in a.seeds:  # seed-major: a partial file already pairs ERM and MLDG
            for m in a.methods:
                if (lever, m, seed) in done:
                    continue
                t0 = time.perf_counter()
                records.append(record(lever, m, seed))
                summary = summarize(records)
                atomic_write_json(out, {"machine": machine_info(), "common": COMMON, "levers": LEVERS,
                                        "records": records, "summary": summary})
                print(f"{lever} {m} seed {seed}: {records[-1]['ema300']['mean_target']:.2f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarize(records)
    (out.with_suffix(".md")).write_text(markdown(summary) + "\n")
    print(markdown(summary))
    if a.bench_out:
        write_bench(records, a.levers[0], Path(a.bench_out))


def write_bench(records: list[dict[str, Any]], lever: str, path: Path) -> None:
    """The method comparison of `lever` in `dgnb bench`'s JSON format, scored as the quick preset scores
    (final weights, all 300 val images per target), with paired intervals to ERM and Pin the Memory − MLDG.

    The runs kept an EMA of their weights (which does not change training) and are scored here with their
    final weights; `source_val_miou` is the runs' own metrics.json value (EMA weights)."""
    from dgnb.analysis import compare_runs
    from dgnb.engine.bench import machine_info
    from dgnb.io import atomic_write_json

    runs = []
    for r in records:
        if r["lever"] != lever:
            continue
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        runs.append({"method": r["method"], "seed": r["seed"], "preset": "quick", "scoring": "final weights, 300 img",
                     "target_miou": {t: round(v, 2) for t, v in r["raw300"]["targets"].items()},
                     "mean_target_miou": round(r["raw300"]["mean_target"], 2),
                     "source_val_miou": metrics["source_val_miou"], "source_val_scoring": "EMA weights",
                     "train_seconds": r["train_seconds"], "run_dir": r["run_dir"]})
    comparisons = compare_runs(runs, "erm")
    if {"mldg", "pinthemem"} <= {r["method"] for r in runs}:
        comparisons["pinthemem vs mldg"] = compare_runs([r for r in runs if r["method"] != "erm"], "mldg")["pinthemem"]
    atomic_write_json(path, {"preset": "quick", "machine": machine_info(), "runs": runs, "reference": "erm",
                             "comparisons": comparisons})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
