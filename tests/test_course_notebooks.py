"""The course's teaching tools: paired intervals, training curves, meta-learning figures, memory
snapshots kept with a run, and the explorers' callbacks (a control moved -> a new picture)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from dgnb.analysis import paired_difference
from dgnb.engine.runs import SNAPSHOTS, train
from dgnb.methods import OptimConfig, build_method
from dgnb.methods.base import changed_hparams
from dgnb.models import ModelConfig
from tests.conftest import toy_config

MODEL = ModelConfig(head_channels=16, decoder_channels=16, low_proj=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# ----- paired differences -------------------------------------------------------------------------
def test_paired_difference_is_a_student_t_interval():
    from scipy import stats

    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        a, b = rng.normal(30, 2, n), rng.normal(29, 2, n)
        res = paired_difference(a, b)
        d = a - b
        half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        assert {"mean", "half_width", "low", "high", "n", "excludes_zero"} <= set(res)
        assert res["n"] == n and res["mean"] == pytest.approx(d.mean())
        assert res["half_width"] == pytest.approx(half, rel=1e-9)
        assert res["low"] == pytest.approx(d.mean() - half) and res["high"] == pytest.approx(d.mean() + half)
        assert res["excludes_zero"] == (res["low"] > 0 or res["high"] < 0)
    assert paired_difference([33.0, 34.0, 35.0], [31.0, 31.5, 32.0], confidence=0.9)["excludes_zero"]
    assert paired_difference([3.0, 4.0, 5.0], [1.0, 1.0, 1.0], 0.99)["half_width"] == pytest.approx(
        stats.t.ppf(0.995, 2) * 1.0 / math.sqrt(3))
    one = paired_difference([2.0], [1.0])
    assert one["mean"] == 1.0 and not math.isfinite(one["half_width"]) and not one["excludes_zero"]
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_changed_hparams_keeps_the_run_key_of_the_defaults():
    from dgnb.config import preset
    from dgnb.engine.runs import run_key

    full = {"inner_lr_ratio": 0.25, "meta_weight": 1.0, "first_order": True}
    assert changed_hparams("mldg", full) == {}
    assert changed_hparams("mldg", {**full, "first_order": False}) == {"first_order": False}
    assert run_key(preset("smoke", "mldg", 0, hparams=changed_hparams("mldg", full))) == run_key(preset("smoke", "mldg", 0))
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        changed_hparams("mldg", {"beta": 1.0})


# ----- training curves and per-target intervals ---------------------------------------------------
def test_plot_history_and_target_points():
    from dgnb.viz import plot_history, results_over_seeds, target_points_figure

    hist = [{"iteration": i, "loss": 3 - 0.1 * i, "seg": 3 - 0.1 * i, "coh": 1.5} for i in range(1, 11)]
    hist += [{"iteration": 5, "val_miou": 10.0}, {"iteration": 10, "val_miou": 20.0}]
    fig = plot_history(hist)
    loss_ax, val_ax = fig.axes
    assert isinstance(fig, Figure)
    assert [line.get_label() for line in loss_ax.lines] == ["loss", "coh"]  # seg = loss: drawn once
    assert list(val_ax.lines[0].get_ydata()) == [10.0, 20.0]
    fig = plot_history({"a": hist, "b": hist}, terms=["loss"], smooth=3)
    assert {line.get_label() for line in fig.axes[0].lines} >= {"a", "b"} and len(fig.axes[1].lines) == 2

    class FakeRun:
        def __init__(self, values):
            self.metrics = {"target_miou": values}

    runs = {"ERM": [FakeRun({"near": 30.0, "far": 20.0}), FakeRun({"near": 31.0, "far": 22.0})],
            "MLDG": [FakeRun({"near": 33.0, "far": 21.0}), FakeRun({"near": 34.5, "far": 22.5})]}
    results = results_over_seeds(runs)
    assert results == {"ERM": {"near": [30.0, 31.0], "far": [20.0, 22.0]},
                       "MLDG": {"near": [33.0, 34.5], "far": [21.0, 22.5]}}
    fig = target_points_figure(results, baseline="ERM")
    assert len(fig.axes) == 2
    ax = fig.axes[1]  # the paired differences: one errorbar per target, centred on the mean difference
    centres = sorted(float(c.lines[0].get_ydata()[0]) for c in ax.containers)
    assert centres == pytest.approx(sorted([3.25, 0.75]))
    assert len(target_points_figure({"ERM": {"near": [30.0]}}).axes) == 1  # one seed: points, no bars


# ----- meta-learning figures ------------------------------------------------------------------------
def test_meta_learning_figures():
    from dgnb.methods import meta
    from dgnb.viz import episode_figure, gradient_parts_figure, meta_gradient_figure

    batch = {"image": torch.rand(6, 3, 16, 24), "label": torch.zeros(6, 16, 24, dtype=torch.long),
             "domain": torch.tensor([0, 0, 1, 1, 2, 2])}
    torch.manual_seed(0)
    fig = episode_figure(batch, [meta.split_episode(batch) for _ in range(3)], ["a", "b", "c"])
    assert isinstance(fig, Figure) and len(fig.axes) == 18
    h = torch.tensor([1.0, 10.0], dtype=torch.float64)
    fig = meta_gradient_figure(lambda w: 0.5 * (h * w**2).sum(), lambda w: 0.5 * ((w - 1) ** 2).sum(), [1.0, 1.0], 0.05)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    grads = {"w.a": torch.ones(3), "w.b": torch.ones(2), "v.c": -torch.ones(4)}
    fig = gradient_parts_figure({"g1": grads, "g2": {k: v.clone() for k, v in grads.items()}}, depth=1)
    cos = fig.axes[1].lines[0].get_ydata()
    assert np.allclose(cos, [1.0, 1.0])  # two identical parts: cosine 1 in every group


# ----- memory snapshots over training --------------------------------------------------------------------
def test_pinthemem_keeps_memory_snapshots_and_resumes_them(toy_root, tmp_path):
    cfg = toy_config(toy_root, iterations=10, method="pinthemem")
    run = train(cfg, root=tmp_path / "a", progress=False)
    snaps = run.snapshots
    assert (run.dir / SNAPSHOTS).is_file() and [s["iteration"] for s in snaps["snapshots"]] == [5, 10]
    probe = snaps["probe"]
    assert probe["domain"] == ["a", "b", "c"] and probe["image"].dtype == torch.uint8
    assert probe["image"].shape == (3, 3, 32, 64) and probe["label"].shape == (3, 32, 64)
    last = snaps["snapshots"][-1]
    method = run.load_method("cpu")
    assert torch.allclose(last["memory"], method.memory)  # the last snapshot is the trained memory
    assert last["read_weights"].shape == (3, 19, 4, 8)
    assert torch.allclose(last["read_weights"].float().sum(1), torch.ones(3, 4, 8), atol=1e-2)
    assert not torch.allclose(snaps["snapshots"][0]["memory"], last["memory"])
    # interrupted after the first snapshot, then resumed: the same snapshots, the same memory
    part = train(cfg, root=tmp_path / "b", progress=False, stop_at=7)
    assert [s["iteration"] for s in part.snapshots["snapshots"]] == [5]
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    assert [s["iteration"] for s in resumed.snapshots["snapshots"]] == [5, 10]
    for s, r in zip(snaps["snapshots"], resumed.snapshots["snapshots"]):
        assert torch.equal(s["memory"], r["memory"]) and torch.equal(s["read_weights"], r["read_weights"])
    # methods that keep nothing write no file
    erm = train(toy_config(toy_root, iterations=5), root=tmp_path / "c", progress=False)
    assert erm.snapshots is None and not (erm.dir / SNAPSHOTS).exists()


def test_memory_over_training_figures(toy_root, tmp_path):
    from dgnb.viz import memory_over_training_figure, slot_separation

    run = train(toy_config(toy_root, iterations=10, method="pinthemem"), root=tmp_path, progress=False)
    fig = memory_over_training_figure(run.snapshots, probe_index=2, slots=[0, 10, 13])
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4 + 1  # 2 snapshots x (gt + 3 slots), colour bar
    sep = slot_separation(run.snapshots, classes=[0, 10, 13])
    assert list(sep) == [5, 10] and all(0 <= v <= 1 for v in sep.values())


# ----- explorers: moving a control draws a new picture ------------------------------------------------------
def _tiny(name: str):
    torch.manual_seed(0)
    return build_method(name, MODEL, OptimConfig(lr=0.02, iterations=10), 2, {}).setup(torch.device("cpu")).eval()


def _changes(widget, control: str, value) -> bool:
    before = widget.image.value
    widget.controls[control].value = value
    return widget.image.value != before and len(widget.image.value) > 0


def test_shift_explorer_callbacks():
    from dgnb.viz.explorers import shift_explorer

    w = shift_explorer(_tiny("erm"), ["source_a", "near"], ["fog", "hue"], size=(32, 64))
    assert w.image.value[:4] == b"\x89PNG"
    w.controls["knob"].value = "fog"  # severity 0: no fog yet
    assert _changes(w, "severity", 5)
    assert _changes(w, "knob", "hue")
    assert _changes(w, "domain", "near")
    assert _changes(w, "image", 3)


def test_memory_explorers_callbacks(toy_root, tmp_path):
    from dgnb.viz.explorers import memory_explorer, memory_training_explorer

    m = _tiny("pinthemem")
    images, labels = torch.rand(3, 3, 32, 48), torch.randint(0, 19, (3, 32, 48))
    w = memory_explorer(m, {"a": images, "b": images.flip(-1)}, {"a": labels, "b": labels.flip(-1)})
    assert len(w.children) == 2
    assert _changes(w, "slot", 13)
    assert _changes(w, "image", 2)
    assert _changes(w, "domain", "b")
    run = train(toy_config(toy_root, iterations=10, method="pinthemem"), root=tmp_path, progress=False)
    w = memory_training_explorer(run.snapshots)
    assert w.controls["iteration"].value == 10
    assert _changes(w, "iteration", 5)
    assert _changes(w, "image", 2)
    assert _changes(w, "slots", (0, 13))
