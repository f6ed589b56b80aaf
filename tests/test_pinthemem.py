"""Pin the Memory and MLDG: hand-computed memory ops and losses, the meta step, shapes, training runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dgnb.engine.runs import train
from dgnb.methods import OptimConfig, build_method, meta
from dgnb.methods.pinthemem import (
    Memory, MemoryFusion, class_masks, cosine_scores, feature_cohesion_loss, masked_class_sums, memory_divergence_loss,
    momentum_update,
)
from dgnb.models import ModelConfig
from tests.conftest import toy_config

CPU = torch.device("cpu")
MODEL = ModelConfig(head_channels=16, decoder_channels=16, low_proj=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def make_method(name: str = "pinthemem", num_domains: int = 2, **hp) -> nn.Module:
    torch.manual_seed(0)
    return build_method(name, MODEL, OptimConfig(lr=0.02, iterations=10), num_domains, hp).setup(CPU).train()


def toy_batch(n_per_domain: int = 2, domains: int = 2, size=(32, 48)) -> dict[str, torch.Tensor]:
    """Sky over road with a car box; colours shift with the domain."""
    g = torch.Generator().manual_seed(1)
    n = n_per_domain * domains
    label = torch.zeros(n, *size, dtype=torch.long)
    label[:, : size[0] // 2] = 10
    label[:, 10:26, 8:20] = 13
    label[:, -2:] = 255
    domain = torch.arange(domains).repeat_interleave(n_per_domain)
    base = torch.stack([label.float() / 20, label.float() / 40, 1 - label.float() / 30], 1).clamp(0, 1)
    image = (0.7 * base + 0.1 * domain.view(-1, 1, 1, 1) + 0.2 * torch.rand(n, 3, *size, generator=g)).clamp(0, 1)
    return {"image": image, "label": label, "domain": domain}


# ----- the update rule (Eq. 1-3) -----------------------------------------------------------------
def test_class_masks_are_area_fractions_without_ignore():
    labels = torch.tensor([[[0, 0, 1, 255], [0, 1, 1, 255]]])  # (1, 2, 4) -> one row of 2 cells
    masks = class_masks(labels, (1, 2), num_classes=3)
    assert masks.shape == (1, 3, 1, 2)
    assert torch.allclose(masks[0, :, 0, 0], torch.tensor([3 / 4, 1 / 4, 0]))
    assert torch.allclose(masks[0, :, 0, 1], torch.tensor([0, 2 / 4, 0]))  # the ignore half counts for nothing


def test_momentum_update_by_hand():
    memory = torch.eye(3, 2)[[0, 1, 0]].clone()  # rows e0, e1, e0
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]).t().reshape(1, 2, 1, 3)  # three unit pixels
    masks = torch.zeros(1, 3, 1, 3)
    masks[0, 1, 0, :] = 1.0  # every pixel is class 1; classes 0 and 2 absent
    sums, counts = masked_class_sums(z, masks)
    assert counts.tolist() == [0, 3, 0]
    new = momentum_update(memory, sums, counts, momentum=0.8)
    mean = torch.tensor([1.6, 1.8]) / 3
    expected = 0.8 * torch.tensor([0.0, 1.0]) + 0.2 * mean
    assert torch.allclose(new[1], expected / expected.norm(), atol=1e-5)
    assert torch.equal(new[0], memory[0]) and torch.equal(new[2], memory[2])  # absent classes unchanged
    assert torch.allclose(new.norm(dim=1), torch.ones(3), atol=1e-5)


def test_memory_write_keeps_rows_unit_norm_and_absent_slots():
    torch.manual_seed(0)
    mem = Memory(19, 8).train()
    feats = torch.rand(2, 8, 4, 6)
    labels = torch.full((2, 16, 24), 10)
    labels[:, 8:] = 0
    new = mem.write(mem.memory, feats, labels)
    assert new.requires_grad  # graph kept through U (meta-train write)
    changed = (new - mem.memory).abs().sum(1) > 0
    assert changed.nonzero().squeeze(1).tolist() == [0, 10]
    assert torch.allclose(new.norm(dim=1), torch.ones(19), atol=1e-5)


# ----- the losses (Eq. 6, 7) ---------------------------------------------------------------------
def test_divergence_is_zero_for_orthonormal_memory_and_counts_positive_cosines():
    n = 5
    classifier = nn.Linear(n, n)
    with torch.no_grad():
        classifier.weight.copy_(40 * torch.eye(n))
        classifier.bias.zero_()
    cls, cos = memory_divergence_loss(torch.eye(n), classifier)
    assert cos.item() == 0.0 and cls.item() < 1e-12
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # one pair with cosine 1 (twice, ordered)
    _, cos = memory_divergence_loss(same, nn.Linear(2, 3))
    assert cos.item() == pytest.approx(2 / 6)
    _, cos = memory_divergence_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), nn.Linear(2, 2))
    assert cos.item() == 0.0  # negative cosines are not penalised (margin 0)


def test_cohesion_falls_when_features_match_their_slot():
    n = 4
    memory = torch.eye(n)
    labels = torch.tensor([[[0, 1], [2, 3]]])
    matched = F.one_hot(labels, n).permute(0, 3, 1, 2).float()  # every pixel's feature = its class slot
    shuffled = matched[:, [1, 2, 3, 0]]
    loss = feature_cohesion_loss(cosine_scores(matched, memory), labels)
    # by hand: correct slot cosine 1, others 0 -> -log(e / (e + 3))
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + n - 1)), rel=1e-5)
    assert loss < feature_cohesion_loss(cosine_scores(shuffled, memory), labels)
    ignored = torch.full_like(labels, 255)
    ignored[0, 0, 0] = 0
    assert feature_cohesion_loss(cosine_scores(shuffled, memory), ignored).item() == pytest.approx(
        -math.log(1 / (math.e + n - 1)), rel=1e-5)


# ----- the meta step -------------------------------------------------------------------------------
def test_inner_step_first_and_second_order_by_hand():
    """L_tr = a θ²/2, L_te = b θ²/2: d/dθ L_te(θ − α a θ) = b θ'(1 − α a) (2nd order) vs b θ' (1st)."""
    a, b, alpha, theta = 3.0, 2.0, 0.1, 1.5
    for first_order, factor in ((True, 1.0), (False, 1 - alpha * a)):
        p = nn.Parameter(torch.tensor(theta))
        adapted = meta.inner_step(0.5 * a * p**2, {"p": p}, alpha, first_order)
        assert p.grad.item() == pytest.approx(a * theta)  # ∇L_tr(θ) left in .grad
        (0.5 * b * adapted["p"] ** 2).backward()
        t1 = theta - alpha * a * theta
        assert p.grad.item() == pytest.approx(a * theta + b * t1 * factor)
    # alpha = 0, first order: the direction is the gradient of L_tr + L_te at θ (appendix invariant)
    p = nn.Parameter(torch.tensor(theta))
    adapted = meta.inner_step(0.5 * a * p**2, {"p": p}, 0.0, True)
    (0.5 * b * adapted["p"] ** 2).backward()
    assert p.grad.item() == pytest.approx((a + b) * theta)


def test_domain_split_and_virtual_domains():
    batch = toy_batch(2, domains=3)
    torch.manual_seed(0)
    for _ in range(5):
        tr, te = meta.split_episode(batch)
        a, b = set(tr["domain"].tolist()), set(te["domain"].tolist())
        assert a and b and not a & b and a | b == {0, 1, 2}
        assert len(tr["image"]) == 2 * len(a) and len(te["label"]) == 2 * len(b)
    single = toy_batch(4, domains=1)
    tr, te = meta.split_episode(single)
    assert tr["domain"].tolist() == [0, 0] and te["domain"].tolist() == [1, 1]
    assert torch.equal(tr["image"], single["image"][:2]) and torch.equal(te["label"], single["label"][2:])
    assert not torch.allclose(te["image"], single["image"][2:]) and 0 <= te["image"].min() <= te["image"].max() <= 1
    with pytest.raises(ValueError, match="single_source_virtual_domains"):
        meta.split_episode(single, virtual=False)


def meta_test_grads_on_update_net(first_order: bool, variant: str) -> list[torch.Tensor]:
    """Gradients of the meta-test loss (Eq. 11) alone on U's parameters, through the inner step."""
    m = make_method(first_order=first_order, memory_update=variant)
    batch = toy_batch()
    m.initialize_memory([batch])
    memory = m.memory.clone()
    tr, te = meta.take(batch, torch.tensor([0, 1])), meta.take(batch, torch.tensor([2, 3]))
    out = m(tr["image"], memory, tr["label"], write=True)
    loss_tr = m.read_loss(out, tr["label"])[0] + m.update_loss(out.written)[0]
    params = meta.trainable_params(m)
    adapted = meta.inner_step(loss_tr, params, 0.5, first_order)
    loss_te, _ = m.meta_test_loss(adapted, tr, te, memory, out)
    update_net = [p for n, p in params.items() if n.startswith("mem.update_net")]
    grads = torch.autograd.grad(loss_te, update_net, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(update_net, grads)]


def test_second_order_meta_gradient_reaches_update_net_through_the_inner_step():
    # U frozen in the re-write too: the only path from L_te to U is through ∇L_tr inside θ' (2nd order)
    first = meta_test_grads_on_update_net(True, "freeze_both")
    second = meta_test_grads_on_update_net(False, "freeze_both")
    assert all(g.abs().max() == 0 for g in first)
    assert sum(g.abs().sum() for g in second) > 0
    # default (paper) variant: both orders reach U through the re-written memory M', differently
    first = meta_test_grads_on_update_net(True, "freeze_encoder")
    second = meta_test_grads_on_update_net(False, "freeze_encoder")
    assert sum(g.abs().sum() for g in first) > 0
    assert any(not torch.allclose(a, b) for a, b in zip(first, second))


def test_fusion_equals_conv_of_concatenated_read():
    """Eq. 5 computed as (W_r Mᵀ) W equals Conv1x1([q, Mᵀ W]) with the same weights."""
    torch.manual_seed(0)
    fusion = MemoryFusion(6).eval()
    q, memory = F.normalize(torch.randn(2, 6, 3, 4), dim=1), F.normalize(torch.randn(5, 6), dim=1)
    w = cosine_scores(q, memory).softmax(1)
    read = torch.einsum("bnhw,nc->bchw", w, memory)
    direct = F.relu(fusion.bn(fusion.conv(torch.cat([q, read], 1))))
    assert torch.allclose(fusion(q, w, memory), direct, atol=1e-5)


# ----- the method ----------------------------------------------------------------------------------
def test_shapes_initialisation_and_inference_path():
    m = make_method()
    batch = toy_batch()
    assert not bool(m.mem.initialized)
    m.initialize_memory([batch])
    q = F.normalize(m.eval().model.encode(batch["image"])[1], dim=1)
    masks = class_masks(batch["label"], q.shape[-2:], 19)
    for c in (0, 10, 13):  # present classes: the normalised class mean of normalised features
        mean = (q * masks[:, c : c + 1]).sum((0, 2, 3)) / masks[:, c].sum()
        assert torch.allclose(m.memory[c], F.normalize(mean, dim=0), atol=1e-4)
    assert torch.allclose(m.memory.norm(dim=1), torch.ones(19), atol=1e-5) and bool(m.mem.initialized)
    out = m(batch["image"], m.memory)
    c = m.model.feature_channels
    assert m.memory.shape == (19, c) and out.logits.shape == (4, 19, 32, 48) and out.aux_logits is None
    assert out.scores.shape == (4, 19, 4, 6) and out.features.shape == (4, c, 4, 6)
    w = m.read_weights(batch["image"])
    assert w.shape == (4, 19, 4, 6) and torch.allclose(w.sum(1), torch.ones(4, 4, 6))
    p1, p2 = m.predict(batch["image"]), m.predict(batch["image"])
    assert p1.shape == (4, 19, 32, 48) and torch.equal(p1, p2)  # deterministic read at test time
    m.train()
    logs = m.training_step(batch)
    assert {"seg", "coh", "mem_cls", "mem_div", "te_seg", "te_coh", "loss_te"} <= set(logs)
    assert not m.memory.requires_grad and torch.allclose(m.memory.norm(dim=1), torch.ones(19), atol=1e-5)
    names = {id(p) for g in m.optimizers["main"].param_groups for p in g["params"]}
    for module in (m.update_net, m.fusion, m.memory_classifier):
        assert all(id(p) in names for p in module.parameters())
    assert {"mem.memory", "mem.initialized"} <= set(m.state_dict())


@pytest.mark.parametrize("hp", [
    {"use_coh": False, "use_div": False},                     # Table 5
    {"memory_update": "none"}, {"memory_update": "train_both"}, {"memory_update": "freeze_both"},  # Table 6
    {"episodic": False}, {"meta": False},                      # Table 7
    {"first_order": False, "gumbel_train": True},
])
def test_ablation_switches_train(hp):
    m = make_method(**hp)
    before = m.memory.clone()
    logs = m.training_step(toy_batch())
    assert all(math.isfinite(v) for v in logs.values()) and not torch.equal(before, m.memory)
    assert ("coh" in logs) == hp.get("use_coh", True) and ("loss_te" in logs) == hp.get("episodic", True)


def test_single_source_uses_virtual_domains():
    for name in ("pinthemem", "mldg"):
        m = make_method(name, num_domains=1)
        logs = m.training_step(toy_batch(4, domains=1))
        assert math.isfinite(logs["loss_te"])
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        make_method("mldg", beta=1.0)
    with pytest.raises(ValueError, match="memory_update"):
        make_method(memory_update="sometimes")


# ----- training runs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pinthemem", "mldg"])
def test_smoke_training_run(toy_root, tmp_path, name):
    run = train(toy_config(toy_root, 6, name), root=tmp_path, progress=False)
    assert run.complete and run.metrics["iterations"] == 6
    method = run.load_method("cpu")
    if name == "pinthemem":
        assert bool(method.mem.initialized) and method.memory.shape == (19, 16)


def test_pinthemem_exact_resume_is_bitwise(toy_root, tmp_path):
    cfg = toy_config(toy_root, iterations=8, method="pinthemem")
    straight = train(cfg, root=tmp_path / "a", progress=False)
    interrupted = train(cfg, root=tmp_path / "b", progress=False, stop_at=6)
    assert not interrupted.complete
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    a = torch.load(straight.dir / "checkpoint.pt", weights_only=False)["method"]["module"]
    b = torch.load(resumed.dir / "checkpoint.pt", weights_only=False)["method"]["module"]
    assert a.keys() == b.keys() and {"mem.memory", "mem.initialized", "memory_classifier.weight"} <= set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.metrics["target_miou"] == resumed.metrics["target_miou"]


# ----- figures and explorer ----------------------------------------------------------------------------
def test_memory_figures_and_explorer():
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.figure import Figure

    from dgnb.viz.explorers import memory_explorer
    from dgnb.viz.memory import class_mean_features, memory_activation_figure, tsne_features_figure

    m = make_method()
    batch = toy_batch()
    m.initialize_memory([batch])
    m.eval()
    feats, classes, domains = class_mean_features(m, {"a": batch["image"][:2], "b": batch["image"][2:]},
                                                  {"a": batch["label"][:2], "b": batch["label"][2:]})
    assert feats.shape == (12, 16) and sorted(set(classes.tolist())) == [0, 10, 13] and set(domains) == {"a", "b"}
    rng = np.random.default_rng(0)
    many = rng.normal(size=(60, 16)), rng.choice([0, 10, 13], 60), np.array(["a", "b"] * 30)
    fig = tsne_features_figure({"erm": (*many, None), "pinthemem": (feats, classes, domains, m.memory.numpy())},
                               perplexity=5)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    weights = m.read_weights(batch["image"][:1])[0]
    fig = memory_activation_figure(batch["image"][0], weights, [0, 10, 13], label=batch["label"][0])
    assert isinstance(fig, Figure)
    widget = memory_explorer(m, {"a": batch["image"]}, {"a": batch["label"]})
    assert len(widget.children) == 2
    plt.close("all")


def test_slot_similarity_and_step_table_figures():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from dgnb.engine.bench import PINTHEMEM_ABLATIONS, ablation_config
    from dgnb.viz import per_class_heatmap, slot_similarity_figure, step_table_figure

    memory = torch.eye(19)[:, :8].clone()
    memory[:8] += 0.1
    fig = slot_similarity_figure({"a": memory, "b": torch.eye(19)}, classes=[0, 1, 2])
    sims = fig.axes[1].images[0].get_array()
    assert isinstance(fig, Figure) and sims.shape == (3, 3) and float(abs(sims - torch.eye(3).numpy()).max()) == 0
    assert not plt.fignum_exists(fig.number)  # closed: a notebook shows it once, as the returned value
    kinds = {"g": ("green", "gradient"), "": ("white", "unused")}
    fig = step_table_figure([("step 1", [("g", "x"), ("", "")]), ("step 2", [("", ""), ("g", "y")])],
                            ["A", "B"], kinds, "episode")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"step 1", "step 2", "A", "B", "x", "y"} <= texts and len(fig.axes[0].patches) == 4
    fig = per_class_heatmap({"near": {"road": -5.0, "car": 12.0}}, difference=True)
    assert fig.axes[0].collections[0].norm.vmin == -20 and fig.axes[0].collections[0].norm.vmax == 20
    # every ablation variant builds: a registered method with hyperparameters it knows
    from dgnb.engine.runs import make_method

    for variant, (_, method, hparams) in PINTHEMEM_ABLATIONS.items():
        built = make_method(ablation_config("smoke", variant, 0), torch.device("cpu"))
        assert all(getattr(built.hp, k) == v for k, v in hparams.items()), variant
    plt.close("all")


def test_ablation_script_keeps_earlier_rows_of_the_same_machine_only(smoke_home, monkeypatch, tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    monkeypatch.setenv("DGNB_HOME", str(smoke_home))
    path = Path(__file__).parents[1] / "benchmarks" / "ablation_pinthemem.py"
    spec = importlib.util.spec_from_file_location("ablation_pinthemem", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "abl.json"
    base = ["--preset", "smoke", "--seeds", "0", "--out", str(out)]

    script.main(base + ["--variants", "full (first order)", "w/o L_div"])
    first = json.loads(out.read_text())
    assert [(r["variant"], r["seed"]) for r in first["runs"]] == [("full (first order)", 0), ("w/o L_div", 0)]
    assert all("own_slot_weight" in r["memory"] for r in first["runs"])
    table = out.with_suffix(".md").read_text()
    assert "| w/o L_div | Tab. 5 | 1 |" in table and "| full (first order) | Tab. 5-7: ours | 1 |" in table

    script.main(base + ["--variants", "full (first order)", "ERM"])  # w/o L_div is kept, full comes from the cache
    second = json.loads(out.read_text())
    assert second["kept"] == ["w/o L_div"] and list(second["variants"]) == ["full (first order)", "w/o L_div", "ERM"]
    assert sorted(r["variant"] for r in second["runs"]) == ["ERM", "full (first order)", "w/o L_div"]
    assert "| ERM | Tab. 7: Agg. | 1 |" in out.with_suffix(".md").read_text()
    assert "warning" not in capsys.readouterr().out  # the cached full runs reproduce the file's numbers

    second["machine"]["cpu_id"] = "another CPU"  # runs of another machine cannot be paired with this one's
    out.write_text(json.dumps(second))
    script.main(base + ["--variants", "ERM"])
    assert "made on another machine" in capsys.readouterr().out
    assert {r["variant"] for r in json.loads(out.read_text())["runs"]} == {"ERM"}
