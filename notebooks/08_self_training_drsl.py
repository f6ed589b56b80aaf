# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Self-training: CBST and DRSL
#
# Notebooks 05 and 06 adapted a segmenter by making its target *outputs* look like source outputs.
# Self-training takes a blunter route: let the source model label the target images itself, keep the
# labels it is most sure of, and train on them as if they were ground truth; repeat with the better
# model. Two papers:
#
# - **CBST**, class-balanced self-training (Zou et al., ECCV 2018). A single confidence threshold keeps
#   almost only the easy, frequent classes (road, sky, building), so the model learns to predict them
#   even more. CBST instead keeps, **per class**, the same portion of its most confident pixels, grows
#   that portion round after round (20%, 25%, 30%, ...), crops training patches around rare classes,
#   and mixes a few labelled source images into each round. The authors' code (CRST) reports 33.4 →
#   46.5 mIoU on GTA5 → Cityscapes.
# - **DRSL**, distribution-regularized self-supervised learning (Iqbal et al., IVC 2022), runs the same
#   rounds with a second head beside the segmentation head: every class is modelled by a **mixture of
#   M = 3 modes** in an embedding space, and target pixels are pulled toward the source pixels that sit
#   in the same mode of the same class (*stochastic mode alignment*). The paper claims at least +2.3
#   mIoU over CBST on SYNTHIA → Cityscapes. It has no public code: dgnb's version is, to our knowledge,
#   the first runnable one, and every choice the paper leaves open is an option (docs/self_training.md).
#
# On one source → target pair of the embedded city this notebook builds class-balanced pseudo labels by
# hand, trains CBST and DRSL, follows the pseudo labels round after round, looks at DRSL's modes with
# t-SNE and an explorer, and compares source only, CBST and DRSL over the five seeds of the benchmark
# the repository ships.

# %% tags=["parameters"]
import os

PRESET = os.environ.get("DGNB_PRESET", "quick")  # "smoke" runs the notebook in seconds (the tests do)
SEED = 0
PAIR = "near"  # a key of dgnb.config.UDA_PAIRS
HPARAMS = {  # per method (dgnb.methods.<name>.Hparams); only changed values enter the runs' keys
    "cbst": {"warmup_fraction": 0.5,   # share of the iterations for the source model (round 0)
             "rounds": 3,              # retraining rounds
             "target_portion": 0.2,    # p of round 1, + target_portion_step per round, up to target_portion_max
             "pseudo_form": "weighted",  # weighted: argmax p/θ (CBST) | quantile: argmax p, kept if p ≥ θ
             "mine_chance": 0.8,       # probability of a crop centred on a rare class
             "source_portion": 0.2},   # source images' share of round 1's set (+0.013 per round)
    "drsl": {"num_modes": 3,           # M modes per class
             "sigma": 0.5,             # σ of every mode
             "triplet_weight": 0.25,   # λ1 (Eq. 4, 7)
             "mmdl_ce_weight": 0.1,    # λ2 (Eq. 5)
             "consistency_weight": 0.1,  # λ3, stochastic mode alignment (Eq. 6); 0 = the paper's "DRSL" row
             "samples_per_class": 300},  # pixels per class per image for the MMDL-FR losses
}

# %%
import math

import numpy as np
import pandas as pd
import torch

from dgnb.config import UDA_PAIRS
from dgnb.course import uda_run
from dgnb.data.folder import SegFolder
from dgnb.data.inspect import load_split
from dgnb.engine.runs import prepare_data, train
from dgnb.methods.base import changed_hparams

SOURCE, TARGET = UDA_PAIRS[PAIR]
configs = {"source only": uda_run(PRESET, "source_only", SEED, PAIR)}
configs |= {label: uda_run(PRESET, name, SEED, PAIR, hparams=changed_hparams(name, HPARAMS[name]))
            for label, name in (("CBST", "cbst"), ("DRSL", "drsl"))}
cfg = configs["CBST"]
prepare_data(cfg)
n_images = 24 if PRESET != "smoke" else 4


def split_images(domain: str, split: str = "val", n: int = n_images) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` images of a split: images (n, 3, H, W) in [0, 1] and labels (n, H, W)."""
    return load_split(cfg.data.root, domain, split, n)


def unlabelled_images(domain: str, n: int = n_images) -> torch.Tensor:
    """The first `n` images of the target's train split, read without their labels (what training sees)."""
    return load_split(cfg.data.root, domain, "train", n, labels=False)[0]


print(f"adapting {SOURCE} -> {TARGET}; evaluated on {cfg.data.targets}")

# %% [markdown]
# ## 1. Which pixels become pseudo labels?
# The source-only model of notebook 05 predicts target train images it has never seen. Let $p_c$ be
# its probability of class $c$ at a pixel. A **single confidence threshold** keeps the pixels with
# $\max_c p_c \ge t$. CBST instead sets one threshold per class, $\theta_c$, so that a fixed portion $p$
# of the pixels predicted as $c$ is kept (the code sorts the confidences of each class and reads
# $\theta_c$ at rank $p\,n_c$). The figure compares the two rules at the same number of kept
# pixels.

# %%
from dgnb.methods.self_training import label_pixels, portion_thresholds
from dgnb.viz.self_training import balance_figure

baseline_run = train(configs["source only"])  # cached by notebook 05
baseline = baseline_run.load_method()
target_train = unlabelled_images(TARGET)
with torch.no_grad():
    probs = baseline.predict(target_train.to(baseline.device)).float().softmax(1).cpu()
conf, pred = probs.max(1)
balance_figure(conf, pred, portion=HPARAMS["cbst"]["target_portion"],
               title=f"source-only model on {TARGET} train images: kept fraction per class under two rules")

# %% [markdown]
# Look at the classes on the right, the rare ones: the single threshold keeps almost none of their
# pixels, while the class-balanced rule keeps the same portion of every class, which is what lets a
# round teach them at all.

# %% [markdown]
# The thresholds in a few lines of your own (in the student edition, the body is yours to write):
# $\theta_c$ is the confidence of the $\lceil p\,n_c \rceil$-th most confident pixel predicted as $c$,
# $+\infty$ for a class never predicted.

# %%
def class_thresholds(confidence, prediction, portion, num_classes=19):
    """θ (num_classes,): per class c, the ⌈portion · n_c⌉-th largest confidence of the n_c pixels predicted c."""
    ### BEGIN SOLUTION: per class, sort its pixels' confidences descending; θ_c at index ⌈portion · n_c⌉ − 1
    theta = torch.full((num_classes,), math.inf)
    for c in range(num_classes):
        values = confidence[prediction == c]
        if len(values):
            theta[c] = values.sort(descending=True).values[math.ceil(portion * len(values)) - 1]
    return theta
    ### END SOLUTION


theta = class_thresholds(conf, pred, 0.2)
assert torch.equal(theta, portion_thresholds(conf, pred, 0.2))  # your θ is the library's

# %% [markdown]
# CBST's pseudo label is the closed-form solution of its class-balanced self-training objective (the
# code's `label_selection`): divide each probability by its class threshold, take the largest ratio, and keep
# the pixel only if that ratio reaches 1,
#
# $$\hat y = \arg\max_c \frac{p_c}{\theta_c} \quad\text{if}\quad \max_c \frac{p_c}{\theta_c} \ge 1,\qquad
# \text{else ignore (255)}.$$
#
# A rare class has a low $\theta_c$, so it can win a pixel that another class narrowly predicts.

# %%
def cbst_labels(probs, thresholds):
    """Pseudo labels (B, H, W) of class probabilities (B, K, H, W): argmax p/θ where max p/θ ≥ 1, else 255."""
    ### BEGIN SOLUTION: divide by θ as (1, K, 1, 1); max over the classes; 255 where the max is below 1
    ratio = probs / thresholds.view(1, -1, 1, 1)
    best, label = ratio.max(1)
    label[best < 1] = 255
    return label
    ### END SOLUTION


mine = cbst_labels(probs, theta)
assert torch.equal(mine, label_pixels(probs, theta, "weighted"))  # your labels are the library's
moved = ((mine != 255) & (mine != pred)).float().mean().item()
print(f"kept {float((mine != 255).float().mean()):.1%} of the pixels; {moved:.2%} got another class than the argmax")

# %% [markdown]
# ## 2. Train CBST: a source model, then rounds
# The run first trains the source model (`warmup_fraction` of the iterations, CRST's "round 0"), then
# runs `rounds` rounds. At each round boundary, a checkpoint, the current model labels every target
# train image (portion 20%, then 25%, 30%), the labels are written next to the run with a manifest, and
# the round's training set is built: the pseudo-labelled target images, some of them replaced by
# patches cropped around rare classes, plus labelled source images making a fifth of the set (what the
# code's 3% of GTA5 makes next to Cityscapes; docs/self_training.md). Each round restarts SGD at a fifth
# of the learning rate, constant, as the code does. The first time this cell takes a few minutes on 2 CPU
# cores; afterwards it is instant.

# %%
from dgnb.viz import plot_history

cbst_run = train(configs["CBST"])
rows = {"source only": baseline_run.metrics["target_miou"]}
for s in cbst_run.metrics["stage_results"]:
    rows["CBST source model (round 0)" if s["stage"] == 0 else f"CBST after round {s['stage']}"] = s["target_miou"]
rows[f"CBST after round {len(cbst_run.metrics['stage_results'])} (final)"] = cbst_run.metrics["target_miou"]
pd.DataFrame(rows).T.assign(**{"mean target": lambda df: df.mean(axis=1).round(2)})

# %%
skip = 100 if PRESET != "smoke" else 0  # the first iterations' losses are off the scale of the rest
plot_history({"CBST": [h for h in cbst_run.history if h["iteration"] > skip]}, terms=["seg", "pseudo_seg"],
             smooth=10 if PRESET != "smoke" else 1,
             title="CBST: source cross-entropy (source model), then the cross-entropy on each round's pseudo labels")

# %% [markdown]
# The pseudo-label loss soon falls below what the source loss reached: a model fits its own most
# confident answers easily, so a low loss in the rounds says nothing about the target's accuracy, which the
# table above measures.

# %% [markdown]
# ## 3. The pseudo labels, round after round
# Every round's labels are a dataset in the common layout with a manifest (the thresholds, the share
# of each class, the fraction kept). Their accuracy needs the target's true labels, which training never
# reads: `score_pseudo_labels` reads them here, for analysis only.

# %%
from dgnb.methods.pseudo_labels import score_pseudo_labels
from dgnb.viz.self_training import rounds_figure

cbst = cbst_run.load_method()
rounds = cbst.pseudo_label_sets(cbst_run.dir)
for pseudo in rounds:
    score_pseudo_labels(pseudo, cfg.data.root, TARGET)
rounds_figure([p.manifest for p in rounds], title=f"CBST's pseudo labels of {TARGET} per class and round")

# %% [markdown]
# The middle panel is the class balance at work (the same portion of every class, wrong ones included);
# the top one shows where the rounds drift: a class whose share of the predictions grows round after round
# while its labels are mostly wrong (bottom) is a confusion the rounds teach back to the model.

# %%
from dgnb.data.taxonomy import colorize
from dgnb.viz import image_grid, to_numpy_image

show = 4 if PRESET != "smoke" else 2
grid = {"target image": [to_numpy_image(x) for x in target_train[:show]]}
for k, pseudo in enumerate(rounds, 1):
    ps = SegFolder(pseudo.root, pseudo.name, "train", limit=show)
    grid[f"round {k} (p = {pseudo.manifest['rule']['portion']:g})"] = [colorize(ps.tensors(i)[1].numpy())
                                                                         for i in range(len(ps))]
truth = SegFolder(cfg.data.root, TARGET, "train", limit=show)  # analysis only
grid["true label (never used)"] = [colorize(truth.tensors(i)[1].numpy()) for i in range(show)]
image_grid(grid, title="the same target images, round after round (black: ignored)")

# %% [markdown]
# Follow one image down its column against the true label: the labelled area grows from round to round,
# and so does any class that spreads where the truth shows another one (on the near pair, car over the
# road), because each round trains on the previous round's answers.

# %% [markdown]
# ### Rare classes
# Classes predicted on less than 0.1% of the target pixels are **mined**: with probability 0.8, an
# image whose pseudo labels contain one is replaced in the round's set by a crop centred on a random
# pixel of it (CRST's `mine_chance`, `mine_port`).

# %%
from dgnb.viz.self_training import mined_patches_figure

rare = pd.DataFrame({f"round {k}": {"mine classes": ", ".join(p.manifest["mine_classes"]) or "-",
                                    "3 rarest predicted": ", ".join(p.manifest["rare_classes"]),
                                    "mined patches": r["mined_patches"], "source images": r["source_images"]}
                     for k, (p, r) in enumerate(zip(rounds, cbst.rounds_written), 1)}).T
rare

# %%
mined_patches_figure(cbst_run.dir / cbst.rounds_written[0]["training_set"], n=6 if PRESET != "smoke" else 3)

# %% [markdown]
# Each patch is centred on a rare class, so the crop the loader takes from it always shows that class:
# these pixels would otherwise appear in a handful of batches per round.

# %%
from dgnb.data.taxonomy import CLASSES

rare_names = {c for p in rounds for c in p.manifest["mine_classes"]} | set(rounds[0].manifest["rare_classes"])
mined = [c for c in CLASSES if c in rare_names]  # in the label space's order
per_class = {label: run.metrics["per_class_iou"][TARGET] for label, run in (("source only", baseline_run),
                                                                            ("CBST", cbst_run))}
pd.DataFrame({label: {c: v.get(c) for c in mined} for label, v in per_class.items()}).rename_axis(
    f"IoU on {TARGET} val (%)")

# %% [markdown]
# Mining shows these classes more often, but only with the labels the rounds made: a class the rounds
# keep confusing becomes rarer in the predictions, is then mined with its wrong labels, and can vanish.

# %% [markdown]
# ## 4. DRSL: a mixture of modes per class
# DRSL keeps CBST's rounds and adds the **MMDL-FR** module on the encoder's features (layer4): an
# embedding block (four dilated 3×3 convolutions, summed, upsampled to half the input size) gives each
# pixel an embedding $e$, and each class $c$ owns $M$ mode centres $\mu_{c,1..M}$ (the weights of a
# fully connected layer). With a fixed variance $\sigma = 0.5$,
#
# $$p_{c,j}(e) \propto \exp\Big(-\frac{\lVert e - \mu_{c,j}\rVert^2}{2\sigma^2}\Big),\qquad
# P(C = c \mid e) = \max_j p_{c,j}(e)\ \text{(normalised over the classes)}.$$
#
# On at most 300 random pixels per class per image (true labels on the source, pseudo labels on the
# target), DRSL minimises a triplet loss that brings $e$ nearer to the nearest mode of its class than to
# any mode of another class by a margin $\alpha$ (Eq. 4, on both domains: Eq. 7), the cross-entropy of
# $P(C \mid e)$ (Eq. 5), and the **stochastic mode alignment** (Eq. 6): for a target pixel of class $y$
# in mode $j^*$, draw a source pixel of class $y$ in the same mode ($e_s^+$) and a source pixel of
# another class ($e_s^-$), and ask $d(e_t, e_s^+) + m \le d(e_t, e_s^-)$, $m = 1$. Weights
# $\lambda_1 = 0.25$, $\lambda_2 = 0.1$, $\lambda_3 = 0.1$. Inference uses the segmentation head: the
# module only shapes the shared encoder.

# %%
from dgnb.methods.drsl import mode_log_likelihoods


def mode_log_likelihood(e, modes, sigma=0.5):
    """log p_{c,j}(e) = −‖e − μ_{c,j}‖² / (2σ²) (N, K, M) of embeddings e (N, D), centres μ (K, M, D)."""
    ### BEGIN SOLUTION: e as (N, 1, 1, D) against μ as (1, K, M, D); sum the squares over D; divide by 2σ²
    return -((e[:, None, None, :] - modes[None]) ** 2).sum(-1) / (2 * sigma**2)
    ### END SOLUTION


e, mu = torch.randn(5, 8), torch.randn(19, 3, 8)
assert torch.allclose(mode_log_likelihood(e, mu), mode_log_likelihoods(e, mu), atol=1e-4)  # = library

# %% [markdown]
# ## 5. Train DRSL
# Same source model length, same rounds and pseudo-label rule as CBST; DRSL's source model also trains
# its MMDL-FR module on the source (Eq. 8), and each round adds a batch of labelled source images to the
# pseudo-labelled target batch (Eq. 9 and 10), so it mixes no source images into the round's set.

# %%
drsl_run = train(configs["DRSL"])
rows = {"source only": baseline_run.metrics["target_miou"], "CBST (final)": cbst_run.metrics["target_miou"]}
for s in drsl_run.metrics["stage_results"]:
    rows["DRSL source model (round 0)" if s["stage"] == 0 else f"DRSL after round {s['stage']}"] = s["target_miou"]
rows["DRSL (final)"] = drsl_run.metrics["target_miou"]
pd.DataFrame(rows).T.assign(**{"mean target": lambda df: df.mean(axis=1).round(2)})

# %%
plot_history({"DRSL": [h for h in drsl_run.history if h["iteration"] > skip]},
             terms=["tri_s", "tri_t", "mmdl_ce_s", "mmdl_ce_t", "cons"], smooth=10 if PRESET != "smoke" else 1,
             title="DRSL: triplet (Eq. 4, 7) and mixture cross-entropy (Eq. 5) per domain, mode alignment (Eq. 6)")

# %% [markdown]
# The target terms sit below the source ones: pseudo-labelled pixels are the ones the model was surest
# of, already near their modes, while every labelled source pixel counts; the alignment term `cons` falls
# over the rounds as target pixels move next to the source pixels of their own class and mode.

# %% [markdown]
# ## 6. The modes, before and after alignment, with t-SNE
# Pixels of source and target val images, up to a few per class and image, embedded by the MMDL-FR
# module of the source model (end of round 0: trained on the source only, nothing aligned yet) and of
# the final DRSL model; t-SNE puts them in 2-D. The middle column colours each pixel by the mode of its
# own class it is nearest to: inside a class's island, several colours are its sub-clusters.

# %%
from dgnb.engine.stages import stage_checkpoint
from dgnb.viz.self_training import embedding_tsne_figure, pixel_embeddings

drsl = drsl_run.load_method()
before = drsl_run.load_method(checkpoint=stage_checkpoint(1)) if drsl_run.metrics["stage_results"] else drsl
src_images, src_labels = split_images(SOURCE)
tgt_images, tgt_labels = split_images(TARGET)
points = {name: pixel_embeddings(m, {SOURCE: src_images, TARGET: tgt_images}, {SOURCE: src_labels, TARGET: tgt_labels},
                                 per_class=15 if PRESET != "smoke" else 5, seed=SEED)
          for name, m in (("before: source model", before), ("after: DRSL", drsl))}
embedding_tsne_figure(points, perplexity=30 if PRESET != "smoke" else 5, seed=SEED,
                      title=f"MMDL-FR pixel embeddings of {SOURCE} (dots) and {TARGET} (crosses)")

# %% [markdown]
# In the right-hand column compare how far the target crosses sit from the source dots before and after
# the rounds; in the left-hand one, whether the classes' islands stay apart while the domains mix.

# %%
from dgnb.methods.drsl import squared_distances


def own_mode_distance(points, centres: torch.Tensor) -> dict[str, float]:
    """Per domain, the mean distance of its pixels' embeddings to the nearest mode of their own class."""
    emb, classes, _, domains = points
    out = {}
    for dom in (SOURCE, TARGET):
        sel = domains == dom
        d2 = squared_distances(torch.as_tensor(emb[sel]), centres)  # (P, K, M)
        own = d2[torch.arange(int(sel.sum())), torch.as_tensor(classes[sel].astype(np.int64))]  # (P, M)
        out[dom] = float(own.min(-1).values.sqrt().mean())
    return out


table = pd.DataFrame({name: own_mode_distance(points[name], m.mmdl.modes.detach().cpu())
                      for name, m in (("before: source model", before), ("after: DRSL", drsl))}).T
table.assign(**{"target − source": table[TARGET] - table[SOURCE]}).rename_axis(
    "mean distance to the own class's nearest mode")

# %% [markdown]
# The last column is the domain shift in the mode space, how much farther target pixels sit from their
# modes than source pixels: what the stochastic mode alignment is meant to shrink.

# %% [markdown]
# ## 7. Explorer: the pixels of a class and its modes
# Pick a target image and a class: its pixels (as the segmentation head predicts them, or as labelled)
# coloured by the mode of that class they are nearest to, and the MMDL-FR module's posterior for the
# class. Cars near and far, or road in light and shadow, often fall in different modes.

# %%
from dgnb.viz.self_training import mode_explorer

mode_explorer(drsl, tgt_images, tgt_labels)

# %% [markdown]
# ## 8. Source only, CBST and DRSL over seeds
# One seed moves these numbers by a point or two. The comparison the papers make (CBST above source
# only, DRSL above CBST) needs several seeds of each method, more than a lab can train: the repository
# ships five seeds of the three with their default hyperparameters on this pair
# (`benchmarks/results/bench_uda2_<target>.json`, made by the `dgnb bench` command in the README's
# "Adaptation II" section), paired by seed (`dgnb.analysis.paired_difference`). If you changed
# `HPARAMS`, these are not your runs.

# %%
from dgnb.analysis import format_difference, paired_difference, shipped_bench
from dgnb.viz import results_over_seeds, target_points_figure

shipped = shipped_bench(f"bench_uda2_{TARGET}.json")
seed_runs = {label: [r for r in shipped if r["method"] == m] for label, m in
             (("source only", "source_only"), ("CBST", "cbst"), ("DRSL", "drsl"))}
results = results_over_seeds(seed_runs)
target_points_figure(results, baseline="source only",
                     title=f"mIoU per target over {len(seed_runs['CBST'])} seeds, adapting to {TARGET} "
                           "(quick preset, the shipped benchmark)")

# %% [markdown]
# Read the right panel on the adapted target first: a filled marker is a difference to source only that
# the seeds resolve, an open one is not; the other targets show whether adapting to one domain helped
# or hurt the rest.

# %%
means = {label: [r["mean_target_miou"] for r in rs] for label, rs in seed_runs.items()}
pd.DataFrame({f"{a} − {b}": {f"{TARGET} (adapted)": format_difference(paired_difference(results[a][TARGET],
                                                                                          results[b][TARGET])),
                             "mean of the targets": format_difference(paired_difference(means[a], means[b]))}
              for a, b in (("CBST", "source only"), ("DRSL", "source only"), ("DRSL", "CBST"))}).T

# %% [markdown]
# The last row is the DRSL paper's claim in this setting: its interval says whether the mixture of modes
# adds anything on top of CBST's rounds here, or whether the seeds cannot tell them apart.

# %% [markdown]
# ## Exercises
# 1. Switch CBST's pseudo labels to the plain per-class quantile, `HPARAMS["cbst"]["pseudo_form"] =
#    "quantile"`, and rerun sections 2 and 3: which classes lose labels, and does the mIoU move?
# 2. Turn mining off, `HPARAMS["cbst"]["mine_chance"] = 0.0`, rerun, and compare the IoU of the mined
#    classes in section 3 with the run that mines.
# 3. The paper's "DRSL" row has no cross-domain alignment: set `HPARAMS["drsl"]["consistency_weight"] =
#    0.0`, rerun sections 5 and 6, and compare the distances to the modes and the mIoU with "DRSL+".
# 4. One mode per class (`HPARAMS["drsl"]["num_modes"] = 1`) is the paper's ablation M = 1 (Table 5).
#    Rerun: do the t-SNE islands lose their sub-clusters, and does the mIoU change?
# 5. Set `PAIR = "far"` and rerun the notebook: are the pseudo labels of round 1 less accurate on the far
#    target, and does self-training still help when the source model starts worse?
