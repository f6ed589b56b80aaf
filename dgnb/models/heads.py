"""Segmentation heads.

- `DeepLabV3PlusHead` (the DG papers' base, RobustNet family): torchvision's ASPP (1x1, three
  dilated 3x3, image pooling, 1x1 projection = the "bot_aspp" feature F), a 1x1-reduced low-level
  skip from layer1, two 3x3 convs and a 1x1 classifier. torchvision's ASPP ends in Dropout(0.5);
  here that dropout is taken out of `encode` and applied at the start of `decode`
  (`feature_dropout`), so F itself is dropout-free, as the official DG networks' bot_aspp is. For a
  plain forward pass nothing changes (dropout(F) -> decoder); a method that acts on F (Pin the
  Memory's memory read and write) sees the clean feature, and the decoder still gets the dropout.
- `DeepLabV2Head` (the UDA papers' base): the ASPP-v2 classifier, four dilated 3x3 convs straight
  to class scores, summed (all four branches: the AdaptSegNet return-in-loop bug is not copied).
Both split into `encode` (deep feature -> F, the feature the methods act on) and `decode`
(F + stage features -> class scores) so a method can act on F in between.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeepLabV3PlusHead(nn.Module):
    def __init__(
        self, in_channels: int, low_channels: int, num_classes: int, rates: tuple[int, int, int] = (6, 12, 18),
        channels: int = 256, low_proj: int = 48, decoder_channels: int | None = None, feature_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        dec = decoder_channels or channels
        self.feature_channels = channels
        self.decoder_channels = dec  # channels of decode_features
        self.aspp = ASPP(in_channels, list(rates), channels)
        self.aspp.project[-1] = nn.Identity()  # torchvision's Dropout(0.5): moved to the start of decode
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.low_proj = conv_bn_relu(low_channels, low_proj, k=1)
        self.decoder = nn.Sequential(conv_bn_relu(channels + low_proj, dec), conv_bn_relu(dec, dec))
        self.classifier = nn.Conv2d(dec, num_classes, 1)

    def encode(self, stages: dict[str, torch.Tensor]) -> torch.Tensor:
        """F = bot_aspp(ASPP(layer4)), (B, channels, H/os, W/os), without dropout."""
        return self.aspp(stages["layer4"])

    def decode_features(self, features: torch.Tensor, stages: dict[str, torch.Tensor], dropout: bool = True
                        ) -> torch.Tensor:
        """The decoder's last feature map at stride 4 (before the classifier): dropout(F) (if `dropout`) ->
        upsample, concat the low-level skip -> convs. SPC's semantic clustering acts on it."""
        if dropout:
            features = self.feature_dropout(features)
        low = self.low_proj(stages["layer1"])
        up = nn.functional.interpolate(features, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.decoder(torch.cat([up, low], dim=1))

    def decode(self, features: torch.Tensor, stages: dict[str, torch.Tensor], dropout: bool = True) -> torch.Tensor:
        """Class scores at stride 4 from F: the classifier on `decode_features`."""
        return self.classifier(self.decode_features(features, stages, dropout))


class ASPPV2Classifier(nn.Module):
    """DeepLab-v2 classifier: sum over dilations r of Conv3x3_r(x) -> class scores."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for b in self.branches:
            nn.init.normal_(b.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.branches]).sum(0)


class DeepLabV2Head(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.feature_channels = in_channels
        self.decoder_channels = in_channels
        self.classifier = ASPPV2Classifier(in_channels, num_classes, rates)

    def encode(self, stages: dict[str, torch.Tensor]) -> torch.Tensor:
        """F = layer4 output (the v2 classifier maps it straight to class scores)."""
        return stages["layer4"]

    def decode_features(self, features: torch.Tensor, stages: dict[str, torch.Tensor], dropout: bool = True
                        ) -> torch.Tensor:
        """No decoder: the classifier acts on F itself."""
        return features

    def decode(self, features: torch.Tensor, stages: dict[str, torch.Tensor], dropout: bool = True) -> torch.Tensor:
        return self.classifier(features)
