"""Output-space discriminators of the UDA papers: they look at a class-probability map (B, K, H, W) and
answer, per patch, "source or target?" (the label convention lives in `dgnb.methods.uda`).

- `FCDiscriminator` (AdaptSegNet, Tsai et al. 2018; also ADVENT's AdvEnt): five 4x4 convolutions of
  stride 2, widths w, 2w, 4w, 8w, 1 (the paper's w = 64), LeakyReLU(0.2) after the first four, no
  normalisation; a logit map at 1/32 of the input. One per output level (main and auxiliary head).
- `MultiScaleDiscriminator` (MRNet's code, a PatchGAN from MUNIT): the same small network applied to
  the map and to two average-pooled copies (3x3, stride 2); per scale five 3x3 convolutions (strides
  2, 1, 2, 1, 2; widths w, w, w, w, 2w, the code's w = 32), four residual blocks, and a 1x1 conv to one
  map; LeakyReLU(0.2), no normalisation, weights N(0, 0.02). Returns one output map per scale.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FCDiscriminator(nn.Module):
    """AdaptSegNet's fully convolutional discriminator: (B, K, H, W) probabilities -> (B, 1, H/32, W/32) logits."""

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        widths = [num_classes, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, probs: torch.Tensor) -> list[torch.Tensor]:
        """A one-element list (the same interface as the multi-scale discriminator)."""
        return [self.net(probs)]


class ResidualBlock(nn.Module):
    """x + Conv3x3(LeakyReLU(Conv3x3(x))) without normalisation (MUNIT's block, norm 'none')."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _patch_discriminator(num_classes: int, width: int, res_blocks: int) -> nn.Sequential:
    convs = [(num_classes, width, 2), (width, width, 1), (width, width, 2), (width, width, 1), (width, 2 * width, 2)]
    layers: list[nn.Module] = []
    for cin, cout, stride in convs:
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2, inplace=True)]
    layers += [ResidualBlock(2 * width) for _ in range(res_blocks)]
    layers.append(nn.Conv2d(2 * width, 1, 1))
    return nn.Sequential(*layers)


class MultiScaleDiscriminator(nn.Module):
    """MRNet's multi-scale LSGAN discriminator: one patch discriminator per scale of the input map."""

    def __init__(self, num_classes: int, width: int = 32, scales: int = 3, res_blocks: int = 4) -> None:
        super().__init__()
        self.nets = nn.ModuleList(_patch_discriminator(num_classes, width, res_blocks) for _ in range(scales))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, probs: torch.Tensor) -> list[torch.Tensor]:
        """Output maps, finest scale first; the input is average-pooled (3x3, stride 2) between scales."""
        outs = []
        for net in self.nets:
            outs.append(net(probs))
            probs = F.avg_pool2d(probs, 3, stride=2, padding=1, count_include_pad=False)
        return outs


DISCRIMINATORS = {"fc": FCDiscriminator, "multiscale": MultiScaleDiscriminator}


def build_discriminator(kind: str, num_classes: int, width: int) -> nn.Module:
    """`fc` (AdaptSegNet; `width` is its first conv's, the paper's 64) or `multiscale` (MRNet; its first conv
    is half as wide, the code's 32 for 64)."""
    if kind == "fc":
        return FCDiscriminator(num_classes, width)
    if kind == "multiscale":
        return MultiScaleDiscriminator(num_classes, max(4, width // 2))
    raise ValueError(f"unknown discriminator '{kind}'; choose one of {sorted(DISCRIMINATORS)}")
