"""Style Projected Clustering, SPC (Huang, Chen, Li, Li, Li, Song, Yan, Xiong, CVPR 2023).

Two parts on a DeepLab-v3+ (docs/style.md has the full walk-through):

**Style projection** after the stem and after layer1 (the decoder's low-level skip is taken from
layer1 *before* the second projection, as in the official network). For an input map x with
per-image channel statistics μ, σ and M style bases (p^μ_m, p^σ_m):

    d_m = mean_c [ (μ_c − p^μ_{m,c})² + σ_c² + (p^σ_{m,c})² − 2 σ_c p^σ_{m,c} ]     (poster, d_m; 'was')
    λ_m = exp(1/(1 + d_m)) / Σ_m' exp(1/(1 + d_m'))                                  (poster, λ_m)
    μ' = Σ_m λ_m p^μ_m,   σ' = Σ_m λ_m p^σ_m                                          (poster, μ', σ')
    F^r = σ' (x − μ) / σ + μ'                                                          (poster, F^r, AdaIN)

d_m is the squared 2-Wasserstein distance between per-channel Gaussians, averaged over channels as in
the official code (the poster writes the sum; the mean only rescales 1/(1+d)). `distance="abs"` is the
first author's from-memory form mean_c |μ_c/σ_c − p^μ_{m,c}/p^σ_{m,c}|. The bases are buffers, not
parameters: after each training forward, base m moves toward the mean statistics of its images,
p_m <- γ p_m + (1 − γ) mean (γ = 0.9), with the group sums added over torchrun processes.

**Semantic clustering**. The decoder's last map goes through a projection head (1x1 conv, ReLU, 1x1
conv), is ℓ2-normalized, layer-normalized and ℓ2-normalized again: pixel embeddings e. Semantic bases
P (K classes x M domains x D) are unit vectors; the score of class c is the best cosine over its bases,
s_c = max_m ⟨e, P_{c,m}⟩, layer-normalized over the K classes and upsampled: the class scores. Losses:

    L_CE  = pixel cross-entropy of the scores                                            (poster, L_CE)
    L_var = (1/MK) Σ_{m,c present} mean_{p ∈ (m,c)} (1 − ⟨e_p, P_{c,m}⟩)²                 (poster, L_var)
    L_dis = (1/MK) Σ_{m,c present} −log exp(⟨ē, p+⟩/τ) / (exp(⟨ē, p+⟩/τ) + Σ_{p−} exp(⟨ē, p−⟩/τ))
            ē = ℓ2norm(mean of the embeddings of class c in domain m),                   (poster, L_dis)
            ⟨ē, p+⟩ = mean_m' ⟨ē, P_{c,m'}⟩, p− = every base P_{c',m'} of another class c', τ = 0.1
    L = L_CE + var_weight · L_var + dis_weight · L_dis

and, without gradient, P_{c,m} <- ℓ2norm(γ_p P_{c,m} + (1 − γ_p) ē) (γ_p = 0.999 in the official
config). The bases enter the losses detached; the gradient flows into e and ē.

Where the paper is silent (docs/style.md, 'What the paper does not say'):
- loss weights: not on the poster; the from-memory code adds the three losses, so both weights are 1;
- base initialisation: the first training batch sets each style base to its domain's mean statistics
  (the projection is the identity until then); semantic bases start as random unit vectors;
- single source (`--sources source_a`): the released single-source model has 10 style bases, but how
  they were built is not public. Here (`style_base_source="kmeans"`, the default with one source) the
  first `kmeans_images` training images' statistics are collected (projection off meanwhile), k-means
  gives `kmeans_bases` bases, and afterwards each image updates its nearest base; the stem projection's
  nearest base also indexes the semantic bases (so there are `kmeans_bases` of them per class too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..data.taxonomy import IGNORE_INDEX
from ..models.style import (StageTransform, adain, all_reduce_sum_, broadcast_, channel_stats, ema_toward_group_means,
                            kmeans)
from .base import Method, register

DISTANCES = ("was", "abs")
BASE_SOURCES = ("auto", "domains", "kmeans")


# ----- style projection (pure functions) --------------------------------------------------------------
def style_distance(mu: torch.Tensor, sigma: torch.Tensor, base_mu: torch.Tensor, base_sigma: torch.Tensor,
                   form: str = "was") -> torch.Tensor:
    """d (B, M) between per-image statistics (B, C) and M style bases (M, C), averaged over channels.

    'was': (μ − p^μ)² + σ² + (p^σ)² − 2σ p^σ = (μ − p^μ)² + (σ − p^σ)², the squared 2-Wasserstein distance
    of two 1-D Gaussians (official code, poster's d_m); 'abs': |μ/σ − p^μ/p^σ| (from-memory code)."""
    if form == "was":
        d = (mu[:, None] - base_mu[None]).pow(2) + (sigma[:, None] - base_sigma[None]).pow(2)
    elif form == "abs":
        d = (mu[:, None] / sigma[:, None] - base_mu[None] / base_sigma[None]).abs()
    else:
        raise ValueError(f"unknown style distance {form!r}; choose one of {DISTANCES} (hparams.distance)")
    return d.mean(dim=2)


def projection_weights(d: torch.Tensor) -> torch.Tensor:
    """λ = softmax_m(1 / (1 + d_m)), (B, M): closer bases weigh more; each row sums to one."""
    return (1.0 / (1.0 + d)).softmax(dim=1)


def project_statistics(lam: torch.Tensor, base_mu: torch.Tensor, base_sigma: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """μ' = Σ_m λ_m p^μ_m, σ' = Σ_m λ_m p^σ_m, each (B, C): a convex combination of the bases."""
    return lam @ base_mu, lam @ base_sigma


class StyleProjection(StageTransform):
    """The style projection module (one per stage): AdaIN toward the λ-weighted style bases.

    Buffers: `style_mu`, `style_sigma` (M, C), the bases; `initialized`; and, for k-means bases, a bank of
    per-image statistics (`bank_mu`, `bank_sigma`, `bank_count`) filled before the k-means. By-products:
    `mu`, `sigma` (the input's statistics), and once the bases exist `d`, `lambda`, `mu_proj`, `sigma_proj`.
    `expose = "input"`: the stage dict keeps the unprojected map (the official low-level skip)."""

    expose = "input"

    def __init__(self, channels: int, num_bases: int, distance: str = "was", momentum: float = 0.9,
                 kmeans_images: int = 0) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown style distance {distance!r}; choose one of {DISTANCES} (hparams.distance)")
        self.distance, self.momentum = distance, momentum
        self.register_buffer("style_mu", torch.zeros(num_bases, channels))
        self.register_buffer("style_sigma", torch.ones(num_bases, channels))
        self.register_buffer("initialized", torch.tensor(False))
        self.kmeans_images = kmeans_images
        if kmeans_images:
            self.register_buffer("bank_mu", torch.zeros(kmeans_images, channels))
            self.register_buffer("bank_sigma", torch.zeros(kmeans_images, channels))
            self.register_buffer("bank_count", torch.tensor(0))

    @property
    def num_bases(self) -> int:
        return self.style_mu.shape[0]

    def weights(self, mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, λ), each (B, M), for statistics (B, C)."""
        d = style_distance(mu, sigma, self.style_mu, self.style_sigma, self.distance)
        return d, projection_weights(d)

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mu, sigma = (s.detach() for s in channel_stats(x))  # detached, as in the from-memory code
        if not bool(self.initialized):
            return x, {"mu": mu, "sigma": sigma}
        d, lam = self.weights(mu, sigma)
        mu_proj, sigma_proj = project_statistics(lam, self.style_mu, self.style_sigma)
        out = adain(x, mu, sigma, mu_proj, sigma_proj)
        return out, {"mu": mu, "sigma": sigma, "d": d, "lambda": lam, "mu_proj": mu_proj, "sigma_proj": sigma_proj}

    @torch.no_grad()
    def update(self, mu: torch.Tensor, sigma: torch.Tensor, assign: torch.Tensor | None) -> None:
        """After a training forward: p_m <- γ p_m + (1 − γ) mean of the statistics of the images assigned to m
        (`assign` (B, M) one-hot; None = each image's nearest base). Before the bases exist: the first batch
        sets them (per-domain bases), or the statistics go into the k-means bank until it is full."""
        if not bool(self.initialized):
            if self.kmeans_images:
                self._fill_bank(mu, sigma)
            else:
                self._initialize_from(mu, sigma, assign)
            return
        if assign is None:
            assign = F.one_hot(self.weights(mu, sigma)[0].argmin(dim=1), self.num_bases)
        ema_toward_group_means(self.style_mu, mu, assign, self.momentum)
        ema_toward_group_means(self.style_sigma, sigma, assign, self.momentum)

    def _initialize_from(self, mu: torch.Tensor, sigma: torch.Tensor, assign: torch.Tensor) -> None:
        """Each base = its domain's mean statistics in this batch (all images' mean for an absent domain)."""
        for base, values in ((self.style_mu, mu), (self.style_sigma, sigma)):
            base.copy_(values.float().mean(0).expand_as(base))
            ema_toward_group_means(base, values, assign, momentum=0.0)
        self.initialized.fill_(True)

    def _fill_bank(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """Store per-image statistics (rank-local); when `kmeans_images` are in, k-means on [μ, σ] sets the
        bases (on rank 0, broadcast to the other processes)."""
        start = int(self.bank_count)
        take = min(len(mu), self.kmeans_images - start)
        self.bank_mu[start:start + take] = mu[:take].float()
        self.bank_sigma[start:start + take] = sigma[:take].float()
        self.bank_count.add_(take)
        if int(self.bank_count) < self.kmeans_images:
            return
        c = self.style_mu.shape[1]
        centroids, _ = kmeans(torch.cat([self.bank_mu, self.bank_sigma], dim=1), self.num_bases)
        self.style_mu.copy_(centroids[:, :c])
        self.style_sigma.copy_(centroids[:, c:].clamp_min(1e-3))
        broadcast_(self.style_mu, self.style_sigma)
        self.initialized.fill_(True)


# ----- semantic clustering ------------------------------------------------------------------------------
def l2norm(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return F.normalize(x, dim=dim, eps=1e-6)


class SemanticClustering(nn.Module):
    """Projection head -> pixel embeddings e -> class scores from the semantic bases P (K, M, D), a buffer.

    It replaces the segmenter's 1x1 classifier, so `Segmenter.forward` is the whole SPC network."""

    def __init__(self, channels: int, num_classes: int, num_bases: int) -> None:
        super().__init__()
        self.projection = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(channels, channels, 1))
        self.embed_norm = nn.LayerNorm(channels)
        self.score_norm = nn.LayerNorm(num_classes)
        self.register_buffer("semantic_bases", l2norm(torch.randn(num_classes, num_bases, channels), dim=2))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """e = ℓ2(LN(ℓ2(proj(x)))) per pixel, (B, D, h, w), unit vectors."""
        e = l2norm(self.projection(x).float())
        e = self.embed_norm(e.permute(0, 2, 3, 1))
        return l2norm(e, dim=3).permute(0, 3, 1, 2)

    def base_similarities(self, e: torch.Tensor) -> torch.Tensor:
        """⟨e, P_{c,m}⟩ for every class and base, (B, K, M, h, w)."""
        return torch.einsum("bdhw,kmd->bkmhw", e, self.semantic_bases.to(e.dtype))

    def scores(self, e: torch.Tensor) -> torch.Tensor:
        """LN_K(max_m ⟨e, P_{c,m}⟩), (B, K, h, w): the clustering's class scores."""
        s = self.base_similarities(e).amax(dim=2)
        return self.score_norm(s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(self.embed(x))


def group_weights(labels: torch.Tensor, assign: torch.Tensor, num_classes: int) -> torch.Tensor:
    """W (P, M, K): pixel p's weight in group (base m, class c) = assign[image of p, m] · [y_p = c].

    `labels` (B, h, w) with 255 = ignore (weight 0 everywhere); `assign` (B, M), one-hot rows (or all ones)."""
    valid = labels != IGNORE_INDEX
    onehot = F.one_hot(labels.clamp(max=num_classes - 1), num_classes).float() * valid[..., None]
    b, h, w = labels.shape
    return (assign.float()[:, None, None, :, None] * onehot[:, :, :, None, :]).reshape(b * h * w, -1, num_classes)


def variance_loss(e: torch.Tensor, bases: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_var = (1/MK) Σ_{(m,c) present} mean over the group's pixels of (1 − ⟨e_p, P_{c,m}⟩)².

    `e` (P, D) unit embeddings, `bases` (K, M, D) (detached), `weights` (P, M, K) from `group_weights`."""
    k, m, _ = bases.shape
    sq = (1 - torch.einsum("pd,kmd->pmk", e, bases)).pow(2)
    sums, counts = (weights * sq).sum(0), weights.sum(0)
    return (sums / counts.clamp_min(1e-12))[counts > 0].sum() / (k * m)


def group_mean_embeddings(e: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ē (M, K, D) = ℓ2norm of each group's mean embedding, counts (M, K)); groups without pixels give 0."""
    sums = torch.einsum("pmk,pd->mkd", weights, e)
    counts = weights.sum(0)
    return l2norm(sums / counts.clamp_min(1e-12)[..., None], dim=2), counts


def discrimination_loss(mean_e: torch.Tensor, counts: torch.Tensor, bases: torch.Tensor, temperature: float
                        ) -> torch.Tensor:
    """L_dis = (1/MK) Σ_{(m,c) present} −log softmax over [p+, p−...] of ⟨ē_{m,c}, ·⟩/τ at p+.

    p+ scores mean_m' ⟨ē, P_{c,m'}⟩ (all bases of the group's class); the negatives are the K−1 other
    classes' bases P_{c',m'}. `mean_e` (M, K, D), `counts` (M, K), `bases` (K, M, D) detached."""
    k, m, _ = bases.shape
    sims = torch.einsum("mkd,jnd->mkjn", mean_e, bases)                  # ⟨ē_{m,k}, P_{j,n}⟩
    own = torch.eye(k, dtype=torch.bool, device=sims.device)[None, :, :, None].expand_as(sims)
    positive = (sims * own).sum((2, 3)) / m                                 # (M, K): mean over n of ⟨ē, P_{k,n}⟩
    negatives = sims.masked_fill(own, float("-inf")).flatten(2)            # (M, K, K·M), own class masked
    logits = torch.cat([positive[..., None], negatives], dim=2) / temperature
    loss = -logits.log_softmax(dim=2)[..., 0]
    return loss[counts > 0].sum() / (k * m)


@torch.no_grad()
def update_semantic_bases(bases: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float) -> None:
    """P_{c,m} <- ℓ2norm(γ_p P_{c,m} + (1 − γ_p) ē_{m,c}) for groups with pixels, in place (`sums` (M, K, D)
    and `counts` (M, K) already summed over processes)."""
    mean_e = l2norm(sums / counts.clamp_min(1e-12)[..., None], dim=2).transpose(0, 1)
    present = (counts > 0).t()[..., None]
    bases.copy_(torch.where(present, l2norm(momentum * bases + (1 - momentum) * mean_e, dim=2), bases))


@dataclass
class SPCOutput:
    logits: torch.Tensor                   # (B, K, H, W) class scores at input size
    embeddings: torch.Tensor               # e (B, D, h, w)
    stages: dict[str, torch.Tensor]        # backbone stages and the projections' by-products
    aux_logits: torch.Tensor | None = None


# ----- the method ---------------------------------------------------------------------------------------
@register
class SPC(Method):
    name = "spc"

    @dataclass
    class Hparams:
        distance: str = "was"              # d_m: 'was' (official, poster) or 'abs' (from-memory code)
        style_momentum: float = 0.9        # γ of the style bases' EMA (from-memory code gamma_style)
        style_base_source: str = "auto"    # 'domains' (one base per source domain), 'kmeans' (k-means over
                                           # per-image statistics), 'auto' (domains if >= 2 sources, else kmeans)
        kmeans_bases: int = 10             # bases per stage with 'kmeans' (the released single-source model: 10)
        kmeans_images: int = 128           # per-image statistics collected before the k-means
        project_stages: str = "stem,layer1"  # stages followed by a style projection ('' = none: clustering only)
        clustering: bool = True            # False: the plain 1x1 classifier and CE (style projection only)
        proto_momentum: float = 0.999      # γ_p of the semantic bases' EMA (official config)
        temperature: float = 0.1           # τ of L_dis (from-memory code)
        var_weight: float = 1.0            # weight of L_var (not on the poster; the code adds the losses)
        dis_weight: float = 1.0            # weight of L_dis (idem)
        aux_weight: float = 0.0            # layer3 auxiliary CE, if the model has one (official: off)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hp = self.hp
        self.base_source = resolve_base_source(hp.style_base_source, self.num_domains, hp.kmeans_bases,
                                               hp.kmeans_images)
        num_bases = self.num_domains if self.base_source == "domains" else hp.kmeans_bases
        stages = [s.strip() for s in hp.project_stages.split(",") if s.strip()]
        self.projections: dict[str, StyleProjection] = {}
        for stage in stages:
            channels = self.model.backbone.channels.get(stage, 0)
            module = StyleProjection(channels, num_bases, hp.distance, hp.style_momentum,
                                     hp.kmeans_images if self.base_source == "kmeans" else 0)
            self.projections[stage] = self.model.backbone.insert_transform(stage, module)
        self.semantic_base_count = num_bases if self.projections else self.num_domains
        if hp.clustering:
            head = self.model.head
            self.model.head.classifier = SemanticClustering(head.decoder_channels, self.model.cfg.num_classes,
                                                            self.semantic_base_count)
        self.ema_exclude = tuple(k for k in self.state_dict() if k.rsplit(".", 1)[-1] in _BASE_BUFFERS)

    # ----- names from the paper ---------------------------------------------------------------------
    @property
    def clustering(self) -> SemanticClustering | None:
        head = self.model.head.classifier
        return head if isinstance(head, SemanticClustering) else None

    @property
    def semantic_bases(self) -> torch.Tensor:
        """P (K, M, D), unit vectors."""
        return self.clustering.semantic_bases

    @property
    def style_bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Stage -> (p^μ, p^σ), each (M, C)."""
        return {s: (p.style_mu, p.style_sigma) for s, p in self.projections.items()}

    # ----- forward --------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> SPCOutput:
        """Backbone with the style projections, ASPP, decoder, semantic clustering (or the 1x1 classifier)."""
        size = images.shape[-2:]
        stages, feats = self.model.encode(images)
        dec = self.model.head.decode_features(feats, stages)
        if self.clustering is not None:
            e = self.clustering.embed(dec)
            scores = self.clustering.scores(e)
        else:
            e, scores = dec, self.model.head.classifier(dec)
        logits = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        aux = None
        if self.model.aux_head is not None and self.training:
            aux = F.interpolate(self.model.aux_head(stages["layer3"]), size=size, mode="bilinear", align_corners=False)
        return SPCOutput(logits, e, stages, aux)

    def domain_assignment(self, domains: torch.Tensor) -> torch.Tensor:
        """(B, M) one-hot: which style/semantic base each image updates, by its source domain."""
        return F.one_hot(domains, self.num_domains).float()

    def semantic_assignment(self, out: SPCOutput, domains: torch.Tensor) -> torch.Tensor:
        """(B, M) weights of each image in the semantic bases' groups: its source domain, or with k-means
        bases its nearest style base at the first projection (all bases before the k-means has run)."""
        if self.base_source == "domains" or not self.projections:
            if self.semantic_base_count == 1:
                return torch.ones(len(domains), 1, device=domains.device)
            return F.one_hot(domains, self.semantic_base_count).float()
        first = next(iter(self.projections))
        d = out.stages.get(f"{first}.d")
        if d is None:
            return torch.ones(len(domains), self.semantic_base_count, device=domains.device)
        return F.one_hot(d.argmin(dim=1), self.semantic_base_count).float()

    # ----- losses ---------------------------------------------------------------------------------
    def clustering_losses(self, out: SPCOutput, labels: torch.Tensor, assign: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_var, L_dis, group sums of e (M, K, D), counts (M, K)); labels nearest-resized to e's size."""
        e = out.embeddings.float()
        small = F.interpolate(labels[:, None].float(), size=e.shape[-2:], mode="nearest")[:, 0].long()
        weights = group_weights(small, assign, self.model.cfg.num_classes)
        flat = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
        bases = self.semantic_bases.detach().float()
        mean_e, counts = group_mean_embeddings(flat, weights)
        l_var = variance_loss(flat, bases, weights)
        l_dis = discrimination_loss(mean_e, counts, bases, self.hp.temperature)
        sums = torch.einsum("pmk,pd->mkd", weights, flat.detach())
        return l_var, l_dis, sums, counts.detach()

    # ----- the training iteration -----------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        hp = self.hp
        labels, domains = batch["label"], batch["domain"]
        with self.autocast():
            out = self(batch["image"])
        ce = F.cross_entropy(out.logits.float(), labels, ignore_index=IGNORE_INDEX)
        loss, logs = ce, {"ce": ce.item()}
        if out.aux_logits is not None and hp.aux_weight > 0:
            aux = F.cross_entropy(out.aux_logits.float(), labels, ignore_index=IGNORE_INDEX)
            loss, logs["aux"] = loss + hp.aux_weight * aux, aux.item()
        sums = counts = None
        if self.clustering is not None:
            l_var, l_dis, sums, counts = self.clustering_losses(out, labels, self.semantic_assignment(out, domains))
            loss = loss + hp.var_weight * l_var + hp.dis_weight * l_dis
            logs.update(var=l_var.item(), dis=l_dis.item())
        self.backward(loss)
        self.step("main")
        self.update_bases(out, domains, sums, counts)
        return {"loss": loss.item(), **logs}

    @torch.no_grad()
    def update_bases(self, out: SPCOutput, domains: torch.Tensor, sums: torch.Tensor | None,
                     counts: torch.Tensor | None) -> None:
        """EMA of the style bases (each projection, from its input's statistics) and of the semantic bases."""
        assign = self.domain_assignment(domains) if self.base_source == "domains" else None
        for stage, projection in self.projections.items():
            projection.update(out.stages[f"{stage}.mu"], out.stages[f"{stage}.sigma"], assign)
        if sums is not None:
            all_reduce_sum_(sums, counts)
            update_semantic_bases(self.semantic_bases, sums, counts, self.hp.proto_momentum)

    # ----- what the notebooks look at -------------------------------------------------------------
    @torch.no_grad()
    def style_readout(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The projections' by-products for images in [0, 1] (eval mode): `<stage>.mu`, `.sigma`, `.lambda`,
        `.mu_proj`, `.sigma_proj`, ... each (B, ·), on the CPU."""
        was = self.training
        self.eval()
        with self.autocast():
            stages = self.model.backbone((images.to(self.device) - self.model.mean) / self.model.std, until="layer1")
        self.train(was)
        return {k: v.float().cpu() for k, v in stages.items() if "." in k}

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel embeddings e (B, D, h, w) for images in [0, 1] (eval mode)."""
        was = self.training
        self.eval()
        with self.autocast():
            e = self(images.to(self.device)).embeddings.float()
        self.train(was)
        return e


_BASE_BUFFERS = ("style_mu", "style_sigma", "initialized", "bank_mu", "bank_sigma", "bank_count", "semantic_bases")


def resolve_base_source(source: str, num_domains: int, kmeans_bases: int, kmeans_images: int) -> str:
    """'domains' or 'kmeans' from `style_base_source`; a request that cannot work is an error naming the fix."""
    if source not in BASE_SOURCES:
        raise ValueError(f"unknown style_base_source {source!r}; choose one of {BASE_SOURCES} "
                         "(--set hparams.style_base_source=...)")
    if source == "auto":
        source = "domains" if num_domains > 1 else "kmeans"
    if source == "domains" and num_domains < 2:
        raise ValueError("SPC with a single source domain cannot have one style base per domain "
                         "(style_base_source='domains'): one base would project every image to the same style. "
                         "Fix: --set hparams.style_base_source=kmeans (bases from k-means over the source's "
                         "per-image statistics, hparams.kmeans_bases of them), or train on several sources "
                         "(--sources A,B).")
    if source == "kmeans":
        if kmeans_bases < 1:
            raise ValueError(f"SPC needs at least one style base, got hparams.kmeans_bases={kmeans_bases}. Fix: "
                             "--set hparams.kmeans_bases=10 (the released single-source model's count).")
        if kmeans_images < kmeans_bases:
            raise ValueError(f"hparams.kmeans_images={kmeans_images} is fewer than the {kmeans_bases} bases the "
                             f"k-means must find. Fix: --set hparams.kmeans_images={8 * kmeans_bases} (or more).")
    return source
