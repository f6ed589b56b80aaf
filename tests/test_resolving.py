"""Paired comparisons, batched augmentation, weight averaging and the F/dropout placement (resolving-power work)."""

from __future__ import annotations

import math

import pytest
import torch

from dgnb.analysis import compare_runs, detectable_difference, format_difference, paired_difference
from dgnb.config import apply_overrides
from dgnb.data.taxonomy import IGNORE_INDEX
from dgnb.data.transforms import BatchAugment
from dgnb.engine.bench import comparison_table
from dgnb.engine.evaluate import confusion_matrix, per_image_confusion
from dgnb.engine.runs import train
from dgnb.methods import build_method
from dgnb.models import ModelConfig, Segmenter
from dgnb.methods.base import OptimConfig
from tests.conftest import toy_config


# ----- paired differences ------------------------------------------------------------------------
def test_paired_difference_by_hand():
    # d = (1, 2, 3): mean 2, sd 1, t_{0.975, 2} = 4.3027, half-width 4.3027 / sqrt(3) = 2.4841
    d = paired_difference([11, 12, 13], [10, 10, 10])
    assert d["mean"] == pytest.approx(2.0) and d["sd"] == pytest.approx(1.0) and d["n"] == 3
    assert d["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert d["low"] == pytest.approx(2 - d["half_width"]) and not d["excludes_zero"]
    # the same mean with a constant difference: zero spread, the interval collapses and excludes zero
    assert paired_difference([11, 12, 13], [10, 11, 12])["excludes_zero"]
    # pairing matters: a seed effect shared by both methods cancels
    a, b = [30.0, 40.0, 50.0, 35.0, 45.0], [29.0, 39.2, 48.9, 34.1, 43.8]
    assert paired_difference(a, b)["excludes_zero"]
    # negative differences are resolved too; one seed gives an infinite interval
    assert paired_difference([1, 2, 3.1], [2, 3, 4])["excludes_zero"]
    assert math.isinf(paired_difference([1.0], [0.0])["half_width"])
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1, 2], [1])


def test_detectable_difference_and_format():
    assert detectable_difference(1.0, 5) == pytest.approx(2.776445 / math.sqrt(5), rel=1e-5)
    d = paired_difference([11, 12, 13], [10, 11, 12])
    assert format_difference(d).endswith("✓")
    assert "✓" not in format_difference(paired_difference([11, 12, 13], [10, 10, 10]))


def _runs():
    out = []
    for seed, (e, m) in enumerate([(30, 32), (31, 33.5), (29, 31.2), (32, 33.9)]):
        for method, v in (("erm", e), ("mldg", m)):
            out.append({"method": method, "seed": seed, "target_miou": {"near": v + 5, "far": v - 5},
                        "mean_target_miou": v, "source_val_miou": 50.0 + seed})
    return out


def test_compare_runs_pairs_by_seed_and_tables():
    comp = compare_runs(_runs(), "erm")
    assert list(comp) == ["mldg"]
    c = comp["mldg"]
    assert c["seeds"] == [0, 1, 2, 3]
    assert c["mean_target"]["mean"] == pytest.approx(2.15) and c["mean_target"]["excludes_zero"]
    assert c["targets"]["near"]["mean"] == pytest.approx(2.15)
    assert c["source_val"]["mean"] == pytest.approx(0.0)
    # a seed the reference lacks is not paired
    comp = compare_runs(_runs() + [{"method": "mldg", "seed": 9, "target_miou": {"near": 0, "far": 0},
                                    "mean_target_miou": 0, "source_val_miou": 0}], "erm")
    assert comp["mldg"]["seeds"] == [0, 1, 2, 3]
    table = comparison_table(compare_runs(_runs(), "erm"), {"a": {"role": "source"}, "near": {"role": "near"},
                                                            "far": {"role": "far"}})
    assert "method − erm" in table.splitlines()[0] and "| mldg |" in table and "✓" in table and "not resolved" in table
    with pytest.raises(ValueError, match="reference"):
        compare_runs(_runs(), "pinthemem")


def test_stage_rows_and_contrasts():
    """An earlier stage of a multi-stage run becomes its own row (no source val), and any two rows can be
    contrasted: the papers' orderings (MRNet Stage II > Stage I > AdaptSegNet) are such contrasts."""
    from dgnb.analysis import contrast, stage_records
    from dgnb.engine.bench import parse_contrasts

    runs = []
    for seed, (a, s1, s2) in enumerate([(20, 22, 25), (21, 22.5, 26), (19, 21.2, 23.9)]):
        runs.append({"method": "adaptsegnet", "seed": seed, "target_miou": {"near": a}, "mean_target_miou": a,
                     "source_val_miou": 40.0})
        runs.append({"method": "mrnet", "seed": seed, "target_miou": {"near": s2}, "mean_target_miou": s2,
                     "source_val_miou": 39.0,
                     "stage_results": [{"stage": 0, "iteration": 400, "target_miou": {"near": s1},
                                        "mean_target_miou": s1}]})
    stages = [rec for r in runs for rec in stage_records(r)]
    assert [(r["method"], r["seed"], r["mean_target_miou"]) for r in stages] == [
        ("mrnet@stage1", 0, 22), ("mrnet@stage1", 1, 22.5), ("mrnet@stage1", 2, 21.2)]
    rows = runs + stages
    c = contrast(rows, "mrnet@stage1", "adaptsegnet")
    assert c["mean_target"]["mean"] == pytest.approx((2 + 1.5 + 2.2) / 3) and c["source_val"] is None
    c = contrast(rows, "mrnet", "mrnet@stage1")
    assert c["targets"]["near"]["mean"] == pytest.approx((3 + 3.5 + 2.7) / 3) and c["mean_target"]["excludes_zero"]
    comp = compare_runs(rows, "adaptsegnet")
    assert set(comp) == {"mrnet", "mrnet@stage1"} and comp["mrnet"]["source_val"]["mean"] == pytest.approx(-1)
    table = comparison_table({"mrnet − mrnet@stage1": {"method": "mrnet", **c},
                              "mrnet@stage1 − adaptsegnet": {"method": "mrnet@stage1",
                                                             **contrast(rows, "mrnet@stage1", "adaptsegnet")}},
                             {"a": {"role": "source"}, "near": {"role": "near"}})
    assert "| mrnet − mrnet@stage1 | 3 | - |" in table and "| mrnet@stage1 − adaptsegnet |" in table
    assert parse_contrasts(["mrnet:mrnet@stage1"]) == [("mrnet", "mrnet@stage1")]
    with pytest.raises(ValueError, match="METHOD:REFERENCE"):
        parse_contrasts(["mrnet"])
    with pytest.raises(ValueError, match="no runs"):
        contrast(rows, "minent", "adaptsegnet")


# ----- batched augmentation ----------------------------------------------------------------------
def test_batch_augment_identity_flip_and_padding():
    img = torch.randint(0, 256, (3, 8, 16), dtype=torch.uint8)
    lbl = torch.randint(0, 19, (8, 16))
    ident = BatchAugment(crop=(8, 16), base_size=(8, 16), scale=(1.0, 1.0))
    # find one seed that flips and one that does not
    outs = {}
    for seed in range(20):
        out_img, out_lbl = ident([img], [lbl], [seed])
        flipped = bool(ident.affine((8, 16), seed)[0, 0] < 0)
        outs[flipped] = (out_img[0], out_lbl[0])
    plain, mirror = outs[False], outs[True]
    assert torch.allclose(plain[0], img.float() / 255, atol=1e-5) and torch.equal(plain[1], lbl)
    assert torch.allclose(mirror[0], img.float().flip(-1) / 255, atol=1e-5) and torch.equal(mirror[1], lbl.flip(-1))
    # a crop larger than the image pads labels with ignore and images with 0
    pad = BatchAugment(crop=(16, 32), base_size=(8, 16), scale=(1.0, 1.0))
    out_img, out_lbl = pad([img], [lbl], [3])
    assert (out_lbl == IGNORE_INDEX).float().mean() == pytest.approx(0.75, abs=0.05)
    outside = out_img[0][:, out_lbl[0] == IGNORE_INDEX]  # zeros, but for the blended border row/column
    assert (outside.abs().amax(0) > 1e-6).float().mean() < 0.15
    assert set(out_lbl[out_lbl != IGNORE_INDEX].unique().tolist()) <= set(lbl.unique().tolist())


def test_batch_augment_is_a_pure_function_of_the_seeds():
    imgs = [torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8) for _ in range(3)]
    lbls = [torch.randint(0, 19, (32, 64)) for _ in range(3)]
    aug = BatchAugment(crop=(24, 40), base_size=(32, 64), scale=(0.75, 1.25), color_jitter=0.3)
    a = aug(imgs, lbls, [5, 6, 7])
    b = aug(imgs[::-1], lbls[::-1], [7, 6, 5])
    assert torch.equal(a[0], b[0].flip(0)) and torch.equal(a[1], b[1].flip(0))
    assert a[0].shape == (3, 3, 24, 40) and a[1].dtype == torch.int64


def test_per_image_confusion_sums_to_the_batch_confusion():
    pred, target = torch.randint(0, 5, (4, 6, 7)), torch.randint(0, 5, (4, 6, 7))
    target[0, 0] = IGNORE_INDEX
    per = per_image_confusion(pred, target, 5)
    assert per.shape == (4, 5, 5)
    assert torch.equal(per.sum(0), confusion_matrix(pred, target, 5))
    assert torch.equal(per[2], confusion_matrix(pred[2:3], target[2:3], 5))


# ----- weight averaging --------------------------------------------------------------------------
def test_ema_tracks_the_average_and_swaps_weights_back():
    method = build_method("erm", ModelConfig(head_channels=16, decoder_channels=16, low_proj=8, aux=False),
                          OptimConfig(lr=0.1, iterations=5), 2).setup(torch.device("cpu"))
    method.enable_ema(0.5)
    w = method.model.head.classifier.weight
    before = w.detach().clone()
    batch = {"image": torch.rand(4, 3, 32, 48), "label": torch.randint(0, 19, (4, 32, 48)), "domain": torch.tensor([0, 0, 1, 1])}
    method.training_step(batch)
    method.end_iteration()
    key = "model.head.classifier.weight"
    assert torch.allclose(method.ema_state[key], 0.5 * before + 0.5 * w.detach())
    current = w.detach().clone()
    with method.averaged():
        assert torch.equal(method.model.head.classifier.weight, method.ema_state[key])
    assert torch.equal(method.model.head.classifier.weight, current)
    with pytest.raises(ValueError, match="decay"):
        method.enable_ema(1.0)


def test_ema_run_resumes_bitwise_and_is_what_is_scored(toy_root, tmp_path):
    cfg = apply_overrides(toy_config(toy_root, iterations=10), {"train.ema_decay": 0.9})
    straight = train(cfg, root=tmp_path / "a", progress=False)
    train(cfg, root=tmp_path / "b", progress=False, stop_at=5)
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    a = torch.load(straight.dir / "checkpoint.pt", weights_only=False)["method"]
    b = torch.load(resumed.dir / "checkpoint.pt", weights_only=False)["method"]
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert straight.metrics["target_miou"] == resumed.metrics["target_miou"]
    # the loaded method holds the averaged weights unless asked otherwise
    avg, raw = straight.load_method("cpu"), straight.load_method("cpu", averaged=False)
    k = "model.head.classifier.weight"
    assert torch.equal(avg.state_dict()[k], a["ema"][k]) and torch.equal(raw.state_dict()[k], a["module"][k])


# ----- where F is taken --------------------------------------------------------------------------
def test_feature_is_dropout_free_and_decoder_applies_dropout():
    model = Segmenter(ModelConfig(head_channels=16, decoder_channels=16, low_proj=8, aux=False)).train()
    x = torch.rand(2, 3, 32, 48)
    torch.manual_seed(0)
    f1 = model.encode(x)[1]
    torch.manual_seed(1)
    f2 = model.encode(x)[1]
    assert torch.equal(f1, f2)  # no dropout inside encode
    stages = model.encode(x)[0]
    torch.manual_seed(0)
    d1 = model.decode(f1, stages, (32, 48))
    torch.manual_seed(1)
    d2 = model.decode(f1, stages, (32, 48))
    assert not torch.equal(d1, d2)  # dropout at the start of decode (training mode)
    assert torch.equal(model.decode(f1, stages, (32, 48), dropout=False), model.decode(f1, stages, (32, 48), dropout=False))
