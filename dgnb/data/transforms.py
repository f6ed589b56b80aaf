"""Joint image + mask transforms.

Training: `BatchAugment`, the random scale, crop and horizontal flip of the DeepLab recipe done for a
whole batch in one affine resampling per image size (`torch.nn.functional.affine_grid` +
`grid_sample`): bilinear for images (padding 0), nearest for masks (padding 255 = ignore). It is the
same geometry as torchvision's `v2.RandomResize -> v2.RandomCrop(pad_if_needed) -> v2.RandomHorizontalFlip`
(without the antialias filter: the quick preset never shrinks below 0.75x), but costs one tensor op
per batch instead of four per image, and runs on the training device. Each image's parameters come
from its own seed, so a batch stays a pure function of the iteration (exact resume).

Evaluation: `eval_transform`, torchvision.transforms.v2 with tv_tensors (masks resized nearest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from .taxonomy import IGNORE_INDEX


@dataclass(frozen=True)
class BatchAugment:
    """Random scale of the shorter side to U(scale) x min(base_size), random crop `crop` (h, w) padded with
    0 / 255 where the scaled image is smaller, horizontal flip with p = 0.5; optional colour jitter."""

    crop: tuple[int, int]
    base_size: tuple[int, int]
    scale: tuple[float, float] = (0.75, 1.25)
    color_jitter: float = 0.0

    def affine(self, size: tuple[int, int], seed: int) -> torch.Tensor:
        """θ (2, 3) mapping crop coordinates to input coordinates (normalised, align_corners=False).

        With s the resize factor, (Hr, Wr) = s (H, W) the resized size and (top, left) the crop offset
        in it: x_in = (left + x_out) / s, i.e. θ = [[±cw/Wr, 0, (2 left + cw)/Wr − 1], [0, ch/Hr, (2 top + ch)/Hr − 1]].
        """
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        h, w = size
        ch, cw = self.crop
        short = min(self.base_size) * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
        s = short / min(h, w)
        hr, wr = h * s, w * s
        top = min(0.0, hr - ch) + u[1] * abs(hr - ch)
        left = min(0.0, wr - cw) + u[2] * abs(wr - cw)
        flip = -1.0 if u[3] < 0.5 else 1.0
        return torch.tensor([[flip * cw / wr, 0.0, (2 * left + cw) / wr - 1],
                             [0.0, ch / hr, (2 * top + ch) / hr - 1]], dtype=torch.float32)

    def __call__(self, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None, seeds: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 images (3, H, W) and int masks (H, W) -> float images (B, 3, h, w) in [0, 1], int64 masks (B, h, w).
        `labels=None` (unlabelled target images): the same geometry, and None for the masks."""
        n = len(images)
        device = images[0].device
        out_img = torch.empty(n, 3, *self.crop, device=device)
        out_lbl = torch.empty(n, *self.crop, dtype=torch.int64, device=device) if labels is not None else None
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[-2:]), []).append(i)
        for size, idx in groups.items():  # one resampling per distinct input size (one for the city)
            theta = torch.stack([self.affine(size, seeds[i]) for i in idx]).to(device)
            grid = F.affine_grid(theta, [len(idx), 1, *self.crop], align_corners=False)
            img = torch.stack([images[i] for i in idx]).float().div_(255)
            out_img[idx] = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            if labels is None:
                continue
            # labels + 1 so that the zero padding marks "outside the image" -> ignore
            lbl = torch.stack([labels[i] for i in idx]).unsqueeze(1).float() + 1
            lbl = F.grid_sample(lbl, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].long() - 1
            out_lbl[idx] = torch.where(lbl < 0, IGNORE_INDEX, lbl)
        if self.color_jitter > 0:
            out_img = self.jitter(out_img, seeds)
        return out_img.clamp_(0, 1), out_lbl

    def jitter(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """RandomApply(ColorJitter(j, j, j, min(j/4, 0.5)), p=0.5) per image, seeded by the image's seed."""
        j = self.color_jitter
        op = v2.RandomApply([v2.ColorJitter(j, j, j, min(j / 4, 0.5))], p=0.5)
        out = []
        for im, seed in zip(images, seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                out.append(op(im))
        return torch.stack(out)


def eval_transform(size: tuple[int, int] | None = None) -> v2.Compose:
    """Whole image, single scale (resized to `size` if given), no flip: dgnb's default protocol."""
    ops: list[v2.Transform] = [v2.Resize(size, antialias=True)] if size else []
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.ToPureTensor()]
    return v2.Compose(ops)
