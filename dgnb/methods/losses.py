"""Losses shared by several methods."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data.taxonomy import IGNORE_INDEX
from ..models import SegOutput


def segmentation_loss(out: SegOutput, labels: torch.Tensor, aux_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L_seg = CE(main scores, Y) + aux_weight * CE(layer3 auxiliary scores, Y), ignore index 255."""
    main = F.cross_entropy(out.logits.float(), labels, ignore_index=IGNORE_INDEX)
    terms = {"seg": main.item()}
    loss = main
    if out.aux_logits is not None and aux_weight > 0:
        aux = F.cross_entropy(out.aux_logits.float(), labels, ignore_index=IGNORE_INDEX)
        loss = loss + aux_weight * aux
        terms["aux"] = aux.item()
    return loss, terms
