"""data_tools: converters on native-format fixtures, exact label values, splits, manifests, resume, verify,
loud errors on broken inputs, and dgnb training on a converted fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import ConversionError, Options, convert, verify
from data_tools.__main__ import main as data_tools_main
from data_tools.mappings import (CITYSCAPES_KNOWN, CITYSCAPES_LUT, IDD_NAME_TO_TRAIN, MAPILLARY_V12_CLASSES,
                                 MAPILLARY_V12_TO_TRAIN, MAPILLARY_V20_CLASSES, MAPILLARY_V20_TO_TRAIN, SYNTHIA_KNOWN,
                                 SYNTHIA_LUT, lut_from_names)
from data_tools.readers import read_mat_v5, read_png16
from dgnb.data.folder import SegFolder, read_meta
from dgnb.data.taxonomy import CLASS_SUBSETS
from tests import fixtures_native as fx


def run(kind: str, src: Path, dst: Path, **kw) -> dict:
    kw.setdefault("workers", 1)
    return convert(kind, src, dst, Options(progress=False, **kw))


def converted_labels(ds: Path, split: str) -> dict[str, np.ndarray]:
    return {p.stem: fx.read_label(p) for p in sorted((ds / split / "labels").glob("*.png"))}


def assert_labels(ds: Path, split: str, want: dict[str, np.ndarray]) -> None:
    got = converted_labels(ds, split)
    assert sorted(got) == sorted(want)
    for k, arr in want.items():
        np.testing.assert_array_equal(got[k], arr, err_msg=f"{split}/{k}")


def class_pixels(arrays) -> list[int]:
    total = np.zeros(256, np.int64)
    for a in arrays:
        total += np.bincount(a.ravel(), minlength=256)
    return total[:19].tolist()


# ----- tables ---------------------------------------------------------------------------------------------
def test_lookup_tables_follow_the_published_tables():
    for i in range(256):
        assert CITYSCAPES_LUT[i] == fx.CS_TO_TRAIN.get(i, 255)
        assert CITYSCAPES_KNOWN[i] == (i <= 33)
    assert [int(SYNTHIA_LUT[i]) for i in range(23)] == [fx.SYNTHIA_TO_TRAIN.get(i, 255) for i in range(23)]
    assert SYNTHIA_LUT.size == 65536 and SYNTHIA_KNOWN.sum() == 23 and not SYNTHIA_KNOWN[23:].any()

    lut, known, missing = lut_from_names(MAPILLARY_V12_CLASSES, MAPILLARY_V12_TO_TRAIN)
    assert not missing and known.sum() == 66 and len(MAPILLARY_V12_TO_TRAIN) == 25
    assert [int(lut[i]) for i in range(66)] == [fx.MAPILLARY_V12_TO_TRAIN.get(i, 255) for i in range(66)]

    lut, known, missing = lut_from_names(MAPILLARY_V20_CLASSES, MAPILLARY_V20_TO_TRAIN)
    assert not missing and known.sum() == 124
    by_index = {21: 0, 74: 0, 35: 0, 58: 0, 45: 255, 56: 255, 4: 1, 24: 1, 27: 2, 12: 3, 5: 4, 85: 5, 88: 5, 86: 255,
                84: 255, **{i: 6 for i in range(90, 96)}, 99: 7, 100: 7, 103: 7, 97: 255, 98: 255, 64: 8, 63: 9,
                61: 10, 30: 11, 31: 255, 32: 12, 33: 12, 34: 12, 108: 13, 114: 14, 107: 15, 111: 16, 110: 17,
                105: 18, 115: 255, 123: 255, 22: 255, 23: 255}
    assert {i: int(lut[i]) for i in by_index} == by_index

    assert IDD_NAME_TO_TRAIN["autorickshaw"] == 255 and IDD_NAME_TO_TRAIN["non-drivable fallback"] == 9
    assert sorted(v for v in IDD_NAME_TO_TRAIN.values() if v != 255) == list(range(19))

    assert CLASS_SUBSETS["19"] == tuple(range(19))
    assert CLASS_SUBSETS["16"] == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert CLASS_SUBSETS["13"] == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def test_png16_reader_is_exact_where_pil_truncates(tmp_path):
    rng = np.random.default_rng(1)
    for channels in (3, 4):
        arr = np.stack([rng.integers(0, 23, (13, 29)), rng.integers(0, 1000, (13, 29)),
                        *[rng.integers(0, 65536, (13, 29))] * (channels - 2)], -1).astype(np.uint16)
        path = tmp_path / f"label{channels}.png"
        path.write_bytes(fx.png16_bytes(arr))
        np.testing.assert_array_equal(read_png16(path), arr)
        naive = np.asarray(Image.open(path))  # the pitfall: PIL keeps only the high byte
        assert not naive[..., 0].any()
    fx.save_rgb(tmp_path / "eight.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ConversionError, match="16-bit"):
        read_png16(tmp_path / "eight.png")


def test_mat_v5_reader(tmp_path):
    ids = {"trainIds": [1, 2, 5, 70000], "valIds": [3, 4], "testIds": [], "a": [7]}
    for compress in (True, False):
        path = tmp_path / f"split{compress}.mat"
        path.write_bytes(fx.mat_v5_bytes(ids, compress))
        got = read_mat_v5(path)
        for k, v in ids.items():
            assert got[k].ravel().tolist() == v
    (tmp_path / "v73.mat").write_bytes(b"MATLAB 7.3 MAT-file".ljust(600, b"\0"))
    with pytest.raises(ConversionError, match="7.3"):
        read_mat_v5(tmp_path / "v73.mat")
    (tmp_path / "cut.mat").write_bytes(fx.mat_v5_bytes(ids, True)[:150])
    with pytest.raises(ConversionError, match="truncated"):
        read_mat_v5(tmp_path / "cut.mat")


# ----- GTAV -----------------------------------------------------------------------------------------------
GTAV_FRAMES = {"train": [1, 2, 3, 5, 12160], "val": [6, 7, 8], "test": [9]}


def test_gtav_official_split_dg_exclusions_mismatch_and_degenerate(tmp_path, capsys):
    src, dst = tmp_path / "GTAV", tmp_path / "data"
    want = fx.make_gtav(src, GTAV_FRAMES, black={3}, mismatch={7})
    manifests = run("gtav", src, dst)
    out = capsys.readouterr().out
    assert "detected layout 'native'" in out and "split.mat" in out
    ds = dst / "gtav"
    assert_labels(ds, "train", {k: want[k] for k in ("00001", "00002", "00005")})
    assert_labels(ds, "val", {k: want[k] for k in ("00006", "00008")})
    train, val = manifests["train"], manifests["val"]
    assert train["count"] == 3 and train["expected_count"] == 12388 and train["complete"]
    assert {e["id"]: e["reason"][:12] for e in train["excluded"]} == {"12160": "single-colou", "00003": "single-colou"}
    assert train["degenerate"] == [{"id": "00003", "reason": train["degenerate"][0]["reason"], "action": "dropped"}]
    assert [e["id"] for e in val["excluded"]] == ["00007"] and "size mismatch" in val["excluded"][0]["reason"]
    assert train["class_pixels"] == class_pixels(want[k] for k in ("00001", "00002", "00005"))
    assert train["image_sizes"] == {"40x24": 3}
    assert (ds / "train/images/00001.png").read_bytes() == (src / "images/00001.png").read_bytes()
    meta = read_meta(dst, "gtav")
    assert meta["splits"] == {"train": 3, "val": 2} and meta["role"] == "real" and meta["source"] == "gtav"
    assert meta["protocol"] == "19" and meta["name"] == "gtav" and meta["image_size"] == [24, 40]
    assert verify(ds, progress=False).ok

    official = run("gtav", src, dst, name="gtav_official", gtav_list="official", splits=["train"])
    assert sorted(official["train"]["items"]) == ["00001", "00002", "00005", "12160"]
    assert official["train"]["expected_count"] == 12403


def test_gtav_layouts_lists_and_uda_split(tmp_path, capsys):
    src = tmp_path / "rn"
    want = fx.make_gtav(src, GTAV_FRAMES, robustnet=True)
    run("gtav", src, tmp_path / "d1", splits=["train", "val", "test"])
    assert "detected layout 'robustnet'" in capsys.readouterr().out
    assert_labels(tmp_path / "d1/gtav", "test", {"00009": want["00009"]})
    assert sorted(converted_labels(tmp_path / "d1/gtav", "train")) == ["00001", "00002", "00003", "00005"]

    src = tmp_path / "native"
    fx.make_gtav(src, GTAV_FRAMES, compress=False)
    (src / "read_mapping/split.mat").unlink()
    with pytest.raises(ConversionError, match="split.mat") as e:
        run("gtav", src, tmp_path / "d2")
    assert "--split all" in str(e.value)
    with pytest.raises(ConversionError, match="00004: missing image and label") as e:  # frame-number gaps
        run("gtav", src, tmp_path / "d2", splits=["all"], name="gtav_uda")
    assert "12146 more" in str(e.value)
    uda = run("gtav", src, tmp_path / "d2", splits=["all"], name="gtav_uda", allow_orphans=True)
    assert uda["train"]["count"] == 9 and uda["train"]["selection"].startswith("all frames")
    assert len(uda["train"]["orphans"]) == 12160 - 9 and uda["train"]["expected_count"] == 24966
    assert read_meta(tmp_path / "d2", "gtav_uda")["splits"] == {"train": 9}
    (tmp_path / "train.txt").write_text("00002.png\n00005.png\n")
    listed = run("gtav", src, tmp_path / "d3", splits=["train"], split_files={"train": tmp_path / "train.txt"})
    assert sorted(listed["train"]["items"]) == ["00002", "00005"]


# ----- SYNTHIA --------------------------------------------------------------------------------------------
def test_synthia_16bit_labels_and_dg_split(tmp_path, capsys):
    src, lists = tmp_path / "SYNTHIA", tmp_path / "split_data"
    want = fx.make_synthia(src, {"train": [0, 2, 3], "val": [1, 4]}, lists_dir=lists)
    with pytest.raises(ConversionError, match="RobustNet"):
        run("synthia", src, tmp_path / "data")
    manifests = run("synthia", src, tmp_path / "data", split_dir=lists)
    assert "detected layout 'native'" in capsys.readouterr().out
    ds = tmp_path / "data/synthia"
    assert_labels(ds, "train", {k: want[k] for k in ("0000000", "0000002", "0000003")})
    assert_labels(ds, "val", {k: want[k] for k in ("0000001", "0000004")})
    assert manifests["val"]["expected_count"] == 2820
    meta = read_meta(tmp_path / "data", "synthia")
    assert meta["protocol"] == "16" and meta["splits"] == {"train": 3, "val": 2}
    assert meta["classes_present"] == sorted({int(v) for a in want.values() for v in np.unique(a)} - {255})
    uda = run("synthia", src, tmp_path / "uda", splits=["all"])
    assert uda["train"]["count"] == 5
    capsys.readouterr()
    uda = run("synthia", src, tmp_path / "uda2", splits=["all", "val"], split_dir=lists)
    assert set(uda["val"]["items"]) <= set(uda["train"]["items"])  # the UDA val is inside train: say so
    assert "not held out" in capsys.readouterr().out

    rn = tmp_path / "rn"
    fx.make_synthia(rn, {"train": [0], "val": [1]}, robustnet=True)
    run("synthia", rn, tmp_path / "d_rn")
    assert "detected layout 'robustnet'" in capsys.readouterr().out

    import shutil
    shutil.rmtree(src / "RAND_CITYSCAPES/GT/LABELS")
    with pytest.raises(ConversionError, match="GT/COLOR"):
        run("synthia", src, tmp_path / "d_color", split_dir=lists)


# ----- Cityscapes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [False, True])
def test_cityscapes_layouts(tmp_path, capsys, nested):
    want = fx.make_cityscapes(tmp_path / "cs", {"train": 4, "val": 2}, nested=nested)
    manifests = run("cityscapes", tmp_path / "cs", tmp_path / "data")
    assert f"detected layout '{'zip-nested' if nested else 'flat'}'" in capsys.readouterr().out
    ds = tmp_path / "data/cityscapes"
    assert_labels(ds, "train", {k: v for k, v in want.items() if k.startswith(("aachen", "bochum"))})
    assert_labels(ds, "val", {k: v for k, v in want.items() if k.startswith(("lindau", "munster"))})
    assert manifests["train"]["expected_count"] == 2975 and manifests["val"]["count"] == 2
    sample = SegFolder(tmp_path / "data", "cityscapes", "val")[0]  # dgnb reads the converted dataset
    assert sample["label"].shape == (24, 48) and sample["image"].shape == (3, 24, 48)


# ----- BDD100K --------------------------------------------------------------------------------------------
def test_bdd_releases_and_orphans(tmp_path, capsys):
    want = fx.make_bdd(tmp_path / "b21", {"train": 3, "val": 2}, release="2021")
    lone = sorted((tmp_path / "b21/bdd100k/labels/sem_seg/masks/train").glob("*.png"))[0]
    lone.unlink()
    with pytest.raises(ConversionError, match="--allow-orphans") as e:
        run("bdd100k", tmp_path / "b21", tmp_path / "data")
    assert lone.stem in str(e.value)
    manifests = run("bdd100k", tmp_path / "b21", tmp_path / "data", allow_orphans=True)
    assert "detected layout '2021'" in capsys.readouterr().out
    orphan = manifests["train"]["orphans"][0]
    assert orphan["id"] == lone.stem and orphan["missing"] == "label"
    ds, images = tmp_path / "data/bdd100k", tmp_path / "b21/bdd100k/images/10k"
    assert_labels(ds, "val", {p.stem: want[p.stem] for p in (images / "val").glob("*.jpg")})
    assert_labels(ds, "train", {p.stem: want[p.stem] for p in (images / "train").glob("*.jpg") if p.stem != lone.stem})
    assert manifests["train"]["count"] == 2 and manifests["train"]["ignore_pixels"] > 0
    name = next(iter(manifests["val"]["items"]))
    assert (ds / f"val/images/{name}.jpg").read_bytes() == (images / f"val/{name}.jpg").read_bytes()

    want18 = fx.make_bdd(tmp_path / "b18", {"train": 2, "val": 2}, release="2018")
    run("bdd100k", tmp_path / "b18", tmp_path / "d18")
    assert "detected layout '2018'" in capsys.readouterr().out
    images = tmp_path / "b18/bdd100k/seg/images"
    for split in ("train", "val"):
        assert_labels(tmp_path / "d18/bdd100k", split, {p.stem: want18[p.stem] for p in (images / split).glob("*.jpg")})


# ----- Mapillary ------------------------------------------------------------------------------------------
def v20_rule(name: str) -> int:
    """The v2.0 rule of docs/real_datasets.md ('Mapillary Vistas'), restated independently of data_tools.mappings."""
    if name in ("Road", "Manhole") or (name.startswith("Lane Marking") and "Crosswalk" not in name):
        return 0
    if name.startswith("Traffic Light - "):
        return 6
    if name in ("Traffic Sign (Front)", "Traffic Sign - Direction (Front)", "Traffic Sign - Temporary (Front)"):
        return 7
    simple = {"Curb": 1, "Sidewalk": 1, "Building": 2, "Wall": 3, "Fence": 4, "Pole": 5, "Utility Pole": 5,
              "Vegetation": 8, "Terrain": 9, "Sky": 10, "Person": 11, "Bicyclist": 12, "Motorcyclist": 12,
              "Other Rider": 12, "Car": 13, "Truck": 14, "Bus": 15, "On Rails": 16, "Motorcycle": 17, "Bicycle": 18}
    return simple.get(name, 255)


def test_mapillary_v12_and_v20_by_name(tmp_path, capsys):
    native = fx.make_mapillary(tmp_path / "v1", {"train": 2, "val": 2}, list(MAPILLARY_V12_CLASSES))
    run("mapillary", tmp_path / "v1", tmp_path / "data")
    assert "detected layout 'v1.x'" in capsys.readouterr().out
    ds = tmp_path / "data/mapillary"
    assert_labels(ds, "val", {k: fx.expected(v, fx.MAPILLARY_V12_TO_TRAIN) for k, v in native["1.2"].items()
                              if k.startswith("val")})
    assert "RobustNet" in read_meta(tmp_path / "data", "mapillary")["mapping"]
    with pytest.raises(ConversionError, match="v1.2 labels only"):
        run("mapillary", tmp_path / "v1", tmp_path / "data", mapillary_version="2.0")

    shuffled = list(np.random.default_rng(0).permutation(MAPILLARY_V20_CLASSES))  # proves the mapping is by name
    native = fx.make_mapillary(tmp_path / "v2", {"val": 3}, list(MAPILLARY_V12_CLASSES), shuffled)
    run("mapillary", tmp_path / "v2", tmp_path / "data", mapillary_version="2.0", splits=["val"])
    assert "detected layout 'combined'" in capsys.readouterr().out
    lut = np.array([v20_rule(n) for n in shuffled], np.uint8)
    assert_labels(tmp_path / "data/mapillary_v2", "val", {k: lut[v] for k, v in native["2.0"].items()})
    run("mapillary", tmp_path / "v2", tmp_path / "data", splits=["val"], name="mapillary_v12")
    assert_labels(tmp_path / "data/mapillary_v12", "val",
                  {k: fx.expected(v, fx.MAPILLARY_V12_TO_TRAIN) for k, v in native["1.2"].items()})

    (tmp_path / "v2/mapillary/config_v1.2.json").write_text(json.dumps(fx.mapillary_config(shuffled)))
    with pytest.raises(ConversionError, match="lacks"):
        run("mapillary", tmp_path / "v2", tmp_path / "data", splits=["val"], name="wrong")


# ----- IDD ------------------------------------------------------------------------------------------------
def test_idd_polygons_rasterized_in_order(tmp_path):
    want = fx.make_idd(tmp_path / "idd", {"train": 3, "val": 2})
    manifests = run("idd", tmp_path / "idd", tmp_path / "data")
    assert sorted(manifests["val"]["items"]) == ["1_000000", "2_000000"]
    assert_labels(tmp_path / "data/idd", "train", {k: want[k] for k in ("1_000000", "2_000000", "1_000001")})
    assert_labels(tmp_path / "data/idd", "val", {k: want[k] for k in ("1_000000", "2_000000")})

    odd = {"label": "hoverboard", "polygon": fx.rect(0, 0, 3, 3)}
    fx.make_idd(tmp_path / "idd2", {"val": 1}, extra_objects=[odd])
    with pytest.raises(ConversionError, match="hoverboard"):
        run("idd", tmp_path / "idd2", tmp_path / "data2", splits=["val"])
    run("idd", tmp_path / "idd2", tmp_path / "data2", splits=["val"], unknown_ids="ignore")
    assert read_meta(tmp_path / "data2", "idd")["splits"] == {"val": 1}


def test_idd_skips_polygons_of_fewer_than_three_points_like_the_authors_tool(tmp_path):
    """AutoNUE's json2labelImg skips an object whose polygon has < 3 points before it even looks at the
    label; PIL would otherwise draw a 2-point polygon as a line and a 1-point one as a dot."""
    short = [{"label": "car", "polygon": [[0, 0], [39, 23]]},                    # a diagonal line
             {"label": "bus", "polygon": [[5, 5]]},                               # a dot
             {"label": "truck", "polygon": []},                                   # nothing
             {"label": "hoverboard", "polygon": [[1, 1], [3, 3]]},                # unknown, but skipped first
             {"label": "motorcycle", "polygon": [[33, 16], [37, 16], [35, 20]]}]  # a triangle: drawn
    want = fx.make_idd(tmp_path / "idd", {"val": 1}, extra_objects=short)["1_000000"]
    run("idd", tmp_path / "idd", tmp_path / "data", splits=["val"])  # no unknown-label error
    got = converted_labels(tmp_path / "data/idd", "val")["1_000000"]
    tri = got == 17
    assert tri.any() and tri[16:21, 33:38].sum() == tri.sum()  # only the triangle is new
    np.testing.assert_array_equal(got[~tri], want[~tri])  # no line, no dot


# ----- errors on broken inputs ----------------------------------------------------------------------------
def _break(kind: str, cs: Path) -> tuple[Path, str]:
    """Damage one file of a Cityscapes fixture; returns the damaged file and the expected message."""
    lbl = sorted(cs.glob("gtFine/val/*/*_labelIds.png"))[0]
    img = sorted(cs.glob("leftImg8bit/val/*/*_leftImg8bit.png"))[0]
    if kind == "missing label":
        lbl.unlink()
        return lbl, "missing label"
    if kind == "size mismatch":
        fx.save_grey(lbl, np.full((30, 48), 7, np.uint8))
        return lbl, "size mismatch"
    if kind == "truncated label":
        data = lbl.read_bytes()
        lbl.write_bytes(data[: len(data) - 30])
        return lbl, "truncated"
    if kind == "colour label":
        fx.save_rgb(lbl, fx.noise_image((24, 48), np.random.default_rng(0)))
        return lbl, "colour rendering"
    if kind == "unknown id":
        arr = fx.read_label(lbl).copy()
        arr[0, :3] = 40
        fx.save_grey(lbl, arr)
        return lbl, r"ids \[40\]"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    return img, "truncated"


@pytest.mark.parametrize("kind", ["missing label", "size mismatch", "unknown id", "truncated image",
                                  "truncated label", "colour label"])
def test_broken_inputs_fail_loudly_and_resume_after_fix(tmp_path, kind):
    cs = tmp_path / "cs"
    fx.make_cityscapes(cs, {"train": 2, "val": 3})
    damaged, message = _break(kind, cs)
    with pytest.raises(ConversionError, match=message) as e:
        run("cityscapes", cs, tmp_path / "data")
    assert damaged.name in str(e.value) or kind == "missing label"
    assert not (tmp_path / "data/cityscapes/meta.json").exists()
    if kind != "missing label":
        manifest = json.loads((tmp_path / "data/cityscapes/val/manifest.json").read_text())
        assert not manifest["complete"] and manifest["count"] == 2 and len(manifest["errors"]) == 1
    fx.make_cityscapes(cs, {"train": 2, "val": 3})  # re-extract
    run("cityscapes", cs, tmp_path / "data")
    assert read_meta(tmp_path / "data", "cityscapes")["splits"] == {"train": 2, "val": 3}


def test_wrong_layout_lists_what_was_expected(tmp_path):
    (tmp_path / "junk/photos").mkdir(parents=True)
    for kind in ("gtav", "synthia", "cityscapes", "bdd100k", "mapillary", "idd"):
        with pytest.raises(ConversionError, match="does not look like") as e:
            run(kind, tmp_path / "junk", tmp_path / "data")
        assert "photos/" in str(e.value) and "Expected one of" in str(e.value)
        levels = "three folder levels" if kind == "bdd100k" else "two folder levels"  # what find_root searched
        assert f"searched up to {levels} below --src" in str(e.value)
    with pytest.raises(ConversionError, match="not a folder"):
        run("gtav", tmp_path / "nowhere", tmp_path / "data")
    with pytest.raises(ConversionError, match="unknown dataset"):
        run("kitti", tmp_path / "junk", tmp_path / "data")


# ----- resume, resize, parallel ---------------------------------------------------------------------------
def test_resume_skips_finished_files_and_redoes_damaged_ones(tmp_path, capsys):
    fx.make_cityscapes(tmp_path / "cs", {"train": 3, "val": 3})
    run("cityscapes", tmp_path / "cs", tmp_path / "data")
    ds = tmp_path / "data/cityscapes"
    labels = sorted((ds / "val/labels").glob("*.png"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in labels}
    capsys.readouterr()
    run("cityscapes", tmp_path / "cs", tmp_path / "data")
    assert "val: 3 converted (3 already done, skipped)" in capsys.readouterr().out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in labels} == before
    labels[0].write_bytes(before[labels[0]][1][:20])  # a torn output of the same name
    with open(ds / "val/.progress.jsonl", "a") as f:
        f.write('{"id": "torn')  # an interrupted progress line
    run("cityscapes", tmp_path / "cs", tmp_path / "data")
    assert "val: 3 converted (2 already done, skipped)" in capsys.readouterr().out
    assert labels[0].read_bytes() == before[labels[0]][1]
    with pytest.raises(ConversionError, match="trial there would delete them"):  # a trial never deletes
        run("cityscapes", tmp_path / "cs", tmp_path / "data", limit=1, splits=["val"])
    assert len(list((ds / "val/labels").glob("*.png"))) == 3 and verify(ds, progress=False).ok
    gone = sorted((tmp_path / "cs").rglob("*_leftImg8bit.png"))[-1]  # a sample leaves the split: its outputs go
    gone.unlink()
    for p in (tmp_path / "cs").rglob(gone.name.replace("_leftImg8bit.png", "_gtFine_*")):
        p.unlink()
    capsys.readouterr()
    run("cityscapes", tmp_path / "cs", tmp_path / "data")
    assert "2 stale file(s) removed" in capsys.readouterr().out
    assert verify(ds, progress=False).ok


def test_resize_short_side_and_square_crop(tmp_path):
    want = fx.make_cityscapes(tmp_path / "cs", {"train": 1, "val": 2})
    run("cityscapes", tmp_path / "cs", tmp_path / "data", resize=12)
    ds = tmp_path / "data/cityscapes"
    for k, lab in converted_labels(ds, "val").items():
        assert lab.shape == (12, 24) and set(np.unique(lab)) <= set(np.unique(want[k]))
        np.testing.assert_array_equal(lab, want[k][1::2, 1::2])  # nearest: blocks of 4 stay exact
        assert Image.open(ds / f"val/images/{k}.png").size == (24, 12)
    assert json.loads((ds / "val/manifest.json").read_text())["native_image_sizes"] == {"48x24": 2}
    run("cityscapes", tmp_path / "cs", tmp_path / "sq", resize=12, square=True, splits=["val"])
    for k, lab in converted_labels(tmp_path / "sq/cityscapes", "val").items():
        np.testing.assert_array_equal(lab, want[k][1::2, 1::2][:, 6:18])
    assert verify(tmp_path / "sq/cityscapes", progress=False).ok


def test_mapillary_square_is_robustnet_resize_height_and_centre_crop(tmp_path):
    """`--resize 1536 --square` on a 1920x1080 image = RobustNet's Mapillary val transform, written out
    here with PIL as its ResizeHeight(1536) + CenterCropPad(1536) do: width int(1920 / 1080 * 1536) = 2730
    (truncated, not rounded to 2731), image BICUBIC, label NEAREST, crop at column round((2730 - 1536) / 2)."""
    from data_tools.common import _resize_pair

    native = fx.make_mapillary(tmp_path / "m", {"val": 1}, list(MAPILLARY_V12_CLASSES), size=(1080, 1920))
    key, raw = next(iter(native["1.2"].items()))
    label = fx.expected(raw, fx.MAPILLARY_V12_TO_TRAIN)
    with Image.open(tmp_path / f"m/mapillary/validation/images/{key}.jpg") as im:
        image = im.convert("RGB")
    width = int(1920 / 1080 * 1536)
    assert width == 2730
    x1 = int(round((width - 1536) / 2.0))
    ref_image = image.resize((width, 1536), Image.BICUBIC).crop((x1, 0, x1 + 1536, 1536))
    ref_label = Image.fromarray(label).resize((width, 1536), Image.NEAREST).crop((x1, 0, x1 + 1536, 1536))
    rgb, lab = _resize_pair(np.asarray(image), label, 1536, True)
    np.testing.assert_array_equal(rgb, np.asarray(ref_image))  # bit for bit
    np.testing.assert_array_equal(lab, np.asarray(ref_label))

    run("mapillary", tmp_path / "m", tmp_path / "data", splits=["val"], resize=1536, square=True)
    ds = tmp_path / "data/mapillary"
    assert_labels(ds, "val", {key: np.asarray(ref_label)})
    assert Image.open(ds / f"val/images/{key}.jpg").size == (1536, 1536)
    assert read_meta(tmp_path / "data", "mapillary")["image_size"] == [1536, 1536]

    # a portrait image: height -> 12, width int(20 / 30 * 12) = 8, padded to the square, centred, label 255
    tall = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20) % 19
    rgb, lab = _resize_pair(np.zeros((30, 20, 3), np.uint8), tall, 12, True)
    assert rgb.shape == (12, 12, 3) and lab.shape == (12, 12)
    assert (lab[:, :2] == 255).all() and (lab[:, 10:] == 255).all()
    np.testing.assert_array_equal(lab[:, 2:10], np.asarray(Image.fromarray(tall).resize((8, 12), Image.NEAREST)))


def test_two_hundred_images_convert_with_workers_as_without(tmp_path):
    fx.make_cityscapes(tmp_path / "cs", {"train": 100, "val": 100}, size=(32, 64))
    manifests = run("cityscapes", tmp_path / "cs", tmp_path / "data", workers=2)
    assert manifests["train"]["count"] == 100 and manifests["val"]["count"] == 100
    report = verify(tmp_path / "data/cityscapes", workers=2, progress=False)
    assert report.ok, report.text()
    run("cityscapes", tmp_path / "cs", tmp_path / "one", workers=1)  # the workers change nothing in the output
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            two = sorted((tmp_path / "data/cityscapes" / split / kind).iterdir())
            one = sorted((tmp_path / "one/cityscapes" / split / kind).iterdir())
            assert [p.name for p in two] == [p.name for p in one] and len(one) == 100
            assert all(a.read_bytes() == b.read_bytes() for a, b in zip(two, one))


# ----- verify and the command line ------------------------------------------------------------------------
def test_verify_reports_problems(tmp_path, capsys):
    fx.make_cityscapes(tmp_path / "cs", {"train": 2, "val": 3})
    ds = tmp_path / "data/cityscapes"
    assert data_tools_main(["convert", "cityscapes", "--src", str(tmp_path / "cs"), "--dst", str(tmp_path / "data"),
                            "--workers", "1", "--no-progress"]) == 0
    assert data_tools_main(["verify", str(ds), "--workers", "1", "--no-progress"]) == 0
    assert "OK: no problems found" in capsys.readouterr().out

    labels = sorted((ds / "val/labels").glob("*.png"))
    arr = fx.read_label(labels[0]).copy()
    arr[0, 0] = 77
    fx.save_grey(labels[0], arr)
    labels[1].unlink()
    meta = json.loads((ds / "meta.json").read_text())
    meta["splits"]["train"] = 5
    (ds / "meta.json").write_text(json.dumps(meta))
    report = verify(ds, progress=False)
    text = report.text()
    assert not report.ok
    assert "image without label" in text and "[77]" in text and "meta.json counts 5" in text
    assert "file differs from the manifest" in text and "manifest counts 3 pairs, the folders hold 2" in text
    assert data_tools_main(["verify", str(ds), "--workers", "1", "--no-progress"]) == 1
    (ds / "meta.json").unlink()
    assert "meta.json is missing" in verify(ds, progress=False).text()


def test_cli_dry_run_errors_and_module_entry_point(tmp_path, capsys):
    fx.make_cityscapes(tmp_path / "cs", {"train": 1, "val": 1})
    assert data_tools_main(["convert", "cityscapes", "--src", str(tmp_path / "cs"), "--dst", str(tmp_path / "d"),
                            "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train: 1 pairs (official train folder, expected 2975)" in out and not (tmp_path / "d").exists()
    assert data_tools_main(["convert", "gtav", "--src", str(tmp_path / "cs"), "--dst", str(tmp_path / "d")]) == 2
    assert "does not look like a GTAV" in capsys.readouterr().err
    res = subprocess.run([sys.executable, "-m", "data_tools", "list"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": "."})
    assert res.returncode == 0 and "mapillary" in res.stdout and "combined v1.2+v2.0" in res.stdout


# ----- dgnb on converted real-format data -----------------------------------------------------------------
def test_paper_preset_points_at_converted_real_data():
    from dgnb.config import preset

    cfg = preset("paper", "erm", **{"data.sources": ["gtav", "synthia"],
                                    "data.targets": ["cityscapes", "bdd100k", "mapillary"]})
    assert cfg.data.sources == ["gtav", "synthia"] and cfg.data.city is None and cfg.data.crop == (768, 768)
    assert cfg.data.eval_size is None and cfg.data.protocol == "19" and cfg.model.backbone == "resnet50"
    assert preset("paper", **{"data.sources": ["synthia"]}).data.protocol == "16"
    from dgnb.data.city import DOMAINS

    city = list(DOMAINS)
    mixed = preset("paper", **{"data.sources": ["gtav", city[0]], "data.targets": ["cityscapes", city[-1]]})
    assert mixed.data.city is not None  # procedural domains are generated next to the real ones


def test_dgnb_train_runs_on_converted_fixture(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    fx.make_gtav(tmp_path / "gtav", {"train": [1, 2, 3, 4], "val": [5, 6]})
    run("gtav", tmp_path / "gtav", root)
    fx.make_cityscapes(tmp_path / "cs", {"train": 2, "val": 2}, size=(24, 40))
    run("cityscapes", tmp_path / "cs", root)
    monkeypatch.setenv("DGNB_HOME", str(tmp_path / "home"))
    from dgnb.cli import main as dgnb_main

    dgnb_main(["train", "--preset", "paper", "--data-root", str(root), "--sources", "gtav", "--targets", "cityscapes",
               "--iterations", "3", "--device", "cpu", "--no-progress", "--set", "model.backbone=resnet_tiny",
               "model.pretrained=false", "model.output_stride=8", "model.head_channels=16", "model.low_proj=8",
               "model.decoder_channels=16", "model.aspp_rates=[1,2,3]", "data.crop=[24,32]",
               "data.base_size=[24,40]", "data.scale=[0.75,1.25]", "data.num_workers=0", "data.batch_per_domain=2",
               "data.eval_batch_size=2", "train.eval_every=3", "train.checkpoint_every=3", "train.log_every=1"])
    out = capsys.readouterr().out
    run_dir = Path(out.split("run folder:")[1].split()[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["target_miou"]) == {"cityscapes"} and metrics["source_val_miou"] >= 0
