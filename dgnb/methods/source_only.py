"""Source only: the baseline of the UDA setting ("Source only" / "Without adaptation" in the papers' tables).

The UDA model (DeepLab-v2 classifier on layer4, auxiliary classifier on layer3) trained on the labelled
source alone: L = CE(z_p, y) + λ_seg CE(z_a, y), λ_seg = 0.1 (AdaptSegNet's). It never receives a target
image, so the target cannot touch anything, BatchNorm statistics included: what it scores on the target is
what the other methods' adaptation is measured against. Unlike `erm` it may run in the UDA setting (and
in DG, where it is ERM with this auxiliary weight).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .erm import ERM


@register
class SourceOnly(ERM):
    name = "source_only"
    settings = ("dg", "uda")

    @dataclass
    class Hparams:
        aux_weight: float = 0.1  # λ_seg of the auxiliary (layer3) classifier (AdaptSegNet)
