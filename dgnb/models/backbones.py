"""ResNet backbones with a fixed stage interface: stem, layer1..layer4.

torchvision's ResNets supply the blocks and the weights; `resnet_tiny` is a narrow ResNet built
from the same torchvision `BasicBlock` so that every method runs unchanged on 2 CPU cores.
Output stride 8 or 16 is reached by dilating the last stage(s) instead of striding (DeepLab).

Style methods extend the backbone in two documented ways (`dgnb.models.style`): a `StageTransform`
inserted after a named stage with `insert_transform` (its by-products come back in the stage dict as
`"<stage>.<name>"`), and the IBN-Net variants selected by `ModelConfig.ibn` (`build_backbone(..., ibn=)`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock

from ..errors import DgnbError
from .style import StageTransform, apply_ibn, block_channels

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _dilate_stage(layer: nn.Sequential, dilation: int, previous: int) -> None:
    """Turn a strided stage into a dilated one (stride 1, 3x3 convs dilated), in place.

    Same rule as torchvision's `replace_stride_with_dilation` (the first block keeps the previous
    stage's rate), which only exists for Bottleneck; this covers BasicBlock too.
    """
    for i, block in enumerate(layer):
        d = previous if i == 0 else dilation
        for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d)):
            if conv.stride == (2, 2):
                conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (d, d), (d, d)


class ResNetBackbone(nn.Module):
    """Stages of a ResNet; `forward` returns the dict of all five stage outputs.

    Transforms inserted with `insert_transform(stage, transform)` run right after their stage; their
    by-products join the dict as `"<stage>.<name>"` (e.g. `"layer1.lambda"`).
    """

    def __init__(self, net: resnet.ResNet, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if output_stride == 16:
            _dilate_stage(self.layer4, 2, previous=1)
        elif output_stride == 8:
            _dilate_stage(self.layer3, 2, previous=1)
            _dilate_stage(self.layer4, 4, previous=2)
        self.output_stride = output_stride
        self.channels = {
            "stem": net.conv1.out_channels,
            **{name: block_channels(getattr(self, name)[-1]) for name in STAGES[1:]},
        }
        self.transforms = nn.ModuleDict()  # stage name -> StageTransform run after that stage

    def insert_transform(self, stage: str, transform: StageTransform) -> StageTransform:
        """Run `transform` on the output of `stage` (one of STAGES); what it returns flows into the next stage.

        One transform per stage; an unknown stage or a second transform at the same stage is an error."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} for a stage transform; valid stages: {', '.join(STAGES)}")
        if stage in self.transforms:
            raise ValueError(f"stage {stage!r} already has a transform ({type(self.transforms[stage]).__name__}); "
                             "combine both into one StageTransform, or insert the second at another stage")
        if not isinstance(transform, StageTransform):
            raise TypeError(f"a stage transform must subclass dgnb.models.style.StageTransform, got "
                            f"{type(transform).__name__}")
        if transform.expose not in ("output", "input"):
            raise ValueError(f"StageTransform.expose must be 'output' or 'input', got {transform.expose!r}")
        self.transforms[stage] = transform
        return transform

    def forward(self, x: torch.Tensor, until: str = "layer4") -> dict[str, torch.Tensor]:
        """Stage outputs by name (up to and including `until`), plus the transforms' by-products."""
        if until not in STAGES:
            raise ValueError(f"unknown stage {until!r}; valid stages: {', '.join(STAGES)}")
        feats: dict[str, torch.Tensor] = {}
        for name in STAGES[: STAGES.index(until) + 1]:
            x = getattr(self, name)(x)
            feats[name] = x
            if name in self.transforms:
                transform = self.transforms[name]
                x, extra = transform(x)
                if transform.expose == "output":
                    feats[name] = x
                feats.update({f"{name}.{k}": v for k, v in extra.items()})
        return feats


class TinyResNet(resnet.ResNet):
    """A narrow ResNet (widths `widths`, one BasicBlock per stage by default) with torchvision's layout."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128), blocks=(1, 1, 1, 1)) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], blocks[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], blocks[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], blocks[3], stride=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


_TORCHVISION: dict[str, tuple[Callable[..., resnet.ResNet], object]] = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V2),
}
BACKBONES = ("resnet_tiny", *_TORCHVISION)


def build_backbone(name: str, output_stride: int = 16, pretrained: bool = False, ibn: str = "none"
                   ) -> ResNetBackbone:
    """Build a backbone by name; `pretrained=True` loads torchvision's ImageNet weights (needs them cached);
    `ibn` = "a" or "b" makes it an IBN-Net (`dgnb.models.style.apply_ibn`, initialised from those weights)."""
    if name == "resnet_tiny":
        if pretrained:
            raise ValueError("resnet_tiny has no pretrained weights; use pretrained=False.")
        return ResNetBackbone(apply_ibn(TinyResNet(), ibn), output_stride)
    if name not in _TORCHVISION:
        raise ValueError(f"unknown backbone '{name}'; choose one of {BACKBONES}")
    fn, weights = _TORCHVISION[name]
    if not pretrained:
        return ResNetBackbone(apply_ibn(fn(weights=None), ibn), output_stride)
    try:
        net = fn(weights=weights)
    except (OSError, RuntimeError) as e:  # offline (URLError is an OSError), a proxy, or a truncated download
        raise WeightsUnavailableError(_weights_help(name, weights.url, e)) from e
    return ResNetBackbone(apply_ibn(net, ibn), output_stride)


class WeightsUnavailableError(DgnbError):
    """ImageNet weights could not be fetched or read; the message says how to provide them."""


def _weights_help(name: str, url: str, error: BaseException) -> str:
    import os

    import torch

    target = os.path.join(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
    return (f"cannot load the ImageNet weights of {name} ({type(error).__name__}: {error}). Download {url} on a "
            f"machine with internet access and copy it to {target} (or set $TORCH_HOME), then rerun; or train "
            "without them: --set model.pretrained=false.")
