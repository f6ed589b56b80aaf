"""Shared pieces of the adaptation methods (docs/adaptation.md): the domain-label convention, the GAN losses of
output-space adversarial training, entropy, the KL divergence, and a base class that owns discriminators.

Label convention (written here once, used by every adversarial method): a discriminator answers
SOURCE_LABEL = 0 for a prediction made on a source image and TARGET_LABEL = 1 for one made on a target
image (AdaptSegNet's code). The segmenter's adversarial term asks the discriminator to answer SOURCE_LABEL
on *target* predictions: target outputs are pushed to look like source outputs. MRNet's code labels the
other way round (source = "real" = 1); with the least-squares loss the game is the same up to relabelling.

Loss kinds (`gan_loss`):
    bce   ℓ(D, y) = mean BCE-with-logits(D, y)      (the "vanilla" GAN, AdaptSegNet, ADVENT)
    lsgan ℓ(D, y) = mean (D − y)²                   (least squares, MRNet's code; AdaptSegNet's `--gan LS`)
A multi-scale discriminator's loss is the sum over its scales.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..models import ModelConfig
from ..models.discriminators import build_discriminator
from .base import Method, OptimConfig

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0
GAN_LOSSES = ("bce", "lsgan")


# ----- losses (pure functions) -------------------------------------------------------------------------
def gan_loss(outputs: Sequence[torch.Tensor], label: float, kind: str = "bce") -> torch.Tensor:
    """Σ over the discriminator's output maps of the mean loss against the constant map `label`."""
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss '{kind}'; choose one of {GAN_LOSSES}")
    total = 0.0
    for out in outputs:
        out = out.float()
        if kind == "bce":
            total = total + F.binary_cross_entropy_with_logits(out, torch.full_like(out, label))
        else:
            total = total + (out - label).pow(2).mean()
    return total


def discriminator_loss(source_outputs: Sequence[torch.Tensor], target_outputs: Sequence[torch.Tensor],
                       kind: str = "bce") -> torch.Tensor:
    """L_D = ½ ℓ(D(P_s), SOURCE_LABEL) + ½ ℓ(D(P_t), TARGET_LABEL) (AdaptSegNet Eq. 2): the discriminator learns
    to tell the domains apart. Give it D's outputs on *detached* predictions, so the segmenter is not updated."""
    return 0.5 * (gan_loss(source_outputs, SOURCE_LABEL, kind) + gan_loss(target_outputs, TARGET_LABEL, kind))


def generator_adversarial_loss(disc: nn.Module, target_probs: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """L_adv = ℓ(D(P_t), SOURCE_LABEL) (AdaptSegNet Eq. 4): the segmenter is rewarded when the discriminator
    mistakes its target predictions for source ones. Gradients reach the segmenter through P_t; call it with
    the discriminator frozen (`frozen`) so that they do not reach D."""
    return gan_loss(disc(target_probs), SOURCE_LABEL, kind)


def gradient_penalty(inputs: torch.Tensor, outputs: Sequence[torch.Tensor], rows: int | None = None) -> torch.Tensor:
    """Σ over pixels and classes of the squared gradient of Σ D(x) w.r.t. the input x, averaged over the first
    `rows` images (all by default); `inputs` must require grad and `outputs` = D(inputs). MRNet's code
    regularises its discriminators on the source ("real") inputs with 0.01 times this."""
    rows = len(inputs) if rows is None else rows
    total = sum(o[:rows].float().sum() for o in outputs)
    (grad,) = torch.autograd.grad(total, inputs, create_graph=True)
    return grad[:rows].float().pow(2).flatten(1).sum(1).mean()


def entropy_map(probs: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """E(p) = −(1 / log C) Σ_c p_c log p_c per pixel, in [0, 1] (ADVENT Eq. 1): (B, C, H, W) -> (B, H, W)."""
    return self_information(probs, eps).sum(1)


def self_information(probs: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """I_c = −p_c log p_c / log C per class (ADVENT Eq. 5, the map AdvEnt's discriminator sees)."""
    p = probs.float()
    return -(p * torch.log(p + eps)) / math.log(p.shape[1])


def kl_divergence(target_log_probs: torch.Tensor, pred_log_probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(target ‖ pred) = Σ_c p_target,c (log p_target,c − log p_pred,c), summed over `dim` (the classes).

    Direction: the first argument is the distribution the second is pulled toward (the expectation is
    under `target`); both are log-probabilities (e.g. `log_softmax`). Non-negative, zero iff equal.
    Gradients flow into both arguments: detach `target_log_probs` for a fixed target (MRNet's code form).
    Returns a map without the class dimension, e.g. (B, H, W) for (B, C, H, W) inputs.
    """
    target_log_probs, pred_log_probs = target_log_probs.float(), pred_log_probs.float()
    return (target_log_probs.exp() * (target_log_probs - pred_log_probs)).sum(dim)


# ----- the base class ------------------------------------------------------------------------------------
class frozen:
    """Context manager: `requires_grad=False` on a module's parameters inside the block (restored after)."""

    def __init__(self, module: nn.Module) -> None:
        self.params = list(module.parameters())

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


class AdaptationMethod(Method):
    """A method that reads unlabelled target images (`batch["target_image"]`) in the UDA setting.

    Subclasses list the output levels they align in `levels` and call `add_discriminators` in `__init__`;
    the discriminators are sub-modules (in the checkpoint's module state) and their Adam optimizer and poly
    schedule are `optimizers["disc"]`, `schedulers["disc"]` (saved and restored with the method)."""

    uda = True
    settings = ("uda",)

    def __init__(self, model_cfg: ModelConfig, optim: OptimConfig, num_domains: int,
                 hparams: dict[str, Any] | None = None) -> None:
        super().__init__(model_cfg, optim, num_domains, hparams)
        if not model_cfg.aux:
            raise ValueError(f"{self.name} aligns the main and the auxiliary (layer3) outputs: set model.aux=true "
                             "(the UDA presets do)")
        self.discriminators = nn.ModuleDict()

    def add_discriminators(self, kind: str, levels: Sequence[str]) -> None:
        """One discriminator of `kind` (fc, multiscale) per output level (`main`, `aux`)."""
        width = self.model.cfg.disc_channels
        for level in levels:
            self.discriminators[level] = build_discriminator(kind, self.model.cfg.num_classes, width)

    def configure_optimizers(self) -> None:
        super().configure_optimizers()
        if len(self.discriminators):
            self.add_adam("disc", self.discriminators.parameters(), self.hp.disc_lr, (0.9, 0.99))

    def add_adam(self, key: str, params: Any, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        """Adam with the papers' betas and the same poly decay as the segmenter (AdaptSegNet, MRNet)."""
        c = self.optim_cfg
        opt = torch.optim.Adam(params, lr=lr, betas=betas)
        self.optimizers[key] = opt
        self.schedulers[key] = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=c.iterations, power=c.poly_power)
        return opt

    @staticmethod
    def probabilities(out: Any) -> dict[str, torch.Tensor]:
        """Softmax of each output level of a forward pass: {"main": P_p, "aux": P_a}."""
        probs = {"main": out.logits.float().softmax(1)}
        if out.aux_logits is not None:
            probs["aux"] = out.aux_logits.float().softmax(1)
        return probs

    def discriminator_step(self, source_probs: dict[str, torch.Tensor], target_probs: dict[str, torch.Tensor],
                           kind: str, penalty: float = 0.0) -> dict[str, float]:
        """One Adam step of every discriminator on detached predictions; returns its loss and mean outputs.

        `d_source_<level>`, `d_target_<level>`: the discriminator's mean output (a probability of "target"
        for bce) on each domain; they separate when D wins and meet when the predictions are aligned."""
        logs: dict[str, float] = {}
        total = 0.0
        with self.autocast():
            for level, disc in self.discriminators.items():
                n = len(source_probs[level])  # one forward over both domains (the network has no normalisation)
                x = torch.cat([source_probs[level], target_probs[level]]).detach().requires_grad_(penalty > 0)
                outs = disc(x)
                out_s, out_t = [o[:n] for o in outs], [o[n:] for o in outs]
                loss = discriminator_loss(out_s, out_t, kind)
                if penalty > 0:
                    loss = loss + penalty * gradient_penalty(x, outs, rows=n)
                total = total + loss
                logs[f"d_loss_{level}"] = float(loss.detach())
                squash = torch.sigmoid if kind == "bce" else (lambda x: x)
                logs[f"d_source_{level}"] = float(squash(out_s[0].detach().float()).mean())
                logs[f"d_target_{level}"] = float(squash(out_t[0].detach().float()).mean())
        self.backward(total)
        self.step("disc")
        logs["d_loss"] = float(total.detach())
        return logs
