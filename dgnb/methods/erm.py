"""ERM: empirical risk minimisation on all source domains aggregated into one training set.

The reference every DG method is compared against ("Source only"/"Baseline" in the papers'
tables): L = CE(f(x), y) + 0.4 CE_aux over mixed-domain batches, with no use of domain labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, register


@register
class ERM(Method):
    name = "erm"

    @dataclass
    class Hparams:
        aux_weight: float = 0.4  # RobustNet/PinMem "dsn" auxiliary weight

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.supervised_step(batch["image"], batch["label"], self.hp.aux_weight)
