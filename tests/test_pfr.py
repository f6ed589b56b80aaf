"""PFR (docs/pfr.md): the Gram matrix, the style and content terms, the options, and the method's invariants."""

from __future__ import annotations

import math

import pytest
import torch

from dgnb.config import preset
from dgnb.engine.runs import train
from dgnb.methods import OptimConfig, build_method
from dgnb.methods.pfr import (STAGES, content_loss, detach_side, gram_matrix, match_sizes, pair_distance,
                              refinement_loss, style_loss)
from dgnb.models import ModelConfig
from tests.conftest import same_checkpoints, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# ----- the Gram matrix ---------------------------------------------------------------------------------------
def test_gram_matrix_of_a_known_tensor():
    # one image, C = 2 channels over N = 3 positions (H = 1, W = 3): F = [[1, 2, 0], [3, 4, 1]]
    f = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 1.0]]).view(1, 2, 1, 3)
    raw = torch.tensor([[1 + 4 + 0, 3 + 8 + 0], [3 + 8 + 0, 9 + 16 + 1]], dtype=torch.float32)  # F Fᵀ by hand
    assert torch.equal(gram_matrix(f, "none")[0], raw)
    assert torch.allclose(gram_matrix(f, "n")[0], raw / 3)
    assert torch.allclose(gram_matrix(f, "cn")[0], raw / 6)
    assert torch.allclose(gram_matrix(f), raw / 6)  # default: 1 / (C N)
    # a batch: one Gram matrix per image, symmetric
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g)
    s = gram_matrix(x)
    assert s.shape == (3, 4, 4) and torch.allclose(s, s.transpose(1, 2))
    assert torch.allclose(s[1], x[1].reshape(4, 30) @ x[1].reshape(4, 30).T / 120, atol=1e-6)
    with pytest.raises(ValueError, match="Gram normalization"):
        gram_matrix(x, "frobenius")


def test_style_loss_is_zero_for_identical_features_and_ignores_where_things_are():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(2, 8, 6, 10, generator=g)
    assert style_loss(src, src.clone()).item() == 0.0
    perm = torch.randperm(60, generator=g)
    shuffled = src.flatten(2)[:, :, perm].view_as(src)  # the same pixels, rearranged
    assert style_loss(src, shuffled).item() == pytest.approx(0.0, abs=1e-6)
    assert content_loss(src, shuffled).item() > 1.0  # content is about where things are; style is not
    other = torch.randn(2, 8, 6, 10, generator=g) * 2
    for norm in ("cn", "n", "none"):
        a = style_loss(src, other, gram_norm=norm)
        assert a.item() > 0
        assert style_loss(src, other.flatten(2)[:, :, perm].view_as(other), gram_norm=norm).item() == pytest.approx(
            a.item(), rel=1e-5)
    # Gram matrices of maps of different sizes compare directly (cn and n normalise by N)
    big = src.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # each pixel four times
    assert style_loss(src, big, gram_norm="cn").item() == pytest.approx(0.0, abs=1e-5)
    assert style_loss(src, big, gram_norm="none").item() > 1.0


def test_pair_distances_by_hand():
    a, b = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert pair_distance(a, b, "l2").tolist() == [5.0, 0.0]  # ‖(3, 4)‖ = 5
    assert pair_distance(a, b, "squared").tolist() == [25.0, 0.0]
    assert pair_distance(a, b, "mse").tolist() == [12.5, 0.0]
    with pytest.raises(ValueError, match="unknown distance"):
        pair_distance(a, b, "l1")


# ----- content between maps of different sizes ---------------------------------------------------------------------
def test_content_size_matching():
    g = torch.Generator().manual_seed(2)
    src = torch.randn(2, 3, 4, 6, generator=g)
    twice = src.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 8 x 12, each pixel a 2x2 block
    for mode in ("resize", "pool"):  # both undo a 2x block upsampling exactly
        s, t = match_sizes(src, twice, mode)
        assert s.shape == t.shape == (2, 3, 4, 6)
        assert torch.allclose(t, src, atol=1e-6), mode
        assert content_loss(src, twice, mode).item() == pytest.approx(0.0, abs=1e-5)
    # resize brings the target to the source's size, whichever is larger; crop and pool go to the common size
    assert match_sizes(twice, src, "resize")[1].shape[-2:] == (8, 12)
    assert match_sizes(twice, src, "pool")[0].shape[-2:] == (4, 6)
    # crop: the centre of each map
    framed = torch.zeros(2, 3, 8, 10)
    framed[..., 2:6, 2:8] = src
    s, t = match_sizes(src, framed, "crop")
    assert s.shape == t.shape == (2, 3, 4, 6) and torch.equal(t, src)
    assert content_loss(src, framed, "crop").item() == 0.0
    assert content_loss(src, framed, "resize").item() > 0.5
    # equal sizes: untouched
    same = torch.randn(2, 3, 4, 6, generator=g)
    for mode in ("resize", "crop", "pool"):
        assert match_sizes(src, same, mode)[1] is same
    with pytest.raises(ValueError, match="size matching"):
        match_sizes(src, twice, "warp")


def test_unequal_batches_are_paired_image_by_image():
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(4, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    expected = pair_distance(src[:2], tgt, "l2").mean()
    assert content_loss(src, tgt).item() == pytest.approx(expected.item())
    assert style_loss(src, tgt).shape == ()


def test_detach_stops_the_gradient_of_one_side():
    g = torch.Generator().manual_seed(4)
    for side, moves in (("none", (True, True)), ("target", (True, False)), ("source", (False, True))):
        s = torch.randn(2, 4, 3, 3, generator=g).requires_grad_()
        t = torch.randn(2, 4, 3, 3, generator=g).requires_grad_()
        a, b = detach_side(s, t, side)
        (style_loss(a, b) + content_loss(a, b)).backward()
        assert ((s.grad is not None and s.grad.abs().sum() > 0), (t.grad is not None and t.grad.abs().sum() > 0)) \
            == moves, side


def test_refinement_loss_sums_the_stages_with_their_weights():
    g = torch.Generator().manual_seed(5)
    widths = (4, 6, 8, 8)
    src = {st: torch.randn(2, c, 6, 8, generator=g) for st, c in zip(STAGES, widths)}
    tgt = {st: torch.randn(2, c, 6, 8, generator=g) for st, c in zip(STAGES, widths)}
    total, terms = refinement_loss(src, tgt)
    sty = sum(style_loss(src[st], tgt[st]) for st in STAGES)
    con = sum(content_loss(src[st], tgt[st]) for st in STAGES)
    assert total.item() == pytest.approx((sty + con).item(), rel=1e-6)  # Eq. 4 over Eq. 2-3
    assert {f"{k}_{st}" for k in ("sty", "con") for st in STAGES} | {"sty", "con", "pfr"} == set(terms)
    weighted, wt = refinement_loss(src, tgt, stage_weights=(0.0, 0.0, 0.0, 2.0), style_weight=0.5, content_weight=3.0)
    expected = 0.5 * 2 * style_loss(src["layer4"], tgt["layer4"]) + 3.0 * 2 * content_loss(src["layer4"], tgt["layer4"])
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    assert wt["sty_layer1"].item() == pytest.approx(terms["sty_layer1"].item())  # logged unweighted


# ----- the method ------------------------------------------------------------------------------------------------
MODEL = ModelConfig(head="deeplabv2", aspp_rates=(1, 2), aux=True, disc_channels=8)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(2, 32, 48, dtype=torch.long)
    label[:, 16:] = 10
    return {"image": torch.rand(2, 3, 32, 48, generator=g), "label": label, "domain": torch.zeros(2, dtype=torch.long),
            "target_image": torch.rand(2, 3, 32, 48, generator=g)}


def test_defaults_are_the_papers_and_the_loss_is_eq6():
    torch.manual_seed(0)
    method = build_method("pfr", MODEL, OptimConfig(lr=0.01, iterations=5), 1).setup(torch.device("cpu"))
    hp = method.hp
    assert (hp.pfr_weight, hp.adv_weight_main, hp.adv_weight_aux, hp.aux_weight) == (0.004, 0.002, 0.0, 0.0)
    assert (hp.gram_norm, hp.distance, hp.content_match, hp.detach) == ("cn", "l2", "resize", "none")
    assert set(method.discriminators) == {"main"} and "disc" in method.optimizers  # one domain classifier (Eq. 5)
    method.train()
    logs = method.training_step(_batch())
    assert {f"sty_{st}" for st in STAGES} <= set(logs) and {f"con_{st}" for st in STAGES} <= set(logs)
    assert logs["loss"] == pytest.approx(logs["seg"] + 0.004 * logs["pfr"] + 0.002 * logs["adv_main"], rel=1e-4)
    assert logs["pfr"] == pytest.approx(logs["sty"] + logs["con"], rel=1e-4)
    assert "d_loss_main" in logs and "aux" not in logs  # no auxiliary CE by default


def test_without_the_adversarial_term_there_is_no_discriminator():
    torch.manual_seed(0)
    method = build_method("pfr", MODEL, OptimConfig(lr=0.01, iterations=5), 1,
                          {"adv_weight_main": 0.0}).setup(torch.device("cpu"))
    assert len(method.discriminators) == 0 and set(method.optimizers) == {"main"}
    method.train()
    logs = method.training_step(_batch())
    assert not any(k.startswith(("adv_", "d_")) for k in logs)
    assert logs["loss"] == pytest.approx(logs["seg"] + 0.004 * logs["pfr"], rel=1e-4)
    multi = build_method("pfr", MODEL, OptimConfig(), 1, {"adv_weight_aux": 0.0002, "aux_weight": 0.1})
    assert set(multi.discriminators) == {"main", "aux"}  # AdaptSegNet's two levels on request


@pytest.mark.parametrize("bad, match", [({"gram_norm": "frobenius"}, "gram_norm"), ({"detach": "both"}, "detach"),
                                        ({"content_match": "warp"}, "content_match"), ({"distance": "l1"}, "distance"),
                                        ({"stage_weights": (1.0, 1.0)}, "stage_weights"),
                                        ({"stage_weights": (1.0, -1.0, 1.0, 1.0)}, "stage_weights")])
def test_bad_options_name_the_valid_ones(bad, match):
    with pytest.raises(ValueError, match=match):
        build_method("pfr", MODEL, OptimConfig(), 1, bad)


def test_pfr_lowers_the_feature_distances_it_measures():
    """With the PFR term alone (no segmentation labels), a few steps bring the stages' style and content
    distances between a fixed source batch and a fixed target batch down."""
    torch.manual_seed(0)
    method = build_method("pfr", MODEL, OptimConfig(lr=0.05, iterations=30), 1,
                          {"adv_weight_main": 0.0, "pfr_weight": 1.0}).setup(torch.device("cpu"))
    batch = _batch(1)
    batch["label"].fill_(255)  # nothing to segment: only L_pfr moves the network
    batch["target_image"] = (batch["target_image"] * 0.3 + 0.6).clamp(0, 1)  # a brighter "domain"
    method.train()
    first = method.training_step(batch)
    for _ in range(20):
        last = method.training_step(batch)
    assert last["pfr"] < 0.7 * first["pfr"]
    assert last["sty_layer1"] < first["sty_layer1"] and last["con_layer4"] < first["con_layer4"]


def test_resume_is_bitwise_and_keeps_the_discriminator(toy_root, tmp_path):
    cfg = toy_config(toy_root, iterations=5, method="pfr")
    straight = train(cfg, root=tmp_path / "a", progress=False)
    interrupted = train(cfg, root=tmp_path / "b", progress=False, stop_at=3)
    assert not interrupted.complete
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    state = same_checkpoints(straight.dir, resumed.dir)
    assert {"main", "disc"} <= set(state["optimizers"]) and state["schedulers"]["disc"]["last_epoch"] == 5
    adam = state["optimizers"]["disc"]
    assert adam["param_groups"][0]["betas"] == (0.9, 0.99) and any("exp_avg" in s for s in adam["state"].values())
    assert any(k.startswith("discriminators.main.") for k in state["module"])
    assert not any(k.startswith("discriminators.aux.") for k in state["module"])
    assert straight.metrics["target_miou"] == resumed.metrics["target_miou"]
    last = lambda run: next(h for h in reversed(run.history) if "pfr" in h)  # noqa: E731
    assert last(straight)["iteration"] == 5 and last(straight) == last(resumed)  # the logged distances too


def test_pfr_smoke_run_in_the_uda_setting(smoke_home, monkeypatch):
    monkeypatch.setenv("DGNB_HOME", str(smoke_home))
    run = train(preset("smoke", "pfr", setting="uda"), progress=False)
    m = run.metrics
    assert m["setting"] == "uda" and m["uda_target"] == "near" and math.isfinite(m["mean_target_miou"])
    assert set(m["target_miou"]) == {"near", "far_texture", "far_fog", "geometric"}
    logged = [h for h in run.history if "pfr" in h]
    assert logged and all(f"sty_{st}" in h and f"con_{st}" in h and "d_loss" in h for h in logged for st in STAGES)
    with pytest.raises(Exception, match="UDA setting"):
        preset("smoke", "pfr")  # a UDA method refuses DG, naming the fix
