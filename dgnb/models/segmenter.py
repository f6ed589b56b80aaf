"""`Segmenter` = backbone + head (+ auxiliary classifier on layer3), built from a `ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.segmentation.fcn import FCNHead

from ..data.taxonomy import NUM_CLASSES
from .backbones import build_backbone
from .heads import ASPPV2Classifier, DeepLabV2Head, DeepLabV3PlusHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS = ("deeplabv3plus", "deeplabv2")


@dataclass
class ModelConfig:
    backbone: str = "resnet_tiny"
    head: str = "deeplabv3plus"
    output_stride: int = 8
    pretrained: bool = False
    head_channels: int = 64
    low_proj: int = 16
    decoder_channels: int | None = None  # None: same as head_channels (the paper's 256/256)
    aspp_rates: tuple[int, ...] = (4, 8, 12)
    feature_dropout: float = 0.5  # DeepLab-v3+: dropout on F at the start of the decoder (torchvision's ASPP value)
    aux: bool = True
    num_classes: int = NUM_CLASSES
    ibn: str = "none"  # IBN-Net variant of the backbone: none, a (IBN-a) or b (IBN-b); dgnb.models.style.apply_ibn
    disc_channels: int = 64  # width of the first conv of the output-space discriminators (UDA; the papers' 64)


@dataclass
class SegOutput:
    """What a forward pass returns. `features` is F, the encoder feature the methods act on."""

    logits: torch.Tensor
    features: torch.Tensor
    aux_logits: torch.Tensor | None = None
    stages: dict[str, torch.Tensor] = field(default_factory=dict)


class Segmenter(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> class scores at input size; ImageNet normalisation inside."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.head not in HEADS:
            raise ValueError(f"unknown head '{cfg.head}'; choose one of {HEADS}")
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.output_stride, cfg.pretrained, cfg.ibn)
        ch = self.backbone.channels
        if cfg.head == "deeplabv3plus":
            self.head: nn.Module = DeepLabV3PlusHead(
                ch["layer4"], ch["layer1"], cfg.num_classes, tuple(cfg.aspp_rates), cfg.head_channels, cfg.low_proj,
                cfg.decoder_channels, cfg.feature_dropout,
            )
            self.aux_head = FCNHead(ch["layer3"], cfg.num_classes) if cfg.aux else None
        else:
            self.head = DeepLabV2Head(ch["layer4"], cfg.num_classes, tuple(cfg.aspp_rates))
            self.aux_head = ASPPV2Classifier(ch["layer3"], cfg.num_classes, tuple(cfg.aspp_rates)) if cfg.aux else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_channels(self) -> int:
        return self.head.feature_channels

    def encode(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Backbone stages and F = head.encode(stages)."""
        stages = self.backbone((images - self.mean) / self.std)
        return stages, self.head.encode(stages)

    def decode(self, features: torch.Tensor, stages: dict[str, torch.Tensor], size: tuple[int, int],
               dropout: bool = True) -> torch.Tensor:
        """Class scores from F (possibly changed by a method), upsampled bilinearly to `size`; `dropout=False`
        skips the head's feature dropout (for a method that already applied it to F)."""
        return F.interpolate(self.head.decode(features, stages, dropout), size=size, mode="bilinear",
                             align_corners=False)

    def forward(self, images: torch.Tensor, return_stages: bool = False) -> SegOutput:
        size = images.shape[-2:]
        stages, feats = self.encode(images)
        aux = None
        if self.aux_head is not None and self.training:
            aux = F.interpolate(self.aux_head(stages["layer3"]), size=size, mode="bilinear", align_corners=False)
        return SegOutput(self.decode(feats, stages, size), feats, aux, stages if return_stages else {})
