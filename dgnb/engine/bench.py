"""`dgnb bench`: train (or load from the run cache) methods x seeds, tabulate mIoU per domain."""

from __future__ import annotations

import errno
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Sequence

from ..config import RunConfig, preset
from ..data.folder import read_meta
from ..io import atomic_write_json
from .runs import prepare_data, train


# Pin the Memory ablations (Kim et al., CVPR 2022, Tables 5-7): variant -> (paper row, method, hyperparameters).
# Used by notebook 03 (short budget) and benchmarks/ablation_pinthemem.py (full length, several seeds).
PINTHEMEM_ABLATIONS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "full (first order)": ("Tab. 5-7: ours", "pinthemem", {}),
    "w/o L_coh": ("Tab. 5", "pinthemem", {"use_coh": False}),
    "w/o L_div": ("Tab. 5", "pinthemem", {"use_div": False}),
    "re-write: E and U trained": ("Tab. 6", "pinthemem", {"memory_update": "train_both"}),
    "re-write: E and U frozen": ("Tab. 6", "pinthemem", {"memory_update": "freeze_both"}),
    "no re-write": ("Tab. 6", "pinthemem", {"memory_update": "none"}),
    "aggregated + memory": ("Tab. 7: Agg., memory", "pinthemem", {"episodic": False}),
    "episodic + memory, no meta step": ("Tab. 7: Episodic, memory", "pinthemem", {"meta": False}),
    "second order (paper)": ("Tab. 7: Episodic, memory, M.L.", "pinthemem", {"first_order": False}),
    "ERM": ("Tab. 7: Agg.", "erm", {}),
    "MLDG": ("Tab. 7: Episodic, M.L.", "mldg", {}),
}


# Implementation options of Pin the Memory measured next to the default: variant -> (what it tests, method,
# hyperparameters, config overrides).
PINTHEMEM_OPTIONS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "memory on dropout(F)": ("placement of F (dgnb 0.1)", "pinthemem", {"memory_dropout": True}, {}),
    "code-faithful read": ("official code: l2norm(F) fused, Gumbel read in training", "pinthemem",
                           {"fuse_normalized": True, "gumbel_train": True}, {}),
    "F of 256 channels": ("the paper's memory capacity (C = 256)", "pinthemem", {}, {"model.head_channels": 256}),
    "ERM, F of 256 channels": ("reference for the row above", "erm", {}, {"model.head_channels": 256}),
}


def ablation_config(preset_name: str, variant: str, seed: int, **overrides: Any) -> RunConfig:
    """The run configuration of one `PINTHEMEM_ABLATIONS` or `PINTHEMEM_OPTIONS` variant (plus any overrides)."""
    if variant in PINTHEMEM_OPTIONS:
        _, method, hparams, extra = PINTHEMEM_OPTIONS[variant]
        overrides = {**extra, **overrides}
    else:
        _, method, hparams = PINTHEMEM_ABLATIONS[variant]
    return preset(preset_name, method, seed, **overrides, **{f"hparams.{k}": v for k, v in hparams.items()})


def domain_roles(cfg: RunConfig) -> dict[str, dict[str, str]]:
    """name -> {role, description}: from the city presets, else from each dataset's meta.json."""
    out = {}
    city = {}
    if cfg.data.city is not None:
        from ..data.city import DOMAINS as city
    for name in cfg.data.sources + cfg.data.targets:
        if name in city:
            d = city[name]
            role, desc = d.role, d.description
        else:
            meta = read_meta(cfg.data.root, name)
            role = "source" if name in cfg.data.sources else meta.get("role", "target")
            desc = meta.get("description", meta.get("name", name))
        if name == cfg.data.uda_target:
            role += ", UDA target"  # its unlabelled train split is adapted to
        out[name] = {"role": "source" if name in cfg.data.sources else role, "description": desc}
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and GPU of the machine running the bench (timings depend on it,
    and CPU results differ in the last bits between CPU models, which moves mIoU by seed-noise amounts)."""
    import torch

    cpu, family, flags = platform.processor() or platform.machine(), None, set()
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = info.get("model name", cpu)
        family = f"family {info.get('cpu family')} model {info.get('model')}" if "cpu family" in info else None
        flags = set(info.get("flags", "").split())
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    # "AMD EPYC" names several generations; the family/model and AVX-512 tell which kernels ran
    return {"cpu": cpu, "cpu_id": family, "avx512": "avx512f" in flags, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu}


def _fmt(values: Sequence[float | None]) -> str:
    if any(v is None for v in values):
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown_table(runs: list[dict[str, Any]], domains: dict[str, dict[str, str]]) -> str:
    """One row per method: source val, each target (role), mean target, train seconds; mean ± std over seeds."""
    targets = [d for d, r in domains.items() if r["role"] != "source"]
    head = ["method", "seeds", "source val"] + [f"{t} ({domains[t]['role']})" for t in targets] + ["mean target", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        cells = [method, str(len(rs)), _fmt([r["source_val_miou"] for r in rs])]
        cells += [_fmt([r["target_miou"][t] for r in rs]) for t in targets]
        cells += [_fmt([r["mean_target_miou"] for r in rs]) if targets else "-", _fmt([r["train_seconds"] for r in rs])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(comparisons: dict[str, dict[str, Any]], domains: dict[str, dict[str, str]]) -> str:
    """Paired (same-seed) differences to the reference: mean [95% t-interval over seeds], ✓ = excludes zero."""
    from ..analysis import format_difference

    if not comparisons:
        return ""
    targets = [d for d, r in domains.items() if r["role"] != "source"]
    refs = list(dict.fromkeys(c["reference"] for c in comparisons.values()))
    head = [f"method − {refs[0]}" if len(refs) == 1 else "difference", "seeds", "source val"] + targets + ["mean target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in comparisons.items():
        label = name if len(refs) == 1 else f"{c.get('method', name)} − {c['reference']}"
        cells = [label, str(c["mean_target"]["n"]),
                 format_difference(c["source_val"]) if c["source_val"] is not None else "-"]
        cells += [format_difference(c["targets"][t]) for t in targets] + [format_difference(c["mean_target"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    ref = refs[0] if len(refs) == 1 else "the second method of each row"
    lines.append(f"Paired difference to {ref} per seed, mean [95% interval, Student t over the seeds]; ✓: the "
                 "interval excludes zero (resolved). Without ✓ the difference is not resolved by these seeds.")
    return "\n".join(lines)


def parse_contrasts(specs: Sequence[str] | None) -> list[tuple[str, str]]:
    """'A:B' -> ('A', 'B'), the paired difference A − B (e.g. 'mrnet:mrnet@stage1')."""
    out = []
    for spec in specs or []:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b:
            raise ValueError(f"contrast '{spec}' must be METHOD:REFERENCE, e.g. mrnet@stage1:adaptsegnet")
        out.append((a, b))
    return out


def check_output_file(out: str | Path | None) -> None:
    """Fail before any training when `out` cannot be written: a folder, or a parent that is not a writable folder."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "the output path is a folder", str(path))
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the output's folder is a file", str(parent))
    if not os.access(parent, os.W_OK):
        raise PermissionError(errno.EACCES, "the output's folder is not writable", str(parent))


class ReuseError(ValueError):
    """A `--reuse` bench file that cannot stand in for training: it names the mismatch."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same_training(cfg: RunConfig, record: dict[str, Any]) -> str | None:
    """Why `record` (a run of an earlier bench file) is not a run of `cfg`, or None when it is: the preset,
    setting, domains, iterations and evaluation must match, and, where its run folder is here, the whole
    training configuration (hyperparameters included)."""
    from .runs import eval_key, read_json, training_dict, uda_target

    d = cfg.data
    expected = {"preset": cfg.preset, "setting": cfg.setting, "uda_target": uda_target(cfg),
                "sources": list(d.sources), "iterations": cfg.train.iterations, "eval_key": eval_key(cfg)}
    for field, value in expected.items():
        if record.get(field) != value:
            return f"{field} is {record.get(field)!r} there, {value!r} here"
    saved = Path(record.get("run_dir", "")) / "config.json"
    if record.get("run_dir") and saved.is_file():
        theirs = _flat(training_dict(RunConfig.from_dict(read_json(saved))))
        mine = _flat(training_dict(cfg))
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if diff:
            return f"its run folder {saved.parent} was trained with other settings ({', '.join(diff)})"
    return None


def reused_runs(files: Sequence[str | Path], configs: Sequence[RunConfig]) -> dict[tuple[str, int], dict[str, Any]]:
    """(method, seed) -> the run record of an earlier bench JSON (`dgnb bench --reuse FILE`), for the methods of
    `configs` that a file holds for every requested seed with the same training set-up (`_same_training`).

    This lets a new method be compared with rows already measured, without retraining them. The reused records
    keep the numbers of the code that trained them and say where they come from (`reused_from`); a method only
    partly in a file, or recorded with other settings, is an error rather than a silent mix."""
    import json

    by_method: dict[str, list[RunConfig]] = {}
    for cfg in configs:
        by_method.setdefault(cfg.method, []).append(cfg)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except FileNotFoundError:
            raise ReuseError(f"--reuse {f}: no such file; give a file written by `dgnb bench --out`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReuseError(f"--reuse {f} is not valid JSON ({e}); give a file written by `dgnb bench --out`") from e
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise ReuseError(f"--reuse {f}: not a `dgnb bench` results file (no 'runs' list); give a file "
                             "written by `dgnb bench --out`")
        recorded = {(r.get("method"), r.get("seed")): r for r in data["runs"]}
        for method, cfgs in by_method.items():
            have = [c for c in cfgs if (method, c.seed) in recorded]
            if not have or all((method, c.seed) in out for c in cfgs):
                continue
            if len(have) < len(cfgs):
                missing = [c.seed for c in cfgs if (method, c.seed) not in recorded]
                raise ReuseError(f"--reuse {f} holds {method} but not for seeds {missing}; drop those seeds, or "
                                 f"train {method} here by leaving it out of the reused file")
            for c in cfgs:
                why = _same_training(c, recorded[(method, c.seed)])
                if why:
                    raise ReuseError(f"--reuse {f}: its {method} seed {c.seed} is another run ({why}); rerun "
                                     "without --reuse to train it")
                out[(method, c.seed)] = {**recorded[(method, c.seed)], "reused_from": str(f)}
    return out


def bench(preset_name: str, methods: Sequence[str], seeds: Sequence[int], overrides: dict[str, Any] | None = None,
          force: bool = False, out: str | Path | None = None, progress: bool = True,
          reference: str | None = None, setting: str = "dg",
          contrasts: Sequence[tuple[str, str]] = (), reuse: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run every (method, seed); return {"preset", "domains", "runs", "table", "comparisons", "comparison_table"}
    and write it to `out`. `reference` (default: the first method) is what the paired differences are taken to.
    `setting="uda"`: the UDA recipe, adapting to `data.uda_target` (docs/adaptation.md).

    A multi-stage method also gets a row per earlier stage (`mrnet@stage1`: its weights at the end of Stage I),
    compared like a method. `contrasts`, pairs (A, B), add the paired differences A − B between any two rows
    (e.g. ('mrnet', 'mrnet@stage1'), ('mrnet@stage1', 'adaptsegnet')) as `contrasts` / `contrast_table`.
    `reuse`: earlier bench files whose runs of the same set-up stand in for training (`reused_runs`)."""
    configs = [preset(preset_name, m, s, setting=setting, **(overrides or {})) for m in methods for s in seeds]
    if not configs:
        raise ValueError("no runs: give at least one method and one seed")
    check_output_file(out)
    taken = reused_runs(reuse, configs) if reuse else {}
    prepare_data(configs[0], progress)
    domains = domain_roles(configs[0])
    runs = []
    for cfg in configs:
        if (cfg.method, cfg.seed) in taken:
            runs.append(taken[(cfg.method, cfg.seed)])
            continue
        run = train(cfg, force=force, progress=progress)
        runs.append({**run.metrics, "run_dir": str(run.dir)})
        if out is not None and len(runs) < len(configs):  # partial results as runs finish (atomic)
            atomic_write_json(out, {"preset": preset_name, "complete": False, "runs_planned": len(configs),
                                    "domains": domains, "runs": runs, "table": markdown_table(runs, domains)})
    from ..analysis import compare_runs, contrast, stage_records

    stages = [rec for r in runs for rec in stage_records(r)]
    order = list(dict.fromkeys([*methods, *(s["method"] for s in stages)]))  # the methods, then their earlier stages
    rows = sorted(runs + stages, key=lambda r: order.index(r["method"]))
    reference = reference or methods[0]
    comparisons = compare_runs(rows, reference)
    contrasted = {f"{a} − {b}": {"method": a, **contrast(rows, a, b)} for a, b in contrasts}
    result = {"preset": preset_name, "setting": setting, "uda_target": configs[0].data.uda_target,
              "machine": machine_info(), "domains": domains, "runs": runs, "stages": stages,
              "table": markdown_table(rows, domains), "reference": reference, "comparisons": comparisons,
              "comparison_table": comparison_table(comparisons, domains),
              "contrasts": contrasted, "contrast_table": comparison_table(contrasted, domains)}
    if taken:
        result["reused"] = {f"{m} seed {s}": r["reused_from"] for (m, s), r in taken.items()}
    if out is not None:
        atomic_write_json(out, result)
    return result
