"""Shared fixtures: a tiny learnable dataset in the common layout (sky above road, a car box)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dgnb.config import DataConfig, RunConfig, TrainConfig
from dgnb.io import atomic_save_png, atomic_write_json
from dgnb.methods import OptimConfig
from dgnb.models import ModelConfig


def make_toy_dataset(root: Path, names=("a", "b", "c"), n: int = 8, size=(32, 64)) -> Path:
    """Three tiny domains whose colours differ by domain; labels: sky (10), road (0), car (13)."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        for split in ("train", "val"):
            for i in range(n):
                lab = np.zeros(size, np.uint8)
                lab[: size[0] // 2] = 10
                x0 = rng.integers(0, size[1] - 10)
                lab[8:28, x0 : x0 + 10] = 13
                img = np.stack([lab * 10 + k * 20, lab * 5, 200 - lab * 8], -1) + rng.integers(0, 30, size + (3,))
                atomic_save_png(root / name / split / "images" / f"{i:04d}.png", img.clip(0, 255).astype(np.uint8))
                atomic_save_png(root / name / split / "labels" / f"{i:04d}.png", lab)
        atomic_write_json(root / name / "meta.json", {"name": name, "role": "toy", "description": f"toy domain {name}"})
    return root


@pytest.fixture(scope="session")
def course_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DGNB_HOME of the notebook tests (smoke-preset data and runs), shared so data is generated once."""
    return tmp_path_factory.getbasetemp() / "dgnb_home"


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"))


def toy_config(root: Path, iterations: int = 10, method: str = "erm", **hparams) -> RunConfig:
    """Sources a, b; target c. A method that only runs in the UDA setting adapts to c (its train split unlabelled)."""
    from dgnb.methods import REGISTRY

    uda = "dg" not in REGISTRY[method].settings
    return RunConfig(
        method=method, preset="toy", seed=0, hparams=hparams, setting="uda" if uda else "dg",
        model=ModelConfig(head_channels=16, decoder_channels=16, low_proj=8),
        optim=OptimConfig(lr=0.02, iterations=iterations),
        data=DataConfig(root=str(root), sources=["a", "b"], targets=["c"], crop=(32, 48), base_size=(32, 64),
                        batch_per_domain=2, val_limit=4, uda_target="c" if uda else None),
        train=TrainConfig(iterations=iterations, eval_every=5, checkpoint_every=5, log_every=5),
    )


@pytest.fixture(scope="session")
def smoke_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$DGNB_HOME for smoke-preset runs: the folder tests/test_notebooks.py uses, so the smoke city is generated
    once per session and runs trained by one test are cached for the others."""
    return tmp_path_factory.getbasetemp() / "dgnb_home"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and far faster than two when other jobs share the CPU).
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same_checkpoints(a_dir: Path, b_dir: Path) -> dict:
    """Assert that two runs' checkpoints hold the same method state (a bitwise resume): iteration, stage,
    extra state, every module tensor, every optimizer state tensor and the schedules. Returns the first's."""
    a = torch.load(Path(a_dir) / "checkpoint.pt", weights_only=False)["method"]
    b = torch.load(Path(b_dir) / "checkpoint.pt", weights_only=False)["method"]
    assert a["iteration"] == b["iteration"] and a["stage"] == b["stage"] and a["extra"] == b["extra"]
    assert a["module"].keys() == b["module"].keys()
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k
    for key, opt in a["optimizers"].items():
        for p, state in opt["state"].items():
            for s, v in state.items():
                assert not torch.is_tensor(v) or torch.equal(v, b["optimizers"][key]["state"][p][s]), (key, p, s)
    assert a["schedulers"] == b["schedulers"]
    return a
