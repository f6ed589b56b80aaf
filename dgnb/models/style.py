"""Feature style: per-image channel statistics, covariance, stage transforms and IBN-Net normalization.

Style lives in the statistics of shallow features (Huang & Belongie's AdaIN; IBN-Net, Pan et al. 2018):
for a feature map x (B, C, H, W) of one stage, the per-image, per-channel mean and standard deviation

    μ_c(x) = (1/HW) Σ_{h,w} x_{c,h,w},    σ_c(x) = sqrt(Var_{h,w}(x_c) + ε)

change with colour, illumination and texture while the layout of the scene barely moves them, and the
channel covariance Σ = Z Zᵀ / (HW − 1) of the standardized map Z = (x − μ) / σ carries the rest of the
second-order style (RobustNet, Choi et al. 2021). The helpers here are the one place these are computed:
SPC, ISW, `dgnb.analysis` and the notebooks' figures all call them.

Two ways a method changes style processing in the backbone, both here:

- a **stage transform** (`StageTransform`), inserted after a named stage with
  `ResNetBackbone.insert_transform` (SPC's style projection, ISW's instance standardization); it returns
  the new map and its by-products (statistics, the standardized map), which the backbone hands back in
  its stage dict under `"<stage>.<name>"`;
- an **IBN-Net variant** of the backbone (`apply_ibn`, selected by `ModelConfig.ibn`), which changes the
  normalization layers inside the residual blocks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

IBN_VARIANTS = ("none", "a", "b")


# ----- statistics -----------------------------------------------------------------------------------
def channel_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel (μ, σ), each (B, C): μ = spatial mean, σ = sqrt(unbiased spatial variance + ε).

    Computed in float32 (the statistics of a bf16 map would be coarse). The unbiased variance and ε = 1e-6
    are those of SPC's style module."""
    x = x.float()
    return x.mean(dim=(2, 3)), (x.var(dim=(2, 3)) + eps).sqrt()


def style_vector(x: torch.Tensor) -> torch.Tensor:
    """[μ, σ] per image, (B, 2C): one point per image in the 'style space' the notebooks draw."""
    mu, sigma = channel_stats(x)
    return torch.cat([mu, sigma], dim=1)


def instance_standardize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Z = (x − μ) / sqrt(Var + ε) per image and channel (instance normalization without affine)."""
    return F.instance_norm(x, eps=eps)


def covariance(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-image channel covariance Σ = Z Zᵀ / (HW − 1) + ε I, (B, C, C), of a standardized map Z.

    Z is (B, C, H, W) with zero spatial mean per channel (`instance_standardize`), so Z Zᵀ / (HW − 1) is
    its covariance (RobustNet's `get_covariance_matrix`); for a whitened Z it is the identity."""
    b, c, h, w = z.shape
    flat = z.float().reshape(b, c, h * w)
    eye = torch.eye(c, device=z.device, dtype=flat.dtype)
    return flat @ flat.transpose(1, 2) / (h * w - 1) + eps * eye


def adain(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, new_mu: torch.Tensor, new_sigma: torch.Tensor
          ) -> torch.Tensor:
    """AdaIN: (x − μ) / σ · σ' + μ', statistics (B, C) broadcast over H, W; keeps x's dtype."""
    scale = (new_sigma / sigma)[:, :, None, None]
    shift = (new_mu - mu * new_sigma / sigma)[:, :, None, None]
    return (x.float() * scale + shift).to(x.dtype)


def kmeans(points: torch.Tensor, k: int, iterations: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of `points` (N, D) into `k` clusters: (centroids (k, D), labels (N,)).

    k-means++ seeding from a private generator (`seed`: the same points always give the same clusters,
    and the global random stream of training is untouched); an emptied cluster keeps its centroid. The
    centroids are returned sorted by their first coordinate (for 1-D points: ascending)."""
    x = points.float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):  # k-means++: the next seed with probability proportional to the squared distance
        d2 = torch.cdist(x, centroids).min(dim=1).values.pow(2)
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        centroids = torch.cat([centroids, x[torch.multinomial(p.cpu(), 1, generator=g).to(x.device)]])
    for _ in range(iterations):
        labels = torch.cdist(x, centroids).argmin(dim=1)
        onehot = F.one_hot(labels, k).to(x.dtype)
        counts = onehot.sum(0)
        updated = torch.where(counts[:, None] > 0, onehot.t() @ x / counts.clamp_min(1)[:, None], centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    centroids = centroids[centroids[:, 0].argsort()]
    return centroids, torch.cdist(x, centroids).argmin(dim=1)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum in place over torchrun processes (no-op in one process): every rank then holds the same buffers."""
    if distributed():
        for t in tensors:
            dist.all_reduce(t)


def broadcast_(*tensors: torch.Tensor) -> None:
    """Copy rank 0's values into every process (no-op in one process)."""
    if distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


@torch.no_grad()
def ema_toward_group_means(bases: torch.Tensor, values: torch.Tensor, assign: torch.Tensor, momentum: float
                           ) -> None:
    """bases[m] <- γ bases[m] + (1 − γ) mean of the `values` assigned to m, in place, for every m that has some.

    `bases` (M, ...), `values` (B, ...), `assign` (B, M) weights (one-hot: each row's group). The group sums
    and counts are summed over torchrun processes first, so all ranks apply the same update."""
    flat = values.float().reshape(values.shape[0], -1)
    sums = assign.float().t() @ flat
    counts = assign.float().sum(0)
    all_reduce_sum_(sums, counts)
    means = (sums / counts.clamp_min(1e-12)[:, None]).reshape(bases.shape)
    present = (counts > 0).reshape(-1, *([1] * (bases.dim() - 1)))
    bases.copy_(torch.where(present, momentum * bases + (1 - momentum) * means.to(bases.dtype), bases))


# ----- stage transforms -------------------------------------------------------------------------------
class StageTransform(nn.Module):
    """A map inserted after a backbone stage: `forward(x) -> (x', by-products)`.

    `x` is the stage's output (B, C, H, W); `x'` flows on into the next stage; the by-products (a dict of
    tensors, possibly empty) appear in the backbone's stage dict as `"<stage>.<name>"`. Subclasses
    implement `transform`; `expose` says which map the stage dict keeps under the stage's own name (what
    heads read, e.g. the decoder's low-level skip from layer1): "output" (x', the default) or "input" (x).
    """

    expose: str = "output"

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.transform(x)


class InstanceStandardization(StageTransform):
    """Z = (x − μ) / σ per image and channel (IN without affine); by-product `z`, the map the ISW loss uses."""

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = instance_standardize(x)
        return z, {"z": z}


# ----- IBN-Net (Pan, Luo, Shi, Tang, ECCV 2018) ----------------------------------------------------------
class IBN(nn.Module):
    """IBN-a's normalization: InstanceNorm (affine) on the first ⌊ratio·C⌋ channels, BatchNorm on the rest."""

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(channels * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split([self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(a.contiguous()), self.BN(b.contiguous())], dim=1)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, ratio: float = 0.5) -> "IBN":
        """An IBN layer initialised from `bn`: the IN half takes the first channels' γ, β; the BN half the
        rest's γ, β and running statistics (so ImageNet weights of a plain ResNet carry over, as RobustNet's
        IBN baseline does)."""
        ibn = cls(bn.num_features, ratio).to(bn.weight.device)
        with torch.no_grad():
            ibn.IN.weight.copy_(bn.weight[: ibn.half])
            ibn.IN.bias.copy_(bn.bias[: ibn.half])
            ibn.BN.weight.copy_(bn.weight[ibn.half:])
            ibn.BN.bias.copy_(bn.bias[ibn.half:])
            ibn.BN.running_mean.copy_(bn.running_mean[ibn.half:])
            ibn.BN.running_var.copy_(bn.running_var[ibn.half:])
        return ibn


def _instance_norm_like(bn: nn.BatchNorm2d) -> nn.InstanceNorm2d:
    """InstanceNorm2d (affine) with `bn`'s γ, β."""
    inorm = nn.InstanceNorm2d(bn.num_features, affine=True).to(bn.weight.device)
    with torch.no_grad():
        inorm.weight.copy_(bn.weight)
        inorm.bias.copy_(bn.bias)
    return inorm


def _residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch F(x) of a torchvision BasicBlock or Bottleneck (everything before the addition)."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out))
    return block.bn2(block.conv2(out))


class InstanceNormAfterAdd(nn.Module):
    """IBN-b's block: ReLU(IN(F(x) + shortcut(x))), an affine InstanceNorm between the addition and the ReLU,
    around a torchvision BasicBlock or Bottleneck (`block`)."""

    def __init__(self, block: nn.Module, channels: int) -> None:
        super().__init__()
        self.block = block
        self.IN = nn.InstanceNorm2d(channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        shortcut = x if b.downsample is None else b.downsample(x)
        return b.relu(self.IN(_residual(b, x) + shortcut))


def block_channels(block: nn.Module) -> int:
    """Output channels of a residual block (plain or wrapped by IBN-b)."""
    block = getattr(block, "block", block)
    return (block.bn3 if isinstance(block, Bottleneck) else block.bn2).num_features


def apply_ibn(net: resnet.ResNet, variant: str) -> resnet.ResNet:
    """Turn a torchvision ResNet into IBN-Net, in place (the placements of the official `resnet_ibn.py`):

    - "a" (IBN-a): in every block of layer1, layer2 and layer3 the first BatchNorm (`bn1`) becomes `IBN`
      (half InstanceNorm, half BatchNorm); layer4 and the stem keep BatchNorm.
    - "b" (IBN-b): the stem's BatchNorm becomes InstanceNorm (affine), and an InstanceNorm (affine) is
      inserted after the residual addition, before the ReLU, of the **last** block of layer1 and of layer2
      (RobustNet's "IBN-Net" baseline: IN at the stem, the end of layer1 and the end of layer2).
    - "none": unchanged.
    Existing BatchNorm weights (ImageNet ones, when loaded) initialise the new layers' affine parameters.
    """
    if variant not in IBN_VARIANTS:
        raise ValueError(f"unknown IBN variant {variant!r}; choose one of {IBN_VARIANTS} (model.ibn)")
    if variant == "a":
        for layer in (net.layer1, net.layer2, net.layer3):
            for block in layer:
                block.bn1 = IBN.from_batchnorm(block.bn1)
    elif variant == "b":
        net.bn1 = _instance_norm_like(net.bn1)
        for layer in (net.layer1, net.layer2):
            layer[-1] = InstanceNormAfterAdd(layer[-1], block_channels(layer[-1]))
    return net
