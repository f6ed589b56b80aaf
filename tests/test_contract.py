"""The method contract, checked for every registered method (a method added later is picked up).

A method builds from its name and `Hparams`, trains one step on a batch, predicts class scores of the
right shape, resumes bitwise (k steps, checkpoint, more steps == an uninterrupted run) and trains on
the smoke preset end to end. Seconds per method.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dgnb.config import preset
from dgnb.engine.runs import train
from dgnb.methods import REGISTRY, Method, OptimConfig, build_method
from dgnb.models import ModelConfig
from tests.conftest import same_checkpoints, toy_config

METHODS = sorted(REGISTRY)
MODEL = ModelConfig(head_channels=16, decoder_channels=16, low_proj=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def toy_batch(cls: type[Method], domains: int = 2, per_domain: int = 2, size=(32, 48)) -> dict[str, torch.Tensor]:
    """Sky over road with a car box, colours shifted per domain (+ unlabeled target images for UDA)."""
    g = torch.Generator().manual_seed(0)
    n = domains * per_domain
    label = torch.zeros(n, *size, dtype=torch.long)
    label[:, : size[0] // 2] = 10
    label[:, 12:24, 8:20] = 13
    label[:, -2:] = 255
    domain = torch.arange(domains).repeat_interleave(per_domain)
    base = torch.stack([label.float() / 20, label.float() / 40, 1 - label.float() / 30], 1).clamp(0, 1)
    image = (0.7 * base + 0.1 * domain.view(-1, 1, 1, 1) + 0.2 * torch.rand(n, 3, *size, generator=g)).clamp(0, 1)
    batch = {"image": image, "label": label, "domain": domain}
    if cls.uda:
        batch["target_image"] = torch.rand(per_domain, 3, *size, generator=g)
    return batch


def test_methods_are_registered():
    assert {"erm", "mldg", "pinthemem"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_builds_trains_a_step_and_predicts(name):
    cls = REGISTRY[name]
    assert issubclass(cls, Method) and cls.name == name and dataclasses.is_dataclass(cls.Hparams)
    torch.manual_seed(0)
    method = build_method(name, MODEL, OptimConfig(lr=0.02, iterations=10), 2).setup(torch.device("cpu"))
    assert dataclasses.is_dataclass(method.hp) and isinstance(method.hp, cls.Hparams)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_method(name, MODEL, OptimConfig(), 2, {"no_such_hparam": 1})
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.train()
    batch = toy_batch(cls)
    logs = method.training_step(batch)
    method.end_iteration()
    assert method.iteration == 1
    assert isinstance(logs, dict) and "loss" in logs
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values()), logs
    assert any(not torch.equal(before[k], v) for k, v in method.state_dict().items()), "one step changed nothing"
    method.eval()
    scores = method.predict(batch["image"][:3])
    assert scores.shape == (3, MODEL.num_classes, 32, 48) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bitwise(name, toy_root, tmp_path):
    cfg = toy_config(toy_root, iterations=4, method=name)
    straight = train(cfg, root=tmp_path / "a", progress=False)
    interrupted = train(cfg, root=tmp_path / "b", progress=False, stop_at=2)
    assert not interrupted.complete
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    assert same_checkpoints(straight.dir, resumed.dir)["iteration"] == 4
    assert straight.metrics["target_miou"] == resumed.metrics["target_miou"]


@pytest.mark.parametrize("name", METHODS)
def test_trains_on_smoke_end_to_end(name, smoke_home, monkeypatch):
    monkeypatch.setenv("DGNB_HOME", str(smoke_home))
    cfg = preset("smoke", name, setting=REGISTRY[name].settings[0])  # a UDA method in the UDA setting
    run = train(cfg, progress=False)
    m = run.metrics
    assert run.complete and m["iterations"] == cfg.train.iterations and m["method"] == name
    assert set(m["target_miou"]) == set(cfg.data.targets) and math.isfinite(m["mean_target_miou"])
    assert run.load_method("cpu").iteration == cfg.train.iterations
