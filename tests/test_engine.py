"""Engine: metrics, deterministic loaders, exact resume, run cache, errors, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dgnb.config import apply_overrides, preset
from dgnb.data.folder import DatasetLayoutError, SegFolder
from dgnb.data.inspect import load_split
from dgnb.data.loaders import IterationBatchSampler
from dgnb.data.taxonomy import LabelError
from dgnb.engine.evaluate import SegMetrics, confusion_matrix
from dgnb.engine.runs import Run, run_dir, train
from dgnb.engine.train import resolve_amp
from dgnb.io import atomic_save_png
from dgnb.methods import build_method
from tests.conftest import make_toy_dataset, toy_config


def test_confusion_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm = confusion_matrix(pred, target, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    m = SegMetrics(cm, classes=(0, 1, 2))
    # IoU_0 = 1/(1+1) ; IoU_1 = 1/(1+1); class 2 absent from the ground truth is not averaged
    assert m.present == [0, 1]
    assert m.miou == pytest.approx(50.0)
    assert SegMetrics(cm, classes=(1,)).miou == pytest.approx(50.0)


def test_sampler_is_a_pure_function_of_the_iteration():
    full = list(IterationBatchSampler([5, 7], per_domain=3, seed=1, start=0, stop=6))
    resumed = list(IterationBatchSampler([5, 7], per_domain=3, seed=1, start=4, stop=6))
    assert full[4:] == resumed
    assert [k[0] for k in full[0]] == [0, 0, 0, 1, 1, 1]  # domain-major
    # every image of a domain is seen once per epoch
    seen = [k[1] for b in full[:5] for k in b if k[0] == 0]
    assert sorted(seen[:5]) == list(range(5))
    # two ranks split each domain's share without overlap and together give the whole batch
    r0 = IterationBatchSampler([5, 7], 4, 1, 0, 1, rank=0, world=2).batch(0)
    r1 = IterationBatchSampler([5, 7], 4, 1, 0, 1, rank=1, world=2).batch(0)
    whole = IterationBatchSampler([5, 7], 4, 1, 0, 1).batch(0)
    assert sorted(r0 + r1) == sorted(whole) and not set(r0) & set(r1)


def test_exact_resume_is_bitwise(toy_root, tmp_path):
    cfg = toy_config(toy_root, iterations=10)
    straight = train(cfg, root=tmp_path / "a", progress=False)
    interrupted = train(cfg, root=tmp_path / "b", progress=False, stop_at=7)
    assert not interrupted.complete
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    a = torch.load(straight.dir / "checkpoint.pt", weights_only=False)["method"]["module"]
    b = torch.load(resumed.dir / "checkpoint.pt", weights_only=False)["method"]["module"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.metrics["target_miou"] == resumed.metrics["target_miou"]


def test_run_cache_returns_complete_runs_and_force_retrains(toy_root, tmp_path):
    cfg = toy_config(toy_root, iterations=4)
    first = train(cfg, root=tmp_path, progress=False)
    stamp = (first.dir / "metrics.json").stat().st_mtime_ns
    again = train(cfg, root=tmp_path, progress=False)
    assert again.dir == first.dir and (again.dir / "metrics.json").stat().st_mtime_ns == stamp
    forced = train(cfg, root=tmp_path, progress=False, force=True)
    assert (forced.dir / "metrics.json").stat().st_mtime_ns != stamp
    other = apply_overrides(cfg, {"optim.lr": 0.01})
    assert run_dir(other, tmp_path) != first.dir
    m = first.metrics
    for key in ("method", "seed", "preset", "sources", "source_val_miou", "target_miou", "per_class_iou", "train_seconds"):
        assert key in m
    assert set(m["target_miou"]) == {"c"}
    # a reopened run gives back a working method with the same predictions
    method = Run.open(first.dir).load_method("cpu")
    assert method.iteration == 4


def test_erm_learns_the_toy_task(toy_root, tmp_path):
    run = train(toy_config(toy_root, iterations=30), root=tmp_path, progress=False)
    hist = [h for h in run.history if "loss" in h]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert run.metrics["source_val_miou"] > 40


def test_load_split_is_the_first_images_as_one_batch(toy_root):
    ds = SegFolder(toy_root, "a", "val")
    images, labels = load_split(toy_root, "a", "val", 2)
    assert images.dtype == torch.float32 and images.shape[0] == labels.shape[0] == 2 and labels.dtype == torch.int64
    for i in range(2):
        item = ds[i]
        assert torch.equal(images[i], item["image"].as_subclass(torch.Tensor).float() / 255)
        assert torch.equal(labels[i], item["label"].as_subclass(torch.Tensor))
    unlabelled, none = load_split(toy_root, "c", "train", 3, labels=False)
    assert none is None and unlabelled.shape[0] == 3 and 0 <= unlabelled.min() and unlabelled.max() <= 1


def test_bad_inputs_name_the_problem(tmp_path, toy_root):
    with pytest.raises(DatasetLayoutError, match="not found"):
        SegFolder(tmp_path / "nowhere", "a", "train")
    root = make_toy_dataset(tmp_path / "broken", names=("x",), n=2)
    (root / "x" / "train" / "labels" / "0001.png").unlink()
    with pytest.raises(DatasetLayoutError, match="no label"):
        SegFolder(root, "x", "train")
    atomic_save_png(root / "x" / "val" / "labels" / "0000.png", np.full((32, 64), 40, np.uint8))
    with pytest.raises(LabelError, match=r"\[40\]"):
        SegFolder(root, "x", "val")[0]
    atomic_save_png(root / "x" / "val" / "labels" / "0001.png", np.zeros((16, 64), np.uint8))
    with pytest.raises(DatasetLayoutError, match="size mismatch"):
        SegFolder(root, "x", "val")[1]
    cfg = toy_config(toy_root)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_method("nope", cfg.model, cfg.optim, 2)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_method("erm", cfg.model, cfg.optim, 2, {"aux_wieght": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown config field"):
        apply_overrides(cfg, {"train.iters": 3})
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp("bf16", torch.device("cpu"))



def test_two_process_torchrun_training(toy_root, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU) trains one run whose weights agree across ranks."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
import dgnb.engine.runs as R
from tests.conftest import toy_config
cfg = toy_config(Path({str(toy_root)!r}), iterations=6)
seen = {{}}
original = R.fit
def spy(method, *a, **k):
    out = original(method, *a, **k)
    seen['w'] = torch.cat([p.detach().reshape(-1) for p in method.model.parameters()])
    return out
R.fit = spy
run = R.train(cfg, root=Path({str(tmp_path / 'runs')!r}), progress=False)
w = seen['w']; other = w.clone(); dist.broadcast(other, src=0)
torch.save({{'rank': dist.get_rank(), 'world': dist.get_world_size(), 'same': bool(torch.equal(w, other))}},
           Path({str(tmp_path)!r}) / f"rank{{dist.get_rank()}}.pt")
dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        info = torch.load(tmp_path / f"rank{r}.pt")
        assert info["world"] == 2 and info["same"], info
    metrics = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 6


def test_set_values_parse_as_json_or_python_literals():
    """`--set hparams.first_order=False` must give the bool False, never the (truthy) string 'False'."""
    from dgnb.cli import parse_value

    assert parse_value("False") is False and parse_value("false") is False and parse_value("true") is True
    assert parse_value("0.2") == 0.2 and parse_value("100") == 100
    assert parse_value("[64, 64]") == [64, 64] and parse_value("(64, 64)") == (64, 64)
    assert parse_value("freeze_both") == "freeze_both" and parse_value("cuda:0") == "cuda:0"
