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
# # 00 · Welcome: the environment, the device, and the embedded city
#
# This course studies **domain generalization** (DG: train on several labelled *source* domains,
# test on domains never seen) and **unsupervised domain adaptation** (UDA: unlabelled images of the
# target are available during training) for semantic segmentation.
#
# Real benchmarks (GTAV, SYNTHIA → Cityscapes, BDD100K, Mapillary) need GPUs and hundreds of GB. So
# every notebook runs by default on an **embedded procedural city**: street scenes labelled in the 19
# Cityscapes classes, rendered in several *domains* that share the same scene content but differ in
# appearance (or, for one control domain, in camera geometry). The same code runs on real data
# converted with `python -m data_tools convert ...` (see the README).
#
# The cell below holds the notebook's parameters: `PRESET = "quick"` is the course default (minutes
# on 2 CPU cores); the tests run every notebook with `"smoke"` (seconds), and so does setting the
# environment variable `DGNB_PRESET=smoke` before starting JupyterLab. Notebooks that train also list
# their seed (`SEED`) and their method's hyperparameters (`HPARAMS`) there: change a value and rerun.

# %% tags=["parameters"]
import os

PRESET = os.environ.get("DGNB_PRESET", "quick")
SEED = 0  # nothing is trained here: the seed of the images drawn below

# %% [markdown]
# ## 1. The environment
# `dgnb` pins `torch` and `torchvision` exactly (see the README for why). The device is chosen
# automatically: CUDA when present, otherwise the CPU. Nothing else in the course needs to change.

# %%
import platform

import torch
import torchvision

import dgnb
from dgnb.engine.train import resolve_amp, resolve_device

device = resolve_device("auto")
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"dgnb {dgnb.__version__}")
print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                             f" ({torch.get_num_threads()} threads)"))
print(f"mixed precision used for training: {resolve_amp('auto', device)}")

# %% [markdown]
# ## 2. The domains
# A domain is a named set of **knobs** (shift axes with severities 0–5). Three *source* domains play
# the role of the synthetic training worlds (like GTAV and SYNTHIA). The targets sit at graded
# distances: *near* (within the sources' range of styles), *far* (unseen textures and hues; fog),
# and a *geometric* control (a source style seen from another camera), which style-based methods
# should not be expected to fix.

# %%
import pandas as pd

from dgnb.config import preset
from dgnb.data.city import DOMAINS, KNOBS

cfg = preset(PRESET)
pd.set_option("display.max_colwidth", 120)
pd.DataFrame([{"domain": d.name, "role": d.role, "knobs": d.knobs, "description": d.description}
              for d in DOMAINS.values()]).set_index("domain")

# %% [markdown]
# ## 3. Generating the data
# The city is generated once into `data/city` (resumable: an interrupted generation continues where
# it stopped). Sources get a train and a val split; targets only a val split, since DG never trains
# on them.

# %%
from dgnb.engine.runs import prepare_data

prepare_data(cfg)
print("data root:", cfg.data.root)

# %% [markdown]
# Every dataset, generated or real, is stored in the same layout
# (`<root>/<domain>/<split>/images|labels/<id>.png`, plus `meta.json`) and read by one `SegFolder`.
# Here is what one source holds: split sizes and the share of pixels of each class.

# %%
from dgnb.data.inspect import describe_dataset

print(describe_dataset(cfg.data.root, cfg.data.sources[0]))

# %% [markdown]
# ## 4. A few images per domain, with their labels overlaid
# Each row is a domain, each column an image of its val split, with the Cityscapes colours of the
# ground truth blended in.

# %%
from dgnb.data.folder import SegFolder
from dgnb.viz import image_grid, overlay

import numpy as np

rows = {}
picks = np.random.default_rng(SEED).choice(len(SegFolder(cfg.data.root, cfg.data.sources[0], "val")), 3, replace=False)
for name in cfg.data.sources + cfg.data.targets:
    ds = SegFolder(cfg.data.root, name, "val")
    rows[f"{name}\n({DOMAINS[name].role})"] = [overlay(ds[int(i)]["image"], ds[int(i)]["label"].numpy(), alpha=0.45)
                                               for i in picks]
fig = image_grid(rows, col_titles=[f"val {i}" for i in picks], legend_classes=[c for c in range(19) if c != 16])
fig

# %% [markdown]
# Each column is the same street in every domain: the label colours (legend below) sit on the same
# pixels in every row except `geometric`, whose camera moved, while the colours and textures beneath
# them change from row to row.

# %% [markdown]
# **Next:** `01_domain_shift` shows how far apart these domains are, trains the ERM baseline on the
# three sources and measures what it loses on each target, and why.

# %% [markdown]
# ## Exercises
# 1. Which class covers the most pixels of a source image (section 3's table)? Which classes are rarer
#    than 1 %? Expect those to be the hardest to segment in every notebook.
# 2. In the grid, which target differs from the sources in colour only, which in texture, which in
#    weather, which in camera? Check your answers against the `knobs` column of the domain table.
# 3. Change `SEED` and rerun the last cell: other images of the val split.
# 4. Print `cfg` for `PRESET = "smoke"` and for `"quick"`: which fields differ, and which of them explain
#    why the smoke preset runs in seconds?
