"""MRNet (Zheng & Yang, IJCAI 2020): unsupervised scene adaptation with memory regularization in vivo.

The network's two classifiers, primary C_p (layer4) and auxiliary C_a (layer3), are two "memories" of
the same image: on the source they agree, on the target they often do not (Fig. 1). Memory
regularization asks them to agree on unlabelled target pixels, with no extra parameters. Two stages:

Stage I (iterations [0, T1), T1 = stage1_fraction · iterations):
    L = L_seg(I_s) + 0.001 L_adv^p(I_t) + 0.0002 L_adv^a(I_t) + λ_mr L_mr(I_t)                     (Eq. 8)
    L_seg  = CE(F_p, y) + 0.5 CE(F_a, y)                                                           (Eq. 1)
    L_adv  = ℓ(D_l(F_l(I_t)), SOURCE_LABEL) per level, multi-scale least-squares D_p, D_a         (Eq. 3-4)
    L_mr   = KL(F_a ‖ F_p) + KL(F_p ‖ F_a), mean over target pixels      (Eq. 5, `mr_form="paper"`)
             or KL(p̄ ‖ F_p) + KL(p̄ ‖ F_a), p̄ = softmax(z_p + 0.5 z_a) detached (`mr_form="code"`)
    L_mr is switched on after `mr_start` of Stage I (paper: 10k of 25k iterations; code: 15k).
Stage boundary (a checkpoint, `stage1.pt`): pseudo labels ŷ_t = argmax(F_p + 0.5 F_a) of every target
train image, written with their manifest (`dgnb.methods.pseudo_labels`; no threshold, as in the paper).
Stage II (iterations [T1, end)): self-training on the target alone, SGD restarted at `stage2_lr_mult`
times the learning rate:
    L = CE(F_p, ŷ) + 0.5 CE(F_a, ŷ) + λ_mr L_mr(I_t)                                              (Eq. 9)
Inference: argmax(F_p + 0.5 F_a) (`fusion="probabilities"`, the paper) or of softmax(z_p + 0.5 z_a) (code).

Differences from the official code (docs/adaptation.md, 'Paper versus official code'): the model is the
course's DeepLab-v2 (AdaptSegNet's heads, not MRNet's heavier concatenated-ASPP heads); each discriminator
sees its own level on the source (the code shows both the fused source prediction); the code's
source class balancing and hardest-20%-pixel selection are not used; the KL form is an option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from ..data.taxonomy import IGNORE_INDEX
from .base import register
from .losses import segmentation_loss
from .pseudo_labels import RULES, PseudoLabels, fuse_heads, make_pseudo_labels
from .uda import AdaptationMethod, frozen, generator_adversarial_loss, kl_divergence

MR_FORMS = ("paper", "code")


def memory_regularization(main_logits: torch.Tensor, aux_logits: torch.Tensor, form: str = "paper",
                          aux_fusion: float = 0.5) -> torch.Tensor:
    """L_mr, the mean over pixels of the disagreement between the primary and auxiliary classifiers.

    paper (Eq. 5): KL(P_a ‖ P_p) + KL(P_p ‖ P_a), both heads pulled toward each other;
    code: KL(p̄ ‖ P_p) + KL(p̄ ‖ P_a) with p̄ = softmax(z_p + a z_a) detached, each head pulled toward the
    fixed fused prediction. The code fuses logits, so p̄ is sharper than either head even when they agree
    (softmax(1.5 z) for z_p = z_a = z): that form also lowers the entropy. `dgnb.methods.uda.kl_divergence(
    target, pred)` is KL(target ‖ pred)."""
    log_p, log_a = F.log_softmax(main_logits.float(), 1), F.log_softmax(aux_logits.float(), 1)
    if form == "paper":
        return (kl_divergence(log_a, log_p) + kl_divergence(log_p, log_a)).mean()
    if form == "code":
        log_fused = F.log_softmax(main_logits.float() + aux_fusion * aux_logits.float(), 1).detach()
        return (kl_divergence(log_fused, log_p) + kl_divergence(log_fused, log_a)).mean()
    raise ValueError(f"unknown memory-regularization form '{form}'; choose one of {MR_FORMS}")


def disagreement_map(main_logits: torch.Tensor, aux_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL(P_a ‖ P_p) (B, H, W): the code's uncertainty map (its visualisation shows log(1 + 10 x))."""
    return kl_divergence(F.log_softmax(aux_logits.float(), 1), F.log_softmax(main_logits.float(), 1))


@register
class MRNet(AdaptationMethod):
    name = "mrnet"

    @dataclass
    class Hparams:
        aux_weight: float = 0.5         # source (Stage I) and pseudo-label (Stage II) CE of the auxiliary head
        adv_weight_main: float = 0.001  # L_adv^p
        adv_weight_aux: float = 0.0002  # L_adv^a
        gan: str = "lsgan"              # the code's least-squares GAN (the paper writes the log loss)
        disc_lr: float = 1e-4           # Adam, β = (0.9, 0.99)
        gradient_penalty: float = 0.0   # on the discriminators' source inputs: 0 (paper), 0.01 (code)
        mr_weight: float = 0.1          # λ_mr
        mr_form: str = "paper"          # paper (symmetric KL) | code (KL to the detached fused prediction)
        mr_start: float = 0.4           # L_mr from this fraction of Stage I on (paper 10k/25k; code 15k/25k)
        stage1_fraction: float = 0.5    # Stage I's share of the iterations; 1: Stage I only
        stage2_lr_mult: float = 0.5     # Stage II's learning rate relative to Stage I's (paper: 1e-4 vs 2e-4)
        aux_fusion: float = 0.5         # a of F_p + a F_a (pseudo labels and inference)
        fusion: str = "probabilities"   # probabilities (paper) | logits (code)
        pseudo_rule: str = "none"       # none (paper) | confidence | class_balanced
        pseudo_threshold: float = 0.9   # confidence rule
        pseudo_portion: float = 0.5     # class_balanced rule

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hp = self.hp
        if hp.mr_form not in MR_FORMS:
            raise ValueError(f"unknown mr_form '{hp.mr_form}'; choose one of {MR_FORMS}")
        if hp.pseudo_rule not in RULES:
            raise ValueError(f"unknown pseudo_rule '{hp.pseudo_rule}'; choose one of {RULES}")
        if not 0 < hp.stage1_fraction <= 1 or not 0 <= hp.mr_start <= 1:
            raise ValueError(f"stage1_fraction={hp.stage1_fraction} must lie in (0, 1] and mr_start={hp.mr_start} "
                             "in [0, 1]")
        self.add_discriminators("multiscale", ["main", "aux"])
        self.pseudo_labels: str | None = None  # pseudo-label dataset of Stage II, relative to the run folder

    # ----- stages --------------------------------------------------------------------------------------
    @property
    def stage1_iterations(self) -> int:
        return max(1, round(self.hp.stage1_fraction * self.optim_cfg.iterations))

    def stage_starts(self) -> list[int]:
        return [self.stage1_iterations] if self.stage1_iterations < self.optim_cfg.iterations else []

    @property
    def mr_active(self) -> bool:
        """Stage II always; Stage I from `mr_start` of its iterations on."""
        return self.stage > 0 or self.iteration >= round(self.hp.mr_start * self.stage1_iterations)

    def begin_stage(self, stage: int, context: Any) -> dict[str, Any]:
        """Stage II: pseudo labels argmax(F_p + a F_a) of the target train set (written under the run folder),
        then SGD restarted at `stage2_lr_mult` times the learning rate, poly over the remaining iterations."""
        name = f"{context.target.dataset}-stage{stage}"
        rel = "pseudo_labels"
        written = make_pseudo_labels(
            lambda x: self.fused_probabilities(x.to(self.device)), context.target_batches(), context.images,
            context.folder / rel, name, self.hp.pseudo_rule, self.hp.pseudo_threshold, self.hp.pseudo_portion,
            info={"made_by": self.name, "stage": stage, "iteration": self.iteration,
                  "target": context.target.dataset, "fusion": self.hp.fusion, "aux_fusion": self.hp.aux_fusion})
        self.pseudo_labels = f"{rel}/{name}"
        self.stage = stage
        self.configure_stage2()
        return {"pseudo_labels": self.pseudo_labels, "pseudo_kept": written.manifest["kept_overall"]}

    def configure_stage2(self) -> None:
        """A fresh SGD (momentum buffers reset) at `stage2_lr_mult` x lr, poly over Stage II's iterations."""
        self.add_sgd("main", self.param_groups(self.model), lr_mult=self.hp.stage2_lr_mult,
                     iterations=self.optim_cfg.iterations - self.stage1_iterations)

    def pseudo_label_root(self) -> tuple[str, str] | None:
        if self.stage == 0 or self.pseudo_labels is None:
            return None
        rel, name = self.pseudo_labels.rsplit("/", 1)
        return rel, name

    def extra_state(self) -> dict[str, Any]:
        return {"pseudo_labels": self.pseudo_labels}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pseudo_labels = state.get("pseudo_labels")
        if self.stage > 0 and self.optimizers:  # Stage II's optimizer, so that its saved state loads into it
            self.configure_stage2()

    # ----- the two heads -------------------------------------------------------------------------------
    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_p, z_a): the primary and auxiliary class scores at input size, in any mode."""
        size = images.shape[-2:]
        stages, feats = self.model.encode(images)
        main = self.model.decode(feats, stages, size)
        aux = F.interpolate(self.model.aux_head(stages["layer3"]), size=size, mode="bilinear", align_corners=False)
        return main, aux

    @torch.no_grad()
    def fused_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            main, aux = self.heads(images)
        return fuse_heads(main, aux, self.hp.aux_fusion, self.hp.fusion)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores whose argmax is the fused prediction argmax(F_p + a F_a) (log of the fused probabilities)."""
        return self.fused_probabilities(images).clamp_min(1e-12).log()

    # ----- training --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.stage1_step(batch) if self.stage == 0 else self.stage2_step(batch)

    def _mr(self, out: Any, terms: dict[str, float]) -> torch.Tensor | float:
        mr = memory_regularization(out.logits, out.aux_logits, self.hp.mr_form, self.hp.aux_fusion)
        terms["mr"] = mr.item()
        terms["mr_on"] = float(self.mr_active)
        return self.hp.mr_weight * mr if self.mr_active else 0.0

    def stage1_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Eq. 8: source segmentation, adversarial alignment of both levels, memory regularization on the target."""
        with self.autocast():
            out_s = self.model(batch["image"])
            out_t = self.model(batch["target_image"])
        seg, terms = segmentation_loss(out_s, batch["label"], self.hp.aux_weight)
        p_s, p_t = self.probabilities(out_s), self.probabilities(out_t)
        weights = {"main": self.hp.adv_weight_main, "aux": self.hp.adv_weight_aux}
        adv = 0.0
        with frozen(self.discriminators), self.autocast():
            for level, disc in self.discriminators.items():
                term = generator_adversarial_loss(disc, p_t[level], self.hp.gan)
                terms[f"adv_{level}"] = term.item()
                adv = adv + weights[level] * term
        loss = seg + adv + self._mr(out_t, terms)
        self.backward(loss)
        self.step("main")
        logs = self.discriminator_step(p_s, p_t, self.hp.gan, self.hp.gradient_penalty)
        return {"loss": loss.item(), **terms, **logs}

    def stage2_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Eq. 9: cross-entropy on the target's pseudo labels (both heads) plus memory regularization."""
        if "target_label" not in batch:
            raise RuntimeError("MRNet Stage II needs target pseudo labels in the batch (target_label)")
        with self.autocast():
            out = self.model(batch["target_image"])
        labels = batch["target_label"]
        if (labels == IGNORE_INDEX).all():  # a thresholded set can leave a crop without any label: no CE term
            pseudo, terms = out.logits.sum() * 0.0, {"seg": 0.0}
        else:
            pseudo, terms = segmentation_loss(out, labels, self.hp.aux_weight)
        terms = {f"pseudo_{k}": v for k, v in terms.items()}
        terms["pseudo_kept"] = float((labels != IGNORE_INDEX).float().mean())
        loss = pseudo + self._mr(out, terms)
        self.backward(loss)
        self.step("main")
        return {"loss": loss.item(), **terms}

    def written_pseudo_labels(self, run_dir: Any) -> PseudoLabels | None:
        """The pseudo-label set Stage II trained on, given the run folder (None before Stage II)."""
        from pathlib import Path

        root = self.pseudo_label_root()
        return None if root is None else PseudoLabels(Path(run_dir) / root[0], root[1])
