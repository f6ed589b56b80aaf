"""Calibrate the embedded city: is the shift graded the way the course needs?

For each seed, ERM is trained on the source domains (quick preset) and evaluated on held-out source
images and on every target; for each target an *oracle* (same recipe, trained on that target's own
train split) measures whether the task is still solvable there (the shift must be style, not an
impossible task). Writes `benchmarks/results/calibrate_city.json` and `.md` with the checks of the
foundation issue:

    source val >= 50 mIoU; near drop in [5, 20]; far drop >= 20 and far mIoU > 15;
    geometric drop >= 5; oracle >= source val - 5.

Usage:  python benchmarks/calibrate_city.py [--seeds 0 1 2] [--oracle-seeds 0] [--jobs 1] [--preset quick]
Runs come from (and go to) the run cache, so a rerun only trains what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _train(job: tuple[str, int, str | None, int, dict]) -> dict:
    preset_name, seed, oracle_of, threads, extra = job
    import torch

    torch.set_num_threads(threads)
    from dgnb.config import preset
    from dgnb.engine.runs import train

    over = dict(extra)
    if oracle_of is not None:  # same recipe and total batch, trained on the target itself
        base = preset(preset_name, **extra)
        over |= {"data.sources": [oracle_of], "data.targets": [],
                "data.batch_per_domain": base.data.batch_per_domain * len(base.data.sources)}
    cfg = preset(preset_name, "erm", seed, **over)
    t = time.time()
    run = train(cfg, progress=False)
    m = dict(run.metrics)
    m["oracle_of"] = oracle_of
    m["run_dir"] = str(run.dir)
    m["wall_seconds"] = round(time.time() - t, 1)
    return m


def probe_domains(specs: list[str], cfg, erm: list[dict]) -> dict:
    """Evaluate each ERM run on ad-hoc domains `NAME=JSON_KNOBS` (generated val split only)."""
    from dgnb.data.city import Domain, ensure_city
    from dgnb.engine.runs import Run, evaluate_domains

    doms = {}
    for spec in specs:
        name, knobs = spec.split("=", 1)
        doms[name] = Domain(name, "calibration probe", "probe", json.loads(knobs))
    c = cfg.data.city
    ensure_city(cfg.data.root, list(doms.values()), {"val": c["val"]}, c["size"], c["seed"], progress=False)
    scores = {n: [] for n in doms}
    for r in erm:
        run = Run.open(r["run_dir"])
        res = evaluate_domains(run.load_method(), run.config, list(doms))
        for n, m in res.items():
            scores[n].append(round(m.miou, 2))
    return {n: {"knobs": doms[n].knobs, "miou": scores[n], "mean": round(statistics.mean(scores[n]), 2)} for n in doms}


def checks(erm: list[dict], oracles: list[dict], roles: dict[str, str]) -> list[dict]:
    mean = statistics.mean
    src = mean(r["source_val_miou"] for r in erm)
    rows = [{"check": "source val mIoU >= 50", "value": round(src, 1), "ok": src >= 50}]
    for d, role in roles.items():
        if role == "source":
            continue
        tgt = mean(r["target_miou"][d] for r in erm)
        drop = src - tgt
        if role == "near":
            rows.append({"check": f"{d}: drop in [5, 20]", "value": round(drop, 1), "ok": 5 <= drop <= 20})
        elif role == "far":
            rows.append({"check": f"{d}: drop >= 20", "value": round(drop, 1), "ok": drop >= 20})
            rows.append({"check": f"{d}: mIoU > 15", "value": round(tgt, 1), "ok": tgt > 15})
        elif role == "geometric":
            rows.append({"check": f"{d}: drop >= 5", "value": round(drop, 1), "ok": drop >= 5})
        ors = [o["source_val_miou"] for o in oracles if o["oracle_of"] == d]
        if ors:
            gap = src - mean(ors)
            rows.append({"check": f"{d}: oracle within 5 of source val (gap)", "value": round(gap, 1), "ok": gap <= 5})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--oracle-seeds", type=int, nargs="*", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    p.add_argument("--out", default=str(RESULTS / "calibrate_city"))
    p.add_argument("--probe", nargs="*", default=[], metavar="NAME=JSON_KNOBS",
                   help="extra ad-hoc domains to evaluate the ERM runs on (to place a target's severity)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides for every run")
    args = p.parse_args(argv)

    from dgnb.config import preset
    from dgnb.data.city import DOMAINS, ensure_city
    from dgnb.engine.runs import prepare_data

    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = preset(args.preset, **extra)
    prepare_data(cfg)
    targets = cfg.data.targets
    c = cfg.data.city
    ensure_city(cfg.data.root, targets, {"train": c["train"], "val": c["val"]}, c["size"], c["seed"])  # oracles
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(args.preset, s, None, threads, extra) for s in args.seeds]
    jobs += [(args.preset, s, t, threads, extra) for t in targets for s in args.oracle_seeds]
    t0 = time.time()
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_train, jobs))
    else:
        results = [_train(j) for j in jobs]
    erm = [r for r in results if r["oracle_of"] is None]
    probes = probe_domains(args.probe, cfg, erm) if args.probe else {}
    oracles = [r for r in results if r["oracle_of"] is not None]
    roles = {d: DOMAINS[d].role for d in cfg.data.sources + targets}
    rows = checks(erm, oracles, roles)
    report = {"probes": probes, "preset": args.preset, "overrides": extra, "seeds": args.seeds, "device": erm[0]["device"], "roles": roles,
              "erm": erm, "oracles": oracles, "checks": rows, "total_seconds": round(time.time() - t0, 1)}
    from dgnb.io import atomic_write_bytes, atomic_write_json

    atomic_write_json(args.out + ".json", report)
    md = [f"# City calibration ({args.preset} preset, ERM seeds {args.seeds}, device {report['device']})", "",
          "| domain | role | ERM mIoU (mean ± std) | oracle mIoU |", "|---|---|---|---|"]
    for d, role in roles.items():
        vals = [r["source_domain_miou"][d] if role == "source" else r["target_miou"][d] for r in erm]
        ors = [o["source_val_miou"] for o in oracles if o["oracle_of"] == d]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        md.append(f"| {d} | {role} | {statistics.mean(vals):.1f} ± {sd:.1f} | "
                  f"{statistics.mean(ors):.1f} |" if ors else f"| {d} | {role} | {statistics.mean(vals):.1f} ± {sd:.1f} | - |")
    src = [r["source_val_miou"] for r in erm]
    md += [f"| all sources (val) | source | {statistics.mean(src):.1f} | - |", "", "| check | value | ok |", "|---|---|---|"]
    md += [f"| {r['check']} | {r['value']} | {'yes' if r['ok'] else 'NO'} |" for r in rows]
    md += [f"| probe {k} | {v['knobs']} | {v['miou']} |" for k, v in probes.items()]
    md += ["", f"ERM train seconds: {[r['train_seconds'] for r in erm]}"]
    atomic_write_bytes(args.out + ".md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
