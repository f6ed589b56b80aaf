"""Source only: the baseline of the UDA setting ("Source only" / "Without adaptation" in the papers' tables).

The UDA model (DeepLab-v2 classifier on layer4, auxiliary classifier on layer3) trained on the labelled
source alone: L = CE(z_p, y) + λ_seg CE(z_a, y), λ_seg = 0.1 (AdaptSegNet's). It never receives a target
image, so the target cannot touch anything, BatchNorm statistics included: what it scores on the target is
what the other methods' adaptation is measured against. Unlike `erm` it may run in the UDA setting (and
in DG, where it is ERM with this auxiliary weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, register
from .losses import segmentation_loss


@register
class SourceOnly(Method):
    name = "source_only"
    settings = ("dg", "uda")

    @dataclass
    class Hparams:
        aux_weight: float = 0.1  # λ_seg of the auxiliary (layer3) classifier (AdaptSegNet)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        with self.autocast():
            out = self.model(batch["image"])
        loss, terms = segmentation_loss(out, batch["label"], self.hp.aux_weight)
        self.backward(loss)
        self.step("main")
        return {"loss": loss.item(), **terms}
