"""Episodic meta-learning machinery shared by MLDG and Pin the Memory.

One MLDG step (Li et al., AAAI 2018) minimises

    L_tr(θ) + β · L_te(θ'),   θ' = θ − α ∇_θ L_tr(θ)                       (MLDG objective)

where L_tr is the loss on the meta-train domains and L_te the loss on the held-out meta-test
domains of the same batch. The pieces:

- `split_episode`: every iteration the source domains of a domain-major batch are permuted and the
  first i ~ U{1..D−1} become meta-train, the rest meta-test (TSMLDG / Pin the Memory code). With a
  single source domain, two *virtual* domains are made by photometric augmentation (`photometric_shift`),
  the augmented half playing the meta-test domain (Pin the Memory, Table 3 setting).
- `inner_step`: θ' built functionally (a dict of tensors, the module's own parameters untouched).
  `first_order=True` (TSMLDG and the official Pin the Memory code) uses the plain, detached gradient,
  so ∂θ'/∂θ = I and the meta-test gradient is ∇L_te evaluated at θ'. `first_order=False` (the MLDG /
  MAML objective as written) keeps the gradient's graph (`create_graph=True`), so backpropagating
  L_te(θ') also differentiates through ∇L_tr: ∂θ'/∂θ = I − α ∇²L_tr(θ) (Hessian-vector products).
- `functional_forward`: a forward pass of a module with θ' via `torch.func.functional_call`.
- `meta_backward`: the whole step: ∇_θ [L_tr(θ) + β L_te(θ')] accumulated in `.grad`, ready for the
  optimizer.

Every random draw uses torch's global CPU generator, which the engine saves in checkpoints, so a
resumed run draws the same splits and augmentations.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call
from torchvision.transforms.v2 import functional as TF

Params = dict[str, torch.Tensor]
BATCH_KEYS = ("image", "label", "domain")


# ----- episodes: meta-train / meta-test -----------------------------------------------------------
def take(batch: dict[str, Any], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows `index` of the source part of a batch (image, label, domain)."""
    return {k: batch[k][index] for k in BATCH_KEYS if k in batch}


def random_domain_split(domains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permute the D distinct domains, i ~ U{1..D−1}: first i -> meta-train, rest -> meta-test."""
    d = len(domains)
    perm = torch.randperm(d)
    i = int(torch.randint(1, d, ()))
    return domains[perm[:i].to(domains.device)], domains[perm[i:].to(domains.device)]


def split_episode(batch: dict[str, Any], virtual: bool = True, jitter: float = 0.8, hue: float = 0.3,
                  blur_p: float = 0.5) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(meta-train batch, meta-test batch) of a domain-major batch, re-drawn every iteration.

    With one source domain and `virtual=True`, the first half of the batch is the meta-train
    domain and the second half, photometrically shifted (`photometric_shift`), the meta-test one.
    """
    present = batch["domain"].unique(sorted=True)
    if len(present) >= 2:
        train_domains, test_domains = random_domain_split(present)
        is_train = torch.isin(batch["domain"], train_domains)
        return take(batch, is_train.nonzero().squeeze(1)), take(batch, (~is_train).nonzero().squeeze(1))
    n = batch["image"].shape[0]
    if not virtual or n < 2:
        raise ValueError(
            "episodic meta-learning needs at least two source domains in the batch, or a single source with "
            "virtual domains (hyperparameter single_source_virtual_domains=True) and at least 2 images; got "
            f"{len(present)} domain(s), {n} image(s), single_source_virtual_domains={virtual}"
        )
    half = (n + 1) // 2
    index = torch.arange(n, device=batch["image"].device)
    tr, te = take(batch, index[:half]), take(batch, index[half:])
    te["image"] = photometric_shift(te["image"], jitter, hue, blur_p)
    te["domain"] = te["domain"] + 1
    return tr, te


def _rand(n: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) draws from the global CPU generator (saved with checkpoints), on `like`'s device."""
    return torch.rand(n, k).to(like.device, like.dtype)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def photometric_shift(images: torch.Tensor, jitter: float = 0.8, hue: float = 0.3, blur_p: float = 0.5,
                      sigma: tuple[float, float] = (0.1, 2.0)) -> torch.Tensor:
    """Strong per-image photometric augmentation of images in [0, 1], (N, 3, H, W), vectorised.

    ColorJitter(jitter, jitter, jitter, hue) (brightness, contrast, saturation factors drawn in
    [max(0, 1−j), 1+j] per image, hue rotated in YIQ space by up to ±hue of a turn) followed by a
    Gaussian blur with probability `blur_p` (sigma drawn per batch): the official code's "meta-test"
    augmentation, ColorJitter(0.8, 0.8, 0.8, 0.3) + blur.
    """
    n = images.shape[0]
    r = _rand(n, 5, images)
    factors = (1 + jitter * (2 * r[:, :3] - 1)).clamp_min(0)
    b, c, s = (factors[:, i].view(n, 1, 1, 1) for i in range(3))
    weights = _RGB_TO_YIQ[0].to(images).view(1, 3, 1, 1)
    x = (images * b).clamp(0, 1)
    mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    gray = (x * weights).sum(1, keepdim=True)
    x = ((x - gray) * s + gray).clamp(0, 1)
    # hue: rotate the chroma plane (I, Q) of YIQ by theta, per image
    theta = 2 * math.pi * hue * (2 * r[:, 3] - 1)
    cos, sin = theta.cos(), theta.sin()
    rot = torch.zeros(n, 3, 3, dtype=images.dtype, device=images.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    yiq = _RGB_TO_YIQ.to(images)
    mats = torch.linalg.inv(yiq) @ rot @ yiq
    x = torch.einsum("nij,njhw->nihw", mats, x).clamp(0, 1)
    if blur_p > 0:
        s_blur = float(sigma[0] + (sigma[1] - sigma[0]) * torch.rand(()))
        blurred = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[s_blur, s_blur])
        x = torch.where((r[:, 4] < blur_p).view(n, 1, 1, 1), blurred, x)
    return x


# ----- the functional inner step -------------------------------------------------------------------
def trainable_params(module: nn.Module) -> Params:
    """θ as a dict name -> parameter (the keys `functional_call` expects)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def loss_scale(method: Any) -> float:
    """The AMP GradScaler's current scale (1 without fp16 scaling)."""
    scaler = getattr(method, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def inner_step(loss: torch.Tensor, params: Params, inner_lr: float, first_order: bool = True,
               backward: Callable[[torch.Tensor], None] | None = None, scale: float = 1.0) -> Params:
    """θ' = θ − α ∇_θ L_tr(θ) as a dict of tensors; also leaves ∇L_tr(θ) in each parameter's `.grad`.

    first_order=True: one ordinary backward (`backward(loss)`, which may multiply the loss by the AMP
    `scale`); the gradient is read back from `.grad` and enters θ' detached, so ∂θ'/∂θ = I.
    first_order=False: the gradient is taken with `create_graph=True`, so θ' stays a differentiable
    function of θ through ∇L_tr and a later backward of L_te(θ') adds −α ∇²L_tr · ∇L_te (second order).
    `.grad` must hold no earlier gradient. Parameters the loss does not reach keep θ' = θ.
    """
    names, tensors = list(params), list(params.values())
    if first_order:
        (backward or torch.Tensor.backward)(loss)
        if inner_lr == 0:
            return dict(params)
        grads = [None if p.grad is None else p.grad.detach() / scale for p in tensors]
    else:
        raw = torch.autograd.grad(loss * scale, tensors, create_graph=True, allow_unused=True)
        grads = []
        for p, g in zip(tensors, raw):
            if g is not None:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()
            grads.append(None if g is None else g / scale)
    return {n: p if g is None else p - inner_lr * g for n, p, g in zip(names, tensors, grads)}


def functional_forward(module: nn.Module, params: Params, *args: Any, update_buffers: bool = False,
                       **kwargs: Any) -> Any:
    """`module(*args, **kwargs)` with the parameters in `params` (θ') instead of its own.

    BatchNorm buffers are passed as scratch copies unless `update_buffers`, so only the ordinary
    (meta-train) forward moves the running statistics, as the official code's network copies do.
    """
    tensors: Params = {} if update_buffers else {n: b.clone() for n, b in module.named_buffers()}
    tensors.update(params)
    return functional_call(module, tensors, args, kwargs)


def inner_learning_rate(method: Any, inner_lr: float, ratio: float) -> float:
    """α: `ratio` × the current outer learning rate when ratio > 0 (the official `inner_lr_anneal`,
    α = lr/4), else the constant `inner_lr`."""
    if ratio > 0:
        return ratio * method.optimizers["main"].param_groups[0]["lr"]
    return inner_lr


def meta_backward(method: Any, params: Params, train_loss: torch.Tensor,
                  test_loss: Callable[[Params], torch.Tensor], inner_lr: float, meta_weight: float = 1.0,
                  first_order: bool = True) -> torch.Tensor:
    """Accumulate ∇_θ [L_tr(θ) + β L_te(θ − α ∇L_tr(θ))] in `.grad` (MLDG); returns L_te.

    `test_loss(θ')` computes the meta-test loss with the adapted parameters (under the method's
    autocast). With α = 0 and first order the direction is ∇(L_tr + β L_te) at θ.
    """
    adapted = inner_step(train_loss, params, inner_lr, first_order, method.backward, loss_scale(method))
    with method.autocast():
        loss_te = test_loss(adapted)
    method.backward(meta_weight * loss_te)
    return loss_te
