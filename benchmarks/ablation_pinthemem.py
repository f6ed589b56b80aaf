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

and the implementation options (`PINTHEMEM_OPTIONS`): the memory on dropout(F) (the placement before
this change), the official code's read (l2norm(F) fused, Gumbel read in training), and F of 256
channels (the paper's memory capacity; with ERM at the same width as its reference).

For every Pin the Memory run the script also measures what the memory read carries on the targets'
val images (`dgnb.analysis.memory_read_diagnostics`: own-slot read weight against 1/N, mIoU of the
read alone, mean cosine between slots), and for every variant the paired (same-seed) difference of
the mean target mIoU to the full method with its 95% interval. The JSON is rewritten after every run.

Usage:

    python benchmarks/ablation_pinthemem.py [--preset quick] [--seeds 0 1 2] [--jobs 1]
                                            [--variants "w/o L_coh" ...] [--force]

Runs come from (and go to) the run cache, so a rerun only trains what is missing; the full method and
the ERM / MLDG rows reuse the notebooks' and `dgnb bench` runs of the same preset and seed.

The table grows across calls: when `--out` already holds runs of the same preset, iterations and seeds,
made on the same machine (CPU family, AVX-512, torch version and threads: CPU kernels differ in the last
bits between CPU generations, which moves every number by seed-noise amounts and breaks the pairing),
the runs of the variants not named this time are kept (listed in the JSON's `kept`), so the variants can
be trained in several sittings. Kept rows carry the numbers of the code that trained them; the script
warns when a rerun full method's numbers differ from the file's (the library changed in between).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from dgnb.engine.bench import PINTHEMEM_ABLATIONS, PINTHEMEM_OPTIONS
from dgnb.engine.bench import ablation_config as config
from dgnb.engine.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
FULL = "full (first order)"
VARIANTS = {**{v: row[:2] for v, row in PINTHEMEM_ABLATIONS.items()}, **{v: row[:2] for v, row in PINTHEMEM_OPTIONS.items()}}
DIAGNOSTIC_IMAGES = 100  # val images per target for the memory diagnostics


def _train(job: tuple[str, str, int, int, bool, bool]) -> dict[str, Any]:
    preset_name, variant, seed, threads, force, progress = job
    import torch

    torch.set_num_threads(threads)
    from dgnb.engine.runs import train

    run = train(config(preset_name, variant, seed), force=force, progress=progress)
    out = {**run.metrics, "variant": variant, "run_dir": str(run.dir)}
    if run.config.method == "pinthemem":
        out["memory"] = memory_diagnostics(run)
    return out


def memory_diagnostics(run) -> dict[str, float]:
    """`memory_read_diagnostics` of the trained run on the first val images of every target, pooled."""
    import torch

    from dgnb.analysis import memory_read_diagnostics
    from dgnb.data.folder import SegFolder

    method = run.load_method("cpu")
    images, labels = [], []
    for name in run.config.data.targets:
        ds = SegFolder(run.config.data.root, name, "val", limit=DIAGNOSTIC_IMAGES)
        for i in range(len(ds)):
            im, lb = ds.tensors(i)
            images.append(im.float() / 255)
            labels.append(lb)
    return {k: round(v, 4) for k, v in memory_read_diagnostics(method, torch.stack(images), torch.stack(labels)).items()}


def _read(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def kept_runs(out: Path, old: dict[str, Any], preset_name: str, iterations: int, seeds: list[int],
              rerun: set[str]) -> list[dict[str, Any]]:
    """The runs an earlier call wrote to `out` (read as `old`) for variants not rerun now (same preset,
    iterations, seeds, machine)."""
    from dgnb.engine.bench import machine_info

    if not old:
        return []
    if (old.get("preset"), old.get("iterations"), old.get("seeds")) != (preset_name, iterations, seeds):
        print(f"{out} holds another set-up ({old.get('preset')}, {old.get('iterations')} iterations, seeds "
              f"{old.get('seeds')}); it is replaced, not extended")
        return []
    if old.get("machine") != machine_info():
        print(f"{out} was made on another machine ({old.get('machine')}); its runs cannot be paired with this "
              "machine's, so it is replaced, not extended (use another --out to keep it)")
        return []
    return [r for r in old.get("runs", []) if r["variant"] not in rerun and r["variant"] in VARIANTS]


def check_full_reproduces(old: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Warn when kept rows are paired with full-method runs whose numbers differ from the file's."""
    before = {r["seed"]: r["mean_target_miou"] for r in old.get("runs", []) if r["variant"] == FULL}
    now = {r["seed"]: r["mean_target_miou"] for r in runs if r["variant"] == FULL}
    moved = {s: (before[s], now[s]) for s in before.keys() & now.keys() if abs(before[s] - now[s]) > 1e-9}
    if moved:
        print(f"warning: the full method's mean target moved against the earlier file {moved}; kept rows "
              "were paired with other full runs than they were trained beside")


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def paired_to_full(runs: list[dict[str, Any]], variant: str) -> str:
    """Paired (same-seed) difference of the mean target mIoU, variant − full, with its 95% interval."""
    from dgnb.analysis import format_difference, paired_difference

    full = {r["seed"]: r["mean_target_miou"] for r in runs if r["variant"] == FULL}
    mine = {r["seed"]: r["mean_target_miou"] for r in runs if r["variant"] == variant}
    seeds = sorted(set(full) & set(mine))
    if variant == FULL or len(seeds) < 2:
        return "-"
    return format_difference(paired_difference([mine[s] for s in seeds], [full[s] for s in seeds]))


def markdown(preset_name: str, seeds: list[int], iterations: int, domains: dict[str, dict[str, str]],
             runs: list[dict[str, Any]]) -> str:
    targets = [d for d, r in domains.items() if r["role"] != "source"]
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS if any(r["variant"] == v for r in runs)}
    head = (["variant", "paper row / option", "seeds", "source val"] + [f"{t} ({domains[t]['role']})" for t in targets]
            + ["mean target", "paired Δ vs full [95% CI]", "own-slot W (1/N = 0.053)", "read-only mIoU",
               "slot cosine", "train s"])
    lines = [f"# Pin the Memory ablations and options ({preset_name} preset, {iterations} iterations, seeds {seeds})", "",
             "mIoU (%) per domain, mean ± std over seeds. Δ: paired (same-seed) difference of the mean target mIoU",
             "to the full method, mean [95% t-interval]; ✓ = the interval excludes zero (resolved), otherwise the",
             "difference is not resolved by these seeds. Memory columns (Pin the Memory runs, target val images):",
             "weight of a pixel's own-class slot in the read W, mIoU of argmax W alone, mean cosine between slots.",
             "Paper rows: Tables 5-7 of Kim et al., CVPR 2022.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, rs in by_variant.items():
        mean_target = [r["mean_target_miou"] for r in rs]
        mem = [r["memory"] for r in rs if "memory" in r]
        cells = [variant, VARIANTS[variant][0], str(len(rs)), _fmt([r["source_val_miou"] for r in rs])]
        cells += [_fmt([r["target_miou"][t] for r in rs]) for t in targets]
        cells += [_fmt(mean_target), paired_to_full(runs, variant)]
        cells += ([f"{statistics.mean(m['own_slot_weight'] for m in mem):.3f}",
                   _fmt([m["read_only_miou"] for m in mem]), f"{statistics.mean(m['slot_similarity'] for m in mem):.2f}"]
                  if mem else ["-", "-", "-"])
        cells += [_fmt([r["train_seconds"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"subset of the variants (default: all): {', '.join(VARIANTS)}")
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (threads are split between them)")
    p.add_argument("--force", action="store_true", help="retrain even when a cached run exists")
    p.add_argument("--out", default=str(RESULTS / "ablation_pinthemem.json"), help="JSON path; the .md goes beside it")
    a = p.parse_args(argv)

    from dgnb.engine.bench import domain_roles
    from dgnb.engine.runs import prepare_data
    from dgnb.io import atomic_write_bytes, atomic_write_json

    cfg = config(a.preset, FULL, a.seeds[0])
    prepare_data(cfg)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    jobs = [(a.preset, v, s, threads, a.force, a.jobs == 1) for v in a.variants for s in a.seeds]
    domains = domain_roles(cfg)
    out = Path(a.out)
    out_before = _read(out)
    kept = kept_runs(out, out_before, a.preset, cfg.train.iterations, a.seeds, set(a.variants))
    runs: list[dict[str, Any]] = list(kept)
    variants = [v for v in VARIANTS if v in a.variants or any(r["variant"] == v for r in kept)]

    def write() -> str:  # after every run: a partial table is kept if the script is stopped
        table = markdown(a.preset, a.seeds, cfg.train.iterations, domains, runs)
        atomic_write_json(out, {
            "preset": a.preset, "machine": machine_info(), "seeds": a.seeds, "iterations": cfg.train.iterations,
            "domains": domains, "variants": {v: {"paper_row": VARIANTS[v][0], "method": VARIANTS[v][1],
                                                 "config": config(a.preset, v, 0).hparams} for v in variants},
            "kept": sorted({r["variant"] for r in kept}), "runs": runs, "table": table,
        })
        atomic_write_bytes(out.with_suffix(".md"), table.encode())
        return table

    if a.jobs == 1:
        for job in jobs:
            runs.append(_train(job))
            write()
    else:
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
            for run in pool.map(_train, jobs):
                runs.append(run)
                write()
    table = write()
    if kept:  # a replaced file is not paired with anything: nothing to warn about
        check_full_reproduces(out_before, runs)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
