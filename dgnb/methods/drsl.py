"""DRSL: distribution-regularized self-supervised learning (Iqbal, Rawal, Hafiz, Chi & Ali, Image and Vision
Computing 2022). No official code exists; every choice the paper leaves open is an option, the paper's reading
the default (docs/self_training.md, "DRSL: what the paper fixes and what dgnb chooses").

DRSL runs CBST's rounds (`dgnb.methods.cbst`) with a second head beside the segmentation head, the MMDL-FR
module ("multi-modal distribution learning based feature regularization", Sec. 3.2), on the encoder's base
features (layer4):

- embedding block: four 3×3 convolutions with the segmentation classifier's dilations, summed, upsampled
  to 1/`label_reduction` of the input (Sec. 4.1, Table 6: labels reduced 2×), giving e ∈ R^D per pixel;
- `modes` μ_{c,j}: M = 3 mode centres per class c (the weights of a fully connected layer, K·M × D);
- mode likelihood p_{c,j}(e) ∝ exp(−‖e − μ_{c,j}‖² / 2σ²), σ = 0.5 fixed (Sec. 3.2);
- class posterior P(C = c | e) = max_j p_{c,j}(e) (Sec. 3.2), normalised over the classes for its CE.

Losses, on at most 300 randomly sampled pixels per class per image (Sec. 4.1), labels = ground truth on the
source and pseudo labels on the target:

    L_tri  = mean ReLU(min_j d(e, μ_{y,j}) − min_{c≠y, j} d(e, μ_{c,j}) + α)                       (Eq. 4)
    L_ce   = mean −log P(C = y | e)                                                               (Eq. 5)
    L_cons = mean ReLU(d(e_t, e_s⁺) − d(e_t, e_s⁻) + m), e_s⁺ a source pixel of the target pixel's
             class mapped to the same mode, e_s⁻ a source pixel of another class, both drawn at random  (Eq. 6)
    L_tri(s, t) = L_tri over the source samples + L_tri over the target samples                  (Eq. 7)

Warm-up (source model, Eq. 8):  L = L_seg(s) + λ1 L_tri(s) + λ2 L_ce(s)
Rounds (Eq. 9, 10):             L = L_seg(s) + L_seg(t) + λ1 L_tri(s, t) + λ2 (L_ce(s) + L_ce(t)) + λ3 L_cons
with λ1 = 0.25 (distance metric learning), λ2 = 0.1 (mixture classification) (Sec. 4.1, Table 3) and
λ3 = 0.1 (the cross-domain consistency of "DRSL+", Table 8; λ3 = 0 is the paper's "DRSL" row).
Inference and pseudo labels: the segmentation head (the MMDL-FR module only regularizes the shared encoder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..data.taxonomy import IGNORE_INDEX
from ..models import SegOutput
from .base import register
from .cbst import CBST
from .losses import segmentation_loss

DISTANCES = ("euclidean", "squared")
POSTERIORS = ("max", "mixture")


# ----- the MMDL-FR module ----------------------------------------------------------------------------------
class EmbeddingBlock(nn.Module):
    """Σ_r Conv3x3_r(x) over the dilation rates r of the segmentation classifier, bilinearly upsampled (Sec. 3.2)."""

    def __init__(self, in_channels: int, dim: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, dim, 3, padding=r, dilation=r) for r in rates)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        e = torch.stack([b(features) for b in self.branches]).sum(0)
        return F.interpolate(e, size=size, mode="bilinear", align_corners=False)


class MMDLHead(nn.Module):
    """The embedding block and the mode centres `modes` μ (K, M, D): the K·M × D weight of the paper's fully
    connected layer, reshaped per class. Centres start on the unit sphere; with `normalize`, embeddings are
    l2-normalised per pixel (then distances lie in [0, 2] and σ = 0.5, the margins of 1 have a fixed scale)."""

    def __init__(self, in_channels: int, num_classes: int, num_modes: int, dim: int, rates: tuple[int, ...],
                 normalize: bool = True) -> None:
        super().__init__()
        self.embedding = EmbeddingBlock(in_channels, dim, rates)
        self.modes = nn.Parameter(F.normalize(torch.randn(num_classes, num_modes, dim), dim=-1))
        self.normalize = normalize

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Embeddings (B, D, h, w) at `size`."""
        e = self.embedding(features, size).float()
        return F.normalize(e, dim=1) if self.normalize else e


# ----- mixture model and losses (pure functions; N pixels, K classes, M modes, D dimensions) ----------------
def squared_distances(embeddings: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """‖e_n − μ_{c,j}‖² (N, K, M) of embeddings (N, D) to mode centres (K, M, D)."""
    k, m, d = modes.shape
    centres = modes.reshape(k * m, d).float()
    e = embeddings.float()
    d2 = (e * e).sum(1, keepdim=True) - 2.0 * e @ centres.t() + (centres * centres).sum(1)
    return d2.clamp_min(0.0).view(-1, k, m)


def mode_log_likelihoods(embeddings: torch.Tensor, modes: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """log p_{c,j}(e) = −‖e − μ_{c,j}‖² / (2σ²) (N, K, M), up to one constant for all modes (Sec. 3.2)."""
    return -squared_distances(embeddings, modes) / (2.0 * sigma**2)


def class_scores(log_likelihoods: torch.Tensor, posterior: str = "max") -> torch.Tensor:
    """Unnormalised log class posterior (N, K): max over modes, log max_j p_{c,j} (`max`, the paper), or the
    equal-weight mixture log (1/M) Σ_j p_{c,j} (`mixture`). Softmax over classes gives P(C = c | e)."""
    if posterior == "max":
        return log_likelihoods.max(-1).values
    if posterior == "mixture":
        return torch.logsumexp(log_likelihoods, -1) - math.log(log_likelihoods.shape[-1])
    raise ValueError(f"unknown class posterior '{posterior}'; choose one of {POSTERIORS}")


def mixture_cross_entropy(log_likelihoods: torch.Tensor, labels: torch.Tensor, posterior: str = "max") -> torch.Tensor:
    """Eq. 5: mean −log P(C = y | e), P the class posterior normalised over the classes."""
    if not len(labels):
        return log_likelihoods.sum() * 0.0
    return F.cross_entropy(class_scores(log_likelihoods, posterior), labels)


def distance(squared: torch.Tensor, kind: str = "euclidean") -> torch.Tensor:
    """d from d²: the Euclidean distance (`euclidean`, the paper's "euclidean distance") or d² itself."""
    if kind == "euclidean":
        return squared.clamp_min(1e-12).sqrt()
    if kind == "squared":
        return squared
    raise ValueError(f"unknown distance '{kind}'; choose one of {DISTANCES}")


def mode_triplet_loss(squared: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                      kind: str = "euclidean") -> torch.Tensor:
    """Eq. 4: mean over pixels of ReLU(d to the nearest mode of the true class − d to the nearest mode of any
    other class + α), from squared distances (N, K, M)."""
    if not len(labels):
        return squared.sum() * 0.0
    nearest = distance(squared, kind).min(-1).values  # (N, K)
    positive = nearest.gather(1, labels[:, None])[:, 0]
    negative = nearest.masked_fill(F.one_hot(labels, nearest.shape[1]).bool(), math.inf).min(1).values
    return F.relu(positive - negative + margin).mean()


def assigned_modes(log_likelihoods: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """j*(e) = argmax_j p_{y,j}(e) (N,): the mode of its own class a pixel maps to (Sec. 3.3)."""
    return log_likelihoods.gather(1, labels.view(-1, 1, 1).expand(-1, 1, log_likelihoods.shape[-1]))[:, 0].argmax(-1)


def sample_pixels(labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """Flat indices into `labels` (B, h, w) of at most `per_class` pixels of each class in each image, drawn at
    random (Sec. 4.1: "a maximum of 300 embeddings per class per image"); ignore pixels are never drawn."""
    flat = labels.reshape(-1)
    valid = (flat != IGNORE_INDEX).nonzero().flatten()
    if not len(valid):
        return valid
    image = valid // labels[0].numel()
    group = image * num_classes + flat[valid]
    jitter = torch.rand(len(valid), device=labels.device, dtype=torch.float64)
    order = torch.argsort(group.double() + jitter)  # by (image, class), random within
    counts = torch.bincount(group, minlength=int(group.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=labels.device) - starts[group[order]]
    return valid[order[rank < per_class]]


def draw_same_group(query: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query group id, the index of a uniformly drawn pool entry with the same id, and whether one
    exists: (index (A,), found (A,))."""
    size = int(max(query.max(), pool.max())) + 1 if len(query) and len(pool) else 1
    order = torch.argsort(pool, stable=True)
    counts = torch.bincount(pool, minlength=size)
    starts = torch.cumsum(counts, 0) - counts
    n = counts[query]
    pick = (torch.rand(len(query), device=query.device) * n).long().clamp(max=(n - 1).clamp_min(0))
    return order[(starts[query] + pick).clamp(max=max(len(pool) - 1, 0))] if len(pool) else pick, n > 0


def draw_other_class(query: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query class, the index of a uniformly drawn pool entry of any *other* class, and whether one
    exists: skip the block of the query's own class in the class-sorted pool."""
    size = int(max(query.max(), pool.max())) + 1 if len(query) and len(pool) else 1
    order = torch.argsort(pool, stable=True)
    counts = torch.bincount(pool, minlength=size)
    starts = torch.cumsum(counts, 0) - counts
    others = len(pool) - counts[query]
    r = (torch.rand(len(query), device=query.device) * others).long().clamp(max=(others - 1).clamp_min(0))
    position = r + (r >= starts[query]).long() * counts[query]
    return order[position.clamp(max=max(len(pool) - 1, 0))] if len(pool) else r, others > 0


def consistency_loss(target: torch.Tensor, target_labels: torch.Tensor, target_modes: torch.Tensor,
                     source: torch.Tensor, source_labels: torch.Tensor, source_modes: torch.Tensor,
                     num_modes: int, margin: float = 1.0, kind: str = "euclidean") -> torch.Tensor:
    """Eq. 6, stochastic mode alignment: for each target embedding e_t (pseudo label y, mode j*), a positive
    e_s⁺ drawn among the source embeddings of class y in mode j* and a negative e_s⁻ drawn among those of
    other classes; mean ReLU(d(e_t, e_s⁺) − d(e_t, e_s⁻) + m) over the target embeddings that have both."""
    if not len(target) or not len(source):
        return target.sum() * 0.0
    positive, has_positive = draw_same_group(target_labels * num_modes + target_modes,
                                             source_labels * num_modes + source_modes)
    negative, has_negative = draw_other_class(target_labels, source_labels)
    keep = has_positive & has_negative
    if not keep.any():
        return target.sum() * 0.0
    e = target[keep]
    d_pos = distance((e - source[positive[keep]]).pow(2).sum(1), kind)
    d_neg = distance((e - source[negative[keep]]).pow(2).sum(1), kind)
    return F.relu(d_pos - d_neg + margin).mean()


@register
class DRSL(CBST):
    name = "drsl"

    @dataclass
    class Hparams(CBST.Hparams):
        source_portion: float = 0.0        # no source images in the round's set: DRSL has its own source term
        source_portion_step: float = 0.0   #   L_seg(s) on every iteration's source batch (Eq. 3, 9)
        num_modes: int = 3                 # M (Sec. 4.1, Table 5)
        embed_dim: int = 64                # D of the embedding block
        sigma: float = 0.5                 # σ of every mode (Sec. 3.2)
        posterior: str = "max"             # max over modes (paper) | mixture (equal-weight mean of the modes)
        normalize_embeddings: bool = True  # l2-normalise e per pixel (the paper is silent)
        samples_per_class: int = 300       # per class per image (Sec. 4.1)
        label_reduction: int = 2           # embeddings at 1/2 of the input (Table 6)
        triplet_weight: float = 0.25       # λ1, distance metric learning (Eq. 4, 7)
        mmdl_ce_weight: float = 0.1        # λ2, mixture classification (Eq. 5)
        consistency_weight: float = 0.1    # λ3, cross-domain mode consistency (Eq. 6; 0 = "DRSL", 0.1 = "DRSL+")
        triplet_margin: float = 1.0        # α of Eq. 4, 7
        consistency_margin: float = 1.0    # m of Eq. 6 ("set to 1")
        distance: str = "euclidean"        # euclidean | squared

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hp = self.hp
        if hp.posterior not in POSTERIORS or hp.distance not in DISTANCES:
            raise ValueError(f"posterior must be one of {POSTERIORS} and distance one of {DISTANCES}; got "
                             f"{hp.posterior!r}, {hp.distance!r}")
        if hp.num_modes < 1 or hp.embed_dim < 1 or hp.samples_per_class < 1 or hp.label_reduction < 1:
            raise ValueError("num_modes, embed_dim, samples_per_class and label_reduction must be >= 1")
        model = self.model
        self.mmdl = MMDLHead(model.backbone.channels["layer4"], model.cfg.num_classes, hp.num_modes, hp.embed_dim,
                             tuple(model.cfg.aspp_rates), hp.normalize_embeddings)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The segmenter's groups, with the MMDL-FR module in the heads' group (head_lr_mult)."""
        groups = super().param_groups(model)
        groups[1]["params"] = list(groups[1]["params"]) + list(self.mmdl.parameters())
        return groups

    # ----- forward passes ------------------------------------------------------------------------------
    def forward_with_embeddings(self, images: torch.Tensor) -> tuple[SegOutput, torch.Tensor]:
        """The segmenter's output (primary and, in training, auxiliary scores) and the MMDL-FR embeddings
        (B, D, H / r, W / r) of the same encoder pass."""
        size = images.shape[-2:]
        stages, feats = self.model.encode(images)
        logits = self.model.decode(feats, stages, size)
        aux = None
        if self.model.aux_head is not None and self.training:
            aux = F.interpolate(self.model.aux_head(stages["layer3"]), size=size, mode="bilinear", align_corners=False)
        r = self.hp.label_reduction
        return SegOutput(logits, feats, aux), self.mmdl(stages["layer4"], (size[0] // r, size[1] // r))

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """MMDL-FR embeddings (B, D, H / r, W / r) of images in [0, 1], in eval mode."""
        was = self.training
        self.eval()
        with self.autocast():
            _, emb = self.forward_with_embeddings(images.to(self.device))
        self.train(was)
        return emb.float()

    @torch.no_grad()
    def mode_maps(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For embeddings (B, D, h, w): the MMDL class posterior P(C = c | e) (B, K, h, w) and, per class, the
        index of its mode each pixel is nearest to (B, K, h, w)."""
        b, d, h, w = embeddings.shape
        loglik = mode_log_likelihoods(embeddings.permute(0, 2, 3, 1).reshape(-1, d), self.mmdl.modes, self.hp.sigma)
        posterior = class_scores(loglik, self.hp.posterior).softmax(-1)
        k = loglik.shape[1]
        return (posterior.view(b, h, w, k).permute(0, 3, 1, 2), loglik.argmax(-1).view(b, h, w, k).permute(0, 3, 1, 2))

    # ----- losses ----------------------------------------------------------------------------------------
    def sampled(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e (P, D), y (P,)): the sampled pixels' embeddings and labels, labels reduced (nearest) to the
        embeddings' size."""
        small = F.interpolate(labels[:, None].float(), size=embeddings.shape[-2:], mode="nearest")[:, 0].long()
        index = sample_pixels(small, self.hp.samples_per_class, self.model.cfg.num_classes)
        flat = embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
        return flat[index], small.reshape(-1)[index]

    def mmdl_terms(self, e: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_tri (Eq. 4), L_ce (Eq. 5), log-likelihoods (P, K, M)) of sampled embeddings."""
        d2 = squared_distances(e, self.mmdl.modes)
        loglik = -d2 / (2.0 * self.hp.sigma**2)
        return (mode_triplet_loss(d2, y, self.hp.triplet_margin, self.hp.distance),
                mixture_cross_entropy(loglik, y, self.hp.posterior), loglik)

    # ----- training ----------------------------------------------------------------------------------------
    def warmup_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Eq. 8: the source model with its MMDL-FR module, L_seg(s) + λ1 L_tri(s) + λ2 L_ce(s)."""
        hp = self.hp
        with self.autocast():
            out, emb = self.forward_with_embeddings(batch["image"])
        seg, terms = segmentation_loss(out, batch["label"], hp.aux_weight)
        tri, ce, _ = self.mmdl_terms(*self.sampled(emb, batch["label"]))
        loss = seg + hp.triplet_weight * tri + hp.mmdl_ce_weight * ce
        self.backward(loss)
        self.step("main")
        return {"loss": loss.item(), **terms, "tri_s": tri.item(), "mmdl_ce_s": ce.item()}

    def round_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Eq. 9, 10 with Eq. 6: both domains' segmentation losses, the MMDL-FR losses on both, and the
        stochastic mode alignment of target pixels with source pixels of the same class and mode."""
        if "target_label" not in batch:
            raise RuntimeError("a DRSL round needs the target pseudo labels in the batch (target_label)")
        hp = self.hp
        with self.autocast():
            out_s, emb_s = self.forward_with_embeddings(batch["image"])
            out_t, emb_t = self.forward_with_embeddings(batch["target_image"])
        seg_s, terms = segmentation_loss(out_s, batch["label"], hp.aux_weight)
        seg_t, pseudo_terms = self.pseudo_loss(out_t, batch["target_label"])
        e_s, y_s = self.sampled(emb_s, batch["label"])
        e_t, y_t = self.sampled(emb_t, batch["target_label"])
        tri_s, ce_s, loglik_s = self.mmdl_terms(e_s, y_s)
        tri_t, ce_t, loglik_t = self.mmdl_terms(e_t, y_t)
        cons = consistency_loss(e_t, y_t, assigned_modes(loglik_t, y_t).detach(), e_s, y_s,
                                assigned_modes(loglik_s, y_s).detach(), hp.num_modes, hp.consistency_margin,
                                hp.distance)
        loss = (seg_s + seg_t + hp.triplet_weight * (tri_s + tri_t) + hp.mmdl_ce_weight * (ce_s + ce_t)
                + hp.consistency_weight * cons)
        self.backward(loss)
        self.step("main")
        return {"loss": loss.item(), **terms, **pseudo_terms, "tri_s": tri_s.item(), "tri_t": tri_t.item(),
                "mmdl_ce_s": ce_s.item(), "mmdl_ce_t": ce_t.item(), "cons": cons.item()}
