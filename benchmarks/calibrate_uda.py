"""Calibrate the UDA setting on the embedded city: how much is there to recover on each notebook pair?

For each source -> target pair the notebooks use (`dgnb.config.UDA_PAIRS`: one near, one far target), two
references bound what adaptation can do (docs/adaptation.md, 'The UDA setting'):

- source only: the UDA recipe (DeepLab-v2 + auxiliary head, 10x head lr) trained on the labelled source
  alone, scored on the target's val split (one run per seed serves every pair of that source);
- target oracle: the same recipe trained on the target's *labelled* train split, scored on the same val
  split: the accuracy a target model of this size reaches.

The gap between them is what adaptation can recover. Writes `benchmarks/results/calibrate_uda.json` and
`.md` with the checks: source-only target mIoU > 5 (the model does transfer something) and gap >= 10.

Usage:  python benchmarks/calibrate_uda.py [--preset quick] [--seeds 0 1 2] [--oracle-seeds 0] [--pairs near far]
Runs come from (and go to) the run cache, so a rerun only trains what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def source_only_config(preset_name: str, seed: int, source: str, extra: dict):
    from dgnb.config import preset

    return preset(preset_name, "source_only", seed, setting="uda", **{"data.sources": [source], **extra})


def oracle_config(preset_name: str, seed: int, target: str, extra: dict):
    """The same recipe trained on the target's labelled train split (evaluated on the other domains too)."""
    from dgnb.config import preset

    base = preset(preset_name, "source_only", seed, setting="uda", **extra)
    others = [d for d in base.data.sources + base.data.targets if d != target]
    return preset(preset_name, "source_only", seed, setting="uda",
                  **{"data.sources": [target], "data.targets": others, "data.uda_target": None, **extra})


def _run(cfg) -> dict:
    from dgnb.engine.runs import train

    t = time.time()
    run = train(cfg, progress=False)
    return {**run.metrics, "run_dir": str(run.dir), "wall_seconds": round(time.time() - t, 1)}


def _stats(values: list[float]) -> dict:
    return {"values": values, "mean": round(statistics.mean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--oracle-seeds", type=int, nargs="*", default=[0])
    p.add_argument("--pairs", nargs="+", default=["near", "far"], help="keys of dgnb.config.UDA_PAIRS")
    p.add_argument("--out", default=str(RESULTS / "calibrate_uda"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides for every run")
    args = p.parse_args(argv)

    from dgnb.config import UDA_PAIRS
    from dgnb.data.city import DOMAINS, ensure_city
    from dgnb.engine.runs import prepare_data
    from dgnb.io import atomic_write_bytes, atomic_write_json

    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    pairs = {k: UDA_PAIRS[k] for k in args.pairs}
    t0 = time.time()
    source_runs: dict[str, list[dict]] = {}
    for source in dict.fromkeys(s for s, _ in pairs.values()):
        cfg = source_only_config(args.preset, args.seeds[0], source, extra)
        prepare_data(cfg)
        c = cfg.data.city
        targets = [t for s, t in pairs.values() if s == source and t in DOMAINS]
        ensure_city(cfg.data.root, targets, {"train": c["train"], "val": c["val"]}, c["size"], c["seed"])  # oracles
        source_runs[source] = [_run(source_only_config(args.preset, s, source, extra)) for s in args.seeds]
    oracle_runs = {t: [_run(oracle_config(args.preset, s, t, extra)) for s in args.oracle_seeds]
                   for _, t in pairs.values()}
    rows, checks = [], []
    for key, (source, target) in pairs.items():
        so = _stats([r["target_miou"][target] for r in source_runs[source]])
        src_val = _stats([r["source_val_miou"] for r in source_runs[source]])
        oracle = _stats([r["source_val_miou"] for r in oracle_runs[target]]) if oracle_runs[target] else None
        gap = round(oracle["mean"] - so["mean"], 2) if oracle else None
        rows.append({"pair": key, "source": source, "target": target, "role": DOMAINS[target].role,
                     "source_val": src_val, "source_only": so, "oracle": oracle, "gap": gap})
        checks.append({"check": f"{key} ({source} -> {target}): source-only target mIoU > 5", "value": so["mean"],
                       "ok": so["mean"] > 5})
        if gap is not None:
            checks.append({"check": f"{key} ({source} -> {target}): oracle - source only >= 10", "value": gap,
                           "ok": gap >= 10})
    report = {"preset": args.preset, "overrides": extra, "seeds": args.seeds, "oracle_seeds": args.oracle_seeds,
              "pairs": rows, "checks": checks, "source_only_runs": source_runs, "oracle_runs": oracle_runs,
              "total_seconds": round(time.time() - t0, 1)}
    atomic_write_json(args.out + ".json", report)
    md = [f"# UDA calibration ({args.preset} preset; source-only seeds {args.seeds}, oracle seeds "
          f"{args.oracle_seeds})", "",
          "| pair | source -> target | source val | source only on target | target oracle | gap (to recover) |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        o = f"{r['oracle']['mean']:.1f}" if r["oracle"] else "-"
        md.append(f"| {r['pair']} | {r['source']} -> {r['target']} ({r['role']}) | {r['source_val']['mean']:.1f} | "
                  f"{r['source_only']['mean']:.1f} ± {r['source_only']['std']:.1f} | {o} | "
                  f"{r['gap'] if r['gap'] is not None else '-'} |")
    md += ["", "| check | value | ok |", "|---|---|---|"]
    md += [f"| {c['check']} | {c['value']} | {'yes' if c['ok'] else 'NO'} |" for c in checks]
    seconds = [r["train_seconds"] for rs in source_runs.values() for r in rs]
    md += ["", f"source-only train seconds: {seconds}; total {report['total_seconds']} s"]
    atomic_write_bytes(args.out + ".md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
