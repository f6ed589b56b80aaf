"""PFR (Zhang, Zhao & Zhang, ICIP 2020): progressive feature refinement plus output-space adversarial learning.

Feature maps of a source image and of a target image are compared at every ResNet stage, i = 2..5 of the
paper (`layer1`..`layer4` here), through their *content* C_i (the feature map itself) and their *style*
S_i (the Gram matrix of the content, after Gatys et al.); the segmenter is trained to make both agree
across the domains. A domain classifier on the segmentation output then aligns what the feature terms
cannot guarantee (AdaptSegNet's, `dgnb.methods.adaptsegnet`, one level). The paper has no public code:
every choice it leaves open is an option below, documented in docs/pfr.md, 'Options'.

    L_seg  = CE(M(x_s), y_s)                                              (Eq. 1; + λ_seg CE_aux as an option)
    S_i    = G(C_i),  G(F) = F Fᵀ / z   for F the C×N matrix of one image  (`gram_matrix`, `gram_norm`)
    L_sty  = Σ_i w_i d(S_i^s, S_i^t)                                      (Eq. 2, `style_loss`)
    L_con  = Σ_i w_i d(C_i^s, C_i^t)                                      (Eq. 3, `content_loss`)
    L_pfr  = α L_sty + β L_con,   α = β = 1                               (Eq. 4, `refinement_loss`)
    L_adv  = ℓ(D(P_t), SOURCE_LABEL)  (the segmenter's side of Eq. 5; D learns Eq. 5 with the labels of
             `dgnb.methods.uda`)
    L      = L_seg + λ_adv L_adv + λ_pfr L_pfr,  λ_adv = 0.002,  λ_pfr = 0.004                   (Eq. 6)

d is the norm ‖·‖₂ of the difference, as Eq. 2-3 write it (`distance="l2"`: the Euclidean norm of the
flattened difference, per image pair, averaged over the pairs of the batch); w_i = 1 (the equations sum
the stages unweighted). Source image k is paired with target image k (the paper trains on one of each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch.nn import functional as F

from .adaptsegnet import AdaptSegNet
from .base import register
from .losses import segmentation_loss
from .uda import frozen, generator_adversarial_loss

STAGES = ("layer1", "layer2", "layer3", "layer4")  # the paper's stages i = 2, 3, 4, 5 of ResNet-101
GRAM_NORMS = ("cn", "n", "none")
DISTANCES = ("l2", "squared", "mse")
MATCHES = ("resize", "crop", "pool")
DETACH = ("none", "target", "source")


# ----- the terms (pure functions) -------------------------------------------------------------------------
def gram_matrix(features: torch.Tensor, norm: str = "cn") -> torch.Tensor:
    """S = F Fᵀ / z per image: (B, C, H, W) -> (B, C, C), with F the C × N (N = H·W) matrix of one image.

    z = C·N (`cn`: Gatys et al.'s scale; their loss ¼‖ΔG‖² / (C² N²) is ¼‖ΔS‖² for this S), N (`n`: the mean
    over positions of f fᵀ) or 1 (`none`: the raw Gram matrix). Positions enter only through the sum, so S
    does not depend on where things are in the image (a spatial permutation leaves it unchanged)."""
    if norm not in GRAM_NORMS:
        raise ValueError(f"unknown Gram normalization '{norm}'; choose one of {GRAM_NORMS}")
    b, c, h, w = features.shape
    f = _full(features).reshape(b, c, h * w)
    scale = {"cn": c * h * w, "n": h * w, "none": 1}[norm]
    return torch.bmm(f, f.transpose(1, 2)) / scale


def match_sizes(source: torch.Tensor, target: torch.Tensor, mode: str = "resize"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two feature maps (B, C, H, W) of unrelated images brought to one spatial size, so that Eq. 3 can
    subtract them position by position (the paper's GTA5 and Cityscapes inputs differ in size).

    resize: the target map resized bilinearly to the source map's size (the source is left as it is);
    crop:   both centre-cropped to the common size (min H, min W);
    pool:   both average-pooled (adaptive) to the common size (min H, min W).
    Maps of equal size come back unchanged."""
    if mode not in MATCHES:
        raise ValueError(f"unknown content size matching '{mode}'; choose one of {MATCHES}")
    if source.shape[-2:] == target.shape[-2:]:
        return source, target
    if mode == "resize":
        return source, F.interpolate(target, size=source.shape[-2:], mode="bilinear", align_corners=False)
    h, w = min(source.shape[-2], target.shape[-2]), min(source.shape[-1], target.shape[-1])
    if mode == "pool":
        return F.adaptive_avg_pool2d(source, (h, w)), F.adaptive_avg_pool2d(target, (h, w))
    return _centre_crop(source, h, w), _centre_crop(target, h, w)


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (mixed precision) in float32; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _centre_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def pair_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """d(a_k, b_k) for each pair k of the leading dimension, over all other entries: (B, ...) -> (B,).

    l2: ‖a − b‖₂, the Euclidean (Frobenius) norm of the difference, as Eq. 2-3 write it;
    squared: ‖a − b‖₂²;  mse: the mean of the squared entries (independent of the tensor's size)."""
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance '{kind}'; choose one of {DISTANCES}")
    diff = (_full(a) - _full(b)).flatten(1)
    if kind == "l2":
        return torch.linalg.vector_norm(diff, dim=1)
    if kind == "squared":
        return diff.pow(2).sum(1)
    return diff.pow(2).mean(1)


def pair_up(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source image k with target image k, for k < min(#source, #target) (the paper's batch is 1 + 1)."""
    n = min(len(source), len(target))
    return source[:n], target[:n]


def style_loss(source: torch.Tensor, target: torch.Tensor, gram_norm: str = "cn", distance: str = "l2"
               ) -> torch.Tensor:
    """One stage's term of Eq. 2: the mean over image pairs of d(S^s, S^t), S = `gram_matrix`."""
    source, target = pair_up(source, target)
    return pair_distance(gram_matrix(source, gram_norm), gram_matrix(target, gram_norm), distance).mean()


def content_loss(source: torch.Tensor, target: torch.Tensor, match: str = "resize", distance: str = "l2"
                 ) -> torch.Tensor:
    """One stage's term of Eq. 3: the mean over image pairs of d(C^s, C^t), position by position after
    `match_sizes`. Between unrelated images it compares different scenes
    (docs/pfr.md, 'Content between unrelated images')."""
    source, target = pair_up(source, target)
    source, target = match_sizes(_full(source), _full(target), match)
    return pair_distance(source, target, distance).mean()


def detach_side(source: torch.Tensor, target: torch.Tensor, side: str = "none"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stop the gradient of one domain's features: `none` (both move), `target` (the target features are a
    fixed reference the source is pulled toward), `source` (the target is pulled toward the source)."""
    if side not in DETACH:
        raise ValueError(f"unknown detach '{side}'; choose one of {DETACH}")
    return (source.detach() if side == "source" else source), (target.detach() if side == "target" else target)


def refinement_loss(source_stages: Mapping[str, torch.Tensor], target_stages: Mapping[str, torch.Tensor],
                    stage_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0), style_weight: float = 1.0,
                    content_weight: float = 1.0, gram_norm: str = "cn", distance: str = "l2",
                    match: str = "resize", detach: str = "none") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_pfr = α Σ_i w_i L_sty,i + β Σ_i w_i L_con,i (Eq. 2-4) over `STAGES`; returns it and every term:
    `sty_<stage>`, `con_<stage>` (unweighted), `sty`, `con` (stage-weighted sums) and `pfr`."""
    terms: dict[str, torch.Tensor] = {}
    sty = con = torch.zeros((), device=source_stages[STAGES[0]].device)
    for stage, w in zip(STAGES, stage_weights):
        f_s, f_t = detach_side(source_stages[stage], target_stages[stage], detach)
        terms[f"sty_{stage}"] = style_loss(f_s, f_t, gram_norm, distance)
        terms[f"con_{stage}"] = content_loss(f_s, f_t, match, distance)
        sty = sty + w * terms[f"sty_{stage}"]
        con = con + w * terms[f"con_{stage}"]
    terms["sty"], terms["con"] = sty, con
    terms["pfr"] = style_weight * sty + content_weight * con
    return terms["pfr"], terms


# ----- the method ------------------------------------------------------------------------------------------
@register
class PFR(AdaptSegNet):
    """AdaptSegNet's adversarial machinery (one FC discriminator on the main output by default) plus the
    style and content terms of every stage. `adv_weight_main = 0` drops the discriminator (PFR without its
    adversarial term); `adv_weight_aux > 0` adds AdaptSegNet's auxiliary level."""

    name = "pfr"

    @dataclass
    class Hparams(AdaptSegNet.Hparams):
        aux_weight: float = 0.0          # λ_seg of the layer3 classifier; Eq. 1 and 6 have one output (0.1: AdaptSegNet's)
        adv_weight_main: float = 0.002   # λ_adv (Sec. 3.4); 0: no adversarial term, no discriminator
        adv_weight_aux: float = 0.0      # Eq. 5 has one domain classifier, on the output M(x)
        pfr_weight: float = 0.004        # λ_pfr (Sec. 3.4)
        style_weight: float = 1.0        # α in L_pfr = α L_sty + β L_con (Eq. 4: plain sum)
        content_weight: float = 1.0      # β
        stage_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # w_i of layer1..layer4 (Eq. 2-3: Σ_i)
        gram_norm: str = "cn"            # cn: F Fᵀ / (C N) (Gatys's scale) | n: / N | none: raw F Fᵀ
        distance: str = "l2"             # l2: ‖·‖₂ as Eq. 2-3 write it | squared | mse
        content_match: str = "resize"    # resize (target to source size) | crop | pool, for maps of unequal size
        detach: str = "none"             # none (gradients into both domains) | target | source

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hp = self.hp
        for value, valid, what in ((hp.gram_norm, GRAM_NORMS, "gram_norm"), (hp.distance, DISTANCES, "distance"),
                                   (hp.content_match, MATCHES, "content_match"), (hp.detach, DETACH, "detach")):
            if value not in valid:
                raise ValueError(f"unknown {what} '{value}' for method 'pfr'; choose one of {valid}")
        weights = tuple(float(w) for w in hp.stage_weights)
        if len(weights) != len(STAGES) or min(weights) < 0:
            raise ValueError(f"stage_weights must be {len(STAGES)} non-negative numbers (layer1..layer4), got "
                             f"{hp.stage_weights!r}")
        self.stage_weights = weights
        if hp.adv_weight_main <= 0:  # PFR without the adversarial term: no discriminator to train
            del self.discriminators["main"]

    def refinement(self, source_stages: Mapping[str, torch.Tensor], target_stages: Mapping[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_pfr (Eq. 4) with this method's options, and its terms."""
        hp = self.hp
        return refinement_loss(source_stages, target_stages, self.stage_weights, hp.style_weight, hp.content_weight,
                               hp.gram_norm, hp.distance, hp.content_match, hp.detach)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        with self.autocast():
            out_s = self.model(batch["image"], return_stages=True)
            out_t = self.model(batch["target_image"], return_stages=True)
        seg, terms = segmentation_loss(out_s, batch["label"], self.hp.aux_weight)
        pfr, parts = self.refinement(out_s.stages, out_t.stages)
        terms.update({k: v.item() for k, v in parts.items()})
        loss = seg + self.hp.pfr_weight * pfr  # Eq. 6 without its adversarial part
        p_s, p_t = self.probabilities(out_s), self.probabilities(out_t)
        weights = self.adv_weights()
        with frozen(self.discriminators), self.autocast():  # gradients of L_adv reach the segmenter only
            for level, disc in self.discriminators.items():
                term = generator_adversarial_loss(disc, p_t[level], self.hp.gan)
                terms[f"adv_{level}"] = term.item()
                loss = loss + weights[level] * term
        self.backward(loss)
        self.step("main")
        logs = self.discriminator_step(p_s, p_t, self.hp.gan) if len(self.discriminators) else {}
        return {"loss": loss.item(), **terms, **logs}
