"""Style methods: the stage-transform mechanism, IBN placements, SPC's projection and clustering losses,
ISW's mask and loss, bad inputs, bitwise resume of the bases, smoke runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dgnb.config import preset
from dgnb.engine.runs import make_method as make_run_method
from dgnb.engine.runs import train
from dgnb.methods import OptimConfig, build_method
from dgnb.methods.isw import cluster_boundaries, covariance_variance, isw_loss, sensitive_mask
from dgnb.methods.spc import (
    StyleProjection, discrimination_loss, group_mean_embeddings, group_weights, project_statistics, projection_weights,
    style_distance, update_semantic_bases, variance_loss,
)
from dgnb.models import ModelConfig, Segmenter
from dgnb.models.backbones import STAGES, build_backbone
from dgnb.models.style import (
    IBN, InstanceNormAfterAdd, InstanceStandardization, StageTransform, channel_stats, covariance, kmeans,
)
from tests.conftest import toy_config

CPU = torch.device("cpu")
MODEL = ModelConfig(head_channels=16, decoder_channels=16, low_proj=8)

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def make_method(name: str, num_domains: int = 2, model: ModelConfig = MODEL, **hp):
    torch.manual_seed(0)
    return build_method(name, model, OptimConfig(lr=0.02, iterations=10), num_domains, hp).setup(CPU).train()


def toy_batch(per_domain: int = 2, domains: int = 2, size=(32, 48)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = per_domain * domains
    label = torch.zeros(n, *size, dtype=torch.long)
    label[:, : size[0] // 2] = 10
    label[:, 10:26, 8:20] = 13
    label[:, -2:] = 255
    domain = torch.arange(domains).repeat_interleave(per_domain)
    base = torch.stack([label.float() / 20, label.float() / 40, 1 - label.float() / 30], 1).clamp(0, 1)
    image = (0.6 * base + 0.15 * domain.view(-1, 1, 1, 1) + 0.2 * torch.rand(n, 3, *size, generator=g)).clamp(0, 1)
    return {"image": image, "label": label, "domain": domain}


# ----- the stage-transform mechanism --------------------------------------------------------------------
class Doubler(StageTransform):
    def transform(self, x):
        return 2 * x, {"mean": x.mean((2, 3))}


def test_stage_transform_changes_the_flow_and_returns_by_products():
    torch.manual_seed(0)
    plain = build_backbone("resnet_tiny").eval()
    torch.manual_seed(0)
    changed = build_backbone("resnet_tiny").eval()
    changed.insert_transform("stem", Doubler())
    x = torch.rand(2, 3, 32, 48)
    a, b = plain(x), changed(x)
    assert torch.allclose(b["stem"], 2 * a["stem"])
    assert torch.allclose(b["stem.mean"], a["stem"].mean((2, 3)))
    assert not torch.allclose(a["layer1"], b["layer1"])  # the doubled map went on into layer1
    kept = Doubler()
    kept.expose = "input"
    torch.manual_seed(0)
    other = build_backbone("resnet_tiny").eval()
    other.insert_transform("layer1", kept)
    c = other(x)
    assert torch.allclose(c["layer1"], a["layer1"]) and not torch.allclose(c["layer2"], a["layer2"])
    assert set(other(x, until="layer1")) == {"stem", "layer1", "layer1.mean"}


def test_stage_transform_bad_inputs():
    backbone = build_backbone("resnet_tiny")
    with pytest.raises(ValueError, match="unknown stage 'layer9'.*valid stages: stem, layer1, layer2, layer3, layer4"):
        backbone.insert_transform("layer9", Doubler())
    backbone.insert_transform("stem", Doubler())
    with pytest.raises(ValueError, match="already has a transform"):
        backbone.insert_transform("stem", Doubler())
    with pytest.raises(TypeError, match="StageTransform"):
        backbone.insert_transform("layer1", nn.Identity())
    with pytest.raises(ValueError, match="unknown stage 'layer1,layer9'|unknown stage 'layer9'"):
        make_method("spc", project_stages="layer1,layer9")


# ----- statistics --------------------------------------------------------------------------------------
def test_channel_stats_and_covariance_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]]).view(1, 1, 2, 2)
    mu, sigma = channel_stats(x, eps=0.0)
    assert torch.allclose(mu, torch.tensor([[3.0]])) and torch.allclose(sigma, torch.tensor([[x.flatten().std()]]))
    z = torch.randn(3, 4, 5, 6)
    cov = covariance(z, eps=0.0)
    flat = z.reshape(3, 4, 30)
    assert torch.allclose(cov[1], flat[1] @ flat[1].t() / 29, atol=1e-5)
    assert torch.allclose(cov, cov.transpose(1, 2))


def test_kmeans_finds_separated_groups():
    pts = torch.cat([torch.zeros(10, 1), torch.full((10, 1), 5.0), torch.full((5, 1), 20.0)]) + 0.01 * torch.randn(25, 1)
    centres, labels = kmeans(pts, 3)
    assert torch.allclose(centres[:, 0], torch.tensor([0.0, 5.0, 20.0]), atol=0.1)
    assert labels.tolist() == [0] * 10 + [1] * 10 + [2] * 5


# ----- IBN-Net placements ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet_tiny", "resnet50"])
def test_ibn_layers_sit_where_the_paper_puts_them(name):
    a = build_backbone(name, ibn="a")
    for stage in ("layer1", "layer2", "layer3"):
        for block in getattr(a, stage):
            assert isinstance(block.bn1, IBN) and block.bn1.half == block.bn1.IN.num_features
            assert block.bn1.IN.num_features + block.bn1.BN.num_features == block.conv1.out_channels
    assert not any(isinstance(m, (IBN, nn.InstanceNorm2d)) for m in a.layer4.modules())
    assert isinstance(a.stem[1], nn.BatchNorm2d)
    b = build_backbone(name, ibn="b")
    assert isinstance(b.stem[1], nn.InstanceNorm2d) and b.stem[1].affine
    for stage in ("layer1", "layer2"):
        layer = getattr(b, stage)
        assert isinstance(layer[-1], InstanceNormAfterAdd) and layer[-1].IN.num_features == b.channels[stage]
        assert not any(isinstance(blk, InstanceNormAfterAdd) for blk in layer[:-1])
    for stage in ("layer3", "layer4"):
        assert not any(isinstance(m, (IBN, nn.InstanceNorm2d)) for m in getattr(b, stage).modules())
    assert not any(isinstance(m, IBN) for m in b.modules())
    x = torch.rand(2, 3, 64, 64)
    assert b(x)["layer4"].shape == build_backbone(name)(x)["layer4"].shape


def test_ibn_b_block_is_instance_norm_between_addition_and_relu():
    torch.manual_seed(0)
    b = build_backbone("resnet_tiny", ibn="b").eval()
    wrapped = b.layer1[-1]
    x = torch.rand(2, b.channels["stem"], 8, 8)
    block = wrapped.block
    pre = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + x
    assert torch.allclose(wrapped(x), F.relu(wrapped.IN(pre)), atol=1e-6)


def test_ibn_method_and_model_config():
    m = make_method("ibn", variant="a")
    assert m.model.cfg.ibn == "a" and isinstance(m.model.backbone.layer1[0].bn1, IBN)
    with pytest.raises(ValueError, match="contradicts"):
        make_method("ibn", model=ModelConfig(head_channels=16, decoder_channels=16, low_proj=8, ibn="a"), variant="b")
    erm_on_ibn = Segmenter(ModelConfig(head_channels=16, decoder_channels=16, low_proj=8, ibn="b"))
    assert isinstance(erm_on_ibn.backbone.stem[1], nn.InstanceNorm2d)
    with pytest.raises(ValueError, match="model.ibn=VALUE|expected one of 'none', 'a', 'b'"):
        preset("smoke", "erm", **{"model.ibn": "c"})


# ----- SPC style projection ------------------------------------------------------------------------------
def test_projection_is_identity_when_the_single_base_is_the_inputs_style():
    x = torch.randn(1, 6, 9, 11) * 3 + 1
    proj = StyleProjection(6, num_bases=1)
    mu, sigma = channel_stats(x)
    proj.style_mu.copy_(mu)
    proj.style_sigma.copy_(sigma)
    proj.initialized.fill_(True)
    out, extra = proj(x)
    assert torch.allclose(out, x, atol=1e-5)
    assert torch.allclose(extra["lambda"], torch.ones(1, 1)) and torch.allclose(extra["d"], torch.zeros(1, 1), atol=1e-6)


def test_projected_statistics_lie_in_the_convex_hull_and_lambda_sums_to_one():
    torch.manual_seed(0)
    base_mu, base_sigma = torch.randn(3, 5), torch.rand(3, 5) + 0.5
    x = torch.randn(4, 5, 8, 8) * 2
    mu, sigma = channel_stats(x)
    for form in ("was", "abs"):
        d = style_distance(mu, sigma, base_mu, base_sigma, form)
        lam = projection_weights(d)
        assert lam.shape == (4, 3) and (lam > 0).all()
        assert torch.allclose(lam.sum(1), torch.ones(4))
        mu_p, sigma_p = project_statistics(lam, base_mu, base_sigma)
        assert (mu_p >= base_mu.min(0).values - 1e-6).all() and (mu_p <= base_mu.max(0).values + 1e-6).all()
        assert torch.allclose(mu_p, torch.einsum("bm,mc->bc", lam, base_mu))
        assert (sigma_p >= base_sigma.min(0).values - 1e-6).all()
    proj = StyleProjection(5, 3)
    proj.style_mu.copy_(base_mu)
    proj.style_sigma.copy_(base_sigma)
    proj.initialized.fill_(True)
    out, extra = proj(x)
    got_mu, got_sigma = channel_stats(out)
    assert torch.allclose(got_mu, extra["mu_proj"], atol=1e-4) and torch.allclose(got_sigma, extra["sigma_proj"], atol=1e-3)


def test_wasserstein_distance_by_hand_and_closer_base_weighs_more():
    mu, sigma = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 2.0]])
    base_mu, base_sigma = torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 2.0], [2.0, 2.0]])
    d = style_distance(mu, sigma, base_mu, base_sigma, "was")
    assert torch.allclose(d, torch.tensor([[0.0, (1 + 1) / 2]]))
    assert projection_weights(d)[0, 0] > projection_weights(d)[0, 1]


def test_style_base_ema_per_domain():
    proj = StyleProjection(2, 2, momentum=0.9)
    mu = torch.tensor([[1.0, 1.0], [3.0, 3.0], [10.0, 10.0]])
    sigma = torch.ones(3, 2)
    assign = F.one_hot(torch.tensor([0, 0, 1]), 2).float()
    proj.update(mu, sigma, assign)  # first batch: the bases are the domains' means
    assert bool(proj.initialized) and torch.allclose(proj.style_mu, torch.tensor([[2.0, 2.0], [10.0, 10.0]]))
    proj.update(torch.tensor([[12.0, 12.0]]), torch.ones(1, 2), F.one_hot(torch.tensor([0]), 2).float())
    assert torch.allclose(proj.style_mu, torch.tensor([[0.9 * 2 + 0.1 * 12] * 2, [10.0, 10.0]]))  # domain 1 absent


# ----- SPC semantic clustering losses -------------------------------------------------------------------
def clustering_case():
    torch.manual_seed(0)
    k, m, d = 4, 2, 8
    bases = F.normalize(torch.randn(k, m, d), dim=2)
    labels = torch.tensor([[[0, 1], [2, 255]], [[1, 1], [3, 0]]])  # (B=2, 2, 2)
    assign = F.one_hot(torch.tensor([0, 1]), m).float()
    return bases, labels, assign, group_weights(labels, assign, k)


def test_variance_loss_is_zero_when_embeddings_equal_their_bases():
    bases, labels, assign, w = clustering_case()
    dom = assign.argmax(1)[:, None, None].expand_as(labels)
    e = bases[labels.clamp(max=3), dom].reshape(-1, bases.shape[2])  # each pixel on its (class, domain) base
    assert float(variance_loss(e, bases, w)) == pytest.approx(0.0, abs=1e-6)
    noisy = F.normalize(e + 0.5 * torch.randn_like(e), dim=1)
    assert float(variance_loss(noisy, bases, w)) > 0.01


def test_variance_loss_by_hand():
    bases = F.normalize(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), dim=2)  # K=2, M=1
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    w = group_weights(torch.tensor([[[0, 0, 1]]]), torch.ones(1, 1), 2)
    expected = (((1 - 1) ** 2 + (1 - 0.6) ** 2) / 2 + (1 - 0.8) ** 2) / 2
    assert float(variance_loss(e, bases, w)) == pytest.approx(expected, abs=1e-6)


def test_discrimination_loss_falls_when_an_embedding_moves_to_its_class_base():
    bases, labels, assign, w = clustering_case()
    torch.manual_seed(1)
    e = F.normalize(torch.randn(w.shape[0], bases.shape[2]), dim=1)
    target = bases[1, 0]  # pixel 1 (image 0, class 1, domain 0) moves to its class's base
    losses = []
    for t in (0.0, 0.5, 1.0):
        moved = e.clone()
        moved[1] = F.normalize((1 - t) * e[1] + t * target, dim=0)
        mean_e, counts = group_mean_embeddings(moved, w)
        losses.append(float(discrimination_loss(mean_e, counts, bases, temperature=0.1)))
    assert losses[0] > losses[1] > losses[2] >= 0


def test_discrimination_loss_matches_the_loop_form():
    bases, labels, assign, w = clustering_case()
    torch.manual_seed(2)
    e = F.normalize(torch.randn(w.shape[0], bases.shape[2]), dim=1)
    mean_e, counts = group_mean_embeddings(e, w)
    k, m, _ = bases.shape
    total = 0.0
    for dm in range(m):
        for c in range(k):
            if counts[dm, c] == 0:
                continue
            pos = (bases[c] @ mean_e[dm, c]).mean()
            neg = torch.cat([bases[j] @ mean_e[dm, c] for j in range(k) if j != c])
            logits = torch.cat([pos[None], neg]) / 0.1
            total += float(F.cross_entropy(logits[None], torch.tensor([0])))
    assert float(discrimination_loss(mean_e, counts, bases, 0.1)) == pytest.approx(total / (k * m), rel=1e-5)


def test_semantic_base_update_keeps_unit_norm_and_absent_groups():
    bases, labels, assign, w = clustering_case()
    e = F.normalize(torch.randn(w.shape[0], bases.shape[2]), dim=1)
    sums, counts = torch.einsum("pmk,pd->mkd", w, e), w.sum(0)
    new = bases.clone()
    update_semantic_bases(new, sums, counts, momentum=0.9)
    assert torch.allclose(new.norm(dim=2), torch.ones(new.shape[:2]), atol=1e-5)
    absent = (counts == 0).t()
    assert torch.equal(new[absent], bases[absent]) and not torch.equal(new[~absent], bases[~absent])


# ----- the SPC method ---------------------------------------------------------------------------------
def test_spc_trains_and_updates_bases_without_gradient():
    m = make_method("spc")
    assert set(m.projections) == {"stem", "layer1"} and m.semantic_bases.shape == (19, 2, 16)
    assert not any(isinstance(b, nn.Parameter) for b in (m.semantic_bases, m.projections["stem"].style_mu))
    batch = toy_batch()
    before = m.semantic_bases.clone()
    logs = m.training_step(batch)
    m.end_iteration()
    assert {"ce", "var", "dis"} <= set(logs) and all(math.isfinite(v) for v in logs.values())
    assert bool(m.projections["stem"].initialized) and not torch.equal(before, m.semantic_bases)
    stem = m.projections["stem"]
    mu, _ = channel_stats(m.model.backbone.stem((batch["image"] - m.model.mean) / m.model.std))
    assert stem.style_mu.shape == (2, mu.shape[1])
    m.training_step(batch)  # second step: the projection is active
    read = m.style_readout(batch["image"])
    assert torch.allclose(read["stem.lambda"].sum(1), torch.ones(4))
    m.eval()
    assert m.predict(batch["image"]).shape == (4, 19, 32, 48)
    # the decoder's low-level skip is the layer1 map before the projection
    stages = m.model.backbone((batch["image"] - m.model.mean) / m.model.std, until="layer1")
    assert not torch.allclose(stages["layer1"], m.projections["layer1"](stages["layer1"])[0])


def test_spc_single_source_kmeans_bases():
    m = make_method("spc", num_domains=1, kmeans_bases=3, kmeans_images=4)
    assert m.base_source == "kmeans" and m.projections["stem"].num_bases == 3 and m.semantic_bases.shape[1] == 3
    batch = toy_batch(per_domain=2, domains=1)
    m.training_step(batch)
    assert not bool(m.projections["stem"].initialized)  # 2 of 4 images collected: projection still off
    m.training_step(batch)
    stem = m.projections["stem"]
    assert bool(stem.initialized) and int(stem.bank_count) == 4
    assert torch.isfinite(stem.style_mu).all() and (stem.style_sigma > 0).all()
    logs = m.training_step(batch)
    assert math.isfinite(logs["loss"])


def test_spc_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="single source.*style_base_source=kmeans"):
        make_method("spc", num_domains=1, style_base_source="domains")
    with pytest.raises(ValueError, match="at least one style base.*kmeans_bases"):
        make_method("spc", num_domains=1, kmeans_bases=0)
    with pytest.raises(ValueError, match="at least one style base"):
        make_method("spc", num_domains=3, style_base_source="kmeans", kmeans_bases=-2)
    with pytest.raises(ValueError, match="style distance"):
        make_method("spc", distance="kl")


# ----- ISW ----------------------------------------------------------------------------------------------
def test_isw_mask_is_symmetric_and_selects_the_high_variance_pairs():
    torch.manual_seed(0)
    c = 6
    variance = torch.rand(c, c) * 0.01
    variance[0, 3] = variance[3, 0] = 5.0
    variance[1, 4] = variance[4, 1] = 2.0
    mask, centres = sensitive_mask(variance, clusters=3)
    assert torch.equal(mask, mask.t()) and mask.diagonal().sum() == 0
    assert {tuple(ij) for ij in mask.triu().nonzero().tolist()} == {(0, 3), (1, 4)}
    assert len(cluster_boundaries(centres)) == 2 and (centres[1:] > centres[:-1]).all()


def test_isw_loss_non_negative_and_zero_for_whitened_input():
    torch.manual_seed(0)
    mask = torch.ones(4, 4) - torch.eye(4)
    z = InstanceStandardization()(torch.randn(3, 4, 8, 8))[0]
    assert float(isw_loss(covariance(z), mask)) > 0
    a = torch.randn(64, 4)
    q = torch.linalg.qr(a - a.mean(0))[0]  # orthonormal columns, each zero-mean (combinations of centred ones)
    white = (q.t() * math.sqrt(63)).reshape(1, 4, 8, 8)  # channel covariance = I
    cov = covariance(white)
    assert torch.allclose(cov[0], torch.eye(4), atol=1e-4)
    assert float(isw_loss(cov, mask)) == pytest.approx(0.0, abs=1e-4)
    assert float(isw_loss(-covariance(z), mask)) >= 0  # |Σ|: non-negative whatever the sign


def test_covariance_variance_of_a_pair():
    a, b = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    v = covariance_variance(a, b)
    assert torch.allclose(v, torch.stack([a, b]).var(0).mean(0), atol=1e-6)


def test_isw_selects_a_mask_after_warmup_and_then_whitens():
    m = build_method("isw", MODEL, OptimConfig(lr=0.02, iterations=12), 2,
                     {"trials": 2, "trial_batches": 2, "warmup_fraction": 0.25}).setup(CPU).train()
    assert m.warmup_iterations == 4 and set(m.isw_stages) == {"stem", "layer1", "layer2"}
    batch = toy_batch()
    seen = []
    for _ in range(6):
        logs = m.training_step(batch)
        m.end_iteration()
        seen.append("isw" in logs)
    assert seen == [False] * 4 + [True] * 2 and m.mask_ready and int(m.trials_done) == 2
    for stage, mask in m.masks().items():
        assert torch.equal(mask, mask.t()) and mask.sum() > 0, stage


# ----- resume and smoke runs ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,hparams", [("spc", {}), ("isw", {"trials": 1, "trial_batches": 1, "warmup_fraction": 0.25})])
def test_bases_and_masks_survive_a_bitwise_resume(name, hparams, toy_root, tmp_path):
    cfg = toy_config(toy_root, iterations=6, method=name, **hparams)
    straight = train(cfg, root=tmp_path / "a", progress=False)
    interrupted = train(cfg, root=tmp_path / "b", progress=False, stop_at=3)
    assert not interrupted.complete
    resumed = train(cfg, root=tmp_path / "b", progress=False)
    a = torch.load(straight.dir / "checkpoint.pt", weights_only=False)["method"]["module"]
    b = torch.load(resumed.dir / "checkpoint.pt", weights_only=False)["method"]["module"]
    keys = [k for k in a if any(s in k for s in ("style_mu", "style_sigma", "semantic_bases", "mask", "variance"))]
    assert keys
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if name == "spc":
        fresh = make_run_method(cfg, CPU).state_dict()  # the run's initial state (same seed)
        assert not torch.equal(a["model.head.classifier.semantic_bases"], fresh["model.head.classifier.semantic_bases"])
        assert not torch.equal(a["model.backbone.transforms.stem.style_mu"], fresh["model.backbone.transforms.stem.style_mu"])
    else:
        assert a["trials_done"] == 1 and a["whitening.stem.mask"].sum() > 0


@pytest.mark.parametrize("name", ["spc", "isw", "ibn"])
def test_smoke_runs(name, smoke_home, monkeypatch):
    monkeypatch.setenv("DGNB_HOME", str(smoke_home))
    run = train(preset("smoke", name), progress=False)
    assert run.complete and math.isfinite(run.metrics["mean_target_miou"])


def test_spc_single_source_smoke_run(smoke_home, monkeypatch):
    monkeypatch.setenv("DGNB_HOME", str(smoke_home))
    cfg = preset("smoke", "spc", **{"data.sources": ["source_a"], "hparams.kmeans_bases": 2,
                                    "hparams.kmeans_images": 4})
    run = train(cfg, progress=False)
    assert run.complete
    method = run.load_method("cpu")
    assert method.base_source == "kmeans" and bool(method.projections["stem"].initialized)
