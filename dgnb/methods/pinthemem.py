"""Pin the Memory (Kim, Lee, Park, Min, Sohn, CVPR 2022): memory-guided meta-learning for DG segmentation.

A categorical memory M (N classes x C channels, rows unit-norm) sits on the encoder feature F
(DeepLab-v3+: the ASPP bottleneck, before the decoder's low-level skip):

    write  Z = l2norm(U(F)),  Z̄[n] = (Y[n] Zᵀ) / K_n                                 (Eq. 1)
           M[n] <- l2norm(m M[n] + (1 − m) Z̄[n])  for the classes present, m = 0.8     (Eq. 2, 3)
    read   W = softmax_n(M q),  q = l2norm(F)                                          (Eq. 4)
           R = ReLU(BN(Conv1x1([F, Mᵀ W])))   -> decoder                               (Eq. 5)
    losses L_read = L_seg + λ1 L_coh (Eq. 6),  L_update = λ2 L_div (Eq. 7) on the written memory

Training (Alg. 1), every iteration: split the source domains at random into meta-train / meta-test;
meta-train: read the current memory M0, write it (graph kept) and take L_read + L_update; inner step
θ' = θ − α∇ (Eq. 9); re-write M' = update(M0, X_tr; copy(θ'_E), θ'_U) with the encoder frozen
(Eq. 10); meta-test: L_read(X_te; M', θ') (Eq. 11), whose gradient reaches U through M'; outer
step on θ; final write M* = update(M0, X_tr; θ_new) under no-grad (Eq. 12), the memory of the next
iteration. At test time the memory is only read (deterministic softmax by default).

What this implementation does where the paper and the official code (Genie-Kim/PintheMemory) differ
(docs/pin_the_memory.md, 'Paper versus official code', has the full table):
- First order by default (`first_order=True`, what the code does: θ' uses the detached inner
  gradient, ∂θ'/∂θ = I). `first_order=False` is the paper's second-order meta-gradient: the
  meta-test loss is also differentiated through ∇L_tr(θ) inside the inner step.
- Read: plain softmax (Eq. 4) at train and test time; the code's Gumbel-softmax is `gumbel_train`
  / `gumbel_read`. The fusion concatenates F as Eq. 5 writes (the code uses l2norm(F):
  `fuse_normalized=True`) and has the code's BN after the 1x1 conv.
- U is applied to F and normalised afterwards (code); U(x) = ReLU(x + BN(Conv1x1(x))).
- Eq. 7 = memory classification CE (λ2 = 0.2) + the pairwise positive-cosine term "scaled double"
  (2 λ2 = 0.4 on the mean over ordered pairs): the code's 0.2 cls + 0.4 div are exactly this.
  The classification term is averaged over the N slots (code) instead of summed (Eq. 7).
- Class masks at feature resolution are area-downsampled one-hot labels (soft fractions; the code
  uses bilinear interpolation of the one-hot map).
- Initialisation (Sec. 3.2, the code uses 2 epochs of the training set) happens lazily from the first
  training batch, or from any batches with `initialize_memory(batches)`; classes absent from them get
  random unit rows. An `initialized` buffer makes resume exact.
- Single source (Table 3, GTAV only): the batch is split in two virtual domains, the second half
  photometrically shifted (ColorJitter(0.8,0.8,0.8,0.3) + blur) and used as meta-test, which is
  what the code intended (its helper applies the strong augmentation to the first source forever).
- BatchNorm running statistics move only in the meta-train forward (the code's functional network
  copies keep their own); no-grad writes (Eq. 12, initialisation) sum the class statistics over
  torchrun processes so every rank holds the same memory.
- The LR schedule is the engine's poly decay (the code: lr·exp(−9t/120k)); β is a weight on L_te.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ..data.taxonomy import IGNORE_INDEX
from .base import Method, register
from .losses import segmentation_loss
from .meta import Params, functional_forward, inner_learning_rate, meta_backward, split_episode, trainable_params

UPDATE_VARIANTS = ("freeze_encoder", "train_both", "freeze_both", "none")


# ----- memory operations (pure functions) ---------------------------------------------------------
def l2norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(||x||² + eps) along `dim` (norm in float32).

    Smooth at x = 0 (a ReLU feature can be all zero), unlike F.normalize, whose double backward is
    NaN there: the second-order meta-gradient differentiates this twice.
    """
    return x * torch.rsqrt(x.float().pow(2).sum(dim, keepdim=True) + eps).to(x.dtype)


def class_masks(labels: torch.Tensor, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Y: soft one-hot masks (B, N, h, w) at feature size; each cell holds the class fractions.

    Ignore pixels (255) go to an extra channel that is dropped after the area downsampling.
    """
    lab = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, num_classes), labels).unsqueeze(1)
    onehot = torch.zeros(lab.shape[0], num_classes + 1, *lab.shape[-2:], device=lab.device).scatter_(1, lab, 1.0)
    return F.adaptive_avg_pool2d(onehot, size)[:, :num_classes]


def masked_class_sums(z: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_p Y[n](p) z(p) (N, C), K_n = Σ_p Y[n](p) (N,)) over the batch: the parts of Eq. 1."""
    sums = torch.einsum("bnhw,bchw->nc", masks.float(), z.float())
    return sums, masks.float().sum((0, 2, 3))


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum in place over torchrun processes (no-op in a single process): one memory for all ranks."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def momentum_update(memory: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, momentum: float) -> torch.Tensor:
    """Eq. 1-2: M[n] <- l2norm(m M[n] + (1 − m) Z̄[n]) with Z̄[n] = sums[n] / K_n; absent classes unchanged."""
    present = (counts > 0).unsqueeze(1)
    means = sums / counts.clamp_min(1e-6).unsqueeze(1)
    mixed = momentum * memory + (1 - momentum) * means
    return torch.where(present, l2norm(mixed), memory)


def cosine_scores(features: torch.Tensor, memory: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """S[b, n, h, w] = <l2norm(F)(b, :, h, w), M[n]>: the cosine similarities inside Eq. 4.

    A 1x1 convolution with the memory rows as filters (one matmul, no permutes).
    """
    q = features if normalized else l2norm(features)
    return F.conv2d(q, memory.to(q.dtype)[:, :, None, None])


def read_weights_from_scores(scores: torch.Tensor, gumbel: bool = False) -> torch.Tensor:
    """Eq. 4: W = softmax over the N slots of S (Gumbel-softmax, τ = 1, if `gumbel`: the official read)."""
    return F.gumbel_softmax(scores, tau=1.0, dim=1) if gumbel else scores.softmax(dim=1)


def feature_cohesion_loss(scores: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 6: L_coh = −(1/|P|) Σ_p Σ_n Y[n](p) log W[n](p), W = softmax(S / τ).

    As in the code, the scores are upsampled bilinearly to label size and the cross-entropy skips
    ignore pixels. F is a ReLU output and the written slots are non-negative (U ends in a ReLU), so
    every cosine lies in [0, 1]: the loss is at least log(1 + (N−1)e^{−1/τ}) (own score 1, others 0),
    ≈ 2.03 nats for N = 19, τ = 1, against log N ≈ 2.94 for a uniform read.
    """
    logits = F.interpolate(scores.float() / temperature, size=labels.shape[-2:], mode="bilinear",
                           align_corners=False)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def memory_divergence_loss(memory: torch.Tensor, classifier: nn.Module, margin: float = 0.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7, its two terms: (memory classification CE(G(M[n]), n) averaged over slots,
    mean over ordered pairs n ≠ n' of max(<M[n], M[n']> − margin, 0)).

    Eq. 7 weights the second by 2 ("scaled double"); both vanish for an orthonormal memory whose
    slots G classifies correctly.
    """
    m = memory.float()
    n = m.shape[0]
    cls = F.cross_entropy(classifier(m), torch.arange(n, device=m.device))
    sim = (m @ m.t() - margin).clamp_min(0)
    off_diagonal = sim.sum() - sim.diagonal().sum()
    return cls, off_diagonal / (n * (n - 1))


# ----- modules ----------------------------------------------------------------------------------
def init_new_layers(module: nn.Module) -> None:
    """Official initialisation of the memory's layers: conv kaiming-normal, BN (1, 1e-4), linear N(0, 1e-4)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.constant_(m.bias, 1e-4)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1e-4)
            nn.init.zeros_(m.bias)


class UpdateNet(nn.Module):
    """U (Sec. 3.2, Fig. 3a): U(x) = ReLU(x + BN(Conv1x1(x))), a 1x1 conv with a residual connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        init_new_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn(self.conv(x)))


class Memory(nn.Module):
    """Categorical memory M (N x C, a buffer: changed only by writes) and its update network U."""

    def __init__(self, num_slots: int, channels: int, momentum: float = 0.8) -> None:
        super().__init__()
        self.momentum = momentum
        self.update_net = UpdateNet(channels)
        self.register_buffer("memory", F.normalize(torch.randn(num_slots, channels), dim=1))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def num_slots(self) -> int:
        return self.memory.shape[0]

    def write(self, memory: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
              sync: bool = False) -> torch.Tensor:
        """Eq. 3: M_new = update(M, X; Θ_E, Θ_U) from F = E(X) (Eq. 1-2). Differentiable in U and F.

        The sums run in float32 (outside autocast) so the momentum update is exact under AMP.
        `sync` (no-grad writes only) sums the class statistics over torchrun processes.
        """
        z = l2norm(self.update_net(features))
        masks = class_masks(labels, z.shape[-2:], self.num_slots)
        with torch.autocast(z.device.type, enabled=False):
            sums, counts = masked_class_sums(z, masks)
            if sync:
                all_reduce_sum_(sums, counts)
            return momentum_update(memory.float(), sums, counts, self.momentum)

    @torch.no_grad()
    def set_from_class_means(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Sec. 3.2 initialisation: M[n] = l2norm(class mean of l2norm(F)); absent classes random unit rows."""
        means = F.normalize(sums / counts.clamp_min(1e-6).unsqueeze(1), dim=1)
        random_rows = F.normalize(torch.randn(self.memory.shape), dim=1).to(means)
        self.memory.copy_(torch.where((counts > 0).unsqueeze(1), means, random_rows))
        self.initialized.fill_(True)


class MemoryFusion(nn.Module):
    """Eq. 5: R = ReLU(BN(Conv1x1([F, Mᵀ W]))): the memory-guided feature (F or l2norm(F) as input)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        init_new_layers(self)

    def forward(self, features: torch.Tensor, weights: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """`features` F (B, C, h, w), `weights` W (B, N, h, w), `memory` M (N, C).

        The conv's memory half acts on Mᵀ W; it is applied as (W_r Mᵀ) W, so the read costs a
        1x1 conv over the N slot weights instead of forming Mᵀ W and concatenating (same result).
        """
        c = features.shape[1]
        w_f, w_r = self.conv.weight[:, :c], self.conv.weight[:, c:, 0, 0]
        w_read = (w_r @ memory.to(w_r.dtype).t())[:, :, None, None]  # (C, N, 1, 1)
        return F.relu(self.bn(F.conv2d(features, w_f) + F.conv2d(weights, w_read.to(weights.dtype))))


@dataclass
class MemoryOutput:
    """One forward of the memory-guided network."""

    logits: torch.Tensor | None           # (B, K, H, W) at input size (None for a write-only pass)
    aux_logits: torch.Tensor | None       # layer3 auxiliary scores (training only)
    features: torch.Tensor                # F (B, C, h, w) before the memory
    scores: torch.Tensor | None = None    # S (B, N, h, w), cosine similarities to the slots (Eq. 4)
    written: torch.Tensor | None = None   # the updated memory (N, C) of a writing pass (Eq. 3)


# ----- the method -------------------------------------------------------------------------------
@register
class PinTheMemory(Method):
    name = "pinthemem"
    ema_exclude = ("mem.memory",)  # M is already a running average (Eq. 2); weight averaging leaves it alone

    @dataclass
    class Hparams:
        aux_weight: float = 0.4             # code ("dsn" head on layer3)
        coh_weight: float = 0.02            # λ1 (paper Sec. 4.1 = code --mem_readloss)
        cls_weight: float = 0.2             # λ2, memory-classification term of Eq. 7 (paper = code --mem_clsloss)
        div_weight: float = 0.4             # 2·λ2, cosine term of Eq. 7 "scaled double" (code --mem_divloss)
        div_margin: float = 0.0             # margin of the cosine term (paper and code: 0)
        coh_temperature: float = 1.0        # τ of the cohesion logits (code --mem_temp)
        momentum: float = 0.8               # m of Eq. 2 (paper = code)
        use_coh: bool = True                # Table 5: without L_coh
        use_div: bool = True                # Table 5: without L_div (both terms of Eq. 7)
        episodic: bool = True               # Table 7: False = aggregated training (one batch, one backward)
        meta: bool = True                   # Table 7: False = episodic without the inner step (θ' = θ)
        first_order: bool = True            # code; False = the paper's second-order gradient (Eq. 11)
        inner_lr: float = 1e-3              # α of Eq. 9 (code initial value), used when inner_lr_ratio = 0
        inner_lr_ratio: float = 0.25        # α = ratio × current lr (code --inner_lr_anneal: lr/4); 0: constant
        meta_weight: float = 1.0            # β of Eq. 11 relative to the outer lr (code: 1)
        memory_update: str = "freeze_encoder"  # Table 6 re-write before meta-test: freeze_encoder (paper),
                                            # train_both, freeze_both, none (meta-test reads the meta-train write)
        memory_dropout: bool = False        # True: the memory reads/writes dropout(F) (dgnb <= 0.1); False: the
                                            # clean F, as the official network (dropout then acts on R only)
        fuse_normalized: bool = False       # Eq. 5 input: F (paper; +1.1 mIoU on quick) or l2norm(F) (code)
        gumbel_train: bool = False          # Gumbel-softmax read during training (code: True; paper: softmax)
        gumbel_read: bool = False           # Gumbel-softmax read at test time (code: True; dgnb: deterministic)
        final_update_eval: bool = True      # Eq. 12 with BN in eval mode (code)
        single_source_virtual_domains: bool = True  # one source: photometric virtual domains (Table 3)
        virtual_jitter: float = 0.8         # code's meta-test ColorJitter(0.8, 0.8, 0.8, 0.3) + blur
        virtual_hue: float = 0.3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.hp.memory_update not in UPDATE_VARIANTS:
            raise ValueError(f"memory_update must be one of {UPDATE_VARIANTS}, got '{self.hp.memory_update}'")
        channels, classes = self.model.feature_channels, self.model.cfg.num_classes
        self.mem = Memory(classes, channels, self.hp.momentum)
        self.fusion = MemoryFusion(channels)
        self.memory_classifier = nn.Linear(channels, classes)  # G of Eq. 7
        init_new_layers(self.memory_classifier)

    # ----- names from the paper, for notebooks --------------------------------------------------
    @property
    def memory(self) -> torch.Tensor:
        """M (N, C), unit-norm rows."""
        return self.mem.memory

    @property
    def update_net(self) -> UpdateNet:
        return self.mem.update_net

    def configure_optimizers(self) -> None:
        """One SGD: backbone at lr, decoder + U + fusion + G at the head lr (the code: 0.01 for all)."""
        groups = self.param_groups(self.model)
        for module in (self.mem, self.fusion, self.memory_classifier):
            groups[1]["params"] += list(module.parameters())
        self.add_sgd("main", groups)

    # ----- one forward ----------------------------------------------------------------------
    def forward(self, images: torch.Tensor, memory: torch.Tensor, labels: torch.Tensor | None = None,
                read: bool = True, write: bool = False, gumbel: bool = False, sync: bool = False) -> MemoryOutput:
        """Encode, optionally write (`labels` needed; Eq. 1-3) and read (Eq. 4-5) `memory`, decode.

        Reading and writing both start from the given `memory`, so a writing pass reads the
        previous memory (as in the paper and code). Called directly with θ, or through
        `torch.func.functional_call` with θ' (meta-test, Eq. 10-11).
        """
        size = images.shape[-2:]
        stages, feats = self.model.encode(images)
        if self.hp.memory_dropout:  # the head's dropout applied to F before the memory instead of to R after it
            feats = self.model.head.feature_dropout(feats)
        written = self.mem.write(memory, feats, labels, sync) if write else None
        if not read:
            return MemoryOutput(None, None, feats, None, written)
        q = l2norm(feats)
        scores = cosine_scores(q, memory, normalized=True)
        fused = self.fusion(q if self.hp.fuse_normalized else feats, read_weights_from_scores(scores, gumbel), memory)
        logits = self.model.decode(fused, stages, size, dropout=not self.hp.memory_dropout)
        aux = None
        if self.model.aux_head is not None and self.training:
            aux = F.interpolate(self.model.aux_head(stages["layer3"]), size=size, mode="bilinear", align_corners=False)
        return MemoryOutput(logits, aux, feats, scores, written)

    # ----- losses -----------------------------------------------------------------------------
    def read_loss(self, out: MemoryOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """L_read = L_seg (+ 0.4 aux) + λ1 L_coh (Eq. 6)."""
        loss, terms = segmentation_loss(out, labels, self.hp.aux_weight)
        if self.hp.use_coh and self.hp.coh_weight > 0:
            coh = feature_cohesion_loss(out.scores, labels, self.hp.coh_temperature)
            loss = loss + self.hp.coh_weight * coh
            terms["coh"] = coh.item()
        return loss, terms

    def update_loss(self, written: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """L_update = λ2 L_div (Eq. 7) on the newly written memory: cls_weight·CE + div_weight·cosine."""
        if not self.hp.use_div:
            return written.new_zeros(()), {}
        cls, cos = memory_divergence_loss(written, self.memory_classifier, self.hp.div_margin)
        return self.hp.cls_weight * cls + self.hp.div_weight * cos, {"mem_cls": cls.item(), "mem_div": cos.item()}

    # ----- memory initialisation ------------------------------------------------------------
    @torch.no_grad()
    def initialize_memory(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Sec. 3.2: M[n] = l2norm(mean of l2norm(F) over the pixels of class n) over `batches`.

        The encoder runs in eval mode (code). `training_step` calls it with the first batch when the
        memory is not initialised yet; call it with a loader's batches for the paper's full pass.
        """
        was_training = self.training
        self.eval()
        sums = counts = None
        for batch in batches:
            with self.autocast():
                feats = self.model.encode(batch["image"].to(self.device))[1]
            q = l2norm(feats.float())
            s, c = masked_class_sums(q, class_masks(batch["label"].to(self.device), q.shape[-2:], self.mem.num_slots))
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        all_reduce_sum_(sums, counts)
        self.train(was_training)
        self.mem.set_from_class_means(sums, counts)

    @torch.no_grad()
    def final_memory_update(self, images: torch.Tensor, labels: torch.Tensor, memory: torch.Tensor) -> None:
        """Eq. 12: M* = update(M0, X_tr; copy(Θ_{E,U})) with the new parameters; BN in eval mode (code).

        With `final_update_eval=False` BN uses the batch statistics, on scratch copies of its buffers.
        """
        was_training = self.training
        if self.hp.final_update_eval:
            self.eval()
        with self.autocast():
            written = functional_forward(self, {}, images, memory, labels, read=False, write=True, sync=True,
                                         update_buffers=not self.training).written
        self.train(was_training)
        self.mem.memory.copy_(written)

    # ----- meta-test (Eq. 10-11) ------------------------------------------------------------
    def rewrite_params(self, params: Params) -> Params:
        """θ' as used by the re-write of Eq. 10 for the `memory_update` variant (Table 6)."""
        variant = self.hp.memory_update
        if variant == "train_both":
            return params
        keep = "mem." if variant == "freeze_encoder" else None
        return {k: v if keep and k.startswith(keep) else v.detach() for k, v in params.items()}

    def meta_test_loss(self, params: Params, tr: dict[str, torch.Tensor], te: dict[str, torch.Tensor],
                       memory: torch.Tensor, meta_train: MemoryOutput) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 10-11: M' = update(M0, X_tr; copy(θ'_E), θ'_U), then L_read(X_te; M', θ')."""
        if self.hp.memory_update == "none":
            rewritten = meta_train.written.detach()
        else:
            rewritten = functional_forward(self, self.rewrite_params(params), tr["image"], memory, tr["label"],
                                           read=False, write=True).written
        out = functional_forward(self, params, te["image"], rewritten, gumbel=self.hp.gumbel_train)
        return self.read_loss(out, te["label"])

    # ----- the training iteration (Alg. 1) --------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        hp = self.hp
        if not bool(self.mem.initialized):
            self.initialize_memory([batch])
        memory = self.memory.detach().clone()  # M0, the memory of this iteration
        if hp.episodic:
            tr, te = split_episode(batch, hp.single_source_virtual_domains, hp.virtual_jitter, hp.virtual_hue)
        else:
            tr, te = batch, None
        # meta-train (Eq. 8-9): read M0, write it with the graph kept, L_read + L_update
        with self.autocast():
            out = self(tr["image"], memory, tr["label"], write=True, gumbel=hp.gumbel_train)
        loss_read, logs = self.read_loss(out, tr["label"])
        loss_update, update_logs = self.update_loss(out.written)
        loss_tr = loss_read + loss_update
        logs.update(update_logs)
        if te is None:  # aggregated training: one backward on the whole batch
            self.backward(loss_tr)
            loss = loss_tr.item()
        else:
            test_logs: dict[str, float] = {}

            def test_loss(params: Params) -> torch.Tensor:
                loss_te, terms = self.meta_test_loss(params, tr, te, memory, out)
                test_logs.update({f"te_{k}": v for k, v in terms.items()})
                return loss_te

            alpha = inner_learning_rate(self, hp.inner_lr, hp.inner_lr_ratio) if hp.meta else 0.0
            first_order = hp.first_order or not hp.meta
            loss_te = meta_backward(self, trainable_params(self), loss_tr, test_loss, alpha, hp.meta_weight,
                                    first_order)
            logs.update(test_logs, loss_tr=loss_tr.item(), loss_te=loss_te.item())
            loss = loss_tr.item() + hp.meta_weight * loss_te.item()
        self.step("main")
        self.final_memory_update(tr["image"], tr["label"], memory)  # Eq. 12
        return {"loss": loss, **logs}

    # ----- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (B, K, H, W): encoder, memory read (one matmul + softmax + 1x1 conv), decoder."""
        with self.autocast():
            return self(images, self.memory, gumbel=self.hp.gumbel_read).logits.float()

    @torch.no_grad()
    def read_weights(self, images: torch.Tensor) -> torch.Tensor:
        """W (B, N, h, w) of Eq. 4 for images in [0, 1]: the memory activation maps (Fig. 6)."""
        with self.autocast():
            feats = self.model.encode(images)[1]
        return read_weights_from_scores(cosine_scores(feats.float(), self.memory), self.hp.gumbel_read)

    @torch.no_grad()
    def on_evaluate(self, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Kept with the run at each evaluation point: the memory M and the probe images' read weights W
        (Eq. 4, plain softmax) for the notebooks' memory-over-training figures."""
        with self.autocast():
            feats = self.model.encode(probe["image"])[1]
        weights = read_weights_from_scores(cosine_scores(feats.float(), self.memory))
        return {"memory": self.memory.float().clone(), "read_weights": weights.half()}
