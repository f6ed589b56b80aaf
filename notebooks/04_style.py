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
# # 04 · Style: IBN-Net, RobustNet's ISW and Style Projected Clustering
#
# *Style Projected Clustering for Domain Generalized Semantic Segmentation* (Huang et al., CVPR 2023)
# starts from an observation the normalization methods before it share: the **style** of an image
# (colour cast, contrast, texture energy, haze) is carried by simple statistics of the network's
# *shallow* features. IBN-Net (ECCV 2018) and RobustNet's instance selective whitening (ISW, CVPR 2021)
# **remove** those statistics; SPC **keeps** them and **projects** an unseen style onto the styles of
# the source domains, then classifies pixels by their distance to per-class, per-domain prototypes
# instead of with a learned linear classifier. The poster reports +3.6 mIoU on average over the best
# earlier method, GTAV + SYNTHIA → Cityscapes, BDD100K, Mapillary.
#
# On the embedded city (quick preset) this notebook
#
# 1. shows where style lives: per-channel statistics of the stem and layer1 features, per domain;
# 2. explains and shows SPC's style projection (before/after maps with the style bases) and its
#    semantic clustering (t-SNE with the semantic bases);
# 3. shows what ISW whitens: covariance matrices, the variance histogram, the selected mask;
# 4. compares ERM, IBN-Net, ISW and SPC per target, and against the severity of single style knobs and
#    a geometric control: which shift each method fixes and which it does not;
# 5. ends with an explorer: an unseen image, its λ over the style bases, its style before and after,
#    and the four methods' predictions.

# %% tags=["parameters"]
import os

PRESET = os.environ.get("DGNB_PRESET", "quick")  # "smoke" runs the notebook in seconds (the tests do)
SEED = 0
HPARAMS = {  # SPC (dgnb.methods.spc.SPC.Hparams); only changed values enter the run's key
    "distance": "was",          # d_m: 'was' (official, 2-Wasserstein) or 'abs' (from-memory code)
    "style_momentum": 0.9,      # γ of the style bases' EMA
    "proto_momentum": 0.999,    # γ_p of the semantic bases' EMA
    "temperature": 0.1,         # τ of L_dis
    "var_weight": 1.0,          # weight of L_var (not given by the paper)
    "dis_weight": 1.0,          # weight of L_dis (not given by the paper)
    "project_stages": "stem,layer1",  # '' turns the style projection off (clustering only)
    "clustering": True,         # False: the plain classifier (style projection only)
}

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from dgnb.analysis import channel_statistics, severity_curves
from dgnb.config import preset
from dgnb.course import style_runs
from dgnb.data.inspect import load_split
from dgnb.engine.runs import prepare_data, train
from dgnb.methods.base import changed_hparams
from dgnb.viz.style import (covariance_figure, sample_embeddings, semantic_tsne_figure, severity_figure,
                            style_distribution_figure, style_explorer, style_map, style_space_figure,
                            variance_histogram_figure)

configs = style_runs(PRESET, SEED)
configs["SPC"] = preset(PRESET, "spc", SEED, hparams=changed_hparams("spc", HPARAMS))
cfg = configs["SPC"]
prepare_data(cfg)
sources, targets = cfg.data.sources, cfg.data.targets
names = sources + targets
roles = {d: "source" if d in sources else "target" for d in names}
n_images = 40 if PRESET != "smoke" else 4


def val_images(domain: str, n: int = n_images) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` val images of `domain`: images (n, 3, H, W) in [0, 1] and labels (n, H, W)."""
    return load_split(cfg.data.root, domain, "val", n)


images, labels = {}, {}
for d in names:
    images[d], labels[d] = val_images(d)
print("sources:", sources, "| unseen targets:", targets)

# %% [markdown]
# ## 1. Why style lives in shallow-feature statistics
# Take the feature map $x \in \mathbb{R}^{C\times H\times W}$ of an early stage and, per channel, its
# spatial mean and standard deviation,
#
# $$\mu_c = \frac{1}{HW}\sum_{h,w} x_{c,h,w},\qquad \sigma_c = \sqrt{\operatorname{Var}_{h,w}(x_c) + \epsilon}.$$
#
# An early channel responds to a colour or an edge orientation; over a whole image, how strongly it
# responds on average (μ) and how much that varies (σ) follow the colour balance, contrast and texture
# energy, while *where* it responds follows the content. Style transfer (AdaIN) changes an image's style
# by replacing these two numbers per channel. So a network can be made less sensitive to style by
# acting on them:
#
# - **IN / IBN-Net** normalizes them away: $(x - \mu)/\sigma$, in part of the channels (IBN-a) or after
#   the stem and the first two stages (IBN-b); content that happened to be coded in μ, σ goes too;
# - **ISW** (RobustNet) also standardizes, and in addition decorrelates the channel pairs whose
#   covariance moves when the image is photometrically changed: the second-order style;
# - **SPC** keeps the statistics but replaces them with a mix of the source domains' statistics,
#   $\sigma' (x-\mu)/\sigma + \mu'$: an unseen style is pulled into the span of known ones.
#
# First, the four runs (cached after the first time; about 2–4 minutes each on 2 CPU cores).

# %%
runs = {label: train(c) for label, c in configs.items()}
methods = {label: r.load_method() for label, r in runs.items()}
rows = {label: {"source val": r.metrics["source_val_miou"], **r.metrics["target_miou"],
                "mean target": r.metrics["mean_target_miou"], "train s": r.metrics["train_seconds"]}
        for label, r in runs.items()}
results = pd.DataFrame(rows).T
results

# %% [markdown]
# All three style methods gain on `near`, `far_texture` and `far_fog` and none on `geometric`. One seed,
# one number per cell: differences of a point or two are within the seed-to-seed spread
# (notebook 02 measures it; `dgnb bench --methods erm,ibn,isw,spc --seeds 0 1 2 3 4` gives intervals).
# Read the `geometric` column as the control: its shift is the camera, not the style.

# %% [markdown]
# ## 2. Style distributions per domain
# The ERM network's stem and layer1 features, on 40 val images of every domain. For the four channels
# whose mean differs most between domains, the distribution over images of μ_c and σ_c:

# %%
erm = methods["ERM"]
stats = {stage: {d: channel_statistics(erm.model, images[d], stage) for d in names} for stage in ("stem", "layer1")}
style_distribution_figure(stats, channels=4)

# %% [markdown]
# Each domain occupies its own band of μ and σ on these channels, and the unseen domains often fall
# outside the three sources' bands: a few statistics per channel identify the domain.

# %% [markdown]
# The same statistics averaged over channels, as densities (what a global brightness/contrast change moves):

# %%
style_distribution_figure(stats, kind="kde")

# %% [markdown]
# Averaged over channels, several domains overlap (near with source_c, far_texture with source_a):
# style is spread over channels, so the methods act on every channel's μ and σ, not on a global scalar.

# %% [markdown]
# ## 3. SPC, part 1: style projection
# After the stem and after layer1, SPC compares the image's statistics with $M$ **style bases**
# $(p^\mu_m, p^\sigma_m)$, one per source domain, and replaces them with a weighted mix of the bases
# (poster, "Style projection"):
#
# $$d_m = \lVert\mu - p^\mu_m\rVert_2^2 + \lVert\sigma - p^\sigma_m\rVert_2^2,\qquad
#   \lambda_m = \frac{\exp\big(1/(1+d_m)\big)}{\sum_{m'}\exp\big(1/(1+d_{m'})\big)},$$
# $$\mu' = \sum_m \lambda_m p^\mu_m,\qquad \sigma' = \sum_m \lambda_m p^\sigma_m,\qquad
#   F^r = \sigma'\,\frac{x-\mu}{\sigma} + \mu'.$$
#
# $d_m$ is the squared 2-Wasserstein distance between the per-channel Gaussians
# $\mathcal N(\mu_c, \sigma_c^2)$ and $\mathcal N(p^\mu_{m,c}, (p^\sigma_{m,c})^2)$ (the official code
# averages it over channels). The bases are not learned by gradient: after each training iteration
# base $m$ moves toward the mean statistics of domain $m$'s images in the batch, $p_m \leftarrow
# 0.9\,p_m + 0.1\,\bar{(\cdot)}$. The decoder's low-level skip is taken from layer1 *before* the second
# projection, as in the official network. Because $\sum_m\lambda_m = 1$ and $\lambda_m > 0$, the
# projected statistics always lie in the convex hull of the bases:

# %%
spc = methods["SPC"]
read = {d: spc.style_readout(images[d]) for d in names}
for stage in ("stem", "layer1"):
    print(f"{stage}: d of the first two {targets[0]} images", read[targets[0]][f"{stage}.d"][:2].numpy().round(3).tolist(),
          "-> λ", read[targets[0]][f"{stage}.lambda"][:2].numpy().round(3).tolist())
lam = read[targets[0]]["stem.lambda"]
base_mu, base_sigma = spc.style_bases["stem"]
mu_p = read[targets[0]]["stem.mu_proj"]
inside = ((mu_p >= base_mu.min(0).values.cpu() - 1e-5) & (mu_p <= base_mu.max(0).values.cpu() + 1e-5)).all()
assert torch.allclose(lam.sum(1), torch.ones(len(lam))) and bool(inside)

# %% [markdown]
# The weights are flat at the stem and uniform at layer1: $1/(1+d)$ lies in (0, 1], so a softmax over
# three such numbers can give one base at most $e/(e+2) \approx 0.58$; and layer1 sees the output of
# the stem's projection, whose styles are already nearly alike (d ≈ 0.01). Every style is pulled toward
# the *middle* of the sources' styles, not onto one of them.

# %% [markdown]
# The per-image style vectors $[\mu, \sigma]$ reduced to two dimensions, coloured by domain (circles:
# sources, crosses: unseen targets), the style bases as stars; left before, right after the projection.
# PCA is fitted on the unprojected vectors and the bases, so both panels share the same axes.

# %%
def style_vectors(stage: str, after: bool) -> dict[str, np.ndarray]:
    key = ("mu_proj", "sigma_proj") if after else ("mu", "sigma")
    return {d: torch.cat([read[d][f"{stage}.{key[0]}"], read[d][f"{stage}.{key[1]}"]], 1).numpy() for d in names}


def bases_of(stage: str) -> np.ndarray:
    mu, sigma = spc.style_bases[stage]
    return torch.cat([mu, sigma], 1).cpu().numpy()


maps = {f"{stage} (PCA)": style_map(style_vectors(stage, False), style_vectors(stage, True), bases_of(stage), "pca")
        for stage in ("stem", "layer1")}
style_space_figure(maps, roles)

# %% [markdown]
# Before the projection the domains form separate clouds and the unseen ones lie away from the stars;
# after it every image, source or unseen, sits at nearly the same point inside the triangle of the
# bases: with flat λ the projection replaces each style by close to the mean of the source styles.

# %% [markdown]
# The same with t-SNE (a non-linear map: distances are only meaningful locally):

# %%
tsne_maps = {f"{stage} (t-SNE)": style_map(style_vectors(stage, False), style_vectors(stage, True), bases_of(stage),
                                           "tsne") for stage in ("stem", "layer1")}
style_space_figure(tsne_maps, roles)

# %% [markdown]
# t-SNE separates the domains before the projection; after it, the remaining differences between
# projected styles are tiny (t-SNE magnifies them into a thin curve) and the domains overlap along it.

# %% [markdown]
# ## 4. SPC, part 2: semantic clustering
# The decoder's last feature map goes through a projection head (1×1 conv, ReLU, 1×1 conv); each pixel
# becomes a unit vector $e$ (ℓ2-norm, LayerNorm, ℓ2-norm). There is no linear classifier: each class
# $c$ has one **semantic base** $P_{c,m}$ per source domain, and the class score is the best cosine,
# $s_c = \max_m \langle e, P_{c,m}\rangle$, layer-normalized over classes. Three losses (poster):
#
# $$\mathcal L_{CE} = -\tfrac{1}{HW}\textstyle\sum_p \log v(y_p\mid e_p),\qquad
#   \mathcal L_{var} = \tfrac{1}{MC}\textstyle\sum_{m,c}\operatorname{mean}_{p\in(m,c)}\big(1 - \langle e_p, P_{c,m}\rangle\big)^2,$$
# $$\mathcal L_{dis} = \tfrac{1}{MC}\textstyle\sum_{m,c} -\log\frac{\exp(\langle\bar e^c_m, p_{c+}\rangle/\tau)}
#   {\exp(\langle\bar e^c_m, p_{c+}\rangle/\tau) + \sum_{p_{c-}}\exp(\langle\bar e^c_m, p_{c-}\rangle/\tau)},$$
#
# with $\bar e^c_m$ the normalized mean embedding of class $c$ in domain $m$, $p_{c+}$ its class's bases
# (their mean similarity) and $p_{c-}$ all bases of other classes, τ = 0.1. $\mathcal L_{var}$ pulls
# pixels onto their base (compactness), $\mathcal L_{dis}$ pushes class means away from other classes'
# bases. The bases follow the class means without gradient: $P_{c,m} \leftarrow
# \operatorname{norm}(0.999\,P_{c,m} + 0.001\,\bar e^c_m)$. The poster gives no loss weights; the
# author's from-memory code adds the three terms, so `var_weight = dis_weight = 1`.

# %%
emb, cls, dom = sample_embeddings(spc, images, labels, per_class=20 if PRESET != "smoke" else 5)
print(f"{len(emb)} pixel embeddings of dimension {emb.shape[1]}; semantic bases {tuple(spc.semantic_bases.shape)} "
      "(classes x source domains x D)")
semantic_tsne_figure(emb, cls, dom, spc.semantic_bases.cpu())

# %% [markdown]
# Pixels cluster by class around their class's squares, and in the right panel each class cluster mixes
# the domains, sources and unseen ones: the clustering is by meaning, not by style.

# %% [markdown]
# ## 5. ISW: which covariances are style
# ISW standardizes the stem, layer1 and layer2 maps ($Z = (x-\mu)/\sigma$) and looks at each image's
# channel covariance $\Sigma = ZZ^\top/(HW-1)$. After a warm-up, it feeds pairs (image, photometrically
# changed image) and measures, per channel pair, how much $\Sigma_{ij}$ moves (the variance over the
# pair, averaged over images). A 1-D k-means with 3 clusters separates the pairs that barely move
# (content) from those that do (style); only the latter are whitened:
# $\mathcal L_{ISW} = \frac1B\sum_b \sum_{(i,j)\in S}|\Sigma_b[i,j]|/|S|$, weight 0.6. The mask $S$ is
# intersected over 10 trials and then fixed.

# %%
isw = methods["ISW"]
pair = {d: isw.covariances(images[d][:1]) for d in (sources[0], "far_fog" if "far_fog" in targets else targets[0])}
stage = "layer1"
covariance_figure({f"{d} ({stage})": pair[d][stage][0] for d in pair}, isw.masks()[stage].cpu())

# %% [markdown]
# After standardization the diagonal is 1 in both images, but the off-diagonal pattern differs between
# the source and the unseen image; the mask (black) marks the few pairs ISW drives toward zero.

# %%
holder = isw.whitening[stage]
variance_histogram_figure(holder.variance.cpu(), holder.centres.cpu(), holder.mask.cpu(), stage)

# %% [markdown]
# Most channel pairs have tiny variance under a photometric change; the k-means boundaries (dashed)
# separate the tail, and only pairs in the upper clusters of every trial end in the mask (red).

# %% [markdown]
# ## 6. Which shift each method fixes
# The mIoU of every method on renders of `source_a` with one knob turned up (severity 0 = the source
# itself), for five style knobs and one geometric one (the camera height: layout, not appearance).

# %%
knobs = ["hue", "cast", "contrast", "fog", "texture", "camera_height"]
n_sweep = 16 if PRESET != "smoke" else 2
sizes = tuple(images[sources[0]].shape[-2:])
curves = severity_curves(methods, "source_a", knobs, n=n_sweep, size=sizes)
severity_figure(curves, geometric=["camera_height"])

# %% [markdown]
# All three style methods flatten the contrast and cast curves and halve the fog loss, none of them
# fixes a large hue rotation, texture hardly matters to any, and the camera-height curves coincide: a
# change of layout is not in the statistics these methods act on.

# %%
drop = pd.DataFrame({knob: {m: per[0] - per[max(per)] for m, per in curves[knob].items()} for knob in knobs})
drop.round(1)  # mIoU lost from severity 0 to 5, per method and knob (lower is more robust)

# %% [markdown]
# ## 7. Single source: more style bases than domains
# With one source (`--sources source_a`) one base per domain would project every image onto the same
# style. The released single-source SPC model has 10 style bases, but **how the paper built them is not
# public** (the training code was never released). dgnb's construction: the first `kmeans_images`
# training images' statistics are clustered by k-means into `kmeans_bases` bases (the projection is off
# until then), and afterwards each image updates its nearest base; asking for per-domain bases with one
# source is an error that names this fix.

# %%
single = preset(PRESET, "spc", SEED, **{"data.sources": ["source_a"]})
from dgnb.methods import build_method

probe = build_method("spc", single.model, single.optim, 1, single.hparams)
print("base source:", probe.base_source, "| style bases per stage:", probe.projections["stem"].num_bases,
      "| semantic bases:", tuple(probe.semantic_bases.shape))
try:
    build_method("spc", single.model, single.optim, 1, {"style_base_source": "domains"})
except ValueError as e:
    print("error:", str(e)[:160], "...")

# %% [markdown]
# ## 8. Explorer
# Choose an unseen-domain image: SPC's λ over its style bases at the stem, the image's style vector on
# the PCA map of §3 before (circle) and after (diamond) the projection, and the four predictions.

# %%
plane = style_map(style_vectors("stem", False), None, bases_of("stem"), "pca")
style_explorer(methods, spc, {d: images[d] for d in targets}, {d: labels[d] for d in targets}, plane)

# %% [markdown]
# Move through `far_fog` images: λ barely changes from image to image, the arrow always ends near the
# middle of the stars, and the four predictions differ most on the distant, hazy part of the street.

# %% [markdown]
# ## Exercises
# **From the figures**
#
# 1. In §2, which target lies furthest from the sources' bands at the stem? Is it the target on which
#    ERM loses most in the table of §1?
# 2. In §3, λ is nearly uniform. Compute by hand the largest possible λ_m for M = 3 bases when one
#    distance is 0 and the others are very large. What does that bound say about how far the projection
#    can move a style toward one base?
# 3. In §6, on which knob does IBN-Net help most relative to ERM, and on which does ISW? Why should the
#    `camera_height` curves look alike for all four methods?
#
# **Change and rerun**
#
# 4. Set `HPARAMS["distance"] = "abs"` (the from-memory code's distance) and rerun §1–§3: do the
#    projected styles still fill the triangle of the bases?
# 5. Set `HPARAMS["project_stages"] = ""` (clustering only) and then `HPARAMS["clustering"] = False`
#    (projection only) and rerun the table of §1: which half of SPC carries its gain on the targets here?
# 6. Set `HPARAMS["var_weight"] = 0` and `HPARAMS["dis_weight"] = 0` and rerun §4: do the class clusters
#    still form around the semantic bases?
# 7. Train the single-source variant of §7 (`train(single)`) and compare its targets with an ERM run
#    on `source_a` alone (`preset(PRESET, "erm", SEED, **{"data.sources": ["source_a"]})`).
