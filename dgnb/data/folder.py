"""One Dataset for the common on-disk layout, shared by generated and converted real data.

Layout (docs/design.md, 'Data'):

    <root>/<dataset>/meta.json                      name, domain, role, classes present, image size, origin
    <root>/<dataset>/<split>/images/<id>.png|jpg    RGB image
    <root>/<dataset>/<split>/labels/<id>.png        uint8 train ids 0..18, 255 = ignore
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .taxonomy import check_label_values

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetLayoutError(FileNotFoundError):
    """The folder does not follow the common layout; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path | None


def read_meta(root: str | Path, dataset: str) -> dict[str, Any]:
    """Read `<root>/<dataset>/meta.json`, with an error that names the fix."""
    ds_dir = Path(root) / dataset
    meta_path = ds_dir / "meta.json"
    if not ds_dir.is_dir():
        found = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else None
        hint = (
            f"data root {Path(root)} does not exist" if found is None
            else f"found datasets: {found or 'none'}"
        )
        raise DatasetLayoutError(
            f"dataset '{dataset}' not found under {ds_dir} ({hint}). Generate the procedural city with "
            "`dgnb data generate --root DATA_ROOT`, or convert a real dataset with "
            "`python -m data_tools convert DATASET --src DOWNLOAD --dst DATA_ROOT`."
        )
    if not meta_path.is_file():
        raise DatasetLayoutError(
            f"{meta_path} is missing: every dataset folder needs a meta.json (written by the generator and "
            "by data_tools). Re-run the command that made this folder."
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{meta_path} is not valid JSON ({e}); delete it and re-run the command "
                                 "that made this folder.") from e


def check_count(ds_dir: Path, split: str, found: int, meta: dict[str, Any]) -> None:
    """A split must hold at least the number of samples its meta.json records (deleted files are not silent)."""
    recorded = (meta.get("splits") or {}).get(split)
    if not isinstance(recorded, int) or found >= recorded:
        return
    if meta.get("origin") == "dgnb procedural city":
        fix = ("rerun the same command: the generator refills missing images (or `dgnb data generate "
               f"--root {ds_dir.parent} --domains {ds_dir.name}`)")
    else:
        fix = ("rerun the `python -m data_tools convert` command that made it (finished files are skipped), then "
               f"`python -m data_tools verify {ds_dir}`")
    raise DatasetLayoutError(f"{ds_dir / split} holds {found} complete image/label pairs but {ds_dir / 'meta.json'} "
                             f"records {recorded}: files were deleted or the copy is incomplete. To fix it, {fix}.")


def list_samples(split_dir: Path, require_labels: bool = True) -> list[Sample]:
    """Pair `images/<id>.*` with `labels/<id>.png`, sorted by id; orphans are an error."""
    img_dir, lbl_dir = split_dir / "images", split_dir / "labels"
    if not img_dir.is_dir():
        raise DatasetLayoutError(
            f"{img_dir} is missing. Expected <root>/<dataset>/<split>/images/<id>.png with labels beside it "
            f"in <split>/labels/<id>.png; splits present: "
            f"{sorted(p.name for p in split_dir.parent.iterdir() if p.is_dir()) if split_dir.parent.is_dir() else []}."
        )
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    if not images:
        raise DatasetLayoutError(f"{img_dir} holds no .png/.jpg images.")
    labels = {p.stem: p for p in lbl_dir.glob("*.png")} if lbl_dir.is_dir() else {}
    if require_labels:
        missing = sorted(set(images) - set(labels))
        if missing:
            raise DatasetLayoutError(
                f"{len(missing)} image(s) in {img_dir} have no label in {lbl_dir}, e.g. '{missing[0]}'. "
                "Re-run the generator/converter (it resumes), or remove the orphan images."
            )
    return [Sample(images[k], labels.get(k)) for k in sorted(images)]


def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError) as e:
        raise DatasetLayoutError(f"cannot read image {path} ({e}); the file is truncated or not an image. "
                                 "Delete it and re-run the command that wrote it.") from e


def load_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise DatasetLayoutError(
                    f"label {path} has mode {im.mode}; labels must be single-channel uint8 train ids. "
                    "Colour renderings cannot be used: convert with data_tools."
                )
            label = np.array(im)
    except (OSError, SyntaxError) as e:
        raise DatasetLayoutError(f"cannot read label {path} ({e}); delete it and re-run the converter.") from e
    check_label_values(label, str(path))
    return label


class SegFolder(Dataset):
    """Images and train-id labels of one split of one dataset in the common layout.

    Returns dicts {"image": tv_tensors.Image uint8 (3,H,W), "label": tv_tensors.Mask int64 (H,W),
    "domain": int} after the optional joint `transform`.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        domain_index: int = 0,
        limit: int | None = None,
        require_labels: bool = True,
        cache: bool = False,
        labels: bool = True,
    ) -> None:
        self.root, self.dataset, self.split = Path(root), dataset, split
        self.meta = read_meta(root, dataset)
        samples = list_samples(self.root / dataset / split, require_labels and labels)
        check_count(self.root / dataset, split, len(samples), self.meta)
        if not labels:  # unlabelled (a UDA target's train split): no label path is even kept
            samples = [Sample(s.image, None) for s in samples]
        self.samples = samples[:limit]
        self.pseudo = self.meta.get("origin") == "pseudo labels"  # labels made by a model (dgnb.methods.pseudo_labels)
        self.transform = transform
        self.domain_index = domain_index
        self.cache: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = {} if cache else None

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Decoded (image, label) of sample i, checked; kept in memory when `cache=True` (small datasets)."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        s = self.samples[i]
        image = load_image(s.image)
        label = None
        if s.label is not None:
            label = load_label(s.label)
            if label.shape != image.shape[:2]:
                raise DatasetLayoutError(
                    f"size mismatch: image {s.image} is {image.shape[1]}x{image.shape[0]} but label {s.label} "
                    f"is {label.shape[1]}x{label.shape[0]} (WxH). Re-convert this dataset; data_tools resizes "
                    "both together."
                )
        if self.cache is not None:
            self.cache[i] = (image, label)
        return image, label

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_labels(self) -> bool:
        return any(s.label is not None for s in self.samples)

    def tensors(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample i as plain tensors, un-transformed: uint8 image (3, H, W) and int64 label (H, W)."""
        image, label = self._read(i)
        img = torch.from_numpy(image).permute(2, 0, 1)
        return img, (torch.from_numpy(label.astype(np.int64)) if label is not None else None)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self._read(i)
        item: dict[str, Any] = {"image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())}
        if label is not None:
            item["label"] = tv_tensors.Mask(torch.from_numpy(label.astype(np.int64)))
        item["domain"] = self.domain_index
        if self.transform is not None:
            item = self.transform(item)
        return item
