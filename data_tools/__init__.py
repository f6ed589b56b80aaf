"""data_tools: convert the native downloads of the DG/UDA benchmarks into dgnb's common layout, and check them.

    python -m data_tools convert DATASET --src DOWNLOAD_DIR --dst DATA_ROOT [--split ...] [--resize N] [--workers N]
    python -m data_tools verify DATA_ROOT/DATASET

Datasets: gtav, synthia (RAND-CITYSCAPES), cityscapes, bdd100k, mapillary (v1.2, v2.0), idd.
See README "Real datasets" and docs/real_datasets.md for the facts each converter follows.
"""

from __future__ import annotations

from . import bdd100k, cityscapes, gtav, idd, mapillary, synthia
from .common import ConversionError, DatasetSpec, Options, convert
from .verify import VerifyReport, verify

DATASETS: dict[str, DatasetSpec] = {m.SPEC.kind: m.SPEC for m in (gtav, synthia, cityscapes, bdd100k, mapillary, idd)}


def get_spec(kind: str) -> DatasetSpec:
    """The converter of `kind`, with an error listing the known ones."""
    try:
        return DATASETS[kind]
    except KeyError:
        raise ConversionError(f"unknown dataset '{kind}'; data_tools converts: {', '.join(DATASETS)}") from None


__all__ = ["DATASETS", "ConversionError", "DatasetSpec", "Options", "VerifyReport", "convert", "get_spec", "verify"]
