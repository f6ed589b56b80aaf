"""`dgnb` command line: bench, train, eval, data, course."""

from __future__ import annotations

import argparse
import ast
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from .config import PRESETS, SETTINGS, preset
from .errors import pop_debug, run_cli


def parse_value(text: str) -> Any:
    """A KEY=VALUE value: JSON (`true`, `0.2`, `[64, 64]`), else a Python literal (`False`, `(64, 64)`),
    else the text itself (`cuda`, `freeze_both`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if getattr(args, "sources", None) is not None:
        o["data.sources"] = args.sources.split(",") if args.sources else []
    if getattr(args, "targets", None) is not None:
        o["data.targets"] = args.targets.split(",") if args.targets else []
    if getattr(args, "uda_target", None) is not None:
        o["data.uda_target"] = args.uda_target
    elif getattr(args, "setting", "dg") == "uda" and o.get("data.targets"):
        o["data.uda_target"] = o["data.targets"][0]  # --targets A,B in the UDA setting: adapt to A
    if getattr(args, "data_root", None) is not None:
        o["data.root"] = args.data_root
    if getattr(args, "iterations", None) is not None:
        o["train.iterations"] = args.iterations
    if getattr(args, "device", None) is not None:
        o["train.device"] = args.device
    if getattr(args, "amp", None) is not None:
        o["train.amp"] = args.amp
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. train.iterations=100 or hparams.aux_weight=0.2), got '{item}'")
        key, value = item.split("=", 1)
        o[key] = parse_value(value)
    return o


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", choices=PRESETS)
    p.add_argument("--setting", default="dg", choices=SETTINGS,
                   help="dg: labelled sources, targets only evaluated; uda: also the unlabelled train split of "
                        "--uda-target (docs/adaptation.md)")
    p.add_argument("--sources", help="comma-separated source datasets (default: the preset's)")
    p.add_argument("--targets", help="comma-separated target datasets (default: the preset's)")
    p.add_argument("--uda-target", help="UDA: the target adapted to (default: the first of --targets, else the "
                                        "preset's)")
    p.add_argument("--data-root", help="folder holding the datasets (default: the preset's)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"))
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="any config field, e.g. data.batch_per_domain=2")
    p.add_argument("--force", action="store_true", help="retrain even if the run cache holds the run")
    p.add_argument("--no-progress", action="store_true")


def cmd_bench(args: argparse.Namespace) -> None:
    from .engine.bench import bench
    from .methods import REGISTRY

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in REGISTRY:
            raise SystemExit(f"unknown method '{m}'; registered methods: {','.join(sorted(REGISTRY))}")
    if args.reference and args.reference not in methods:
        raise SystemExit(f"--reference {args.reference} is not among --methods {','.join(methods)}; add it to --methods")
    from .engine.bench import parse_contrasts

    contrasts = parse_contrasts(args.contrast)
    known = set(methods) | {f"{m}@stage{k}" for m in methods for k in range(1, 10)}
    for a, b in contrasts:
        for m in (a, b):
            if m not in known:
                raise SystemExit(f"--contrast names '{m}', which is not among --methods {','.join(methods)} "
                                 "(or an earlier stage of one, METHOD@stageK); add it to --methods")
    res = bench(args.preset, methods, args.seeds, _overrides(args), args.force, args.out, not args.no_progress,
                reference=args.reference, setting=args.setting, contrasts=contrasts, reuse=args.reuse or ())
    if res.get("reused"):
        print("reused from earlier bench files, not trained here: " + ", ".join(res["reused"]))
    print(res["table"])
    if res["comparison_table"]:
        print("\n" + res["comparison_table"])
    if res["contrast_table"]:
        print("\n" + res["contrast_table"])
    if args.out:
        print(f"\nwrote {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .engine.runs import train

    cfg = preset(args.preset, args.method, args.seed, setting=args.setting, **_overrides(args))
    run = train(cfg, force=args.force, progress=not args.no_progress)
    if run.complete:
        m = run.metrics
        print(json.dumps({k: m[k] for k in ("method", "seed", "source_val_miou", "target_miou", "train_seconds")}, indent=2))
    print(f"run folder: {run.dir}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .engine.runs import Run, evaluate_domains

    run = Run.open(args.run)
    cfg = run.config
    if args.data_root:
        cfg.data.root = args.data_root
    if args.protocol:
        cfg.data.protocol = args.protocol
    domains = args.domains.split(",") if args.domains else cfg.data.sources + cfg.data.targets
    _check_eval_inputs(run, cfg, domains, args.split, args.partial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unfinished run is announced below, once
        method = run.load_method(args.device or "auto")
    if not run.complete:
        print(f"note: {run.dir} is unfinished; scoring its checkpoint at iteration {method.iteration} of "
              f"{cfg.train.iterations} (--partial)", file=sys.stderr)
    results = evaluate_domains(method, cfg, domains, args.split)
    print("| domain | mIoU | pixel acc |\n|---|---|---|")
    for name, m in results.items():
        print(f"| {name} | {m.miou:.2f} | {m.accuracy:.2f} |")
    if args.per_class:
        for name, m in results.items():
            print(f"\n{name}: " + ", ".join(f"{c} {v:.1f}" for c, v in m.per_class().items()))


def _check_eval_inputs(run: Any, cfg: Any, domains: list[str], split: str, partial: bool) -> None:
    """Refuse an unfinished run unless --partial; check the domains exist before loading the model."""
    from .data.city import SPLITS
    from .engine.runs import check_names, domain_set

    if not run.complete and not partial:
        raise ValueError(f"{run.dir} is an unfinished run (no metrics.json: training was interrupted or is still "
                         "going). Finish it with `dgnb train` and the same arguments (it resumes), or pass --partial "
                         "to score its latest checkpoint anyway.")
    if split not in SPLITS:
        raise ValueError(f"--split {split!r} is not valid; choose one of {', '.join(SPLITS)}")
    if not domains or "" in domains:
        raise ValueError(f"--domains {','.join(domains)!r} is not valid: give comma-separated dataset names")
    check_names(cfg, domains, "evaluation")
    for name in domains:
        domain_set(cfg, name, split, None)


def _figure_path(out: str | None, default: str) -> Path:
    """Where `data render` writes: a folder gets the default name inside it, a name without suffix gets .png."""
    if out is None:
        return Path(default)
    path = Path(out)
    if path.is_dir():
        return path / default
    return path if path.suffix else path.with_suffix(".png")


def cmd_data(args: argparse.Namespace) -> None:
    from .data import city

    if args.action == "list":
        for name, d in city.DOMAINS.items():
            print(f"{name:16s} {d.role:10s} {d.description}")
        print("\nknobs (severity 0-5): " + ", ".join(city.KNOBS))
        return
    cfg = preset(args.preset)
    root = args.root or cfg.data.root
    c = cfg.data.city
    if args.action == "generate":
        domains = args.domains.split(",") if args.domains else list(city.DOMAINS)
        city.ensure_city(root, domains=domains, splits={"train": c["train"], "val": c["val"]}, size=tuple(c["size"]),
                         seed=c["seed"], progress=True)
        print(f"city domains {domains} ready under {root}")
    elif args.action == "inspect":
        from .data.inspect import describe_dataset

        for name in (args.domains.split(",") if args.domains else sorted(p.name for p in Path(root).iterdir() if (p / "meta.json").is_file())):
            print(describe_dataset(root, name))
    elif args.action == "render":
        from .viz.figures import knob_sweep_figure

        if not args.domains or not args.knob:
            raise SystemExit("dgnb data render needs --domains NAME and --knob KNOB (see `dgnb data list`)")
        out = _figure_path(args.out, f"{args.domains.split(',')[0]}_{args.knob}.png")
        fig = knob_sweep_figure(args.domains.split(",")[0], args.knob, index=args.index, size=tuple(c["size"]))
        fig.savefig(out, dpi=120, bbox_inches="tight")
        print(f"wrote {out}")


def cmd_course(args: argparse.Namespace) -> None:
    from .course import course_plan, plan_table, prepare_course

    if args.action == "list":
        print(plan_table(course_plan(args.preset, args.seed)))
        return
    prepare_course(args.preset, args.seed, force=args.force, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> None:
    from .methods import REGISTRY

    parser = argparse.ArgumentParser(prog="dgnb", description="Domain generalization / adaptation course toolkit")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("bench", help="train/load methods x seeds and print the mIoU table")
    _common(p)
    p.add_argument("--methods", default="erm", help=f"comma-separated, from: {','.join(sorted(REGISTRY))}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", help="write the JSON results here")
    p.add_argument("--reference", help="method the paired per-seed differences are taken to (default: the first)")
    p.add_argument("--contrast", nargs="*", metavar="A:B",
                   help="extra paired differences A − B, e.g. mrnet:mrnet@stage1 (METHOD@stageK: a multi-stage "
                        "method's weights at the end of stage K)")
    p.add_argument("--reuse", nargs="*", metavar="FILE",
                   help="earlier `dgnb bench --out` files: their runs of the same set-up (all requested seeds) stand "
                        "in for training those methods, e.g. to add a method to a measured table")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("train", help="train one run (or return it from the run cache)")
    _common(p)
    p.add_argument("--method", default="erm", choices=sorted(REGISTRY))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run on datasets")
    p.add_argument("run", help="run folder (printed by dgnb train)")
    p.add_argument("--domains", help="comma-separated datasets (default: the run's sources and targets)")
    p.add_argument("--split", default="val")
    p.add_argument("--protocol", choices=("19", "16", "13"))
    p.add_argument("--data-root")
    p.add_argument("--device")
    p.add_argument("--per-class", action="store_true")
    p.add_argument("--partial", action="store_true", help="score an unfinished run's latest checkpoint")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("data", help="the procedural city: list, generate, inspect, render a knob sweep")
    p.add_argument("action", choices=("list", "generate", "inspect", "render"))
    p.add_argument("--preset", default="quick", choices=PRESETS)
    p.add_argument("--root")
    p.add_argument("--domains")
    p.add_argument("--knob")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("course", help="train every run the notebooks need before a lab (prepare), or list them")
    p.add_argument("action", choices=("prepare", "list"))
    p.add_argument("--preset", default="quick", choices=PRESETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain runs the run cache already holds")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_course)

    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of expected errors (allowed anywhere in the line)")
    argv, debug = pop_debug(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    code = run_cli("dgnb", lambda: args.fn(args), debug)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
