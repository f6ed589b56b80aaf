"""The procedural city: determinism, paired renders, knobs, class coverage, writing to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dgnb.data.city as city
from dgnb.data.city import DOMAINS, KNOBS, Domain, ensure_city, render, sweep
from dgnb.data.folder import SegFolder

SIZE = (64, 128)


def test_render_is_a_pure_function_of_its_arguments():
    a, b = render("source_a", "train", 3, seed=1, size=SIZE), render("source_a", "train", 3, seed=1, size=SIZE)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    c = render("source_a", "train", 4, seed=1, size=SIZE)
    assert not np.array_equal(a.label, c.label)
    assert a.image.shape == (*SIZE, 3) and a.image.dtype == np.uint8 and a.label.dtype == np.uint8


def test_style_domains_are_paired_renders_of_one_layout_and_geometric_is_not():
    ref = render("source_a", "val", 0, size=SIZE)
    for name, dom in DOMAINS.items():
        r = render(name, "val", 0, size=SIZE)
        if dom.role == "geometric":
            assert not np.array_equal(r.label, ref.label)
        else:
            assert np.array_equal(r.label, ref.label), name
            if name != "source_a":
                assert np.abs(r.image.astype(int) - ref.image.astype(int)).mean() > 5, name


def test_every_source_domain_shows_every_city_class():
    """docs/city.md: each class appears in each source, so per-class IoU is defined everywhere."""
    seen = np.zeros(256, bool)
    for i in range(40):
        seen[np.unique(render("source_a", "train", i, size=(128, 256)).label)] = True
    assert set(np.nonzero(seen)[0]) == set(range(19)) - {16}, np.nonzero(seen)[0]  # no trains in the city


def test_roles_and_distances_are_present():
    roles = [d.role for d in DOMAINS.values()]
    assert roles.count("source") >= 3 and "near" in roles and roles.count("far") >= 2 and "geometric" in roles


def test_knob_sweep_changes_appearance_monotonically_and_keeps_labels():
    res = sweep("source_a", "fog", [0, 2, 5], size=SIZE)
    assert all(np.array_equal(r.label, res[0].label) for r in res)
    stds = [r.image.astype(float).std() for r in res]
    assert stds[0] > stds[1] > stds[2]  # fog washes out contrast
    night = sweep("source_b", "night", [0, 5], size=SIZE)
    assert night[1].image.mean() < 0.5 * night[0].image.mean()


def test_geometric_knobs_change_the_view():
    def frac(results, classes):
        return [np.isin(r.label, classes).mean() for r in results]

    ground = frac(sweep("source_a", "camera_height", [0, 5], size=(128, 256)), [0, 1, 9])
    assert ground[1] < ground[0] - 0.05  # same horizon, higher camera: the street's wedge narrows (|u - c_x| < w (v - v_h) / h_c)
    sky = frac(sweep("source_a", "pitch", [0, 5], size=(128, 256)), [10])
    assert sky[1] < sky[0] - 0.03  # tilting down lowers the share of sky


def test_custom_domain_in_one_line_and_bad_knobs_are_clear_errors():
    dusk = Domain("dusk", "dim warm light with fog", knobs={"brightness": -2, "cast": 2, "fog": 1})
    assert render(dusk, "val", 0, size=SIZE).image.mean() < render("source_a", "val", 0, size=SIZE).image.mean()
    with pytest.raises(ValueError, match="unknown knob 'fgo'.*fog"):
        Domain("x", "typo", knobs={"fgo": 2})
    with pytest.raises(ValueError, match="outside"):
        Domain("x", "too much", knobs={"fog": 9})
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        render("nope", "val", 0)
    assert set(KNOBS) >= {"hue", "contrast", "cast", "texture", "fog", "night", "noise", "blur", "camera_height",
                          "pitch", "density"}


def test_ensure_city_writes_the_common_layout_resumably(tmp_path, monkeypatch):
    calls = []
    real = city._write_one

    def flaky(item):
        if len(calls) == 3:
            raise KeyboardInterrupt  # an interruption in the middle of generation
        calls.append(item)
        real(item)

    monkeypatch.setattr(city, "_write_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        ensure_city(tmp_path, ["source_b"], {"train": 5}, size=SIZE, progress=False, workers=1)
    folder = tmp_path / "source_b"
    assert not (folder / "meta.json").exists()  # meta.json is written last
    assert len(list((folder / "train" / "images").glob("*.png"))) == 3
    assert not list(folder.rglob("*.tmp"))
    monkeypatch.setattr(city, "_write_one", real)
    ensure_city(tmp_path, ["source_b"], {"train": 5, "val": 2}, size=SIZE, progress=False, workers=1)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["role"] == "source" and meta["splits"] == {"train": 5, "val": 2}
    ds = SegFolder(tmp_path, "source_b", "train")
    assert len(ds) == 5
    item = ds[4]
    assert item["image"].shape == (3, *SIZE) and np.array_equal(item["label"].numpy(), render("source_b", "train", 4, size=SIZE).label)
    with pytest.raises(ValueError, match="other settings.*delete that folder"):
        ensure_city(tmp_path, ["source_b"], {"train": 5}, size=(32, 64), progress=False)


def test_parallel_generation_matches_serial(tmp_path):
    ensure_city(tmp_path / "p", ["near"], {"val": 70}, size=SIZE, progress=False, workers=2)
    ensure_city(tmp_path / "s", ["near"], {"val": 70}, size=SIZE, progress=False, workers=1)
    for i in (0, 69):
        a = (tmp_path / "p" / "near" / "val" / "images" / f"{i:05d}.png").read_bytes()
        b = (tmp_path / "s" / "near" / "val" / "images" / f"{i:05d}.png").read_bytes()
        assert a == b
