"""ADVENT (Vu et al., CVPR 2019): entropy minimization on target predictions (MinEnt), or adversarial
alignment of their entropy maps (AdvEnt, `variant="advent"`).

A network trained on the source is confident on source images and uncertain on target ones: its
prediction entropy is low on the source and high on the target. MinEnt lowers the target entropy
directly; AdvEnt asks a discriminator to tell source from target *self-information maps* and the
segmenter to fool it.

    E(x)_(h,w) = −(1 / log C) Σ_c P_c log P_c                       normalised entropy, in [0, 1]   (Eq. 1)
    MinEnt:  L = L_seg(I_s) + Σ_levels λ_ent,l mean_(h,w) E(I_t)    λ_ent = 0.001 (main), 0.0002 (aux) (Eq. 3)
    AdvEnt:  I_c = −P_c log P_c / log C  (Eq. 5);  L = L_seg + Σ_l λ_adv,l ℓ(D_l(I_t,l), SOURCE_LABEL), D on I
             (Eq. 6-7, AdaptSegNet's discriminator and label convention, `dgnb.methods.uda`)

with L_seg = CE(z_p, y) + λ_seg CE(z_a, y), λ_seg = 0.1 (the code's multi-level model). The paper's
best number ("AdvEnt + MinEnt") averages two separately trained models; this class trains one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register
from .losses import segmentation_loss
from .uda import AdaptationMethod, entropy_map, frozen, generator_adversarial_loss, self_information

VARIANTS = ("minent", "advent")


@register
class MinEnt(AdaptationMethod):
    name = "minent"

    @dataclass
    class Hparams:
        aux_weight: float = 0.1         # λ_seg, source CE of the auxiliary classifier
        ent_weight_main: float = 0.001  # λ_ent of the main output (MinEnt)
        ent_weight_aux: float = 0.0002  # λ_ent of the auxiliary output (MinEnt)
        variant: str = "minent"         # minent | advent (adversarial on self-information maps)
        adv_weight_main: float = 0.001  # λ_adv (AdvEnt)
        adv_weight_aux: float = 0.0002  # λ_adv (AdvEnt)
        gan: str = "bce"
        disc_lr: float = 1e-4           # AdvEnt's discriminators: Adam, β = (0.9, 0.99)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.hp.variant not in VARIANTS:
            raise ValueError(f"unknown MinEnt variant '{self.hp.variant}'; choose one of {VARIANTS}")
        if self.hp.variant == "advent":
            self.add_discriminators("fc", ["main", "aux"])

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        with self.autocast():
            out_s = self.model(batch["image"])
            out_t = self.model(batch["target_image"])
        loss, terms = segmentation_loss(out_s, batch["label"], self.hp.aux_weight)
        p_t = self.probabilities(out_t)
        for level in p_t:  # logged for both variants: what MinEnt lowers, what AdvEnt aligns
            terms[f"ent_{level}"] = entropy_map(p_t[level].detach()).mean().item()
        logs: dict[str, float] = {}
        if self.hp.variant == "minent":
            weights = {"main": self.hp.ent_weight_main, "aux": self.hp.ent_weight_aux}
            for level, p in p_t.items():
                loss = loss + weights[level] * entropy_map(p).mean()
            self.backward(loss)
            self.step("main")
        else:
            weights = {"main": self.hp.adv_weight_main, "aux": self.hp.adv_weight_aux}
            i_s = {k: self_information(p) for k, p in self.probabilities(out_s).items()}
            i_t = {k: self_information(p) for k, p in p_t.items()}
            with frozen(self.discriminators), self.autocast():
                for level, disc in self.discriminators.items():
                    term = generator_adversarial_loss(disc, i_t[level], self.hp.gan)
                    terms[f"adv_{level}"] = term.item()
                    loss = loss + weights[level] * term
            self.backward(loss)
            self.step("main")
            logs = self.discriminator_step(i_s, i_t, self.hp.gan)
        return {"loss": loss.item(), **terms, **logs}
