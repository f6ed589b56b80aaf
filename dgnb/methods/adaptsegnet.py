"""AdaptSegNet (Tsai et al., CVPR 2018): multi-level adversarial learning in the output space.

The segmentation network's class-probability maps of target images should be indistinguishable from
those of source images: scenes share their layout (road below, sky above, cars on the road) even when
their appearance differs. One fully convolutional discriminator per output level (main = layer4 head,
aux = layer3 head) learns to tell source from target predictions; the segmenter learns to fool it.

    L_seg(I_s)       = CE(z_p, y) + λ_seg CE(z_a, y)                       λ_seg = 0.1          (Eq. 3)
    L_adv(I_t)       = Σ_levels λ_adv,l ℓ(D_l(P_t,l), SOURCE_LABEL)        λ_adv = 0.001 / 0.0002 (Eq. 4, 6)
    L_D              = ½ ℓ(D_l(P_s,l), SOURCE_LABEL) + ½ ℓ(D_l(P_t,l), TARGET_LABEL)             (Eq. 2)
    segmenter:  min L_seg + L_adv  (SGD, heads at 10x);   discriminators: min L_D  (Adam 1e-4, β = (0.9, 0.99))

ℓ is BCE-with-logits (`gan="bce"`, the paper) or least squares (`gan="lsgan"`); the labels are
`dgnb.methods.uda.SOURCE_LABEL` = 0 and `TARGET_LABEL` = 1 (the official code's). Per iteration: the
source forward and the target forward run in train mode (BatchNorm statistics see both domains, as in
the code), the segmenter steps on L_seg + L_adv with the discriminators frozen, then the discriminators
step on the detached predictions. The DeepLab-v2 classifier sums all four dilated branches (the
official code's `return` inside the loop keeps two; docs/adaptation.md, 'Paper versus official code').
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register
from .losses import segmentation_loss
from .uda import AdaptationMethod, frozen, generator_adversarial_loss


@register
class AdaptSegNet(AdaptationMethod):
    name = "adaptsegnet"

    @dataclass
    class Hparams:
        aux_weight: float = 0.1         # λ_seg, source CE of the auxiliary classifier
        adv_weight_main: float = 0.001  # λ_adv of the main (layer4) output
        adv_weight_aux: float = 0.0002  # λ_adv of the auxiliary (layer3) output; 0: single-level
        gan: str = "bce"                # bce (paper) | lsgan
        disc_lr: float = 1e-4           # Adam, β = (0.9, 0.99), poly decay like the segmenter

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        levels = ["main"] + (["aux"] if self.hp.adv_weight_aux > 0 else [])
        self.add_discriminators("fc", levels)

    def adv_weights(self) -> dict[str, float]:
        return {"main": self.hp.adv_weight_main, "aux": self.hp.adv_weight_aux}

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        with self.autocast():
            out_s = self.model(batch["image"])
            out_t = self.model(batch["target_image"])
        seg, terms = segmentation_loss(out_s, batch["label"], self.hp.aux_weight)
        p_s, p_t = self.probabilities(out_s), self.probabilities(out_t)
        weights = self.adv_weights()
        adv = 0.0
        with frozen(self.discriminators), self.autocast():  # Eq. 4: gradients reach the segmenter only
            for level, disc in self.discriminators.items():
                term = generator_adversarial_loss(disc, p_t[level], self.hp.gan)
                terms[f"adv_{level}"] = term.item()
                adv = adv + weights[level] * term
        loss = seg + adv
        self.backward(loss)
        self.step("main")
        logs = self.discriminator_step(p_s, p_t, self.hp.gan)  # Eq. 2 on detached predictions
        return {"loss": loss.item(), **terms, **logs}
