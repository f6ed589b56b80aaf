"""Nothing silent, nothing lost: bad inputs and faults across dgnb, data_tools and the Python API.

Four kinds: data loss, silent wrong results, errors that come too late or as tracebacks, unclear
messages. Each test fails without the mechanism it checks. Smoke preset, tmp folders only.
"""

from __future__ import annotations

import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import dgnb.engine.runs as runs_mod
from data_tools import ConversionError, Options, convert, verify
from data_tools.__main__ import main as data_tools_main
from dgnb.cli import main as dgnb_main
from dgnb.config import RunConfig, apply_overrides, preset
from dgnb.data.city import ensure_city, render, sweep
from dgnb.data.folder import DatasetLayoutError, SegFolder
from dgnb.engine.runs import Run, evaluate_domains, make_method, prepare_data, train
from dgnb.io import atomic_save_png
from tests import fixtures_native as fx
from tests.conftest import make_toy_dataset, toy_config

SIZE = (32, 64)


# ----- helpers -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke city (sources + the 'near' target), generated once for the module."""
    root = tmp_path_factory.mktemp("data") / "city-smoke"
    prepare_data(smoke(root), progress=False)
    return root


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DGNB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def smoke(root: Path, **overrides) -> RunConfig:
    return preset("smoke", "erm", 0, **{"data.root": str(root), "data.targets": ["near"], **overrides})


def dgnb(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run the dgnb command line in-process: (exit code, stdout, stderr)."""
    try:
        dgnb_main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:  # escaped the command line: a traceback for the user
        code = -1
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str, prog: str = "dgnb") -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # minus progress bars
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def convert_cs(src: Path, dst: Path, **kw) -> dict:
    return convert("cityscapes", src, dst, Options(progress=False, workers=1, **kw))


# ----- data loss ---------------------------------------------------------------------------------------------
def test_trial_conversion_never_deletes_a_complete_one(tmp_path, capsys):
    fx.make_cityscapes(tmp_path / "cs", {"train": 3, "val": 3})
    convert_cs(tmp_path / "cs", tmp_path / "data")
    ds = tmp_path / "data/cityscapes"
    files = sorted(p.relative_to(ds) for p in ds.rglob("*.png"))
    meta = (ds / "meta.json").read_bytes()
    capsys.readouterr()
    code = data_tools_main(["convert", "cityscapes", "--src", str(tmp_path / "cs"), "--dst", str(tmp_path / "data"),
                            "--limit", "1", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "would delete them" in err and "--name cityscapes_trial" in err
    assert sorted(p.relative_to(ds) for p in ds.rglob("*.png")) == files and (ds / "meta.json").read_bytes() == meta
    assert verify(ds, progress=False).ok
    convert_cs(tmp_path / "cs", tmp_path / "data", limit=1, name="cityscapes_trial")  # a trial elsewhere is fine
    trial = json.loads((tmp_path / "data/cityscapes_trial/meta.json").read_text())
    assert trial["splits"] == {"train": 1, "val": 1} and trial["trial_limit"] == 1
    assert verify(tmp_path / "data/cityscapes_trial", progress=False).ok


def test_a_failing_rerun_keeps_the_outputs_it_could_not_redo(tmp_path):
    fx.make_cityscapes(tmp_path / "cs", {"train": 1, "val": 2})
    convert_cs(tmp_path / "cs", tmp_path / "data")
    image = sorted((tmp_path / "cs/leftImg8bit/val").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:40])  # the download got damaged after a complete conversion
    with pytest.raises(ConversionError, match="cannot decode image"):
        convert_cs(tmp_path / "cs", tmp_path / "data")
    stem = image.name.replace("_leftImg8bit.png", "")
    assert (tmp_path / f"data/cityscapes/val/images/{stem}.png").is_file()
    assert (tmp_path / f"data/cityscapes/val/labels/{stem}.png").is_file()


# ----- silent wrong results: config values -------------------------------------------------------------------
BAD_VALUES = [
    ("train.iterations", -5), ("train.iterations", 0), ("train.iterations", 2.5), ("data.batch_per_domain", 0),
    ("data.crop", [64]), ("data.base_size", [0, 64]), ("data.scale", [1.25, 0.75]), ("optim.lr", "fast"),
    ("optim.lr", -0.1), ("optim.momentum", 1.0), ("data.eval_limit", 0), ("data.sources", []),
    ("data.targets", ["near", "near"]), ("train.device", "gpu"), ("train.amp", "yes"), ("data.protocol", "17"),
    ("model.output_stride", 12), ("data.cache_images", "no"), ("hparams.aux_weight", "high"),
]


@pytest.mark.parametrize("path,value", BAD_VALUES)
def test_config_values_are_checked_where_the_config_is_built(path, value):
    with pytest.raises(ValueError, match="is invalid: expected") as e:
        preset("smoke", **{path: value})
    assert f"{path}={value!r}" in str(e.value) and "Fix" in str(e.value)
    with pytest.raises(ValueError, match="is invalid"):  # the notebooks' route: apply_overrides
        apply_overrides(preset("smoke"), {path: value})


def test_every_config_field_has_a_check_and_saved_configs_are_checked_too(tmp_path):
    from dgnb.config import CHECKS, config_fields

    missing = sorted(set(config_fields(preset("smoke"))) - set(CHECKS))
    assert not missing, f"add a check for {missing} to CHECKS in dgnb/config.py"
    d = preset("smoke").to_dict()
    d["seed"] = 2**70
    with pytest.raises(ValueError, match=r"seed=\d+ is invalid: expected an integer in \[0, 9223372036854775807\]"):
        RunConfig.from_dict(d)
    cfg = toy_config(tmp_path, iterations=10)
    cfg.train.iterations = -5  # a config built by hand reaches train() unchecked otherwise
    with pytest.raises(ValueError, match="train.iterations=-5 is invalid"):
        train(cfg, root=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--iterations", "0"], "train.iterations=0 is invalid"),
    (["--iterations", "-5"], "train.iterations=-5 is invalid"),
    (["--seed", str(2**70)], "seed=1180591620717411303424 is invalid: expected an integer in [0, "),
    (["--device", "gpu"], "train.device='gpu' is invalid: expected auto, cpu, cuda, cuda:N or mps"),
    (["--set", "data.batch_per_domain=0"], "data.batch_per_domain=0 is invalid"),
])
def test_cli_rejects_bad_values_before_anything_runs(capsys, home, argv, needle):
    code, _, err = dgnb(capsys, "train", "--preset", "smoke", "--no-progress", *argv)
    assert code == 2 and needle in one_line_error(err)
    assert not (home / "runs").exists() and not (home / "data").exists()


# ----- silent wrong results: data -------------------------------------------------------------------------
def test_deleted_city_images_are_refilled_and_a_short_split_is_an_error(tmp_path):
    ensure_city(tmp_path, ["source_b"], {"train": 6}, size=SIZE, progress=False, workers=1)
    images = tmp_path / "source_b/train/images"
    for p in sorted(images.glob("*.png"))[::2]:
        p.unlink()
    with pytest.raises(DatasetLayoutError, match=r"holds 3 complete image/label pairs but .*meta.json records 6"):
        SegFolder(tmp_path, "source_b", "train")
    (tmp_path / "source_b/train/labels/00001.png").unlink()  # a label alone
    ensure_city(tmp_path, ["source_b"], {"train": 6}, size=SIZE, progress=False, workers=1)
    ds = SegFolder(tmp_path, "source_b", "train")
    assert len(ds) == 6
    assert np.array_equal(ds[1]["label"].numpy(), render("source_b", "train", 1, size=SIZE).label)


def test_converted_split_shorter_than_its_meta_is_an_error(tmp_path):
    fx.make_cityscapes(tmp_path / "cs", {"train": 1, "val": 3})
    convert_cs(tmp_path / "cs", tmp_path / "data")
    next((tmp_path / "data/cityscapes/val/images").glob("*.png")).unlink()
    next((tmp_path / "data/cityscapes/val/labels").glob("*.png")).unlink()
    with pytest.raises(DatasetLayoutError, match="records 3.*data_tools convert"):
        SegFolder(tmp_path / "data", "cityscapes", "val")


def test_changed_generator_code_regenerates_the_data(tmp_path):
    ensure_city(tmp_path, ["near"], {"val": 3}, size=SIZE, progress=False, workers=1)
    meta_path = tmp_path / "near/meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["generator"]["code"]  # the data's identity includes the generator code
    meta["generator"]["code"] = "written-by-older-code"
    meta_path.write_text(json.dumps(meta))
    stale = tmp_path / "near/val/images/00000.png"
    atomic_save_png(stale, np.zeros((*SIZE, 3), np.uint8))  # what the older code drew
    ensure_city(tmp_path, ["near"], {"val": 3}, size=SIZE, progress=False, workers=1)
    assert np.array_equal(SegFolder(tmp_path, "near", "val")[0]["image"].permute(1, 2, 0).numpy(),
                          render("near", "val", 0, size=SIZE).image)
    assert json.loads(meta_path.read_text())["generator"]["code"] != "written-by-older-code"
    with pytest.raises(ValueError, match="other settings"):  # another request on the same root stays an error
        ensure_city(tmp_path, ["near"], {"val": 3}, size=(48, 64), progress=False)


def test_render_and_sweep_name_the_bad_argument():
    for kwargs, needle in [({"split": "tarin"}, "split='tarin' is not a split of the city; choose one of train, val"),
                           ({"index": -1}, "index=-1 is invalid: the image index must be an integer >= 0"),
                           ({"index": "3"}, "index='3' is invalid"),
                           ({"seed": 2**70}, "seed=1180591620717411303424 is invalid"),
                           ({"size": (8, 8)}, "size=(8, 8) is invalid")]:
        args = {"split": "val", "index": 0, "size": SIZE, **kwargs}
        with pytest.raises(ValueError) as e:
            render("source_a", **args)
        assert needle in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"severity 'high' is outside the valid range: a number in \[0, 5\]"):
        sweep("source_a", "fog", [0, "high"], size=SIZE)
    with pytest.raises(ValueError, match=r"knob 'fog' severity -1 is outside the valid range: a number in \[0, 5\]"):
        sweep("source_a", "fog", [-1], size=SIZE)


def test_data_render_writes_where_it_says(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "figs").mkdir()
    code, out, _ = dgnb(capsys, "data", "render", "--preset", "smoke", "--domains", "source_a", "--knob", "fog",
                        "--out", "figs")
    assert code == 0 and (tmp_path / "figs/source_a_fog.png").is_file() and "wrote figs/source_a_fog.png" in out
    code, out, _ = dgnb(capsys, "data", "render", "--preset", "smoke", "--domains", "source_a", "--knob", "fog",
                        "--out", "sweep")
    assert code == 0 and (tmp_path / "sweep.png").is_file() and out.strip() == "wrote sweep.png"
    code, _, err = dgnb(capsys, "data", "render", "--preset", "smoke", "--domains", "source_a", "--knob", "fog",
                        "--index", "-1")
    assert code == 2 and "index=-1 is invalid" in one_line_error(err)


# ----- runs: evaluation, cache, checkpoints --------------------------------------------------------------------
def test_eval_refuses_an_unfinished_run_unless_asked(smoke_root, home, capsys):
    run = train(smoke(smoke_root), progress=False, stop_at=3)
    assert not run.complete
    code, out, err = dgnb(capsys, "eval", str(run.dir), "--domains", "near")
    assert code == 2 and "unfinished run" in one_line_error(err) and "--partial" in err and not out
    code, out, err = dgnb(capsys, "eval", str(run.dir), "--domains", "near", "--partial")
    assert code == 0 and "| near |" in out and "iteration 3 of 6" in err


def test_misspelt_target_fails_before_any_training(smoke_root, home, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(runs_mod, "fit", no_training)
    code, _, err = dgnb(capsys, "train", "--preset", "smoke", "--data-root", str(smoke_root), "--targets", "nera",
                        "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "target dataset 'nera' not found" in line and "Did you mean 'near'?" in line
    assert not (home / "runs").exists()


def test_new_targets_reevaluate_a_finished_run_instead_of_retraining(smoke_root, home, monkeypatch):
    first = train(smoke(smoke_root), progress=False)
    stamp = (first.dir / "checkpoint.pt").stat().st_mtime_ns
    before = (first.dir / "metrics.json").read_bytes()
    # (no monkeypatched `fit` here: patching library code changes the run key by design, see test_run_key.py;
    # the untouched checkpoint below shows that nothing was retrained)
    wider = smoke(smoke_root, **{"data.targets": ["near", "far_fog"], "data.eval_limit": 4})
    again = train(wider, progress=False)
    assert again.dir == first.dir and (first.dir / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert set(again.metrics["target_miou"]) == {"near", "far_fog"}
    assert again.metrics["train_seconds"] == first.metrics["train_seconds"]
    assert (first.dir / "metrics.json").read_bytes() == before and set(first.metrics["target_miou"]) == {"near"}
    assert train(wider, progress=False).metrics == again.metrics  # now cached too


def test_corrupt_checkpoint_in_the_cache_names_the_file_and_the_fix(smoke_root, home, capsys):
    from dgnb.errors import CheckpointError

    cfg = smoke(smoke_root)
    run = train(cfg, progress=False)
    ckpt = run.dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint.pt is corrupt.*--force"):
        train(cfg, progress=False)
    code, _, err = dgnb(capsys, "eval", str(run.dir), "--domains", "near")
    assert code == 2 and str(ckpt) in one_line_error(err) and "--force" in err
    assert train(cfg, progress=False, force=True).complete  # the fix the message gives works


def test_corrupt_checkpoint_of_an_unfinished_run_names_the_file(smoke_root, home):
    from dgnb.errors import CheckpointError

    cfg = smoke(smoke_root)
    run = train(cfg, progress=False, stop_at=3)
    (run.dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*checkpoint.pt.*truncated or corrupt"):
        train(cfg, progress=False)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, toy_root):
    from dgnb.errors import CheckpointError

    run = train(toy_config(toy_root, iterations=2), root=tmp_path, progress=False)
    other = apply_overrides(run.config, {"model.head_channels": 24})
    torch.save({"method": make_method(other, torch.device("cpu")).checkpoint_state()}, run.dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"does not fit this run's method/model.*another configuration"):
        Run.open(run.dir).load_method("cpu")


def test_corrupt_metrics_json_names_the_file_and_recovers_without_retraining(tmp_path, toy_root, monkeypatch):
    from dgnb.errors import RunCacheError

    cfg = toy_config(toy_root, iterations=2)
    run = train(cfg, root=tmp_path, progress=False)
    metrics = run.dir / "metrics.json"
    good = json.loads(metrics.read_text())
    metrics.write_text('{"method": "erm", "seed"')
    with pytest.raises(RunCacheError, match=r"metrics.json is not valid JSON .*delete it .*not retrained"):
        train(cfg, root=tmp_path, progress=False)
    with pytest.raises(RunCacheError, match=str(metrics)):
        Run.open(run.dir).metrics
    metrics.unlink()  # the fix the message gives
    history_before = run.history
    again = train(cfg, root=tmp_path, progress=False)
    assert again.metrics["target_miou"] == good["target_miou"] and again.history == history_before


def test_mixed_image_sizes_in_an_evaluation_set(tmp_path, toy_root):
    root = make_toy_dataset(tmp_path / "mixed", names=("a", "b", "c"), n=3)
    atomic_save_png(root / "c/val/images/0001.png", np.full((40, 72, 3), 90, np.uint8))
    atomic_save_png(root / "c/val/labels/0001.png", np.full((40, 72), 10, np.uint8))
    cfg = toy_config(root, iterations=2)
    method = make_method(cfg, torch.device("cpu"))
    metrics = evaluate_domains(method, cfg, ["c"])
    assert metrics["c"].confusion.sum() == 2 * 32 * 64 + 40 * 72


# ----- errors early, in one line -------------------------------------------------------------------------------
def test_bench_writes_partial_results_as_runs_finish(smoke_root, home, tmp_path, monkeypatch):
    from dgnb.engine import bench as bench_mod

    out = tmp_path / "bench.json"
    seen = []
    real = bench_mod.train

    def spy(cfg, **kw):
        seen.append(json.loads(out.read_text())["runs"] if out.exists() else None)
        return real(cfg, **kw)

    monkeypatch.setattr(bench_mod, "train", spy)
    result = bench_mod.bench("smoke", ["erm"], [0, 1], {"data.root": str(smoke_root), "data.targets": ["near"]},
                             out=out, progress=False)
    assert seen[0] is None and [r["seed"] for r in seen[1]] == [0]  # seed 0 on disk while seed 1 trained
    assert json.loads(out.read_text())["runs"] == result["runs"] and len(result["runs"]) == 2


def test_bench_reuse_takes_recorded_runs_and_refuses_other_set_ups(smoke_root, home, tmp_path, monkeypatch, capsys):
    from dgnb.engine import bench as bench_mod

    common = {"data.root": str(smoke_root), "data.targets": ["near"]}
    first = tmp_path / "first.json"
    recorded = bench_mod.bench("smoke", ["erm"], [0, 1], common, out=first, progress=False)["runs"]

    def no_training(cfg, **kw):
        raise AssertionError(f"trained {cfg.method} seed {cfg.seed}")

    monkeypatch.setattr(bench_mod, "train", no_training)
    again = bench_mod.bench("smoke", ["erm"], [1, 0], common, progress=False, reuse=[first])
    assert [r["seed"] for r in again["runs"]] == [1, 0]
    assert again["runs"][1] == {**recorded[0], "reused_from": str(first)}
    assert again["reused"] == {"erm seed 1": str(first), "erm seed 0": str(first)}
    with pytest.raises(bench_mod.ReuseError, match=r"not for seeds \[2\]"):
        bench_mod.bench("smoke", ["erm"], [0, 2], common, progress=False, reuse=[first])
    with pytest.raises(bench_mod.ReuseError, match="iterations is 6 there, 3 here"):
        bench_mod.bench("smoke", ["erm"], [0], {**common, "train.iterations": 3, "optim.iterations": 3},
                        progress=False, reuse=[first])
    with pytest.raises(bench_mod.ReuseError, match=r"other settings \(optim.lr\)"):
        bench_mod.bench("smoke", ["erm"], [0], {**common, "optim.lr": 0.123}, progress=False, reuse=[first])
    code, _, err = dgnb(capsys, "bench", "--preset", "smoke", "--data-root", str(smoke_root), "--targets", "near",
                        "--reuse", str(tmp_path / "missing.json"), "--no-progress")
    assert code == 2 and "missing.json: no such file" in one_line_error(err)


def test_bench_out_that_is_a_folder_fails_before_training(smoke_root, home, tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(runs_mod, "fit", no_training)
    code, _, err = dgnb(capsys, "bench", "--preset", "smoke", "--data-root", str(smoke_root), "--targets", "near",
                        "--out", str(tmp_path), "--no-progress")
    line = one_line_error(err)
    assert code == 2 and str(tmp_path) in line and "give a file path" in line


def deny_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only folder gives every atomic write (the tests may run as root, who can write anywhere)."""
    def mkstemp(*a, dir=None, **k):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr("dgnb.io.tempfile.mkstemp", mkstemp)


def test_expected_failures_are_one_line_and_debug_shows_the_traceback(tmp_path, home, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = dgnb(capsys, "train", "--preset", "smoke", "--data-root", str(afile), "--no-progress")
    assert code == 2 and f"data root {afile} is a file" in one_line_error(err)
    with pytest.raises(DatasetLayoutError):
        dgnb(capsys, "train", "--preset", "smoke", "--data-root", str(afile), "--no-progress", "--debug")
    deny_writes(monkeypatch)
    code, _, err = dgnb(capsys, "data", "generate", "--preset", "smoke", "--root", str(tmp_path / "ro"),
                        "--domains", "source_a")
    line = one_line_error(err)
    assert code == 2 and "Permission denied" in line and str(tmp_path / "ro" / "source_a") in line
    assert "make it writable" in line


def test_data_tools_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    fx.make_cityscapes(tmp_path / "cs", {"train": 1, "val": 1})
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = ["convert", "cityscapes", "--src", str(tmp_path / "cs"), "--workers", "1", "--no-progress"]
    assert data_tools_main([*args, "--dst", str(afile)]) == 2
    assert "is a file, not a folder" in one_line_error(capsys.readouterr().err, "data_tools")
    deny_writes(monkeypatch)
    assert data_tools_main([*args, "--dst", str(tmp_path / "ro")]) == 2
    line = one_line_error(capsys.readouterr().err, "data_tools")
    assert "Permission denied" in line and str(tmp_path / "ro" / "cityscapes") in line


def test_run_that_cannot_write_its_folder_is_one_line(smoke_root, home, capsys, monkeypatch):
    deny_writes(monkeypatch)
    code, _, err = dgnb(capsys, "train", "--preset", "smoke", "--data-root", str(smoke_root), "--targets", "near",
                        "--no-progress")
    line = one_line_error(err)
    assert code == 2 and str(home / "runs") in line and "$DGNB_HOME" in line


def test_paper_preset_checks_the_data_root_before_fetching_weights(tmp_path, home, capsys, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("weights requested before the data root was checked")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_download)
    code, _, err = dgnb(capsys, "train", "--preset", "paper", "--data-root", str(tmp_path / "nowhere"),
                        "--device", "cpu", "--no-progress")
    line = one_line_error(err)
    assert code == 2 and "source dataset 'gtav' not found" in line and "does not exist" in line


def test_offline_weights_say_how_to_provide_them(monkeypatch, tmp_path):
    from dgnb.models import build_backbone

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(Exception) as e:
        build_backbone("resnet18", pretrained=True)
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "torch") in msg and "model.pretrained=false" in msg


def test_ctrl_c_in_the_cli_is_one_line_and_the_run_resumes(smoke_root, home, capsys, monkeypatch):
    real = runs_mod.fit

    def interrupted(*args, **kwargs):  # fit(method, make_loader, iterations, run_dir, ..., stop_at): Ctrl-C after 3
        real(*args[:9], 3, **kwargs)
        raise KeyboardInterrupt(f"interrupted at iteration 3; checkpoint saved to {args[3] / 'checkpoint.pt'}, "
                                "rerun to resume")

    monkeypatch.setattr(runs_mod, "fit", interrupted)
    argv = ["train", "--preset", "smoke", "--data-root", str(smoke_root), "--targets", "near", "--no-progress"]
    code, _, err = dgnb(capsys, *argv)
    assert code == 130 and err.strip().startswith("dgnb: interrupted at iteration 3") and "Traceback" not in err
    monkeypatch.setattr(runs_mod, "fit", real)
    code, out, _ = dgnb(capsys, *argv)
    assert code == 0 and '"target_miou"' in out
    assert os.path.isfile(out.split("run folder:")[1].split()[0] + "/metrics.json")
