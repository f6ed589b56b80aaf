"""How long the course takes on this machine: `make course` from nothing, then every notebook warm.

In a fresh $DGNB_HOME (by default a new temporary folder: the checkout's own data and run cache are neither
used nor touched):

1. `make course`, timed piece by piece: generating the city, then every run of `dgnb.course.course_plan`
   (what `dgnb course prepare --preset quick` trains), one after the other, each timed;
2. every notebook executed top to bottom on the quick preset, in course order, with the run cache warm
   (each `train(cfg)` cell a cache hit), each timed; the executed copies are kept in <home>/executed/.

A notebook's *cold* time (what a student waits for when nobody prepared the lab) is its warm time plus the
runs it is the first notebook to train, in course order, plus the city for the first notebook; the course
cold is their sum. Results go to benchmarks/results/course_time.{json,md}, rewritten (atomically) after
every timed step, so an interrupted measurement keeps what it measured.

Measure on an otherwise idle machine: anything else running slows the runs.

The notebooks run with Jupyter's own inline backend, so every figure is rendered as in a lab.

Usage: python benchmarks/course_time.py [--home DIR] [--preset quick] [--skip-notebooks]
       python benchmarks/course_time.py --home DIR --notebooks-only   # re-time the notebooks of a measured home
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60} min {s % 60:02d} s"


def first_notebook(notebooks: str) -> str:
    """A plan item's notebooks are listed in course order ('02_meta_learning, 03_pin_the_memory')."""
    return notebooks.split(", ")[0]


def summarize(result: dict[str, Any], notebooks: list[str]) -> dict[str, Any]:
    """Per notebook: warm seconds, seconds of the runs it is the first to train, cold = warm + those."""
    per: dict[str, dict[str, float]] = {n: {"runs": 0.0, "training": 0.0} for n in notebooks}
    for run in result["runs"]:
        per.setdefault(run["first_notebook"], {"runs": 0.0, "training": 0.0})
        per[run["first_notebook"]]["runs"] += 1
        per[run["first_notebook"]]["training"] += run["seconds"]
    if notebooks:
        per[notebooks[0]]["training"] += result.get("city_seconds", 0.0)
    for name, row in per.items():
        warm = result["notebooks"].get(name)
        row["warm"] = warm
        row["cold"] = None if warm is None else warm + row["training"]
    return per


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# The course's time ({result['preset']} preset)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads). "
             "Fresh home: the city generated and every run trained from nothing. Cold: what a student waits for "
             "in an unprepared lab (the notebook's warm time plus the runs it is the first to train, the city "
             "for the first notebook); warm: after `make course`.", "",
             f"`make course`: {fmt(result['course_seconds'])} ({len(result['runs'])} runs, the city "
             f"{fmt(result['city_seconds'])}).", "",
             "| notebook | runs it trains first | their training | warm | cold |", "|---|---|---|---|---|"]
    for name, row in result["per_notebook"].items():
        warm = "-" if row["warm"] is None else fmt(row["warm"])
        cold = "-" if row["cold"] is None else fmt(row["cold"])
        lines.append(f"| {name} | {int(row['runs'])} | {fmt(row['training'])} | {warm} | {cold} |")
    done = [r for r in result["per_notebook"].values() if r["cold"] is not None]
    if len(done) == len(result["per_notebook"]):
        lines += ["", f"All notebooks, cold: {fmt(sum(r['cold'] for r in done))}; warm: "
                      f"{fmt(sum(r['warm'] for r in done))}."]
    lines += ["", "| run | notebook(s) | method | iterations | wall |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['notebooks']} | {r['method']} | {r['iterations']} | {fmt(r['seconds'])} |"
              for r in result["runs"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", help="the fresh $DGNB_HOME to use (default: a new temporary folder)")
    p.add_argument("--preset", default="quick")
    p.add_argument("--skip-notebooks", action="store_true", help="time `make course` only")
    p.add_argument("--notebooks-only", action="store_true",
                   help="keep the runs timed in --out (the home must be the one they were trained in) and time "
                        "the notebooks again")
    p.add_argument("--out", default=str(RESULTS / "course_time.json"))
    a = p.parse_args()

    home = Path(a.home or tempfile.mkdtemp(prefix="dgnb-course-"))
    if a.notebooks_only:
        previous = json.loads(Path(a.out).read_text())
        if previous.get("home") != str(home):
            raise SystemExit(f"{a.out} was measured in {previous.get('home')}, not {home}; give that --home")
    elif (home / "runs").exists() or (home / "data").exists():
        raise SystemExit(f"{home} already holds data or runs; give an empty folder (the measurement is cold)")
    os.environ["DGNB_HOME"] = str(home)
    os.environ["DGNB_PRESET"] = a.preset
    os.environ.pop("MPLBACKEND", None)  # the kernels draw inline, as in a lab

    from dgnb.course import course_plan, prepare_course
    from dgnb.engine.bench import machine_info
    from dgnb.engine.runs import prepare_data
    from dgnb.io import atomic_write_bytes, atomic_write_json

    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    result: dict[str, Any] = {"preset": a.preset, "home": str(home), "machine": machine_info(), "runs": [],
                              "notebooks": {}, "city_seconds": 0.0, "course_seconds": 0.0}

    def save() -> None:
        result["per_notebook"] = summarize(result, notebooks)
        atomic_write_json(a.out, result)
        atomic_write_bytes(Path(a.out).with_suffix(".md"), markdown(result).encode())

    if a.notebooks_only:
        result.update({k: previous[k] for k in ("runs", "city_seconds", "course_seconds")})
    else:
        start = time.perf_counter()
        prepare_data(course_plan(a.preset)[0].config, progress=False)  # timed apart from the runs
        result["city_seconds"] = round(time.perf_counter() - start, 1)
        save()

        def record(item: Any, run: Any, seconds: float) -> None:
            result["runs"].append({"label": item.label, "notebooks": item.notebook, "method": item.config.method,
                                   "iterations": item.config.train.iterations,
                                   "first_notebook": first_notebook(item.notebook), "seconds": round(seconds, 1)})
            result["course_seconds"] = round(time.perf_counter() - start, 1)
            print(f"{item.label} ({item.config.method}): {result['runs'][-1]['seconds']} s", flush=True)
            save()

        prepare_course(a.preset, progress=False, on_run=record)
    if a.skip_notebooks:
        return
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    (home / "executed").mkdir(exist_ok=True)
    for name in notebooks:
        nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
        t = time.perf_counter()
        NotebookClient(nb, timeout=3600, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
        result["notebooks"][name] = round(time.perf_counter() - t, 1)
        nbformat.write(nb, home / "executed" / f"{name}.ipynb")
        print(f"{name}: {result['notebooks'][name]} s warm", flush=True)
        save()


if __name__ == "__main__":
    main()
