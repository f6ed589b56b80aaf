"""MLDG (Li et al., AAAI 2018) for segmentation: episodic meta-learning across source domains.

    min_θ  L_tr(θ) + β · L_te(θ − α ∇_θ L_tr(θ))

Every iteration the source domains of the batch are split at random into meta-train and meta-test
(`split_episode`); L = CE + 0.4 CE_aux on each side. First order by default, as the
segmentation code this baseline comes from (TSMLDG, Pin the Memory's MLDG baseline): θ' uses the
detached inner gradient, so the update direction is ∇L_tr(θ) + β ∇L_te(θ'). `first_order=False`
gives the objective as written (gradients through the inner step; Hessian-vector products, about
twice the memory). The meta step is shared with Pin the Memory (`dgnb.methods.meta`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, register
from .losses import segmentation_loss
from .meta import Params, functional_forward, inner_learning_rate, meta_backward, split_episode, trainable_params


@register
class MLDG(Method):
    name = "mldg"

    @dataclass
    class Hparams:
        aux_weight: float = 0.4                     # RobustNet/PinMem "dsn" auxiliary weight
        inner_lr: float = 1e-3                      # α (TSMLDG and PinMem code: 1e-3), used when inner_lr_ratio = 0
        inner_lr_ratio: float = 0.25                # α = ratio × current lr (PinMem's MLDG baseline: lr/4); 0: const
        meta_weight: float = 1.0                    # β (code: 1)
        first_order: bool = True                    # code; False: second-order MLDG as in the paper's objective
        single_source_virtual_domains: bool = True  # one source: photometric virtual domains, meta-test = shifted
        virtual_jitter: float = 0.8                 # ColorJitter strength of the virtual meta-test domain (code: 0.8)
        virtual_hue: float = 0.3                    # hue jitter of the virtual meta-test domain (code: 0.3)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        hp = self.hp
        tr, te = split_episode(batch, hp.single_source_virtual_domains, hp.virtual_jitter, hp.virtual_hue)
        with self.autocast():
            out = self.model(tr["image"])
        loss_tr, terms = segmentation_loss(out, tr["label"], hp.aux_weight)
        logs: dict[str, float] = {}

        def test_loss(params: Params) -> torch.Tensor:
            out_te = functional_forward(self.model, params, te["image"])
            loss, terms_te = segmentation_loss(out_te, te["label"], hp.aux_weight)
            logs.update({f"te_{k}": v for k, v in terms_te.items()})
            return loss

        alpha = inner_learning_rate(self, hp.inner_lr, hp.inner_lr_ratio)
        loss_te = meta_backward(self, trainable_params(self.model), loss_tr, test_loss, alpha,
                                     hp.meta_weight, hp.first_order)
        self.step("main")
        return {"loss": loss_tr.item() + hp.meta_weight * loss_te.item(), **terms, **logs,
                "loss_tr": loss_tr.item(), "loss_te": loss_te.item()}
