"""Pin the Memory ablations (paper Tables 5-7) on the embedded city: full-length runs over seeds.

Notebook 03_pin_the_memory shows a short-budget, single-seed version of this table. This script trains
every variant with the preset's own schedule (quick: 1,200 iterations) for each seed and writes
`benchmarks/results/ablation_pinthemem.json` (every run's metrics) and `.md` (mean ± std over seeds,
and the change of the mean target mIoU against the full method).

Variants (hyperparameters of `dgnb.methods.pinthemem.PinTheMemory.Hparams`):

    full (first order)               the method as the official code trains it (Tables 5-7, last row)
    w/o L_coh, w/o L_div             Table 5: without feature cohesion / memory divergence
    re-write: E and U trained        Table 6: the re-write before meta-test (Eq. 10) trains both
    re-write: E and U frozen         Table 6: ... freezes both
    no re-write                      Table 6: meta-test reads the meta-train write
    aggregated + memory              Table 7: memory, non-episodic training
    episodic + memory, no meta step  Table 7: episodes without the inner step (θ' = θ)
    second order (paper)             Table 7 "M.L.": the paper's second-order meta-gradient (slower)
    ERM, MLDG                        Table 7 without memory: aggregated / episodic with the meta step

Usage:

    python benchmarks/ablation_pinthemem.py [--preset quick] [--seeds 0 1 2] [--jobs 1]
                                            [--variants "w/o L_coh" ...] [--force]

Runs come from (and go to) the run cache, so a rerun only trains what is missing; the full method and
the ERM / MLDG rows reuse the notebooks' and `dgnb bench` runs of the same preset and seed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from dgnb.engine.bench import PINTHEMEM_ABLATIONS as VARIANTS
from dgnb.engine.bench import ablation_config as config
from dgnb.engine.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
FULL = "full (first order)"


def _train(job: tuple[str, str, int, int, bool, bool]) -> dict[str, Any]:
    preset_name, variant, seed, threads, force, progress = job
    import torch

    torch.set_num_threads(threads)
    from dgnb.engine.runs import train

    run = train(config(preset_name, variant, seed), force=force, progress=progress)
    return {**run.metrics, "variant": variant, "run_dir": str(run.dir)}


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown(preset_name: str, seeds: list[int], iterations: int, domains: dict[str, dict[str, str]],
             runs: list[dict[str, Any]]) -> str:
    targets = [d for d, r in domains.items() if r["role"] != "source"]
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS if any(r["variant"] == v for r in runs)}
    full = by_variant.get(FULL)
    full_mean = statistics.mean(r["mean_target_miou"] for r in full) if full else None
    head = (["variant", "paper row", "seeds", "source val"] + [f"{t} ({domains[t]['role']})" for t in targets]
            + ["mean target", "Δ mean target vs full", "train s"])
    lines = [f"# Pin the Memory ablations ({preset_name} preset, {iterations} iterations, seeds {seeds})", "",
             "mIoU (%) per domain, mean ± std over seeds; Δ is the difference of the seed-mean of the mean target",
             "mIoU with the full method's. Paper rows: Tables 5-7 of Kim et al., CVPR 2022.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, rs in by_variant.items():
        mean_target = [r["mean_target_miou"] for r in rs]
        delta = "-" if full_mean is None or variant == FULL else f"{statistics.mean(mean_target) - full_mean:+.1f}"
        cells = [variant, VARIANTS[variant][0], str(len(rs)), _fmt([r["source_val_miou"] for r in rs])]
        cells += [_fmt([r["target_miou"][t] for r in rs]) for t in targets]
        cells += [_fmt(mean_target), delta, _fmt([r["train_seconds"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"subset of the variants (default: all): {', '.join(VARIANTS)}")
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (threads are split between them)")
    p.add_argument("--force", action="store_true", help="retrain even when a cached run exists")
    p.add_argument("--out", default=str(RESULTS / "ablation_pinthemem.json"), help="JSON path; the .md goes beside it")
    a = p.parse_args()

    from dgnb.engine.bench import domain_roles
    from dgnb.engine.runs import prepare_data
    from dgnb.io import atomic_write_bytes, atomic_write_json

    cfg = config(a.preset, FULL, a.seeds[0])
    prepare_data(cfg)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    jobs = [(a.preset, v, s, threads, a.force, a.jobs == 1) for v in a.variants for s in a.seeds]
    if a.jobs == 1:
        runs = [_train(job) for job in jobs]
    else:
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
            runs = list(pool.map(_train, jobs))

    domains = domain_roles(cfg)
    table = markdown(a.preset, a.seeds, cfg.train.iterations, domains, runs)
    out = Path(a.out)
    atomic_write_json(out, {
        "preset": a.preset, "machine": machine_info(), "seeds": a.seeds, "iterations": cfg.train.iterations, "domains": domains,
        "variants": {v: {"paper_row": VARIANTS[v][0], "method": VARIANTS[v][1], "hparams": VARIANTS[v][2]}
                     for v in a.variants},
        "runs": runs, "table": table,
    })
    atomic_write_bytes(out.with_suffix(".md"), table.encode())
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
