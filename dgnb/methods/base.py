"""The method interface (in the spirit of DomainBed's `algorithms.py`).

A method owns its networks, optimizers, schedulers and losses. The engine calls
`training_step(batch)` once per iteration (the method may run several forward/backward passes and
optimizer steps inside it: meta-learning and adversarial training need that), then
`end_iteration()`. `predict(images)` gives class scores for evaluation.

A batch is a dict on the method's device:
    image  (N, 3, h, w) float in [0, 1]   source images, domain-major (b images of domain 0, then 1, ...)
    label  (N, h, w) int64                train ids, 255 = ignore
    domain (N,) int64                     index of the source domain of each image
    target_image (M, 3, h, w)             unlabeled target images (UDA methods only)
    target_label (M, h, w) int64          pseudo labels of those images, when the method's current stage
                                          trains on them (`pseudo_label_root`); never the target's own labels

Multi-stage methods (MRNet Stage I/II, self-training rounds) keep their stage as state: `stage_starts()`
lists the iterations where stages 1, 2, ... begin; the engine calls `begin_stage(stage, context)` there
(after the last iteration of the previous stage), writes a checkpoint (a stage boundary is always one,
kept as `stage<k>.pt`) and rebuilds the loader, so a resume on either side of a boundary is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..models import ModelConfig, Segmenter

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available by its `name` (CLI, configs, run cache)."""
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class OptimConfig:
    """SGD with polynomial decay (DeepLab recipe): lr_t = lr (1 - t/T)^power."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    head_lr_mult: float = 1.0  # UDA papers use 10x on the classifier heads
    iterations: int = 1000


class Method(nn.Module):
    """Base class. Subclasses set `name`, `Hparams` (a dataclass) and implement `training_step`."""

    name: ClassVar[str] = ""
    uda: ClassVar[bool] = False  # needs unlabeled target images in the batch
    settings: ClassVar[tuple[str, ...]] = ("dg",)  # the settings (dg, uda) the method may run in
    ema_exclude: ClassVar[tuple[str, ...]] = ()  # state entries that weight averaging leaves alone

    @dataclass
    class Hparams:
        aux_weight: float = 0.4

    def __init__(self, model_cfg: ModelConfig, optim: OptimConfig, num_domains: int, hparams: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.hp = make_hparams(self.Hparams, hparams or {}, self.name)
        self.optim_cfg = optim
        self.num_domains = num_domains
        self.model = Segmenter(model_cfg)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.scaler: torch.amp.GradScaler | None = None
        self.amp_dtype: torch.dtype | None = None
        self.iteration = 0
        self.stage = 0  # index of the current training stage (multi-stage methods; see stage_starts)
        self.ema_decay = 0.0
        self.ema_state: dict[str, torch.Tensor] | None = None

    # ----- set-up -------------------------------------------------------------------------
    def setup(self, device: torch.device, amp_dtype: torch.dtype | None = None) -> "Method":
        """Move to `device`, build optimizers (after the move) and the AMP grad scaler."""
        self.to(device)
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.configure_optimizers()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def configure_optimizers(self) -> None:
        """Default: one SGD over the segmenter, heads at `head_lr_mult`, poly schedule."""
        self.add_sgd("main", self.param_groups(self.model))

    def param_groups(self, model: Segmenter) -> list[dict[str, Any]]:
        head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
        return [
            {"params": list(model.backbone.parameters()), "lr": self.optim_cfg.lr},
            {"params": head, "lr": self.optim_cfg.lr * self.optim_cfg.head_lr_mult},
        ]

    def add_sgd(self, key: str, groups: list[dict[str, Any]] | Iterator[nn.Parameter], lr_mult: float = 1.0,
                iterations: int | None = None, power: float | None = None) -> torch.optim.Optimizer:
        """SGD (the config's momentum and weight decay) at `lr_mult` x the learning rates, with a poly schedule
        over `iterations` (default: the run's) of `power` (default: the config's). A multi-stage method calls it
        again at a stage boundary to restart SGD (momentum buffers reset) over that stage's iterations."""
        c = self.optim_cfg
        groups = list(groups)
        for g in groups:
            if isinstance(g, dict):
                g["lr"] *= lr_mult
        opt = torch.optim.SGD(groups, lr=c.lr * lr_mult, momentum=c.momentum, weight_decay=c.weight_decay)
        self.optimizers[key] = opt
        self.schedulers[key] = torch.optim.lr_scheduler.PolynomialLR(
            opt, total_iters=max(1, c.iterations if iterations is None else iterations),
            power=c.poly_power if power is None else power)
        return opt

    # ----- the training iteration -----------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def end_iteration(self) -> None:
        """Called by the engine after each `training_step`: advance schedules and the counter."""
        for s in self.schedulers.values():
            s.step()
        self.iteration += 1
        if self.ema_state is not None:
            self.update_ema()

    # ----- stages (multi-stage methods) -------------------------------------------------------
    def stage_starts(self) -> list[int]:
        """Iterations at which stages 1, 2, ... begin (empty: a single-stage method)."""
        return []

    def stage_due(self) -> bool:
        """True when the next stage begins at the current iteration and has not begun yet."""
        starts = self.stage_starts()
        return self.stage < len(starts) and self.iteration >= starts[self.stage]

    def begin_stage(self, stage: int, context: Any) -> None:
        """Enter `stage` (called by the engine at its start iteration; `context` is a
        `dgnb.engine.stages.StageContext`: the unlabelled target set, the run folder). Must set `self.stage`."""
        raise NotImplementedError(f"{self.name} lists stage starts but does not implement begin_stage")

    def pseudo_label_root(self) -> tuple[str, str] | None:
        """(data root, dataset name) of pseudo labels the current stage trains on, read as `target_label`
        with the target images; None when the batches carry no target labels."""
        return None

    # ----- weight averaging (EMA) -------------------------------------------------------------
    def enable_ema(self, decay: float) -> None:
        """Keep θ̄, an exponential moving average of every floating-point parameter and buffer (BatchNorm
        statistics included): θ̄ <- d θ̄ + (1 − d) θ after each iteration. Evaluation uses θ̄ (`averaged`).
        Averaging the last few hundred iterates removes most of the final-iterate noise of SGD."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}; use train.ema_decay=0 to turn it off")
        self.ema_decay = decay
        self.ema_state = {k: v.detach().clone() for k, v in self.state_dict().items()
                          if v.is_floating_point() and k not in self.ema_exclude}

    @torch.no_grad()
    def update_ema(self) -> None:
        current = self.state_dict()
        keys = list(self.ema_state)
        torch._foreach_lerp_([self.ema_state[k] for k in keys], [current[k].detach() for k in keys], 1 - self.ema_decay)

    @contextlib.contextmanager
    def averaged(self) -> Iterator["Method"]:
        """Inside the block the method holds the averaged weights θ̄ (no-op without EMA); restored after."""
        if self.ema_state is None:
            yield self
            return
        backup = {k: v.detach().clone() for k, v in self.state_dict().items() if k in self.ema_state}
        self.load_state_dict(self.ema_state, strict=False)
        try:
            yield self
        finally:
            self.load_state_dict(backup, strict=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision on CUDA when the engine asked for it; a no-op otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(**kwargs)

    def supervised_step(self, images: torch.Tensor, labels: torch.Tensor, aux_weight: float) -> dict[str, float]:
        """One step of cross-entropy on labelled images (`segmentation_loss`, auxiliary head at `aux_weight`):
        ERM's whole step, and the source warm-up of self-training methods."""
        from .losses import segmentation_loss

        with self.autocast():
            out = self.model(images)
        loss, terms = segmentation_loss(out, labels, aux_weight)
        self.backward(loss)
        self.step("main")
        return {"loss": loss.item(), **terms}

    def step(self, key: str = "main") -> None:
        """Average gradients over processes (torchrun), apply optimizer `key`, clear its gradients."""
        opt = self.optimizers[key]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            all_reduce_grads([p for g in opt.param_groups for p in g["params"]])
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    # ----- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (B, K, H, W) for images in [0, 1]."""
        with self.autocast():
            return self.model(images).logits.float()

    def on_evaluate(self, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Called by the engine at each evaluation point, in eval mode, with a fixed probe batch
        (`image` in [0, 1], `label`, on the method's device). Return tensors to keep with the run
        (`snapshots.pt`, e.g. a memory and its read weights) or None. Must not change any state or
        draw random numbers (resume stays exact)."""
        return None

    # ----- checkpoints ----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Non-tensor state a subclass must keep across a resume (stage counters, thresholds...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed for an exact resume: modules and buffers, optimizers, schedules."""
        return {
            "module": self.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "iteration": self.iteration,
            "stage": self.stage,
            "extra": self.extra_state(),
            "ema": self.ema_state,
        }

    def load_checkpoint_state(self, state: dict[str, Any], weights_only: bool = False) -> None:
        self.load_state_dict(state["module"])
        self.iteration = state["iteration"]
        self.stage = state.get("stage", 0)
        self.load_extra_state(state.get("extra", {}))  # may rebuild a later stage's optimizers before they load
        if self.ema_state is not None and state.get("ema") is not None:
            for k, v in state["ema"].items():
                self.ema_state[k].copy_(v)
        if weights_only:
            return
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average `.grad` over all processes in one flat all-reduce (what DDP does per bucket)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def make_hparams(cls: type, values: dict[str, Any], method: str) -> Any:
    """Build the method's hyperparameter dataclass; an unknown name is an error listing the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for method '{method}'; valid: {sorted(names)}")
    return cls(**values)


def build_method(name: str, model_cfg: ModelConfig, optim: OptimConfig, num_domains: int,
                 hparams: dict[str, Any] | None = None) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method '{name}'; registered methods: {sorted(REGISTRY)}")
    return REGISTRY[name](model_cfg, optim, num_domains, hparams)


def changed_hparams(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that differ from method `name`'s defaults (an unknown name is an error).

    A notebook lists every hyperparameter; passing only the changed ones keeps the run's cache key
    equal to that of `preset(preset_name, name, seed)`, so unchanged notebooks reuse cached runs."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method '{name}'; registered methods: {sorted(REGISTRY)}")
    defaults = make_hparams(REGISTRY[name].Hparams, {}, name)
    make_hparams(REGISTRY[name].Hparams, dict(values), name)  # validates the names
    return {k: v for k, v in values.items() if getattr(defaults, k) != v}
