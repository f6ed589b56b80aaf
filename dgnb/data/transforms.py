"""Joint image + mask transforms (torchvision.transforms.v2 with tv_tensors).

Images stay uint8 through the geometric ops and become float in [0, 1] at the end; masks are
`tv_tensors.Mask`, so v2 resizes them with nearest interpolation and pads them with 255.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .taxonomy import IGNORE_INDEX

_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


def train_transform(
    crop: tuple[int, int], base_size: tuple[int, int], scale: tuple[float, float] = (0.75, 1.25),
    color_jitter: float = 0.0,
) -> v2.Compose:
    """Random scale of the shorter side around `base_size`, random crop, h-flip, optional jitter."""
    short = min(base_size)
    ops: list[v2.Transform] = [
        v2.RandomResize(int(short * scale[0]), int(short * scale[1]) + 1, antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True, fill=_FILL),
        v2.RandomHorizontalFlip(),
    ]
    if color_jitter > 0:
        j = color_jitter
        ops.append(v2.RandomApply([v2.ColorJitter(j, j, j, min(j / 4, 0.5))], p=0.5))
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.ToPureTensor()]
    return v2.Compose(ops)


def eval_transform(size: tuple[int, int] | None = None) -> v2.Compose:
    """Whole image, single scale (resized to `size` if given), no flip: dgnb's default protocol."""
    ops: list[v2.Transform] = [v2.Resize(size, antialias=True)] if size else []
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.ToPureTensor()]
    return v2.Compose(ops)
