"""The runs the course notebooks train, in one place, and `dgnb course prepare` (`make course`).

Before a lab, `prepare_course("quick")` trains every run the notebooks need, so that each notebook's
`train(cfg)` cell returns from the run cache instantly. It shows one progress bar over the runs with an
up-front time estimate, and it is resumable: finished runs are cached, an interrupted run resumes from
its checkpoint.

The notebooks build their configurations with the functions below (`erm_run`, `method_runs`,
`ablation_runs`), so the list `course_runs` returns is exactly what they train:

- notebook 01 (domain shift): ERM;
- notebook 03 (Pin the Memory), section 7: ERM, MLDG and Pin the Memory;
- notebook 03, section 12: the Pin the Memory ablations (Tables 5-7) on a short budget,
  `ABLATION_ITERATIONS` iterations evaluated on `ABLATION_EVAL_LIMIT` images per domain (the whole
  preset on `smoke`), all variants but the second-order one;
- notebook 04 (style): ERM, IBN-Net, ISW and SPC (`style_runs`).
- notebook 05 (adaptation): source only, AdaptSegNet and MinEnt in the UDA setting on `UDA_PAIR`;
- notebook 06 (MRNet): MRNet (Stages I and II) on the same pair, and the λ_mr sweep on a short budget
  (`MR_SWEEP_ITERATIONS`, Stage I only).
- notebook 07 (PFR): source only, AdaptSegNet, PFR and PFR without its adversarial term on the same pair,
  seed 0 (`pfr_runs`);
- notebook 08 (self-training): source only, CBST and DRSL on the same pair, seed 0 (`self_training_runs`).

Notebooks 02, 03, 07 and 08 read their five-seed comparisons from the benchmark files the repository ships
(`dgnb.analysis.shipped_bench`) instead of training every seed in the lab.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, preset

#: Notebook 03's comparison (section 7): table label -> method.
NOTEBOOK_METHODS = {"ERM": "erm", "MLDG": "mldg", "Pin the Memory": "pinthemem"}
#: Notebook 04's comparison: table label -> method.
STYLE_METHODS = {"ERM": "erm", "IBN-Net": "ibn", "ISW": "isw", "SPC": "spc"}
#: Budget of each short ablation row of notebook 03 (section 12) on presets other than smoke.
ABLATION_ITERATIONS = 150
ABLATION_EVAL_LIMIT = 50
#: Ablation variants notebook 03 trains (the second-order one costs about twice as much and is left to
#: benchmarks/ablation_pinthemem.py).
SKIPPED_ABLATIONS = ("second order (paper)",)

#: Wall seconds of one whole quick-preset run (1,200 iterations, periodic validation, final evaluation) on a
#: 2-core machine, by method; used for the estimate only. Measured by `benchmarks/course_time.py` (`make course`
#: in a fresh home, each run timed; benchmarks/results/course_time.json) on machine 2 of the README (AMD EPYC,
#: 2 cores); the README's machine 1 takes about twice as long. A method missing here counts as the slowest.
QUICK_RUN_SECONDS: dict[str, float] = {
    "erm": 109.0, "mldg": 119.0, "pinthemem": 205.0, "ibn": 85.0, "isw": 103.0, "spc": 106.0,
    # UDA setting: 800-iteration runs, written at QUICK_ITERATIONS as `run_seconds` scales them back (source only
    # 62 s, AdaptSegNet 201 s, MinEnt 137 s, MRNet 190 s, PFR 130 s, CBST 153 s, DRSL 219 s measured whole).
    # MRNet's Stage I costs about 5 times its Stage II per iteration, so the short Stage-I-only sweep of notebook
    # 06 takes longer than this scaling says (116 s measured against 87 s estimated for 300 iterations).
    "source_only": 81.0, "adaptsegnet": 288.0, "minent": 193.0, "mrnet": 273.0, "pfr": 182.0,
    "cbst": 217.0, "drsl": 316.0}
QUICK_ITERATIONS = 1200
#: Of a quick run's seconds, the part that does not scale with iterations (final evaluation, 300 images per
#: domain; it scales with the images evaluated instead).
QUICK_EVAL_SECONDS = 25.0
QUICK_EVAL_IMAGES = 300
#: Generating the quick preset's city (3 sources x 900 images, 4 targets x 300, 128 x 256) when it is missing.
CITY_SECONDS, CITY_IMAGES, CITY_PIXELS = 80.0, 3 * 900 + 4 * 300, 128 * 256


def erm_run(preset_name: str = "quick", seed: int = 0) -> RunConfig:
    """Notebook 01's ERM run (also notebook 03's ERM)."""
    return preset(preset_name, "erm", seed)


def method_runs(preset_name: str = "quick", seed: int = 0) -> dict[str, RunConfig]:
    """Notebook 03, section 7: label -> configuration of ERM, MLDG and Pin the Memory."""
    return {label: preset(preset_name, method, seed) for label, method in NOTEBOOK_METHODS.items()}


def style_runs(preset_name: str = "quick", seed: int = 0) -> dict[str, RunConfig]:
    """Notebook 04: label -> configuration of ERM, IBN-Net, ISW and SPC (each method's defaults)."""
    return {label: preset(preset_name, method, seed) for label, method in STYLE_METHODS.items()}
#: Notebooks 05 and 06: the source -> target pair (a key of dgnb.config.UDA_PAIRS) and the methods of 05.
UDA_PAIR = "near"
UDA_NOTEBOOK_METHODS = {"source only": "source_only", "AdaptSegNet": "adaptsegnet", "MinEnt": "minent"}
#: Notebook 06's λ_mr sweep: Stage I only, on a short budget (presets other than smoke).
MR_SWEEP = (0.0, 0.1, 0.5)
MR_SWEEP_ITERATIONS = 300


#: Notebook 07: label -> (method, hyperparameters changed from its defaults), and the seeds of its intervals.
PFR_NOTEBOOK_RUNS = {"source only": ("source_only", {}), "AdaptSegNet": ("adaptsegnet", {}), "PFR": ("pfr", {}),
                     "PFR without L_adv": ("pfr", {"adv_weight_main": 0.0})}
PFR_SEEDS = (0,)


def pfr_runs(preset_name: str = "quick", seeds: Any = PFR_SEEDS, pair: str = UDA_PAIR,
             hparams: dict[str, Any] | None = None) -> dict[str, dict[int, RunConfig]]:
    """Notebook 07: label -> seed -> configuration. `hparams` (PFR's, changed from the defaults) reach both PFR
    runs; the variant without the adversarial term sets `adv_weight_main = 0` on top."""
    out: dict[str, dict[int, RunConfig]] = {}
    for label, (method, extra) in PFR_NOTEBOOK_RUNS.items():
        hp = {**(hparams or {}), **extra} if method == "pfr" else {}
        out[label] = {s: uda_run(preset_name, method, s, pair, hp) for s in seeds}
    return out


def uda_run(preset_name: str, method: str, seed: int = 0, pair: str = UDA_PAIR,
            hparams: dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """A UDA-setting run of `method` adapting along `pair` (notebooks 05, 06)."""
    from .config import UDA_PAIRS

    source, target = UDA_PAIRS[pair]
    return preset(preset_name, method, seed, setting="uda", hparams=dict(hparams or {}),
                  **{"data.sources": [source], "data.uda_target": target, **overrides})


def mr_sweep_overrides(preset_name: str) -> dict[str, Any]:
    """The sweep's short budget: none on smoke, else `MR_SWEEP_ITERATIONS` iterations."""
    return {} if preset_name == "smoke" else {"train.iterations": MR_SWEEP_ITERATIONS}


def mr_sweep_runs(preset_name: str = "quick", seed: int = 0, pair: str = UDA_PAIR,
                  hparams: dict[str, Any] | None = None) -> dict[float, RunConfig]:
    """Notebook 06's λ_mr sweep: λ -> MRNet Stage I only, short budget."""
    return {lam: uda_run(preset_name, "mrnet", seed, pair, {**(hparams or {}), "mr_weight": lam,
                                                            "stage1_fraction": 1.0}, **mr_sweep_overrides(preset_name))
            for lam in MR_SWEEP}


#: Notebook 08's comparison: table label -> method, and the seeds it trains.
SELF_TRAINING_METHODS = {"source only": "source_only", "CBST": "cbst", "DRSL": "drsl"}
SELF_TRAINING_SEEDS = (0,)


def self_training_runs(preset_name: str = "quick", seeds: Any = SELF_TRAINING_SEEDS, pair: str = UDA_PAIR,
                       hparams: dict[str, dict[str, Any]] | None = None) -> dict[str, list[RunConfig]]:
    """Notebook 08: label -> the configurations of source only, CBST and DRSL over the notebook's seeds;
    `hparams[method]` holds a method's changed hyperparameters."""
    hparams = hparams or {}
    return {label: [uda_run(preset_name, m, s, pair, hparams=hparams.get(m)) for s in seeds]
            for label, m in SELF_TRAINING_METHODS.items()}


def ablation_overrides(preset_name: str) -> dict[str, Any]:
    """The short budget of the ablation rows: none on smoke (already seconds), else 150 iterations, 50 images."""
    if preset_name == "smoke":
        return {}
    return {"train.iterations": ABLATION_ITERATIONS, "data.eval_limit": ABLATION_EVAL_LIMIT}


def ablation_runs(preset_name: str = "quick", seed: int = 0) -> dict[str, RunConfig]:
    """Notebook 03, section 12: variant -> configuration of each short ablation row it trains."""
    from .engine.bench import PINTHEMEM_ABLATIONS, ablation_config

    short = ablation_overrides(preset_name)
    return {v: ablation_config(preset_name, v, seed, **short) for v in PINTHEMEM_ABLATIONS
            if v not in SKIPPED_ABLATIONS}


@dataclass
class CourseRun:
    notebook: str      # the notebook(s) that train it
    label: str         # its name there
    config: RunConfig
    dir: Path | None = None  # its run folder (course_plan fills it: the key is hashed once per run)


def course_plan(preset_name: str = "quick", seed: int = 0) -> list[CourseRun]:
    """Every run the notebooks train, in notebook order, each once (runs two notebooks share are listed once)."""
    from .engine.runs import run_dir

    candidates = [CourseRun("01_domain_shift", "ERM", erm_run(preset_name, seed))]
    candidates += [CourseRun("02_meta_learning", label, preset(preset_name, m, seed))
                   for label, m in (("ERM", "erm"), ("MLDG", "mldg"))]
    candidates += [CourseRun("03_pin_the_memory", label, cfg) for label, cfg in method_runs(preset_name, seed).items()]
    candidates += [CourseRun("03_pin_the_memory", f"ablation: {v}", cfg)
                   for v, cfg in ablation_runs(preset_name, seed).items()]
    candidates += [CourseRun("04_style", label, cfg) for label, cfg in style_runs(preset_name, seed).items()]
    candidates += [CourseRun("05_adversarial_uda", label, uda_run(preset_name, m, seed))
                   for label, m in UDA_NOTEBOOK_METHODS.items()]
    candidates += [CourseRun("06_mrnet", "MRNet", uda_run(preset_name, "mrnet", seed))]
    candidates += [CourseRun("06_mrnet", f"λ_mr = {lam:g} (Stage I, short)", cfg)
                   for lam, cfg in mr_sweep_runs(preset_name, seed).items()]
    candidates += [CourseRun("07_pfr", label, cfg)
                   for label, by_seed in pfr_runs(preset_name, [seed]).items() for cfg in by_seed.values()]
    candidates += [CourseRun("08_self_training_drsl", label, cfg)
                   for label, cfgs in self_training_runs(preset_name, [seed]).items() for cfg in cfgs]
    plan: dict[Path, CourseRun] = {}
    for item in candidates:
        item.dir = run_dir(item.config)
        first = plan.setdefault(item.dir, item)
        if first is not item and item.notebook not in first.notebook:
            first.notebook += f", {item.notebook}"
    return list(plan.values())


def course_runs(preset_name: str = "quick", seed: int = 0) -> list[RunConfig]:
    """The configurations of every run the notebooks train (see `course_plan`)."""
    return [item.config for item in course_plan(preset_name, seed)]


def is_cached(cfg: RunConfig) -> bool:
    from .engine.runs import Run, run_dir

    return Run(run_dir(cfg), cfg).complete


def run_seconds(cfg: RunConfig) -> float:
    """Seconds training and evaluating `cfg` takes on the reference machine: the method's quick-run time,
    scaled by iterations (training) and by the images evaluated per domain (final evaluation)."""
    whole = QUICK_RUN_SECONDS.get(cfg.method, max(QUICK_RUN_SECONDS.values()))
    per_domain = (cfg.data.city or {}).get("val", QUICK_EVAL_IMAGES)
    images = min(per_domain, cfg.data.eval_limit or per_domain)
    return ((whole - QUICK_EVAL_SECONDS) * cfg.train.iterations / QUICK_ITERATIONS
            + QUICK_EVAL_SECONDS * images / QUICK_EVAL_IMAGES)


def estimate_seconds(cfg: RunConfig) -> float:
    """`run_seconds(cfg)`, or 0 when the run cache already holds the run."""
    return 0.0 if is_cached(cfg) else run_seconds(cfg)


def city_seconds(cfg: RunConfig) -> float:
    """Seconds generating the procedural-city domains of `cfg` that are missing takes on the reference machine
    (`CITY_SECONDS` for the quick preset's city, scaled by images and pixels)."""
    if cfg.data.city is None:
        return 0.0
    from .data.city import DOMAINS

    c = cfg.data.city
    sources = [d for d in cfg.data.sources if d in DOMAINS]
    targets = [d for d in cfg.data.targets if d in DOMAINS and d not in sources]
    missing = lambda d: not (Path(cfg.data.root) / d / "meta.json").is_file()  # noqa: E731
    images = sum(c["train"] + c["val"] for d in sources if missing(d)) + sum(c["val"] for d in targets if missing(d))
    pixels = c["size"][0] * c["size"][1]
    return CITY_SECONDS * images * pixels / (CITY_IMAGES * CITY_PIXELS)


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def plan_table(plan: list[CourseRun]) -> str:
    """Markdown table of the plan: notebook, run, method, iterations, cached, estimate."""
    lines = ["| notebook | run | method | iterations | cached | estimate |", "|---|---|---|---|---|---|"]
    for item in plan:
        cfg, sec = item.config, estimate_seconds(item.config)
        lines.append(f"| {item.notebook} | {item.label} | {cfg.method} | {cfg.train.iterations} | "
                     f"{'yes' if sec == 0 else 'no'} | {_fmt(sec)} |")
    return "\n".join(lines)


def prepare_course(preset_name: str = "quick", seed: int = 0, force: bool = False, progress: bool = True,
                   log: Any = print, on_run: Callable[[Any, Any, float], None] | None = None) -> list:
    """Train (or find in the run cache) every run the notebooks need; returns their `Run`s.

    Prints the number of runs, how many are cached and the estimated time on the reference machine
    (cached runs count 0), then shows one progress bar over the runs. Interrupt it at any time: finished
    runs stay cached and the run in progress resumes from its last checkpoint on the next call.
    `on_run(planned, run, seconds)` is called after each run with its wall time (the course timing uses it).
    """
    from tqdm.auto import tqdm

    from .engine.runs import prepare_data, train

    plan = course_plan(preset_name, seed)
    from .engine.runs import Run

    estimates = [run_seconds(p.config) if force or not Run(p.dir, p.config).complete else 0.0 for p in plan]
    cached = sum(e == 0 for e in estimates)
    generation = city_seconds(plan[0].config)
    total = sum(estimates) + generation
    log(f"dgnb course ({preset_name} preset, seed {seed}): {len(plan)} runs, {cached} already in the run cache; "
        f"estimated {_fmt(total)} on the reference machine (2 CPU cores"
        + (f", generating the city included: {_fmt(generation)}" if generation else "") + ")")
    prepare_data(plan[0].config, progress)
    runs = []
    remaining = sum(estimates)
    bar = tqdm(total=len(plan), desc="course runs", unit="run", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}{postfix}]", file=sys.stdout)
    start = time.perf_counter()
    try:
        for item, sec in zip(plan, estimates):
            bar.set_postfix_str(f"now: {item.label} ({item.config.method}), about {_fmt(remaining)} left")
            t = time.perf_counter()
            runs.append(train(item.config, force=force, progress=False))
            if on_run is not None:
                on_run(item, runs[-1], time.perf_counter() - t)
            remaining -= sec
            bar.update(1)
        bar.set_postfix_str("done")
    finally:
        bar.close()
    log(f"all {len(plan)} runs ready in {_fmt(time.perf_counter() - start)}; the notebooks will load them from "
        "the run cache")
    return runs

