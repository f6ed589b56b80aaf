"""RobustNet's instance selective whitening, ISW (Choi, Jung, Yun, Kim, Kim, Choo, CVPR 2021).

Instance standardization Z = (x − μ) / σ (IN without affine) after the stem, layer1 and layer2, and a
loss that whitens only the *style-sensitive* entries of each image's channel covariance
Σ = Z Zᵀ / (HW − 1) + ε I:

    L_ISW = (1/B) Σ_b max(0, Σ_{(i,j) ∈ S} |Σ_b[i, j]| / |S|)            (one per position, averaged)
    L = CE + 0.6 · L_ISW                                                  (RobustNet's --wt_reg_weight 0.6)

S, the sensitive set, is chosen once, after a warm-up without L_ISW (RobustNet: epoch 5 of 40k
iterations), from photometric pairs: for image x and its photometrically changed copy x̃ (ColorJitter
0.8/0.8/0.8/0.3 + blur), the element-wise variance of the two covariances, V = Var(Σ(x), Σ(x̃)), averaged
over images. A 1-D k-means with 3 clusters on the off-diagonal entries of V splits them by how much a
photometric change moves them; every entry outside the lowest-variance cluster is sensitive. This is
repeated for `trials` trials (fresh images and augmentations) and the masks are intersected.

dgnb's version (docs/style.md, 'ISW in dgnb'):
- the standardization is a stage transform after each stage's output (`dgnb.models.style`); RobustNet
  standardizes inside the stage, before its last ReLU (the stem's BN is replaced by it);
- a trial uses the training batches of `trial_batches` consecutive iterations (eval-mode forward, no
  gradient) instead of a pass over 500 training images; the trials take the last iterations of the
  warm-up, so the mask is ready when the warm-up ends, and resume stays exact;
- the k-means runs on the C(C−1)/2 upper-triangle entries (RobustNet clusters the whole C×C matrix,
  whose zero lower triangle and diagonal then sit in the lowest cluster), with Lloyd iterations
  (RobustNet: the exact 1-D `kmeans1d`);
- the mask is stored symmetric (both triangles, zero diagonal); since Σ is symmetric the mean of |Σ|
  over it equals RobustNet's over the upper triangle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.style import InstanceStandardization, all_reduce_sum_, covariance, kmeans
from .base import Method, register
from .losses import segmentation_loss
from .meta import photometric_shift

ISW_STAGES = ("stem", "layer1", "layer2")


# ----- the loss and the mask (pure functions) -----------------------------------------------------------
def isw_loss(cov: torch.Tensor, mask: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """(1/B) Σ_b max(0, Σ_{ij} |Σ_b[i,j]| M[i,j] / Σ M − margin) for covariances (B, C, C), mask M (C, C)."""
    masked = (cov.abs() * mask).sum(dim=(1, 2)) / mask.sum().clamp_min(1)
    return (masked - margin).clamp_min(0).mean()


def covariance_variance(cov_a: torch.Tensor, cov_b: torch.Tensor) -> torch.Tensor:
    """V = element-wise unbiased variance of the pair (Σ(x), Σ(x̃)), averaged over images: ((Σa − Σb)²/2), (C, C)."""
    return (cov_a - cov_b).pow(2).mean(0) / 2


def upper_triangle(c: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (C, C) mask of the entries above the diagonal (each channel pair once)."""
    return torch.ones(c, c, dtype=torch.bool, device=device).triu(diagonal=1)


def sensitive_mask(variance: torch.Tensor, clusters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (C, C) symmetric float, sorted cluster centres (clusters,)): the pairs outside the lowest of
    `clusters` 1-D k-means clusters of the upper-triangle variances are sensitive."""
    c = variance.shape[0]
    upper = upper_triangle(c, variance.device)
    values = variance[upper]
    centres, labels = kmeans(values[:, None], min(clusters, len(values)))
    selected = torch.zeros(c, c, device=variance.device)
    selected[upper] = (labels > 0).float()
    return selected + selected.t(), centres[:, 0]


def cluster_boundaries(centres: torch.Tensor) -> torch.Tensor:
    """Midpoints between consecutive sorted 1-D k-means centres: the variances where the cluster changes."""
    return (centres[1:] + centres[:-1]) / 2


# ----- the method --------------------------------------------------------------------------------------
@register
class ISW(Method):
    name = "isw"

    @dataclass
    class Hparams:
        aux_weight: float = 0.4           # RobustNet "dsn" head (used when the model has an auxiliary head)
        isw_weight: float = 0.6           # --wt_reg_weight
        warmup_fraction: float = 0.125    # iterations without L_ISW before the mask (RobustNet: 5 of ~40 epochs)
        trials: int = 10                  # --trials: masks intersected
        trial_batches: int = 4            # training batches per trial (RobustNet: 500 images per trial)
        clusters: int = 3                 # --clusters of the 1-D k-means
        margin: float = 0.0               # relax margin (ISW: 0)
        jitter: float = 0.8               # ColorJitter(0.8, 0.8, 0.8, 0.3) + blur of the photometric pair
        hue: float = 0.3
        stages: str = "stem,layer1,layer2"  # positions of the instance standardization

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hp = self.hp
        if hp.trials < 1 or hp.trial_batches < 1 or hp.clusters < 2:
            raise ValueError(f"ISW needs trials >= 1, trial_batches >= 1 and clusters >= 2, got {hp.trials}, "
                             f"{hp.trial_batches}, {hp.clusters} (--set hparams.trials=10 ...)")
        if not 0 <= hp.warmup_fraction < 1:
            raise ValueError(f"hparams.warmup_fraction must lie in [0, 1), got {hp.warmup_fraction}")
        self.isw_stages = [s.strip() for s in hp.stages.split(",") if s.strip()]
        self.whitening = nn.ModuleDict()
        for stage in self.isw_stages:
            self.model.backbone.insert_transform(stage, InstanceStandardization())
            c = self.model.backbone.channels[stage]
            holder = nn.Module()
            holder.register_buffer("mask", torch.zeros(c, c))          # S, symmetric 0/1
            holder.register_buffer("variance_sum", torch.zeros(c, c))  # Σ over the trial's batches of V
            holder.register_buffer("variance", torch.zeros(c, c))      # V of the last trial (for figures)
            holder.register_buffer("centres", torch.zeros(hp.clusters))  # its k-means centres
            self.whitening[stage] = holder
        self.register_buffer("trials_done", torch.tensor(0))
        self.register_buffer("batches_in_trial", torch.tensor(0))

    # ----- schedule ---------------------------------------------------------------------------------
    @property
    def warmup_iterations(self) -> int:
        """Iterations trained with CE only; the last `trials · trial_batches` of them select the mask."""
        return max(int(self.hp.warmup_fraction * self.optim_cfg.iterations), self.hp.trials * self.hp.trial_batches)

    @property
    def mask_ready(self) -> bool:
        return int(self.trials_done) >= self.hp.trials

    def masks(self) -> dict[str, torch.Tensor]:
        return {s: h.mask for s, h in self.whitening.items()}

    # ----- mask selection ---------------------------------------------------------------------------
    @torch.no_grad()
    def standardized_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Z at each ISW position for images in [0, 1], by stage (forward up to the last position)."""
        with self.autocast():
            stages = self.model.backbone((images - self.model.mean) / self.model.std, until=self.isw_stages[-1])
        return {s: stages[f"{s}.z"].float() for s in self.isw_stages}

    @torch.no_grad()
    def covariance_statistics(self, images: torch.Tensor) -> None:
        """One batch of a trial: add V = Var(Σ(x̃), Σ(x)) (mean over the images) to each position's sum, with
        the network in eval mode (RobustNet's `validate_for_cov_stat`)."""
        was = self.training
        self.eval()
        shifted = photometric_shift(images, self.hp.jitter, self.hp.hue)
        maps = self.standardized_maps(torch.cat([shifted, images]))
        self.train(was)
        n = len(images)
        for stage, z in maps.items():
            cov = covariance(z)
            self.whitening[stage].variance_sum += covariance_variance(cov[:n], cov[n:])

    @torch.no_grad()
    def close_trial(self) -> None:
        """k-means on the trial's mean variances; intersect the new mask with the previous trials' (AND)."""
        first = int(self.trials_done) == 0
        for holder in self.whitening.values():
            variance = holder.variance_sum / self.hp.trial_batches
            all_reduce_sum_(variance)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                variance /= torch.distributed.get_world_size()
            mask, centres = sensitive_mask(variance, self.hp.clusters)
            holder.mask.copy_(mask if first else holder.mask * mask)
            holder.variance.copy_(variance)
            holder.centres.zero_()[: len(centres)] = centres
            holder.variance_sum.zero_()
        self.trials_done += 1

    def select_mask_step(self, images: torch.Tensor) -> None:
        """Called every iteration: during the last `trials · trial_batches` warm-up iterations, gather a trial."""
        start = self.warmup_iterations - self.hp.trials * self.hp.trial_batches
        if self.mask_ready or self.iteration < start:
            return
        self.covariance_statistics(images)
        self.batches_in_trial += 1
        if int(self.batches_in_trial) == self.hp.trial_batches:
            self.batches_in_trial.zero_()
            self.close_trial()

    # ----- the training iteration -------------------------------------------------------------------
    def whitening_loss(self, stages: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the positions of L_ISW on the standardized maps of this forward."""
        losses = [isw_loss(covariance(stages[f"{s}.z"]), self.whitening[s].mask, self.hp.margin)
                  for s in self.isw_stages]
        return torch.stack(losses).mean()

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        whiten = self.mask_ready and self.hp.isw_weight > 0  # from the first iteration after the warm-up
        self.select_mask_step(batch["image"])
        with self.autocast():
            out = self.model(batch["image"], return_stages=True)
        loss, terms = segmentation_loss(out, batch["label"], self.hp.aux_weight)
        if whiten:
            wt = self.whitening_loss(out.stages)
            loss = loss + self.hp.isw_weight * wt
            terms["isw"] = wt.item()
        self.backward(loss)
        self.step("main")
        return {"loss": loss.item(), **terms}

    @torch.no_grad()
    def covariances(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ (B, C, C) at each position for images in [0, 1] (eval mode), on the CPU: for figures."""
        was = self.training
        self.eval()
        maps = self.standardized_maps(images.to(self.device))
        self.train(was)
        return {s: covariance(z).cpu() for s, z in maps.items()}
