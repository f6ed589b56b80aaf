"""Unsupervised domain adaptation: the setting, the shared machinery, and the methods' invariants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dgnb.config import ConfigError, apply_overrides, preset
from dgnb.data.folder import DatasetLayoutError, SegFolder
from dgnb.data.loaders import IterationBatchSampler, train_loader
from dgnb.data.taxonomy import IGNORE_INDEX
from dgnb.data.transforms import BatchAugment
from dgnb.engine.runs import Run, run_dir, train
from dgnb.methods.mrnet import disagreement_map, memory_regularization
from dgnb.methods.pseudo_labels import (PseudoLabels, apply_rule, class_balanced_thresholds, fuse_heads,
                                        make_pseudo_labels, score_pseudo_labels)
from dgnb.methods.uda import (SOURCE_LABEL, TARGET_LABEL, discriminator_loss, entropy_map, frozen,
                              generator_adversarial_loss, kl_divergence)
from dgnb.models.discriminators import FCDiscriminator, MultiScaleDiscriminator
from tests.conftest import same_checkpoints, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# ----- the KL helper, entropy ------------------------------------------------------------------------------
def test_kl_is_non_negative_zero_for_equal_and_goes_from_target_to_pred():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 5, 3, 3, generator=g).log_softmax(1), torch.randn(4, 5, 3, 3, generator=g).log_softmax(1)
    assert kl_divergence(p, q).shape == (4, 3, 3)
    assert (kl_divergence(p, q) >= 0).all() and (kl_divergence(q, p) >= 0).all()
    assert torch.allclose(kl_divergence(p, p), torch.zeros(4, 3, 3), atol=1e-6)
    # direction: KL(target ‖ pred) = Σ target (log target − log pred), by hand on a two-class example
    target, pred = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    by_hand = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_divergence(target.log(), pred.log()).item() == pytest.approx(by_hand, rel=1e-5)
    assert kl_divergence(pred.log(), target.log()).item() != pytest.approx(by_hand, rel=1e-2)  # not symmetric


def test_entropy_of_one_hot_is_zero_and_of_uniform_is_one():
    one_hot = F.one_hot(torch.tensor([[[3, 0], [18, 7]]]), 19).permute(0, 3, 1, 2).float()
    assert torch.allclose(entropy_map(one_hot), torch.zeros(1, 2, 2), atol=1e-6)
    assert torch.allclose(entropy_map(torch.full((1, 19, 2, 2), 1 / 19)), torch.ones(1, 2, 2), atol=1e-5)


def test_memory_regularization_forms():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 19, 4, 4, generator=g)
    assert memory_regularization(z, z.clone(), "paper").item() == pytest.approx(0.0, abs=1e-6)  # heads agree
    # the code fuses logits, softmax(z + 0.5 z) = softmax(1.5 z): even agreeing heads are pulled to a sharper map
    sharper = 2 * kl_divergence((1.5 * z).log_softmax(1), z.log_softmax(1)).mean()
    assert memory_regularization(z, z.clone(), "code").item() == pytest.approx(sharper.item(), rel=1e-5)
    assert sharper.item() > 0.01
    za = torch.randn(2, 19, 4, 4, generator=g)
    # paper form is symmetric in the two heads; the disagreement map is KL(P_a ‖ P_p) per pixel
    assert memory_regularization(z, za, "paper").item() == pytest.approx(memory_regularization(za, z, "paper").item())
    assert torch.allclose(disagreement_map(z, za), kl_divergence(za.log_softmax(1), z.log_softmax(1)))
    # code form: the fused target is detached, so the gradient only pulls each head toward it
    zp, zaa = z.clone().requires_grad_(True), za.clone().requires_grad_(True)
    memory_regularization(zp, zaa, "code").backward()
    fused = (z + 0.5 * za).softmax(1)
    expected = (zp.softmax(1) - fused).detach() / (2 * 4 * 4)  # d/dz KL(p̄ ‖ softmax z) = softmax z − p̄, mean
    assert torch.allclose(zp.grad, expected, atol=1e-6)


# ----- the label convention and the adversarial losses --------------------------------------------------------
@pytest.mark.parametrize("kind", ["bce", "lsgan"])
@pytest.mark.parametrize("disc_cls", [FCDiscriminator, MultiScaleDiscriminator])
def test_generator_loss_pushes_target_outputs_toward_the_source_label(kind, disc_cls):
    torch.manual_seed(0)
    disc = disc_cls(19, 8)
    for m in disc.modules():  # a discriminator that already tells the domains apart somewhat (not ~0 everywhere)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, 0.1)
    logits = torch.randn(2, 19, 64, 64, requires_grad=True)  # stands for the segmenter's target scores

    def d_out() -> float:  # how far D's answer on the target is from SOURCE_LABEL (bce: its logit, -inf = source)
        with torch.no_grad():
            outs = disc(logits.softmax(1))
            if kind == "bce":
                return float(torch.stack([o.mean() for o in outs]).mean())
            return float(torch.stack([(o - SOURCE_LABEL).abs().mean() for o in outs]).mean())

    start = d_out()
    opt = torch.optim.SGD([logits], lr=300.0)
    for _ in range(40):
        with frozen(disc):
            loss = generator_adversarial_loss(disc, logits.softmax(1), kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in disc.parameters())  # the generator's step leaves D alone
    assert all(p.requires_grad for p in disc.parameters())  # and `frozen` restores it
    assert d_out() < start - 0.01 * abs(start) - 1e-4


def test_discriminator_learns_source_zero_target_one():
    torch.manual_seed(0)
    disc = FCDiscriminator(19, 8)
    source = F.one_hot(torch.zeros(4, 64, 64, dtype=torch.long), 19).permute(0, 3, 1, 2).float()  # confident
    target = torch.full((4, 19, 64, 64), 1 / 19)  # uncertain
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    for _ in range(30):
        loss = discriminator_loss(disc(source), disc(target), "bce")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert torch.sigmoid(disc(source)[0]).mean() < 0.2 and torch.sigmoid(disc(target)[0]).mean() > 0.8
    assert (SOURCE_LABEL, TARGET_LABEL) == (0.0, 1.0)


# ----- pseudo labels --------------------------------------------------------------------------------------------
def test_class_balanced_thresholds_keep_the_intended_portion():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(50_000, generator=g)
    pred = torch.randint(0, 5, (50_000,), generator=g)
    pred[:300] = 7  # a rare class
    for portion in (0.2, 0.5, 1.0):
        theta = class_balanced_thresholds(conf, pred, portion)
        labels = apply_rule(conf, pred, "class_balanced", thresholds=theta)
        for c in (0, 1, 2, 3, 4, 7):
            n = int((pred == c).sum())
            kept = int((labels == c).sum())
            assert kept == math.ceil(portion * n), (portion, c)  # continuous confidences: no ties
        assert math.isinf(theta[10])  # never predicted
    labels = apply_rule(conf, pred, "confidence", threshold=0.75)
    assert torch.equal(labels != IGNORE_INDEX, conf >= 0.75)
    assert torch.equal(apply_rule(conf, pred, "none"), pred)


def test_fused_heads_are_probabilities():
    g = torch.Generator().manual_seed(0)
    main, aux = torch.randn(2, 19, 4, 4, generator=g), torch.randn(2, 19, 4, 4, generator=g)
    for space in ("probabilities", "logits"):
        p = fuse_heads(main, aux, 0.5, space)
        assert torch.allclose(p.sum(1), torch.ones(2, 4, 4), atol=1e-5)
    assert torch.equal(fuse_heads(main, aux, 0.0).argmax(1), main.argmax(1))


def test_pseudo_labels_are_written_in_the_common_layout_with_a_manifest(toy_root, tmp_path):
    target = SegFolder(toy_root, "c", "train", labels=False)
    ids = [s.image.stem for s in target.samples]

    def batches():
        for i in range(0, len(ids), 3):
            yield ids[i : i + 3], torch.stack([target.tensors(j)[0].float() / 255 for j in range(i, min(i + 3, len(ids)))])

    def probabilities(images):  # a "model" that calls the top half sky (10) and the rest road (0), half confident
        p = torch.full((len(images), 19, *images.shape[-2:]), 0.01)
        p[:, 10, : images.shape[-2] // 2] = 0.9
        p[:, 0, images.shape[-2] // 2 :] = 0.6
        return p

    paths = {s.image.stem: s.image for s in target.samples}
    made = make_pseudo_labels(probabilities, batches(), lambda i: [paths[k] for k in i], tmp_path, "c-pseudo",
                              rule="confidence", threshold=0.7)
    m = made.manifest
    assert m["origin"] == "pseudo labels" and m["splits"]["train"] == len(ids)
    assert m["kept_fraction"] == {"road": 0.0, "sky": 1.0} and m["kept_overall"] == 0.5 and m["accuracy"] is None
    ds = SegFolder(tmp_path, "c-pseudo", "train")
    assert ds.pseudo and len(ds) == len(ids)
    label = ds.tensors(0)[1]
    assert set(label.unique().tolist()) == {10, IGNORE_INDEX}
    acc = score_pseudo_labels(made, toy_root, "c")  # analysis: the top half is sky, but for the cars in it
    truth = torch.stack([SegFolder(toy_root, "c", "train").tensors(i)[1] for i in range(len(ids))])
    top = truth[:, : truth.shape[1] // 2]
    assert acc["per_class"]["sky"] == pytest.approx(float((top == 10).float().mean()), abs=1e-4)
    assert acc["per_class"]["sky"] < 1
    assert json.loads((made.folder / "meta.json").read_text())["accuracy"] == acc


# ----- the setting: sampling, labels never read, errors ---------------------------------------------------------
def test_target_stream_is_a_pure_function_of_the_iteration():
    full = list(IterationBatchSampler([5, 7], 2, 1, 0, 6, target=(9, 3)))
    resumed = list(IterationBatchSampler([5, 7], 2, 1, 4, 6, target=(9, 3)))
    assert full[4:] == resumed
    assert [k[0] for k in full[0]] == [0, 0, 1, 1, 2, 2, 2]  # sources, then the target stream
    seen = [k[1] for b in full[:3] for k in b if k[0] == 2]
    assert sorted(seen) == list(range(9))  # every target image once per epoch
    dg = list(IterationBatchSampler([5, 7], 2, 1, 0, 6))
    assert [[k for k in b if k[0] < 2] for b in full] == dg  # adding a target leaves the source batches alone


def test_target_training_labels_are_never_read(toy_root, tmp_path, monkeypatch):
    import dgnb.data.folder as folder

    read = []
    original = folder.load_label
    monkeypatch.setattr(folder, "load_label", lambda path: read.append(str(path)) or original(path))
    unlabelled = SegFolder(toy_root, "c", "train", labels=False)
    assert not unlabelled.has_labels and unlabelled.tensors(0)[1] is None
    augment = BatchAugment((32, 48), (32, 64))
    labelled = SegFolder(toy_root, "c", "train")
    with pytest.raises(ValueError, match="must not carry the target's own labels"):
        train_loader([SegFolder(toy_root, "a", "train")], augment, 2, 0, 0, 1, target=labelled, target_batch=2)
    for method in ("adaptsegnet", "mrnet"):
        read.clear()
        run = train(toy_config(toy_root, iterations=4, method=method), root=tmp_path / method, progress=False)
        assert run.complete
        assert read, "the sources' labels are read"
        assert not [p for p in read if "/c/train/" in p], "a target training label was read"


def test_batches_carry_target_images(toy_root):
    augment = BatchAugment((32, 48), (32, 64))
    sources = [SegFolder(toy_root, n, "train", domain_index=i) for i, n in enumerate("ab")]
    target = SegFolder(toy_root, "c", "train", labels=False)
    batch = next(iter(train_loader(sources, augment, 2, 0, 0, 1, target=target, target_batch=3)))
    assert batch["image"].shape == (4, 3, 32, 48) and batch["label"].shape == (4, 32, 48)
    assert batch["target_image"].shape == (3, 3, 32, 48) and "target_label" not in batch
    assert batch["domain"].tolist() == [0, 0, 1, 1]


def test_bad_settings_name_the_fix(toy_root, tmp_path):
    with pytest.raises(ConfigError, match="domain-generalization method.*source_only"):
        preset("smoke", "erm", setting="uda")
    with pytest.raises(ConfigError, match="adapts to an unlabelled target.*--setting uda"):
        preset("smoke", "adaptsegnet")
    with pytest.raises(ConfigError, match="needs a target to adapt to.*--uda-target"):
        preset("smoke", "minent", setting="uda", **{"data.uda_target": None})
    with pytest.raises(ConfigError, match="not among the evaluated targets"):
        preset("smoke", "mrnet", setting="uda", **{"data.targets": ["far_fog"]})
    with pytest.raises(ConfigError, match="also a labelled source"):
        preset("smoke", "mrnet", setting="uda", **{"data.sources": ["near"]})
    with pytest.raises(ValueError, match="unknown setting"):
        preset("smoke", "erm", setting="da")
    cfg = toy_config(toy_root, method="adaptsegnet")
    (tmp_path / "d").mkdir()
    for name in ("a", "b", "c"):  # a copy of the toy data whose target has no train split
        import shutil

        shutil.copytree(toy_root / name, tmp_path / "d" / name)
    shutil.rmtree(tmp_path / "d" / "c" / "train")
    with pytest.raises(DatasetLayoutError, match="UDA target 'c' has no train split.*--uda-target"):
        train(apply_overrides(cfg, {"data.root": str(tmp_path / "d")}), root=tmp_path / "runs", progress=False)


def test_cli_reports_setting_errors_in_one_line(capsys):
    from dgnb.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "smoke", "--setting", "uda", "--method", "erm"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "source_only" in err and err.startswith("dgnb: error:")


def test_source_only_run_is_shared_by_every_pair_and_uda_runs_are_not(toy_root):
    base = toy_config(toy_root, method="adaptsegnet")
    assert run_dir(base) != run_dir(apply_overrides(base, {"data.targets": ["c", "a2"], "data.uda_target": "a2"}))
    assert run_dir(base) == run_dir(apply_overrides(base, {"data.targets": ["c", "b2"]}))  # evaluation only
    a = preset("smoke", "source_only", setting="uda")
    b = preset("smoke", "source_only", setting="uda", **{"data.uda_target": "far_fog"})
    assert run_dir(a) == run_dir(b)


# ----- resume: discriminators, stages ------------------------------------------------------------------------------
def test_discriminator_state_survives_resume(toy_root, tmp_path):
    cfg = toy_config(toy_root, iterations=5, method="adaptsegnet")
    straight = train(cfg, root=tmp_path / "a", progress=False)
    train(cfg, root=tmp_path / "b", progress=False, stop_at=3)
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    state = same_checkpoints(straight.dir, resumed.dir)
    assert {"main", "disc"} <= set(state["optimizers"]) and state["schedulers"]["disc"]["last_epoch"] == 5
    adam = state["optimizers"]["disc"]
    assert adam["param_groups"][0]["betas"] == (0.9, 0.99) and any("exp_avg" in s for s in adam["state"].values())
    assert any(k.startswith("discriminators.aux.") for k in state["module"])


@pytest.mark.parametrize("stop", [2, 3, 4])
def test_mrnet_resumes_bitwise_across_the_stage_boundary(toy_root, tmp_path, stop):
    cfg = toy_config(toy_root, iterations=6, method="mrnet")  # Stage I: iterations 0-2, Stage II: 3-5
    straight = train(cfg, root=tmp_path / "a", progress=False)
    interrupted = train(cfg, root=tmp_path / "b", progress=False, stop_at=stop)
    assert not interrupted.complete
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    state = same_checkpoints(straight.dir, resumed.dir)
    assert state["stage"] == 1 and state["extra"]["pseudo_labels"] == "pseudo_labels/c-stage1"
    boundary = torch.load(straight.dir / "stage1.pt", weights_only=False)["method"]
    assert boundary["iteration"] == 3 and boundary["stage"] == 1  # the stage boundary is a checkpoint
    labels = sorted((straight.dir / "pseudo_labels" / "c-stage1" / "train" / "labels").glob("*.png"))
    assert labels and all((resumed.dir / p.relative_to(straight.dir)).read_bytes() == p.read_bytes() for p in labels)
    assert straight.metrics["target_miou"] == resumed.metrics["target_miou"]
    assert straight.metrics["stage_results"][0]["iteration"] == 3
    starts = [h for h in straight.history if "stage_start" in h]
    assert len(starts) == 1 and starts[0]["stage_start"]["pseudo_kept"] == 1.0  # no threshold (paper)
    stage2 = [h for h in straight.history if "pseudo_seg" in h]
    assert stage2 and all(h["iteration"] > 3 for h in stage2)


def test_mrnet_predicts_the_fused_heads(toy_root, tmp_path):
    run = train(toy_config(toy_root, iterations=2, method="mrnet", stage1_fraction=1.0), root=tmp_path, progress=False)
    method = run.load_method("cpu")
    assert method.stage_starts() == [] and not (run.dir / "stage1.pt").exists()
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        main, aux = method.heads(images)
    assert torch.equal(method.predict(images).argmax(1), (main.softmax(1) + 0.5 * aux.softmax(1)).argmax(1))
    assert isinstance(Run.open(run.dir).config.hparams["stage1_fraction"], float)


def test_uda_smoke_runs(smoke_home, monkeypatch):
    monkeypatch.setenv("DGNB_HOME", str(smoke_home))
    for method in ("source_only", "adaptsegnet", "minent", "mrnet"):
        run = train(preset("smoke", method, setting="uda"), progress=False)
        m = run.metrics
        assert m["setting"] == "uda" and set(m["target_miou"]) == {"near", "far_texture", "far_fog", "geometric"}
        assert m["uda_target"] == (None if method == "source_only" else "near")
    advent = train(preset("smoke", "minent", setting="uda", **{"hparams.variant": "advent"}), progress=False)
    assert any("d_loss" in h for h in advent.history)
    pseudo = PseudoLabels(run.dir / "pseudo_labels", "near-stage1")
    assert pseudo.manifest["splits"]["train"] == 12 and np.isclose(pseudo.manifest["kept_overall"], 1.0)


def test_uda_calibration_script_on_smoke(smoke_home, monkeypatch, tmp_path):
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("DGNB_HOME", str(smoke_home))
    path = Path(__file__).parents[1] / "benchmarks" / "calibrate_uda.py"
    spec = importlib.util.spec_from_file_location("calibrate_uda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--preset", "smoke", "--seeds", "0", "--oracle-seeds", "0", "--out", str(tmp_path / "cal")])
    report = json.loads((tmp_path / "cal.json").read_text())
    assert [p["pair"] for p in report["pairs"]] == ["near", "far"]
    for pair in report["pairs"]:
        oracle = report["oracle_runs"][pair["target"]][0]
        assert oracle["sources"] == [pair["target"]] and pair["target"] not in oracle["target_miou"]
        assert pair["gap"] == round(pair["oracle"]["mean"] - pair["source_only"]["mean"], 2)
    assert "| near | source_a -> near (near) |" in (tmp_path / "cal.md").read_text()


def test_class_balanced_pseudo_labels_keep_the_portion_per_class(toy_root, tmp_path):
    target = SegFolder(toy_root, "c", "train", labels=False)
    ids = [s.image.stem for s in target.samples]
    g = torch.Generator().manual_seed(0)
    batches = [(ids[i : i + 4], torch.zeros(len(ids[i : i + 4]), 3, 32, 64)) for i in range(0, len(ids), 4)]
    paths = {s.image.stem: s.image for s in target.samples}
    made = make_pseudo_labels(lambda x: torch.rand(len(x), 19, 32, 64, generator=g).softmax(1), batches,
                              lambda i: [paths[k] for k in i], tmp_path, "cb", rule="class_balanced", portion=0.3)
    m = made.manifest
    assert m["rule"] == {"rule": "class_balanced", "threshold": None, "portion": 0.3}
    assert len(m["kept_fraction"]) == 19 and all(abs(f - 0.3) < 0.01 for f in m["kept_fraction"].values())
    assert abs(m["kept_overall"] - 0.3) < 0.01 and all(t is not None for t in m["thresholds"].values())


def test_uda_results_table_and_bars_mark_the_adapted_target():
    from types import SimpleNamespace

    from dgnb.viz.adaptation import uda_results

    def run(src: float, near: float, fog: float) -> SimpleNamespace:
        return SimpleNamespace(metrics={"source_val_miou": src, "target_miou": {"near": near, "far_fog": fog},
                                        "train_seconds": 1.0})

    table, fig = uda_results({"source only": run(50, 30, 20), "AdaptSegNet": run(48, 36, 21)}, "source_a", "near")
    assert list(table.index) == ["source only", "AdaptSegNet"]
    assert list(table.columns) == ["source_a (source, val)", "near", "far_fog", "train s"]
    assert table.loc["AdaptSegNet", "near"] == 36
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["source_a\n(source)", "near\n(near, adapted)", "far_fog\n(far)"]
    heights = sorted(round(b.get_height()) for b in fig.axes[0].patches if b.get_height() > 0)
    assert heights == [20, 21, 30, 36, 48, 50]
