"""Self-training: CBST rounds (pseudo labels, rare-class mining, the source mix) and DRSL's MMDL-FR module."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dgnb.config import preset
from dgnb.data.folder import SegFolder
from dgnb.data.taxonomy import CLASSES, IGNORE_INDEX
from dgnb.data.transforms import BatchAugment
from dgnb.engine.runs import train
from dgnb.io import atomic_save_png, atomic_write_json
from dgnb.methods import OptimConfig, build_method
from dgnb.methods.cbst import scheduled
from dgnb.methods.drsl import (assigned_modes, class_scores, consistency_loss, draw_other_class, draw_same_group,
                               mixture_cross_entropy, mode_log_likelihoods, mode_triplet_loss, sample_pixels,
                               squared_distances)
from dgnb.methods.pseudo_labels import PseudoLabels, class_balanced_thresholds, score_pseudo_labels
from dgnb.methods.self_training import (label_pixels, mine_classes, mining_window, portion_thresholds,
                                        source_count, write_round, write_training_set)
from dgnb.models import ModelConfig
from tests.conftest import same_checkpoints, toy_config

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# ----- class-balanced thresholds and pseudo labels ------------------------------------------------------
@pytest.mark.parametrize("portion", [0.2, 0.35, 0.5])
def test_class_balanced_thresholds_keep_the_intended_portion_per_class(portion):
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 6, (40, 30), generator=g)
    pred[pred == 5] = 4  # class 5 never predicted
    conf = torch.rand(40, 30, generator=g) * 0.7 + 0.3 * (pred == 2)  # classes of different confidence levels
    theta = portion_thresholds(conf, pred, portion, num_classes=6)
    assert math.isinf(theta[5]) and torch.isfinite(theta[:5]).all()
    for c in range(5):
        n = int((pred == c).sum())
        kept = int(((conf >= theta[c]) & (pred == c)).sum())
        assert kept == math.ceil(portion * n), (c, kept, n)
    assert torch.equal(theta, class_balanced_thresholds(conf, pred, portion, 6))  # the loop version agrees
    big_pred = torch.randint(0, 5, (200, 300), generator=g)
    big_conf = torch.rand(200, 300, generator=g)
    coarse = portion_thresholds(big_conf, big_pred, portion, num_classes=6, stride=4)  # CRST's ds_rate: close
    for c in range(5):
        kept = float(((big_conf >= coarse[c]) & (big_pred == c)).sum()) / float((big_pred == c).sum())
        assert abs(kept - portion) < 0.03


def test_weighted_pseudo_labels_solve_cbst_and_keep_at_least_the_quantile_pixels():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 4, 16, 16, generator=g).pow(3).softmax(1)
    conf, pred = probs.max(1)
    theta = portion_thresholds(conf, pred, 0.3, num_classes=4)
    weighted = label_pixels(probs, theta, "weighted")
    quantile = label_pixels(probs, theta, "quantile")
    ratio = probs / theta.view(1, -1, 1, 1)
    kept = weighted != IGNORE_INDEX
    assert torch.equal(kept, ratio.max(1).values >= 1)
    assert torch.equal(weighted[kept], ratio.argmax(1)[kept])
    assert ((quantile != IGNORE_INDEX) <= kept).all()  # every pixel the quantile rule keeps is kept
    assert torch.equal(quantile[quantile != IGNORE_INDEX], pred[quantile != IGNORE_INDEX])
    # a rare class with a low threshold takes a pixel another class predicts (the weighted form's point)
    p = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)
    assert label_pixels(p, torch.tensor([0.9, 0.3]), "weighted").item() == 1
    assert label_pixels(p, torch.tensor([0.9, 0.3]), "quantile").item() == IGNORE_INDEX
    assert label_pixels(p, torch.tensor([math.inf, 0.3]), "weighted").item() == 1  # never-predicted class: never
    assert label_pixels(p, torch.tensor([math.inf, math.inf]), "weighted").item() == IGNORE_INDEX


def test_portion_schedules_follow_the_crst_code():
    assert [scheduled(0.2, 0.05, 0.5, r) for r in (1, 2, 3, 7, 9)] == [0.2, 0.25, 0.3, 0.5, 0.5]
    assert [scheduled(0.03, 0.0025, 0.06, r) for r in (1, 2, 3)] == [0.03, 0.0325, 0.035]
    method = build_method("cbst", ModelConfig(), OptimConfig(iterations=800), 1)
    assert method.stage_starts() == [400, 533, 666] and method.round_span(3) == (666, 800)
    assert method.portions(2) == (0.25, 0.213)  # the source share: 0.2 + 0.013 per round
    short = build_method("cbst", ModelConfig(), OptimConfig(iterations=4), 1)
    assert short.stage_starts() == [2, 3]  # fewer iterations than rounds: fewer rounds, one iteration each


def test_round_pseudo_labels_match_the_forward_pass_and_do_not_depend_on_the_cache(toy_root, tmp_path):
    torch.manual_seed(0)
    method = build_method("cbst", ModelConfig(head_channels=16, decoder_channels=16, low_proj=8),
                          OptimConfig(iterations=10), 2).setup(torch.device("cpu")).eval()
    target = SegFolder(toy_root, "c", "train", labels=False)
    ids = [s.image.stem for s in target.samples]
    images = torch.stack([target.tensors(i)[0] for i in range(len(target))]).float() / 255
    with torch.no_grad():
        forward = method.model(images).logits.softmax(1)
        mirrored = method.model(images.flip(-1)).logits.softmax(1).flip(-1)
    probs = method.target_probabilities(method.target_scores(images), tuple(images.shape[-2:]))
    assert torch.allclose(probs, 0.5 * (forward + mirrored), atol=1e-5)  # the segmenter's own prediction, flipped

    def batches():
        return iter([(ids[:3], images[:3]), (ids[3:], images[3:])])

    def paths(names):
        return [next(s.image for s in target.samples if s.image.stem == n) for n in names]

    sets = {}
    for name, limit in (("cached", 1 << 30), ("predicted twice", 0)):
        sets[name] = write_round(method.target_scores, batches, paths, tmp_path, name, 0.3,
                                 finish=method.target_probabilities, cache_bytes=limit)
    a, b = (sorted((p.folder / "train" / "labels").glob("*.png")) for p in sets.values())
    assert len(a) == len(ids) and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert {**sets["cached"].manifest, "name": None} == {**sets["predicted twice"].manifest, "name": None}


# ----- rare-class mining --------------------------------------------------------------------------------------
def test_mine_classes_are_the_rare_predicted_ones():
    predicted = torch.zeros(19, dtype=torch.long)
    predicted[0], predicted[2], predicted[18], predicted[12] = 100000, 50000, 20, 200  # shares 1.3e-4, 1.3e-3
    assert mine_classes(predicted, 1e-3) == [18]
    assert mine_classes(predicted, 2e-3) == [18, 12]


@pytest.mark.parametrize("where", [(30, 60), (1, 2), (62, 125), (40, 0)])
def test_rare_class_mining_picks_crops_containing_the_class(where):
    label = torch.zeros(64, 128, dtype=torch.long)
    r, c = where
    label[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = 18  # a small bicycle, anywhere (borders too)
    label[20:25, 100:105] = 12
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        top, left, h, w = mining_window(label, [18], (32, 48), g)
        assert (h, w) == (32, 48) and 0 <= top <= 64 - 32 and 0 <= left <= 128 - 48
        assert (label[top : top + h, left : left + w] == 18).any()
    assert mining_window(label, [17], (32, 48), g) is None  # the class is not in the image
    # the loader's random scale and crop of a mined patch always keep its centre, so the class stays in view
    patch = label[top : top + h, left : left + w]
    augment = BatchAugment((32, 48), (32, 64), (0.75, 1.25))
    centre = patch.clone()
    centre[15:18, 23:26] = 7  # a 3 x 3 block: nearest downsampling cannot skip it
    _, out = augment([torch.zeros(3, 32, 48, dtype=torch.uint8)] * 16, [centre] * 16, list(range(16)))
    assert (out == 7).flatten(1).any(1).all()


def _pseudo_set(root, n: int = 6) -> PseudoLabels:
    """A written pseudo-label set: road everywhere, a bicycle (18) in the even images."""
    for i in range(n):
        label = np.zeros((40, 80), np.uint8)
        if i % 2 == 0:
            label[30:33, 70:74] = 18
        atomic_save_png(root / "p" / "train" / "labels" / f"{i:03d}.png", label)
        atomic_save_png(root / "p" / "train" / "images" / f"{i:03d}.png", np.full((40, 80, 3), i, np.uint8))
    atomic_write_json(root / "p" / "meta.json", {"name": "p", "origin": "pseudo labels", "mine_classes": ["bicycle"],
                                                 "splits": {"train": n}})
    return PseudoLabels(root, "p")


def test_training_set_mines_patches_and_mixes_the_source_portion(tmp_path, toy_root):
    pseudo = _pseudo_set(tmp_path)
    sources = [SegFolder(toy_root, "a", "train"), SegFolder(toy_root, "b", "train")]
    g = torch.Generator().manual_seed(0)
    comp = write_training_set(pseudo, "p-train", (16, 24), 1.0, sources, 0.25, g)
    assert comp == {**comp, "target_images": 6, "mined_patches": 3, "source_images": 4, "source_pool": 16}
    mixed = SegFolder(tmp_path, "p-train", "train")
    assert mixed.pseudo and len(mixed) == 10
    names = [s.image.stem for s in mixed.samples]
    assert sum(n.startswith("s-") for n in names) == 4 and sum(n.startswith("t-") for n in names) == 6
    for i, s in enumerate(mixed.samples):
        image, label = mixed.tensors(i)
        if s.image.stem.startswith("t-") and int(s.image.stem[2:]) % 2 == 0:  # a mined patch: crop-sized, has the bike
            assert tuple(label.shape) == (16, 24) and (label == 18).any()
            assert int(image[0, 0, 0]) == int(s.image.stem[2:])  # the patch of its own image
        elif s.image.stem.startswith("t-"):
            assert tuple(label.shape) == (40, 80)  # nothing to mine: the whole image
    again = write_training_set(pseudo, "p-again", (16, 24), 1.0, sources, 0.25, torch.Generator().manual_seed(0))
    assert again == comp  # a pure function of the seed
    none = write_training_set(pseudo, "p-none", (16, 24), 0.0, sources, 0.0, g)
    assert none["mined_patches"] == 0 and none["source_images"] == 0
    share = write_training_set(pseudo, "p-share", (16, 24), 0.0, sources, 0.25, g, basis="share")
    assert share["source_images"] == 2 and len(SegFolder(tmp_path, "p-share", "train")) == 8  # 2 of 8: a quarter


def test_source_count_as_a_dataset_portion_or_as_a_share_of_the_set():
    assert source_count(0.03, "dataset", 24966, 2975) == 748  # CRST: 3% of GTA5
    share = 748 / (748 + 2975)  # ... which is a fifth of the round's set next to Cityscapes
    assert source_count(share, "share", 24966, 2975) == 748
    assert source_count(0.2, "share", 600, 600) == 150 and source_count(0.2, "share", 100, 600) == 100
    assert source_count(0.0, "share", 600, 600) == 0
    with pytest.raises(ValueError):
        source_count(1.0, "share", 600, 600)


# ----- the MMDL-FR module (DRSL) ----------------------------------------------------------------------------
def _modes() -> torch.Tensor:
    """K = 2 classes, M = 2 modes, D = 2: class 0 at (0, 0) and (1, 0), class 1 at (0, 2) and (3, 4)."""
    return torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [3.0, 4.0]]])


def test_mode_log_likelihoods_match_a_hand_computation():
    e = torch.tensor([[1.0, 1.0]])
    # squared distances 2, 1 (class 0), 2, 13 (class 1); σ = 0.5: log p = −d² / (2 · 0.25) = −2 d²
    assert torch.allclose(squared_distances(e, _modes()), torch.tensor([[[2.0, 1.0], [2.0, 13.0]]]))
    ll = mode_log_likelihoods(e, _modes(), sigma=0.5)
    assert torch.allclose(ll, torch.tensor([[[-4.0, -2.0], [-4.0, -26.0]]]))
    halved = -0.5 * torch.tensor([[[2.0, 1.0], [2.0, 13.0]]])
    assert torch.allclose(mode_log_likelihoods(e, _modes(), sigma=1.0), halved)
    assert torch.allclose(class_scores(ll, "max"), torch.tensor([[-2.0, -4.0]]))  # P(C=c) = max over modes
    mix = torch.tensor([[math.log((math.exp(-4) + math.exp(-2)) / 2), math.log((math.exp(-4) + math.exp(-26)) / 2)]])
    assert torch.allclose(class_scores(ll, "mixture"), mix)
    ce = mixture_cross_entropy(ll, torch.tensor([0]))  # −log softmax((−2, −4))_0 = log(1 + e^−2)
    assert math.isclose(ce.item(), math.log(1 + math.exp(-2)), rel_tol=1e-5)
    # Eq. 4: nearest own mode at 1, nearest other-class mode at √2
    d2 = squared_distances(e, _modes())
    assert math.isclose(mode_triplet_loss(d2, torch.tensor([0]), 1.0).item(), 2 - math.sqrt(2), rel_tol=1e-5)
    assert math.isclose(mode_triplet_loss(d2, torch.tensor([0]), 1.0, "squared").item(), 1 - 2 + 1, abs_tol=1e-6)
    assert assigned_modes(ll, torch.tensor([0])).item() == 1 and assigned_modes(ll, torch.tensor([1])).item() == 0


def test_triplet_loss_pulls_a_target_embedding_toward_its_mode():
    modes = _modes()
    e = torch.tensor([[0.9, 1.6]], requires_grad=True)  # labelled class 0, nearest to class 1's (0, 2)
    y = torch.tensor([0])
    mode = assigned_modes(mode_log_likelihoods(e, modes), y)
    before = (e - modes[0, mode]).norm()
    mode_triplet_loss(squared_distances(e, modes), y, margin=1.0).backward()
    with torch.no_grad():
        after = (e - 0.1 * e.grad - modes[0, mode]).norm()
    assert after < before


def test_alignment_loss_pulls_a_target_embedding_toward_its_mode():
    modes = _modes()
    g = torch.Generator().manual_seed(0)
    # source pixels: class 0 around its mode (1, 0) and around its mode (0, 0); class 1 around (0, 2)
    source = torch.cat([torch.tensor([1.0, 0.0]) + 0.05 * torch.randn(20, 2, generator=g),
                        torch.tensor([0.0, 0.0]) + 0.05 * torch.randn(20, 2, generator=g),
                        torch.tensor([0.0, 2.0]) + 0.05 * torch.randn(20, 2, generator=g)])
    source_labels = torch.tensor([0] * 40 + [1] * 20)
    source_modes = assigned_modes(mode_log_likelihoods(source, modes), source_labels)
    assert torch.equal(source_modes[:40], torch.tensor([1] * 20 + [0] * 20))
    target = torch.tensor([[1.3, 0.9], [1.2, 1.3]], requires_grad=True)  # pseudo label 0, both nearest to (1, 0)
    target_labels = torch.tensor([0, 0])
    target_modes = assigned_modes(mode_log_likelihoods(target, modes), target_labels)
    assert target_modes.tolist() == [1, 1]
    before = (target - modes[0, 1]).norm(dim=1)
    torch.manual_seed(0)
    loss = consistency_loss(target, target_labels, target_modes, source, source_labels, source_modes, 2, margin=1.0)
    assert loss.item() > 0
    loss.backward()
    with torch.no_grad():
        after = (target - 0.2 * target.grad - modes[0, 1]).norm(dim=1)
    assert (after < before).all()


def test_alignment_draws_positives_of_the_same_class_and_mode_and_negatives_of_another_class():
    torch.manual_seed(0)
    pool = torch.tensor([3, 0, 5, 3, 5, 5, 0, 1])
    query = torch.tensor([5, 3, 0, 1, 2] * 200)
    index, found = draw_same_group(query, pool)
    assert found.tolist()[:5] == [True, True, True, True, False]
    assert torch.equal(pool[index[found]], query[found])
    assert set(index[query == 5].tolist()) == {2, 4, 5}  # every member of the group can be drawn
    other, found = draw_other_class(query, pool)
    assert found.all() and (pool[other] != query).all()
    assert set(other[query == 5].tolist()) == {0, 1, 3, 6, 7}
    only = draw_other_class(torch.tensor([4]), torch.tensor([4, 4]))[1]
    assert not only.any()  # no other class in the pool: no negative


def test_pixel_sampling_takes_at_most_the_count_per_class_per_image():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (3, 20, 30))
    labels[1, :5] = IGNORE_INDEX
    labels[2] = 2
    index = sample_pixels(labels, 50, 19)
    image, cls = index // 600, labels.reshape(-1)[index]
    assert (cls != IGNORE_INDEX).all() and len(index.unique()) == len(index)
    for b in range(3):
        for c in range(4):
            available = int((labels[b] == c).sum())
            assert int(((image == b) & (cls == c)).sum()) == min(50, available)


# ----- runs: rounds are stages, resume is exact ---------------------------------------------------------------
@pytest.mark.parametrize("method, stop", [("cbst", 4), ("cbst", 5), ("drsl", 3), ("drsl", 6)])
def test_resume_is_bitwise_across_a_round_boundary(toy_root, tmp_path, method, stop):
    # warm-up iterations 0-3, rounds 1, 2, 3 begin at 4, 5, 6; the toy's two sources hold 16 images, its target 8
    cfg = toy_config(toy_root, iterations=8, method=method, source_portion=0.25,
                     source_portion_max=0.5)
    straight = train(cfg, root=tmp_path / "a", progress=False)
    interrupted = train(cfg, root=tmp_path / "b", progress=False, stop_at=stop)
    assert not interrupted.complete
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    state = same_checkpoints(straight.dir, resumed.dir)
    assert state["stage"] == 3 and [r["round"] for r in state["extra"]["rounds_written"]] == [1, 2, 3]
    assert [r["source_images"] for r in state["extra"]["rounds_written"]] == [3, 3, 3]  # a quarter of 11
    for k, first in ((1, 4), (2, 5), (3, 6)):  # every boundary is a checkpoint
        boundary = torch.load(straight.dir / f"stage{k}.pt", weights_only=False)["method"]
        assert boundary["iteration"] == first and boundary["stage"] == k
    written = sorted((straight.dir / "pseudo_labels").rglob("*.png"))
    assert written and all((resumed.dir / p.relative_to(straight.dir)).read_bytes() == p.read_bytes() for p in written)
    assert straight.metrics["target_miou"] == resumed.metrics["target_miou"]
    assert [s["iteration"] for s in straight.metrics["stage_results"]] == [4, 5, 6]
    lr = torch.load(straight.dir / "checkpoint.pt", weights_only=False)["method"]["optimizers"]["main"]
    assert math.isclose(lr["param_groups"][0]["lr"], 0.2 * cfg.optim.lr)  # rounds: constant, 0.2 x lr


def test_self_training_never_reads_the_target_training_labels(toy_root, tmp_path, monkeypatch):
    import dgnb.data.folder as folder

    read = []
    original = folder.load_label
    monkeypatch.setattr(folder, "load_label", lambda path: read.append(str(path)) or original(path))
    for method in ("cbst", "drsl"):
        read.clear()
        cfg = toy_config(toy_root, iterations=6, method=method, source_portion=0.25, source_portion_max=0.5)
        run = train(cfg, root=tmp_path / method, progress=False)
        assert run.complete and any("/pseudo_labels/c-round" in p for p in read)
        assert not [p for p in read if "/c/train/" in p], "a target training label was read"


def test_drsl_training_logs_every_term_and_predicts_with_the_segmentation_head(toy_root, tmp_path):
    run = train(toy_config(toy_root, iterations=10, method="drsl"), root=tmp_path, progress=False)
    warm = [h for h in run.history if "tri_s" in h and h["iteration"] <= 5]  # logged every 5 iterations
    rounds = [h for h in run.history if "cons" in h]
    assert warm and all("cons" not in h for h in warm)
    assert rounds and all(math.isfinite(h[k]) for h in rounds for k in ("tri_t", "mmdl_ce_t", "cons", "pseudo_seg"))
    method = run.load_method("cpu")
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(method.predict(images), method.model(images).logits)
    emb = method.embeddings(images)
    assert emb.shape == (2, 64, 16, 24) and torch.allclose(emb.norm(dim=1), torch.ones(2, 16, 24), atol=1e-4)
    posterior, modes = method.mode_maps(emb)
    assert posterior.shape == (2, 19, 16, 24) and torch.allclose(posterior.sum(1), torch.ones(2, 16, 24), atol=1e-4)
    assert modes.shape == (2, 19, 16, 24) and int(modes.max()) < 3
    assert any(k.startswith("mmdl.") for k in method.state_dict())


# ----- smoke runs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cbst", "drsl"])
def test_self_training_smoke_runs(method, smoke_home, monkeypatch):
    monkeypatch.setenv("DGNB_HOME", str(smoke_home))
    cfg = preset("smoke", method, setting="uda")
    run = train(cfg, progress=False)
    m = run.metrics
    assert m["uda_target"] == "near" and [s["stage"] for s in m["stage_results"]] == [0, 1, 2]
    starts = [h["stage_start"] for h in run.history if "stage_start" in h]
    assert [s["target_portion"] for s in starts] == [0.2, 0.25, 0.3]
    sets = run.load_method("cpu").pseudo_label_sets(run.dir)
    assert [p.name for p in sets] == ["near-round1", "near-round2", "near-round3"]
    for p in sets:
        manifest = p.manifest
        assert manifest["splits"]["train"] == 12 and manifest["rule"]["form"] == "weighted"
        assert set(manifest["kept_fraction"]) <= set(CLASSES) and 0 < manifest["kept_overall"] < 1
    accuracy = score_pseudo_labels(sets[0], cfg.data.root, "near")  # analysis only, after training
    assert 0 <= accuracy["overall"] <= 1 and sets[0].manifest["accuracy"] == accuracy


def test_notebook_08_lists_the_defaults_so_it_reads_the_course_runs():
    from pathlib import Path

    from dgnb.methods.base import changed_hparams
    from tests.test_notebooks import parameters

    hparams = parameters(Path(__file__).parents[1] / "notebooks" / "08_self_training_drsl.py")["HPARAMS"]
    assert set(hparams) == {"cbst", "drsl"}
    assert all(changed_hparams(m, values) == {} for m, values in hparams.items())  # dgnb course prepare trains them
