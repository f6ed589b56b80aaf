"""IBN-Net (Pan, Luo, Shi, Tang, ECCV 2018) as a DG baseline: ERM on an IBN-Net backbone.

Instance normalization removes each image's channel means and deviations, the statistics that carry
style; batch normalization keeps the content discrimination. IBN-Net mixes both in the shallow layers
(`dgnb.models.style.apply_ibn`):

- IBN-a: the first norm of every block in layer1-3 is half IN, half BN;
- IBN-b: IN replaces the stem's BN and follows the residual addition of the last block of layer1 and
  layer2. RobustNet's and SPC's tables use this one as "IBN-Net", so it is the default here.

The loss is ERM's: L = CE + aux_weight · CE_aux. The variant is the hparam `variant`; any other method
gets an IBN backbone through the model config instead (`--set model.ibn=a`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..models import ModelConfig
from ..models.style import IBN_VARIANTS
from .base import OptimConfig, make_hparams, register
from .erm import ERM


@register
class IBNNet(ERM):
    name = "ibn"

    @dataclass
    class Hparams:
        variant: str = "b"       # 'a' (IBN-a) or 'b' (IBN-b, RobustNet's IBN-Net baseline)
        aux_weight: float = 0.4  # as ERM

    def __init__(self, model_cfg: ModelConfig, optim: OptimConfig, num_domains: int,
                 hparams: dict[str, Any] | None = None) -> None:
        hp = make_hparams(self.Hparams, hparams or {}, self.name)
        if hp.variant not in IBN_VARIANTS[1:]:
            raise ValueError(f"ibn: hparams.variant must be 'a' or 'b', got {hp.variant!r} (--set hparams.variant=b)")
        if model_cfg.ibn not in ("none", hp.variant):
            raise ValueError(f"ibn: model.ibn={model_cfg.ibn!r} contradicts hparams.variant={hp.variant!r}; set one "
                             f"of them (--set hparams.variant={model_cfg.ibn}, or leave model.ibn at none)")
        super().__init__(dataclasses.replace(model_cfg, ibn=hp.variant), optim, num_domains, hparams)
