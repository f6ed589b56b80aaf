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
# # 07 · PFR: progressive feature refinement
#
# *Towards Adaptive Semantic Segmentation by Progressive Feature Refinement* (Zhang, Zhao & Zhang,
# ICIP 2020) adds one idea to notebook 05's AdaptSegNet. Before the output-space discriminator gets to
# see anything, the feature maps of a source image and a target image are compared **at every stage
# of the backbone**, in two ways borrowed from neural style transfer:
#
# - their **content**, the feature map itself, position by position;
# - their **style**, the Gram matrix of the feature map: which channels fire together, wherever they
#   fire.
#
# Both distances are added to the training loss at the four ResNet stages, so the features are
# refined stage after stage ("progressively") toward something the two domains share; a domain
# classifier on the segmentation output does the rest. The paper reports 44.5 mIoU on
# GTA5 → Cityscapes (ResNet-101), against 42.4 for AdaptSegNet. It publishes no code: dgnb's
# implementation is the first runnable one, and every choice the paper leaves open is an option
# (docs/pfr.md).
#
# This notebook computes Gram matrices by hand, shows what the content term asks for when the two
# images are unrelated scenes, trains PFR with and without its adversarial term next to source only
# and AdaptSegNet, follows the per-stage distances during training, looks at the Gram matrices again
# after adaptation, and compares the methods over the five seeds of the benchmark the repository ships.

# %% tags=["parameters"]
import os

PRESET = os.environ.get("DGNB_PRESET", "quick")  # "smoke" runs the notebook in seconds (the tests do)
SEED = 0            # the run the single-seed figures show
SEEDS = [0]         # seeds trained here (§8 also reads the shipped five-seed benchmark)
PAIR = "near"       # a key of dgnb.config.UDA_PAIRS: "near" or "far"
HPARAMS = {  # PFR (dgnb.methods.pfr.PFR.Hparams); only changed values enter the runs' keys
    "pfr_weight": 0.004,                   # λ_pfr
    "adv_weight_main": 0.002,              # λ_adv: one discriminator, on the main output (0: none)
    "style_weight": 1.0,                   # α in L_pfr = α L_sty + β L_con
    "content_weight": 1.0,                 # β
    "stage_weights": (1.0, 1.0, 1.0, 1.0),  # w_i of layer1..layer4
    "gram_norm": "cn",                     # cn: F Fᵀ / (C N) | n: / N | none: raw F Fᵀ
    "distance": "l2",                      # l2: ‖·‖₂ as the paper writes it | squared | mse
    "content_match": "resize",             # resize | crop | pool, for maps of unequal size
    "detach": "none",                      # none | target | source: whose features receive no gradient
}

# %%
import torch

from dgnb.config import UDA_PAIRS
from dgnb.course import pfr_runs
from dgnb.data.inspect import load_split
from dgnb.engine.runs import prepare_data, train
from dgnb.methods.base import changed_hparams

SOURCE, TARGET = UDA_PAIRS[PAIR]
seeds = list(SEEDS)
assert SEED in seeds, f"SEED = {SEED} must be one of the seeds {seeds}"
configs = pfr_runs(PRESET, seeds, PAIR, hparams=changed_hparams("pfr", HPARAMS))  # label -> seed -> config
cfg = configs["PFR"][SEED]
prepare_data(cfg)
n_images = 24 if PRESET != "smoke" else 4
print(f"adapting {SOURCE} -> {TARGET}; seeds {seeds}; runs: {list(configs)}")


def split_images(domain: str, split: str = "val", n: int = n_images) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` images of a split: images (n, 3, H, W) in [0, 1] and labels (n, H, W)."""
    return load_split(cfg.data.root, domain, split, n)


images = {dom: split_images(dom)[0] for dom in (SOURCE, TARGET)}

# %% [markdown]
# ## 1. Content and style of a feature map
# At stage i (the paper's ResNet stages 2–5, dgnb's `layer1`..`layer4`), write the feature map of one
# image as a matrix $F$ with one row per channel, $C$ rows, and one column per position, $N = H W$
# columns. The **content** is $F$ itself. The **style** is its Gram matrix
#
# $$S = \frac{1}{C N}\,F F^\top \in \mathbb{R}^{C\times C},\qquad S_{jk} = \frac{1}{CN}\sum_{p} F_{jp}F_{kp},$$
#
# how strongly channels j and k respond together, summed over all positions. Because the positions are
# summed out, rearranging the pixels of an image leaves $S$ unchanged: style says *what* textures and
# colours occur, not *where*. The factor $1/(CN)$ is the scale of Gatys et al.'s style loss (the paper
# cites their Gram matrix without saying how it is normalised; `gram_norm` offers the others).

# %%
from dgnb.methods.pfr import gram_matrix

f = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 1.0]]).view(1, 2, 1, 3)  # C = 2 channels, N = 3 positions
print("F Fᵀ =\n", gram_matrix(f, "none")[0], "\nS = F Fᵀ / (C N) =\n", gram_matrix(f)[0])
rearranged = f[..., torch.tensor([2, 0, 1])]  # the same three pixels in another order
assert torch.allclose(gram_matrix(rearranged), gram_matrix(f))
print("content distance to the rearranged map:", float((f - rearranged).norm()),
      "| style distance:", float((gram_matrix(f) - gram_matrix(rearranged)).norm()))

# %% [markdown]
# The Gram matrix in a few lines of your own (in the student edition, the body is yours to write).

# %%
def style_gram(features):
    """S = F Fᵀ / (C N) for each image of features (B, C, H, W): a (B, C, C) tensor."""
    ### BEGIN SOLUTION: flatten the positions, F = (B, C, N); batch matrix product F Fᵀ; divide by C·N
    b, c, h, w = features.shape
    flat = features.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)
    ### END SOLUTION


probe = torch.rand(2, 8, 6, 10)
assert torch.allclose(style_gram(probe), gram_matrix(probe), atol=1e-6)  # your S is the library's

# %% [markdown]
# ## 2. The PFR objective
# With $C_i^s, C_i^t$ the content and $S_i^s, S_i^t$ the style of a source and a target image at
# stage i, the paper writes (Eq. 2–4)
#
# $$\mathcal{L}_{sty} = \sum_i \big\|S_i^s - S_i^t\big\|_2,\qquad
#   \mathcal{L}_{con} = \sum_i \big\|C_i^s - C_i^t\big\|_2,\qquad
#   \mathcal{L}_{pfr} = \mathcal{L}_{sty} + \mathcal{L}_{con},$$
#
# and trains the segmenter on (Eq. 6)
#
# $$\mathcal{L} = \mathcal{L}_{seg} + \lambda_{adv}\,\mathcal{L}_{adv} + \lambda_{pfr}\,\mathcal{L}_{pfr},
#   \qquad \lambda_{adv} = 0.002,\ \lambda_{pfr} = 0.004,$$
#
# where $\mathcal{L}_{adv}$ is AdaptSegNet's adversarial term on the main output (notebook 05, one
# discriminator). The norms are not squared, as written; a batch pairs source image k with target
# image k and averages over the pairs. The paper leaves open how a content difference is taken between
# maps of different sizes (its GTA5 and Cityscapes inputs differ), whether the stages are weighted,
# and whether one side's features are held fixed: `content_match`, `stage_weights` and `detach`.

# %%
from dgnb.methods.pfr import STAGES, refinement_loss


def pfr_loss(source_stages, target_stages):
    """L_pfr = Σ_i ‖S_i^s − S_i^t‖ + ‖C_i^s − C_i^t‖ over the stages of two dicts {stage: (B, C, H, W)} of equally
    sized maps: image k of the source with image k of the target, each norm averaged over the B pairs,
    S = gram_matrix (the library's)."""
    ### BEGIN SOLUTION: per stage and per pair, the norm of the flattened difference of the Gram matrices and of the maps; mean over pairs, sum over stages
    total = 0.0
    for stage in source_stages:
        f_s, f_t = source_stages[stage], target_stages[stage]
        total = total + (gram_matrix(f_s) - gram_matrix(f_t)).flatten(1).norm(dim=1).mean()
        total = total + (f_s - f_t).flatten(1).norm(dim=1).mean()
    return total
    ### END SOLUTION


widths = dict(zip(STAGES, (16, 32, 64, 128)))  # the course network's stage widths
feats_s = {st: torch.rand(2, c, 12, 24) for st, c in widths.items()}
feats_t = {st: torch.rand(2, c, 12, 24) * 1.5 for st, c in widths.items()}
library, terms = refinement_loss(feats_s, feats_t)
print(f"L_pfr = {library.item():.3f}:", {k: round(v.item(), 3) for k, v in terms.items() if "_" in k})
assert torch.isclose(pfr_loss(feats_s, feats_t), library, rtol=1e-4)  # your L_pfr is the library's

# %% [markdown]
# ## 3. Gram matrices before adaptation
# The source-only model of notebook 05 (it never saw a target image) looks at one source image and one
# target image of another scene, the kind of pair PFR's training draws. Per stage, the Gram matrices
# of both images and their difference.

# %%
from dgnb.analysis import stage_features
from dgnb.viz.pfr import gram_figure

baseline = train(configs["source only"][SEED]).load_method()  # notebook 05's run; the others train in §5
pair = (images[SOURCE][:1], images[TARGET][1:2])  # source val image 0, target val image 1


def pair_grams(method) -> tuple[dict, dict]:
    """{stage: S (C, C)} of the source image and of the target image of `pair`."""
    return tuple({st: gram_matrix(v)[0] for st, v in stage_features(method.model, x).items()} for x in pair)


gram_figure({"source only": pair_grams(baseline)},
            title=f"source-only model: Gram matrices of a {SOURCE} image and a {TARGET} image, per stage")

# %% [markdown]
# Read the bottom row: a red block is a pair of channels that fire together more in the source image,
# a blue one more in the target image, and the relative ‖ΔS‖ in each title says how large the style gap
# is at that stage compared with the Gram matrices themselves.

# %% [markdown]
# ## 4. What the content term asks between unrelated images
# Style ignores where things are; content does not. PFR's pairs are two *unrelated* scenes, so its
# content term compares a road here with a building there. The embedded city can separate the two
# causes of a distance: image k of every domain's val split shows the same street layout (paired
# renders). With the source-only model, per stage: the distances between the same scene in the two
# domains (only the style differs), between two different scenes of the source (only the content
# differs), and between different scenes across the domains (what PFR trains on). The distances are
# shown relative to the size of the maps, ‖a − b‖ / ½(‖a‖ + ‖b‖), so that the stages compare.

# %%
from dgnb.analysis import refinement_distances
from dgnb.viz.pfr import stage_distances_figure

feats = {dom: stage_features(baseline.model, images[dom]) for dom in (SOURCE, TARGET)}
shifted = {dom: {st: v.roll(1, dims=0) for st, v in feats[dom].items()} for dom in feats}  # image k-1 for k
kinds = {"same scene, two domains": refinement_distances(feats[SOURCE], feats[TARGET]),
         f"two scenes, {SOURCE} only": refinement_distances(feats[SOURCE], shifted[SOURCE]),
         "two scenes, two domains (PFR's pairs)": refinement_distances(feats[SOURCE], shifted[TARGET])}
stage_distances_figure(kinds, ("style_rel", "content_rel"),
                       title=f"source-only model, {len(images[SOURCE])} val pairs: what makes the distances large")

# %% [markdown]
# Compare the orange bars (another scene, same domain) with the blue ones (same scene, other domain):
# in the content panel the change of scene costs more than the change of domain, so between unrelated
# images $\mathcal{L}_{con}$ mostly measures the scenes, while in the style panel, which forgets where
# things are, the two are close.

# %% [markdown]
# Maps of different sizes (two datasets' crops) cannot be subtracted position by position; the three
# ways dgnb offers to match them (`content_match`):

# %%
from dgnb.methods.pfr import match_sizes

a, b = torch.rand(1, 16, 24, 48), torch.rand(1, 16, 16, 40)
for mode in ("resize", "crop", "pool"):
    s_, t_ = match_sizes(a, b, mode)
    print(f"{mode:6s}: source {tuple(a.shape[-2:])} -> {tuple(s_.shape[-2:])}, "
          f"target {tuple(b.shape[-2:])} -> {tuple(t_.shape[-2:])}")

# %% [markdown]
# ## 5. Train source only, AdaptSegNet, PFR and PFR without its adversarial term
# Same network, data and schedule for all, for the seeds `SEEDS`. Source only and AdaptSegNet are
# notebook 05's runs, so the run cache already holds them if you ran it. The first time, this cell takes
# three to five minutes per run on 2 CPU cores (`make course` trains them all before a lab); afterwards
# it is instant. The table shows seed `SEED`.

# %%
from dgnb.viz.adaptation import uda_results

runs = {label: {s: train(c) for s, c in by_seed.items()} for label, by_seed in configs.items()}
one = {label: by_seed[SEED] for label, by_seed in runs.items()}
table, bars = uda_results(one, SOURCE, TARGET,
                          title=f"mIoU per domain, adapting {SOURCE} -> {TARGET} ({PRESET}, seed {SEED})")
table

# %%
bars

# %% [markdown]
# Look at the adapted target's group first, then at the others: one seed moves each bar by a point or
# two, so §8 decides which of these differences are real.

# %% [markdown]
# ## 6. The style and content terms during training
# PFR logs each stage's style and content distance at every logging step (`sty_layer1`, …,
# `con_layer4` in the run history): the quantities $\lambda_{pfr}$ multiplies.

# %%
from dgnb.viz.pfr import refinement_history_figure

refinement_history_figure({"PFR": one["PFR"], "PFR without L_adv": one["PFR without L_adv"]},
                          smooth=10 if PRESET != "smoke" else 1)

# %% [markdown]
# Follow one colour (one stage) in each panel: the content distances sit orders of magnitude above the
# style ones, so with α = β = 1 the content term dominates $\mathcal{L}_{pfr}$, and the dashed curves
# show whether the adversarial term changes how far the features align.

# %% [markdown]
# ## 7. Gram matrices after adaptation
# The pair of §3 again, through the source-only model and through PFR.

# %%
methods = {label: r.load_method() for label, r in one.items()}
gram_figure({"source only": pair_grams(methods["source only"]), "PFR": pair_grams(methods["PFR"])},
            title=f"Gram matrices of a {SOURCE} and a {TARGET} image, before (source only) and after PFR")

# %% [markdown]
# Each model and stage has its own colour scale, so read the titles: the maxima say how large each
# model's Gram matrices are, and the relative ‖ΔS‖ how far apart the two images' styles are for that
# size; a smaller ‖ΔS‖ alone can come from smaller features rather than from closer styles.

# %%
after = {label: refinement_distances(*(stage_features(m.model, images[dom]) for dom in (SOURCE, TARGET)))
         for label, m in methods.items()}
stage_distances_figure(after, ("style", "content", "style_rel", "content_rel"),
                       title=f"{len(images[SOURCE])} {SOURCE}/{TARGET} val pairs of the same scene: distances per stage")

# %% [markdown]
# A method aligns the domains when its relative bars (right) drop below source only's; when only its
# absolute bars (left) fall, it has met $\mathcal{L}_{pfr}$ by shrinking its features, which an
# unnormalised distance rewards just as well (docs/pfr.md, 'Shrinking instead of aligning').

# %% [markdown]
# ## 8. What the adversarial term adds, and the comparison over seeds
# Every number so far is one seed. First your runs, paired by seed (`dgnb.analysis.compare_runs`): with
# the one seed of `SEEDS` each difference is a single sample, not an interval, so read it as a hint.

# %%
from dgnb.analysis import bench_records, compare_runs, format_difference, shipped_bench
from dgnb.viz import seed_intervals_figure


def print_differences(records: list[dict], pairs: tuple[tuple[str, str], ...]) -> None:
    """method − reference on the adapted target and on the mean of the targets, paired by seed."""
    for method, reference in pairs:
        d = compare_runs([r for r in records if r["method"] in (method, reference)], reference)[method]
        n = len(d["seeds"])
        print(f"{method:11s} − {reference:17s}: {TARGET} {format_difference(d['targets'][TARGET])}, "
              f"mean target {format_difference(d['mean_target'])}" + (f" ({n} seeds)" if n > 1 else ""))


print_differences(bench_records({label: list(by_seed.values()) for label, by_seed in runs.items()}),
                  (("PFR", "AdaptSegNet"), ("PFR", "PFR without L_adv")))

# %% [markdown]
# The answer to the paper's claim needs more seeds than a lab can train. The repository ships it:
# source only, AdaptSegNet and PFR with their default hyperparameters, five seeds each on this pair
# (`benchmarks/results/bench_uda2_<target>.json`, made by the `dgnb bench` command in the README's
# "Adaptation II" section). Paired by seed, with 95% Student-t intervals: each method against source
# only, and PFR against AdaptSegNet, the paper's claim. (If you changed `HPARAMS`, these are not your
# runs: the shipped file always holds the defaults.)

# %%
LABELS = {"source_only": "source only", "adaptsegnet": "AdaptSegNet", "pfr": "PFR"}
five = [{**r, "method": LABELS[r["method"]]} for r in shipped_bench(f"bench_uda2_{TARGET}.json", list(LABELS))]
print_differences(five, (("PFR", "source only"), ("AdaptSegNet", "source only"), ("PFR", "AdaptSegNet")))
seed_intervals_figure(five, "source only", title=f"target mIoU over five seeds, adapting {SOURCE} -> {TARGET} "
                                                 "(quick preset, the shipped benchmark)")

# %% [markdown]
# Read the right panel first: an interval that crosses the dashed zero line is a difference these seeds
# cannot resolve, whatever the means say; the printed lines give the adapted target alone, where the
# paper's ordering (PFR above AdaptSegNet above source only) should show if it holds here.

# %%
from dgnb.viz.adaptation import adversarial_history_figure

adversarial_history_figure({"AdaptSegNet": one["AdaptSegNet"], "PFR": one["PFR"]},
                           smooth=10 if PRESET != "smoke" else 1)

# %% [markdown]
# PFR's discriminator plays the same game as AdaptSegNet's main one with twice the weight: where its
# source and target curves (middle) stay closer together, the feature terms have already removed part
# of what the discriminator could use.

# %% [markdown]
# ## Exercises
# 1. Section 4 says the content term mostly compares scenes. Set `HPARAMS["content_weight"] = 0.0`
#    (style only) and rerun: does PFR lose anything on the target?
# 2. The paper says it matches the source features *to* the target's. Rerun with
#    `HPARAMS["detach"] = "target"` (the target features receive no gradient from $\mathcal{L}_{pfr}$):
#    do the distances of §6 still fall, and what happens to the target mIoU?
# 3. Use the raw Gram matrix, `HPARAMS["gram_norm"] = "none"`, and rerun: how large is
#    $\lambda_{pfr}\mathcal{L}_{sty}$ now compared with the segmentation loss, and does training survive?
# 4. "Progressive" means every stage. Keep only the low-level stages,
#    `HPARAMS["stage_weights"] = (1.0, 1.0, 0.0, 0.0)`, or only the high-level ones, and rerun: which
#    stages carry the effect at this scale?
# 5. Set `PAIR = "far"` and rerun the notebook: is the style gap of §3 larger on the far target, and
#    does PFR close more of it there?
# 6. Section 7 asks whether PFR aligns the domains or shrinks its features. Rerun with
#    `HPARAMS["distance"] = "mse"` (the mean of squares: its gradient vanishes as the difference does,
#    where the norm's does not) and compare the relative bars of §7 with those of the default run.
# 7. Is the adversarial term worth its cost? Train two more seeds (`SEEDS = [0, 1, 2]`, about half an
#    hour on 2 CPU cores) and read the interval of PFR − PFR without L_adv in §8: is it resolved?
