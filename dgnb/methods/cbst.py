"""CBST: class-balanced self-training (Zou, Yu, Kumar & Wang, ECCV 2018), as the CRST code (`yzou2/CRST`,
`crst_seg.py`) runs it. docs/self_training.md has the equation-to-code map and the differences.

Stage 0, the warm-up (iterations [0, T_0), T_0 = warmup_fraction · iterations): the source model the CRST
code starts from ("round 0"), trained here: L = CE(z_p, y_s) + aux_weight CE(z_a, y_s), poly schedule
ending at T_0. It never sees a target image.

Rounds r = 1 .. R (stages; each boundary is a checkpoint `stage<r>.pt` and the loader is rebuilt):
    1. the current model predicts every target train image (softmax of the primary head, flip-averaged; the
       classifier's low-resolution scores are kept between the two passes over the set);
    2. class-balanced thresholds θ_c at target portion p_r = min(p_0 + (r − 1) Δp, p_max)   (code: kc_parameters)
       (p_0 = 0.2, Δp = 0.05, p_max = 0.5, the code's `init_tgt_port`, `tgt_port_step`, `max_tgt_port`);
    3. pseudo labels ŷ = argmax_c p_c / θ_c kept where max_c p_c / θ_c ≥ 1  (the paper's closed-form solution
       of its class-balanced self-training objective; code: label_selection)
       written with their manifest (`self_training.write_round`);
    4. the round's training set: the pseudo-labelled target images (rare-class patches mined with
       probability 0.8 around classes predicted on < 0.1% of the pixels) mixed with a random source portion
       s_r = min(s_0 + (r − 1) Δs, s_max): by default the source images' share of the round's set, 0.20,
       +0.013, up to 0.335, which is what the code's 3% (+0.25%, up to 6%) of GTA5's 24,966 images makes next to
       Cityscapes' 2,975 (`source_basis="dataset"` reads s_r as the code does: a portion of the source dataset);
    5. retraining on it: L = CE(z_p, ŷ) + aux_weight CE(z_a, ŷ) over the mixed batch (ignore = 255), a fresh SGD
       at round_lr_mult × lr (the code: 5e-5 after a 2.5e-4 source model), constant (poly power 0).
Inference: the primary head.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..data.loaders import stable_seed
from ..data.taxonomy import IGNORE_INDEX
from .base import Method, register
from .losses import segmentation_loss
from .self_training import FORMS, SOURCE_BASES, PseudoLabels, write_round, write_training_set

PSEUDO_DIR = "pseudo_labels"


def run_config(folder: Path) -> Any:
    """The `RunConfig` of the run whose folder is `folder` (its `config.json`): the source datasets, the crop
    and the seed a round needs."""
    from ..config import RunConfig

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: self-training rounds read the run's sources and crop from it; "
                                "train through dgnb.engine.runs.train (or `dgnb train`), which writes it")
    return RunConfig.from_dict(json.loads(path.read_text()))


def source_sets(cfg: Any) -> list[Any]:
    """The labelled train splits of the run's sources (the pool a round's source portion is drawn from)."""
    from ..engine.runs import domain_set

    return [domain_set(cfg, name, "train", None, i, cfg.data.train_limit) for i, name in enumerate(cfg.data.sources)]


def scheduled(start: float, step: float, cap: float, round_index: int) -> float:
    """min(start + (r − 1) · step, cap) for round r = 1, 2, ... (CRST's portion schedules)."""
    return round(min(start + (round_index - 1) * step, cap), 6)


@register
class CBST(Method):
    name = "cbst"
    uda = True
    settings = ("uda",)

    @dataclass
    class Hparams:
        aux_weight: float = 0.1            # CE weight of the auxiliary (layer3) head, source and pseudo labels
        warmup_fraction: float = 0.5       # share of the iterations for the source model (stage 0)
        rounds: int = 3                    # retraining rounds (CRST: 4 rounds, the last one only evaluates)
        target_portion: float = 0.2        # p of the first round (init_tgt_port)
        target_portion_step: float = 0.05  # + per round (tgt_port_step)
        target_portion_max: float = 0.5    # cap (max_tgt_port)
        source_basis: str = "share"        # share: s = the source images' share of the round's set | dataset:
                                           #   s = the portion of the source dataset drawn (the code's)
        source_portion: float = 0.2        # s of round 1 (the code's init_src_port 0.03 of GTA5, as a share)
        source_portion_step: float = 0.013   # + per round (src_port_step 0.0025 of GTA5, as a share)
        source_portion_max: float = 0.335  # cap (max_src_port 0.06 of GTA5, as a share)
        round_lr_mult: float = 0.2         # rounds' lr / warm-up lr (the code: 5e-5 / 2.5e-4)
        round_poly_power: float = 0.0      # rounds' schedule: 0 = constant (the code's `power`)
        pseudo_form: str = "weighted"      # weighted: argmax p/θ (paper, code) | quantile: argmax p, p ≥ θ
        threshold_stride: int = 4          # every k-th pixel for the thresholds (the code's ds_rate)
        pseudo_flip: bool = True           # average the prediction with the flipped image's (the code)
        mine_portion: float = 1e-3         # mine classes predicted on less than this share (mine_port)
        mine_chance: float = 0.8           # probability of a mined crop (mine_chance)
        rare_classes: int = 3              # rarest classes listed in the manifest (rare_cls_num)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hp = self.hp
        if hp.pseudo_form not in FORMS or hp.source_basis not in SOURCE_BASES:
            raise ValueError(f"pseudo_form must be one of {FORMS} and source_basis one of {SOURCE_BASES}; got "
                             f"{hp.pseudo_form!r}, {hp.source_basis!r}")
        if not 0 < hp.warmup_fraction <= 1 or hp.rounds < 0 or hp.threshold_stride < 1:
            raise ValueError(f"warmup_fraction={hp.warmup_fraction} must lie in (0, 1], rounds={hp.rounds} be >= 0 "
                             f"and threshold_stride={hp.threshold_stride} >= 1")
        for name in ("target_portion", "target_portion_max"):
            if not 0 < getattr(hp, name) <= 1:
                raise ValueError(f"{name}={getattr(hp, name)} must lie in (0, 1]")
        for name in ("source_portion", "source_portion_max"):
            if not 0 <= getattr(hp, name) < (1 if hp.source_basis == "share" else 1.0001):
                raise ValueError(f"{name}={getattr(hp, name)} must lie in [0, 1) (a share) or [0, 1] (a portion)")
        self.rounds_written: list[dict[str, Any]] = []  # per round: its pseudo labels, training set, portions

    # ----- stages: warm-up, then rounds -----------------------------------------------------------------
    @property
    def warmup_iterations(self) -> int:
        total = self.optim_cfg.iterations
        return min(total, max(1, round(self.hp.warmup_fraction * total)))

    def stage_starts(self) -> list[int]:
        """Iterations where rounds 1..R begin: the iterations after the warm-up split as evenly as possible."""
        total, warm = self.optim_cfg.iterations, self.warmup_iterations
        rounds = min(self.hp.rounds, total - warm)
        return [warm + (i * (total - warm)) // rounds for i in range(rounds)]

    def round_span(self, stage: int) -> tuple[int, int]:
        """[first, end) iterations of round `stage` (1-based)."""
        starts = self.stage_starts() + [self.optim_cfg.iterations]
        return starts[stage - 1], starts[stage]

    def configure_optimizers(self) -> None:
        """The warm-up's SGD (heads at head_lr_mult) with a poly schedule that ends with the warm-up."""
        super().configure_optimizers()
        c = self.optim_cfg
        self.schedulers["main"] = torch.optim.lr_scheduler.PolynomialLR(
            self.optimizers["main"], total_iters=self.warmup_iterations, power=c.poly_power)

    def configure_round(self, stage: int) -> None:
        """A fresh SGD for round `stage` (momentum reset, as the code builds one per round) at round_lr_mult x
        the learning rates, schedule poly(round_poly_power) over the round's iterations."""
        first, end = self.round_span(stage)
        self.add_sgd("main", self.param_groups(self.model), lr_mult=self.hp.round_lr_mult, iterations=end - first,
                     power=self.hp.round_poly_power)

    def portions(self, stage: int) -> tuple[float, float]:
        """(target portion p_r, source portion s_r) of round `stage`."""
        hp = self.hp
        return (scheduled(hp.target_portion, hp.target_portion_step, hp.target_portion_max, stage),
                scheduled(hp.source_portion, hp.source_portion_step, hp.source_portion_max, stage))

    @torch.no_grad()
    def target_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The primary head's class scores at the classifier's own resolution (before the upsampling to the
        input size, so a round can keep those of a whole target set), of the images and, with `pseudo_flip`,
        of their mirror images (eval mode)."""
        def scores(x: torch.Tensor) -> torch.Tensor:
            stages, feats = self.model.encode(x)
            return self.model.head.decode(feats, stages).float()

        x = images.to(self.device)
        with self.autocast():
            return scores(x), (scores(x.flip(-1)) if self.hp.pseudo_flip else None)

    def target_probabilities(self, scores: tuple[torch.Tensor, torch.Tensor | None], size: tuple[int, int]
                             ) -> torch.Tensor:
        """Class probabilities at `size` from `target_scores`: softmax of the bilinearly upsampled scores (what
        the segmenter's forward computes), averaged with the mirrored prediction of the flipped image."""
        def probabilities(z: torch.Tensor) -> torch.Tensor:
            return F.interpolate(z.to(self.device), size=size, mode="bilinear", align_corners=False).softmax(1)

        main, flipped = scores
        p = probabilities(main)
        return p if flipped is None else 0.5 * (p + probabilities(flipped).flip(-1))

    def begin_stage(self, stage: int, context: Any) -> dict[str, Any]:
        """Round `stage`: pseudo labels of the target train set at portion p_r, the mixed training set with
        mined patches, then a fresh optimizer."""
        tick = time.perf_counter()
        cfg = run_config(context.folder)
        target = context.target.dataset
        portion, source_portion = self.portions(stage)
        name = f"{target}-round{stage}"
        pseudo = write_round(
            self.target_scores, context.target_batches, context.images, context.folder / PSEUDO_DIR, name, portion,
            self.hp.pseudo_form, self.hp.threshold_stride, self.hp.mine_portion, self.hp.rare_classes,
            info={"made_by": self.name, "round": stage, "iteration": self.iteration, "target": target},
            finish=self.target_probabilities)
        generator = torch.Generator().manual_seed(stable_seed("self-training round", cfg.seed, stage))
        composition = write_training_set(pseudo, f"{name}-train", tuple(cfg.data.crop), self.hp.mine_chance,
                                         source_sets(cfg) if source_portion > 0 else [], source_portion, generator,
                                         self.hp.source_basis)
        record = {"round": stage, "iteration": self.iteration, "target_portion": portion,
                  "pseudo_labels": f"{PSEUDO_DIR}/{name}", "training_set": f"{PSEUDO_DIR}/{name}-train",
                  "pseudo_kept": pseudo.manifest["kept_overall"], **composition}
        self.rounds_written.append(record)
        self.stage = stage
        self.configure_round(stage)
        # the history also gets the seconds the round's labels and set took (the engine's train_seconds leaves
        # stage boundaries out); not in the method state, which must not depend on the clock
        return {**{k: v for k, v in record.items() if k != "mine_classes"},
                "seconds": round(time.perf_counter() - tick, 1)}

    def pseudo_label_root(self) -> tuple[str, str] | None:
        if self.stage == 0 or not self.rounds_written:
            return None
        rel, name = self.rounds_written[-1]["training_set"].rsplit("/", 1)
        return rel, name

    def pseudo_label_sets(self, run_dir: str | Path) -> list[PseudoLabels]:
        """The pseudo-label set of every round this model went through (round 1 first), given the run folder."""
        out = []
        for record in self.rounds_written:
            rel, name = record["pseudo_labels"].rsplit("/", 1)
            out.append(PseudoLabels(Path(run_dir) / rel, name))
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"rounds_written": [dict(r) for r in self.rounds_written]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rounds_written = [dict(r) for r in state.get("rounds_written", [])]
        if self.stage > 0 and self.optimizers:  # the round's optimizer, so that its saved state loads into it
            self.configure_round(self.stage)

    # ----- training ------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.warmup_step(batch) if self.stage == 0 else self.round_step(batch)

    def warmup_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The source model: CE on the labelled source images only."""
        return self.supervised_step(batch["image"], batch["label"], self.hp.aux_weight)

    def pseudo_loss(self, out: Any, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """CE of both heads on the round's labels (pseudo labels, or source labels of the mixed-in portion);
        zero when a crop holds no kept label."""
        if (labels == IGNORE_INDEX).all():
            return out.logits.sum() * 0.0, {"pseudo_seg": 0.0, "pseudo_kept": 0.0}
        loss, terms = segmentation_loss(out, labels, self.hp.aux_weight)
        terms = {f"pseudo_{k}": v for k, v in terms.items()}
        terms["pseudo_kept"] = float((labels != IGNORE_INDEX).float().mean())
        return loss, terms

    def round_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """CBST retraining: CE on the round's mixed set (target pseudo labels + the source portion)."""
        if "target_label" not in batch:
            raise RuntimeError("a CBST round needs the round's labels in the batch (target_label)")
        with self.autocast():
            out = self.model(batch["target_image"])
        loss, terms = self.pseudo_loss(out, batch["target_label"])
        self.backward(loss)
        self.step("main")
        return {"loss": loss.item(), **terms}
