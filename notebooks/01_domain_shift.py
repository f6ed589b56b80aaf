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
# # 01 · Domain shift: what it is, how big it is, and what it breaks
#
# A segmentation network trained on some domains is tested on another. If the test images come
# from the same distribution as the training images, the held-out score is a fair estimate. Under
# **domain shift** (other textures, colours, weather, camera) it is not: the network has learned
# cues that do not transfer. This notebook
#
# 1. renders one scene in every domain (*paired renders*) and sweeps one shift knob;
# 2. measures the *style* of each domain the way instance-normalization methods see it: channel
#    means and standard deviations of shallow features;
# 3. trains the **ERM** baseline (empirical risk minimization on the aggregated sources: plain
#    cross-entropy over mixed-domain batches) and evaluates it on every domain and class;
# 4. plots mIoU against the severity of a knob, and explains what fails and why;
# 5. ends with an explorer to try any domain, image and severity.

# %% tags=["parameters"]
import os

PRESET = os.environ.get("DGNB_PRESET", "quick")  # "smoke" runs the notebook in seconds (the tests do)
SEED = 0
HPARAMS = {"aux_weight": 0.4}  # ERM's one hyperparameter (the weight of an auxiliary head's loss; the course's
                               # model has no auxiliary head, so it changes nothing here: see the exercises)

# %%
import numpy as np
import torch

from dgnb.config import preset
from dgnb.data.city import DOMAINS, KNOBS, render
from dgnb.engine.runs import prepare_data, train
from dgnb.methods.base import changed_hparams
from dgnb.viz import domains_figure, knob_sweep_figure

cfg = preset(PRESET, "erm", SEED, hparams=changed_hparams("erm", HPARAMS))
size = tuple(cfg.data.city["size"])
prepare_data(cfg)

# %% [markdown]
# ## 1. Paired renders: one layout, every domain
# The city separates *content* (a street layout drawn through a pinhole camera: it fixes the label
# map and the depth) from *appearance* (a domain's style). Each column below is one layout; each row
# renders it in one domain. Except for the geometric control, the label map is identical in every
# row: whatever differs between rows is pure appearance shift.

# %%
names = cfg.data.sources + cfg.data.targets
domains_figure(names, indices=(0, 1, 2), size=size)

# %% [markdown]
# Read each column top to bottom: the buildings, cars and road stay where they are while colours,
# textures and fog change, except in the `geometric` row, where the camera itself moved.

# %% [markdown]
# ## 2. One knob through its severities
# A knob is one axis of shift with severities 0–5. `fog` applies Koschmieder's law with the
# rendered depth Z: the observed colour is $I = J\,t + A\,(1 - t)$ with transmission
# $t = e^{-\beta Z}$, so far objects fade first. Try another knob: any name from `KNOBS`.

# %%
print({k: v.description for k, v in KNOBS.items()})
knob_sweep_figure("source_a", "fog", index=1, size=size)

# %% [markdown]
# From left to right the distant end of the street disappears first and the nearby road and cars
# last: fog removes contrast in proportion to depth, not uniformly.

# %% [markdown]
# A new domain is one line: a name, a description and knob severities.

# %%
from dgnb.data.city import Domain

dusk = Domain("dusk", "dim, warm light with a little haze", knobs={"brightness": -2, "cast": 2, "fog": 1})
from dgnb.viz import image_grid

image_grid({"source_a": [render("source_a", "val", i, size=size).image for i in range(3)],
            "dusk": [render(dusk, "val", i, size=size).image for i in range(3)]})

# %% [markdown]
# The same three layouts, darker, warmer and slightly hazy: a domain is only a change of appearance
# settings, the content generator is shared.

# %% [markdown]
# ## 3. Train the ERM baseline on the three sources
# `train(cfg)` returns a cached run when one with the same configuration (and library code) exists,
# so rerunning this cell is instant; `force=True` retrains. On 2 CPU cores the quick preset takes
# about three minutes.

# %%
run = train(cfg)
method = run.load_method()
m = run.metrics
print(f"trained in {m['train_seconds']} s; source val mIoU {m['source_val_miou']:.1f}")

# %% [markdown]
# What happened during training: the cross-entropy over iterations (faint: every logged value; solid:
# a running mean) and the mIoU on held-out *source* images at each evaluation point.

# %%
from dgnb.viz import plot_history

plot_history(run, smooth=5)

# %% [markdown]
# The loss falls fast at first and then slowly, and the source validation mIoU rises with it: the
# network fits the sources. Nothing here says how it does on the targets; that is the next question.

# %% [markdown]
# ## 4. Style statistics: what an instance-normalization layer would remove
# For every image we take the feature map of the network's first stage (`stem`) and compute, per
# channel, its spatial mean μ and standard deviation σ. These statistics carry style (colour,
# contrast, texture energy) rather than content; IBN-Net and RobustNet normalise them away.
# Domains whose points separate here are distinguishable by style alone.

# %%
from dgnb.analysis import image_tensor, style_statistics
from dgnb.viz import style_scatter

n_style = 24 if PRESET != "smoke" else 6
images = {d: image_tensor([render(d, "val", i, size=size).image for i in range(n_style)]) for d in names}
stats = style_statistics(method.model, images, stage="stem")
style_scatter(stats)

# %% [markdown]
# Where a domain forms its own cloud, the style of an image alone tells its domain, before any
# semantics; a target whose cloud sits far from all three sources' is one to expect a large drop on.

# %% [markdown]
# ## 5. How much does ERM lose on each domain?
# mIoU over the classes present (the city has no trains). Source val is measured on held-out source
# images; each target on its val split.

# %%
from dgnb.viz import domain_bars, per_class_heatmap

per_domain = {**m["source_domain_miou"], **m["target_miou"]}
roles = {d: DOMAINS[d].role for d in per_domain}
domain_bars({"ERM": per_domain}, roles, title=f"ERM ({PRESET} preset, seed {SEED})")

# %% [markdown]
# Compare every target's bar with the source bars: the gap is what the domain shift costs, smaller on
# `near` and `geometric`, largest on the two far targets.

# %%
per_class_heatmap(m["per_class_iou"])

# %% [markdown]
# Rows are domains, columns classes: look for columns that stay green in every row (classes that
# survive the shift) and for cells that turn red only in some target rows (what that shift breaks).

# %% [markdown]
# ## 6. Predictions on each target
# Columns: image, ground truth, ERM prediction; one row per domain.

# %%
from dgnb.analysis import predict_labels
from dgnb.viz import overlay

rows = {}
for d in [cfg.data.sources[0]] + cfg.data.targets:
    r = render(d, "val", 4, size=size)
    pred = predict_labels(method, image_tensor([r.image]))[0].numpy()
    rows[d] = [r.image, overlay(r.image, r.label), overlay(r.image, pred)]
present = [c for c in range(19) if c != 16]  # the city has no trains
image_grid(rows, col_titles=["image", "ground truth", "ERM prediction"], legend_classes=present)

# %% [markdown]
# On the source row the prediction looks like the ground truth; on the targets, look for classes
# painted with another class's colour (the legend gives the colours): those are the confusions the
# heat map counted.

# %% [markdown]
# ## 7. mIoU against the severity of one knob
# The same 24 layouts of a source domain, rendered with the knob at each severity. Fog removes
# contrast with depth; `hue` rotates every colour; `texture` swaps each class's surface pattern
# for an unseen family (stripes, waves, speckle...) while keeping its colour.

# %%
from dgnb.analysis import severity_sweep
from dgnb.viz import curve

n_sweep = 24 if PRESET != "smoke" else 4
sweeps = {k: severity_sweep(method, "source_a", k, n=n_sweep, size=size) for k in ("fog", "texture", "hue")}
curve(list(range(6)), {k: list(v.values()) for k, v in sweeps.items()}, xlabel="severity",
      title="ERM on source_a with one knob turned up")

# %% [markdown]
# The slope of each curve is the model's sensitivity to that knob: a flat curve is a shift the model
# ignores, a steep one a cue it relies on.

# %% [markdown]
# ## 8. What fails, and why
# Read the heat map and the overlays together:
#
# - **Large, textured "stuff" classes survive a style change** (road, sky, vegetation), because
#   their position and shape say as much as their colour.
# - **Colour, not texture, is what this ERM model leans on.** In the severity curves the `texture`
#   knob alone barely moves mIoU, while a hue rotation costs a lot: the small network learned class
#   colours (around the shared palette) and shapes, and treats surface patterns as noise. So the
#   drop on `far_texture` comes mostly from its hue rotation and per-class palette change: classes
#   whose colours move towards another class's (buildings, walls, fences, signs) collapse. A hue
#   rotation mixes the colour channels: a second-order (covariance) shift that per-channel
#   normalization alone does not undo.
# - **Under fog**, transmission falls with depth: near objects stay, far ones fade into the airlight
#   and small far classes (poles, signs, lights) disappear first. Contrast, not colour, is lost.
# - **The geometric control** keeps the sources' style but moves the camera up and tilts it: object
#   scale, the horizon and the road's perspective change. Nothing about style explains that drop, so
#   no style method should be expected to fix it.
# - **Near** is a new mixture of the sources' own styles: a smaller drop, the case where DG methods
#   that interpolate or project styles are designed to help.
#
# The next notebooks try to recover these drops with memory, style projection, whitening and
# adaptation.

# %% [markdown]
# ## 9. Explorer
# Choose a domain, an image and a knob's severity; the image is rendered on the fly and segmented by
# the trained ERM model.

# %%
from dgnb.viz.explorers import shift_explorer

shift_explorer(method, names, ["fog", "night", "texture", "hue", "contrast", "blur", "noise", "camera_height"],
               size=size)

# %% [markdown]
# Move the severity slider with a knob selected and watch the prediction (right) degrade while the
# ground truth (middle) stays the same; the legend lists the classes in view.

# %% [markdown]
# ## Exercises
# **From the figures**
#
# 1. In the style scatter (§4), which target's cloud overlaps the sources most? Is it the target with
#    the smallest drop in §5?
# 2. In the per-class heat map, which three classes lose the most IoU on `far_texture`? Find one of
#    them in the prediction grid (§6): what is it predicted as instead?
# 3. In §7, which knob costs the most at severity 5? Which one is nearly flat, and why can the model
#    afford to ignore it?
# 4. In the explorer, find the lowest `fog` severity at which poles and traffic signs vanish from the
#    prediction of a source image.
#
# **Change and rerun**
#
# 5. Add a knob to the sweep of §7 (`"night"`, `"contrast"` or `"blur"`) and rank all knobs by the mIoU
#    they cost at severity 5.
# 6. Train ERM with photometric augmentation, the simplest DG baseline:
#    `cfg = preset(PRESET, "erm", SEED, **{"data.color_jitter": 0.4})`, then rerun §3 to §7. Which
#    targets improve, and does the `texture` curve move?
# 7. Train on two sources only (`**{"data.sources": ["source_a", "source_b"]}`) and compare the drop on
#    `near`: how much does the third source's style contribute?
# 8. `HPARAMS["aux_weight"]` only matters with an auxiliary head: build the model with one
#    (`**{"model.aux": True}`) and compare the training curves with and without it.
