"""Command line: `python -m data_tools {convert,verify,list}`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import DATASETS, ConversionError, Options, convert, verify


def _split_files(items: list[str] | None) -> dict[str, Path]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConversionError(f"--split-file expects SPLIT=FILE (e.g. train=gtav_split_train.txt), got '{item}'")
        split, path = item.split("=", 1)
        out[split] = Path(path)
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    opts = Options(
        splits=args.split.split(",") if args.split else None, resize=args.resize, square=args.square,
        workers=args.workers, name=args.name, split_files=_split_files(args.split_file),
        split_dir=Path(args.split_dir) if args.split_dir else None, gtav_list=args.gtav_list,
        mapillary_version=args.mapillary_version, on_mismatch=args.on_mismatch, on_degenerate=args.on_degenerate,
        unknown_ids=args.unknown_ids, allow_orphans=args.allow_orphans, limit=args.limit,
        progress=not args.no_progress, dry_run=args.dry_run,
    )
    convert(args.dataset, args.src, args.dst, opts)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify(args.path, workers=args.workers, progress=not args.no_progress, quick=args.quick)
    print(report.text())
    return 0 if report.ok else 1


def cmd_list(args: argparse.Namespace) -> int:
    for kind, spec in DATASETS.items():
        print(f"{kind:11s} {spec.title}; splits {', '.join(spec.splits)} (default {','.join(spec.default_splits)}); "
              f"protocol {spec.protocol}")
        for layout in spec.layouts:
            print(f"{'':11s}   layout: {layout}")
    return 0


def parser() -> argparse.ArgumentParser:
    workers = min(8, os.cpu_count() or 1)
    p = argparse.ArgumentParser(prog="python -m data_tools",
                                description="Convert real DG/UDA segmentation datasets to dgnb's common layout.")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="convert a native download into DATA_ROOT/<name>/")
    c.add_argument("dataset", choices=sorted(DATASETS))
    c.add_argument("--src", required=True, help="folder holding the extracted native download")
    c.add_argument("--dst", required=True, help="data root (the dataset goes to DST/<name>/)")
    c.add_argument("--split", help="comma-separated splits (default: the dataset's labelled ones, e.g. train,val; "
                   "gtav/synthia also accept 'all', written as train)")
    c.add_argument("--resize", type=int, metavar="SHORT_SIDE", help="resize so the short side is this many pixels "
                   "(images bilinear, labels nearest); with --square, see there")
    c.add_argument("--square", action="store_true", help="with --resize N, RobustNet's Mapillary evaluation "
                   "transform exactly: height -> N (width truncated), image bicubic, label nearest, centre N x N "
                   "crop (portrait images padded with ignore); use --resize 1536 --square on val")
    c.add_argument("--workers", type=int, default=workers, help=f"worker processes (default {workers})")
    c.add_argument("--name", help="output dataset folder name (default: the dataset kind; mapillary_v2 for v2.0)")
    c.add_argument("--split-file", action="append", metavar="SPLIT=FILE", help="a list of sample names for a split "
                   "(one per line, e.g. RobustNet's gtav_split_train.txt); repeatable")
    c.add_argument("--split-dir", help="folder with <dataset>_split_<split>.txt lists (RobustNet's split_data/)")
    c.add_argument("--gtav-list", choices=("dg", "official"), default="dg", help="GTAV train: 'dg' = official minus "
                   "RobustNet's 15 single-colour frames (12,388, default), 'official' = split.mat as is (12,403)")
    c.add_argument("--mapillary-version", choices=("1.2", "2.0"), default="1.2")
    c.add_argument("--on-mismatch", choices=("error", "drop", "resize"), help="image/label size mismatch "
                   "(default: drop for gtav, error otherwise)")
    c.add_argument("--on-degenerate", choices=("keep", "drop"), help="single-colour images (default: drop for "
                   "gtav, keep otherwise)")
    c.add_argument("--unknown-ids", choices=("error", "ignore"), default="error",
                   help="label ids the format does not define: fail (default) or map them to 255")
    c.add_argument("--allow-orphans", action="store_true", help="convert complete pairs when some images lack a "
                   "label or the reverse (listed in the manifest)")
    c.add_argument("--limit", type=int, help="convert only the first N pairs of each split (a trial run)")
    c.add_argument("--dry-run", action="store_true", help="detect the layout and plan the splits, write nothing")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_convert)

    v = sub.add_parser("verify", help="check a converted dataset; non-zero exit on problems")
    v.add_argument("path", help="DATA_ROOT/<dataset>")
    v.add_argument("--workers", type=int, default=workers)
    v.add_argument("--quick", action="store_true", help="read image headers only (no full decode)")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(fn=cmd_verify)

    ls = sub.add_parser("list", help="the datasets and the layouts each converter accepts")
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    from dgnb.errors import pop_debug, run_cli

    p = parser()
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks of expected errors (allowed anywhere in the line)")
    argv, debug = pop_debug(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(argv)
    return run_cli("data_tools", lambda: args.fn(args), debug, extra=(ConversionError,))


if __name__ == "__main__":
    sys.exit(main())
