"""Segmenter: stage interface, output strides, heads, auxiliary classifier."""

from __future__ import annotations

import pytest
import torch

from dgnb.models import ModelConfig, Segmenter, build_backbone


@pytest.mark.parametrize("name,os_", [("resnet_tiny", 8), ("resnet_tiny", 16), ("resnet18", 8), ("resnet50", 16)])
def test_backbone_stage_strides(name, os_):
    bb = build_backbone(name, os_).eval()
    with torch.no_grad():
        feats = bb(torch.rand(1, 3, 64, 64))
    strides = {k: 64 // v.shape[-1] for k, v in feats.items()}
    assert strides == {"stem": 4, "layer1": 4, "layer2": 8, "layer3": min(16, os_), "layer4": os_}
    assert {k: v.shape[1] for k, v in feats.items()} == bb.channels


@pytest.mark.parametrize("head", ["deeplabv3plus", "deeplabv2"])
def test_segmenter_outputs(head):
    cfg = ModelConfig(head=head, aspp_rates=(2, 4, 6) if head == "deeplabv3plus" else (2, 4, 6, 8))
    model = Segmenter(cfg)
    out = model(torch.rand(2, 3, 48, 80), return_stages=True)
    assert out.logits.shape == (2, 19, 48, 80)
    assert out.aux_logits.shape == (2, 19, 48, 80)
    assert out.features.shape[1] == model.feature_channels and out.features.shape[-2:] == (6, 10)
    assert set(out.stages) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    model.eval()
    assert model(torch.rand(1, 3, 48, 80)).aux_logits is None  # the auxiliary classifier is for training only


def test_encode_decode_split_reproduces_forward():
    model = Segmenter(ModelConfig()).eval()
    x = torch.rand(1, 3, 32, 64)
    stages, f = model.encode(x)
    assert torch.allclose(model.decode(f, stages, (32, 64)), model(x).logits)


def test_bad_model_config():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="unknown head"):
        Segmenter(ModelConfig(head="unet"))
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("resnet_tiny", pretrained=True)
