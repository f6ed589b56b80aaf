"""`dgnb course prepare`: the runs the notebooks train, listed once, trained ahead of a lab, then cached."""

from __future__ import annotations


import pytest

from dgnb.cli import main as dgnb_main
from dgnb.config import preset
from dgnb.course import (QUICK_RUN_SECONDS, ablation_runs, course_plan, course_runs, estimate_seconds, method_runs,
                         mr_sweep_runs, pfr_runs, prepare_course, self_training_runs, style_runs, uda_run)
from dgnb.engine.bench import PINTHEMEM_ABLATIONS, ablation_config
from dgnb.engine.runs import run_dir


def test_the_plan_is_what_the_notebooks_train(tmp_path, monkeypatch):
    monkeypatch.setenv("DGNB_HOME", str(tmp_path))
    plan = course_plan("quick")
    folders = [run_dir(p.config) for p in plan]
    # ERM (01-04), MLDG (02, 03), Pin the Memory (03), its 10 short ablation rows, notebook 04's IBN-Net, ISW and
    # SPC; notebook 05's three UDA runs, notebook 06's MRNet run and its three short λ_mr rows; PFR with and
    # without its adversarial term (07; its source only and AdaptSegNet are 05's); CBST and DRSL (08). One seed
    # each: the notebooks read their five-seed comparisons from the shipped benchmark files.
    assert len(folders) == len(set(folders)) == 3 + 10 + 3 + 3 + 1 + 3 + 2 + 2
    # notebooks 01, 02 and 03 (section 7): the preset's runs; notebook 03 section 12: ablation_config + short budget
    assert run_dir(preset("quick", "erm", 0)) == folders[0]
    assert plan[0].notebook == "01_domain_shift, 02_meta_learning, 03_pin_the_memory, 04_style"
    assert plan[1].notebook == "02_meta_learning, 03_pin_the_memory" and plan[1].config.method == "mldg"
    assert {run_dir(c) for c in method_runs("quick").values()} == set(folders[:3])
    short = {"train.iterations": 150, "data.eval_limit": 50}
    want = {run_dir(ablation_config("quick", v, 0, **short)) for v in PINTHEMEM_ABLATIONS if "second order" not in v}
    assert set(folders[3:13]) == want and len(ablation_runs("quick")) == 10
    assert folders[13:16] == [run_dir(preset("quick", m, 0)) for m in ("ibn", "isw", "spc")]
    assert [p.notebook for p in plan[13:16]] == ["04_style"] * 3
    assert {run_dir(c) for c in style_runs("quick").values()} == {folders[0], *folders[13:16]}
    assert run_dir(uda_run("quick", "mrnet")) == run_dir(preset("quick", "mrnet", setting="uda")) == folders[19]
    assert set(folders[20:23]) == {run_dir(c) for c in mr_sweep_runs("quick").values()}
    pfr = {label: [run_dir(c) for c in by_seed.values()] for label, by_seed in pfr_runs("quick").items()}
    assert pfr == {"source only": [folders[16]], "AdaptSegNet": [folders[17]], "PFR": [folders[23]],
                   "PFR without L_adv": [folders[24]]}
    assert folders[16] == run_dir(uda_run("quick", "source_only")) == run_dir(preset("quick", "source_only",
                                                                                     setting="uda"))
    assert folders[24] == run_dir(preset("quick", "pfr", 0, setting="uda", **{"hparams.adv_weight_main": 0.0}))
    assert plan[16].notebook == "05_adversarial_uda, 07_pfr, 08_self_training_drsl"
    notebook08 = [run_dir(c) for cfgs in self_training_runs("quick").values() for c in cfgs]
    assert notebook08 == [folders[16], *folders[25:]] and [p.config.method for p in plan[25:]] == ["cbst", "drsl"]
    # on smoke the ablation rows use the whole preset: full / ERM / MLDG are the section 7 runs
    assert len(course_runs("smoke")) == 3 + 7 + 3 + 3 + 1 + 3 + 2 + 2
    # the estimate: the reference machine's quick-run seconds, scaled by iterations and images evaluated
    assert estimate_seconds(preset("quick", "pinthemem")) == pytest.approx(QUICK_RUN_SECONDS["pinthemem"])
    assert estimate_seconds(ablation_config("quick", "ERM", 0, **short)) < QUICK_RUN_SECONDS["erm"] / 4


def test_prepare_trains_every_run_once_and_a_second_call_trains_nothing(smoke_home, monkeypatch, capsys):
    monkeypatch.setenv("DGNB_HOME", str(smoke_home))  # shared with the notebook tests: they find these runs cached
    runs = prepare_course("smoke", progress=False)
    assert len(runs) == len(course_runs("smoke")) and all(r.complete for r in runs)
    assert all(estimate_seconds(c) == 0 for c in course_runs("smoke"))
    capsys.readouterr()
    seen = []
    # (patching `fit` to raise would change every run key: the cache hashes in-memory changes to the library)
    written = {r.dir: (r.dir / "checkpoint.pt").stat().st_mtime_ns for r in runs}
    again = prepare_course("smoke", progress=False, on_run=lambda item, run, s: seen.append((item.label, run.dir, s)))
    assert [r.dir for r in again] == [r.dir for r in runs]  # found in the run cache, nothing trained again:
    assert {r.dir: (r.dir / "checkpoint.pt").stat().st_mtime_ns for r in again} == written
    assert [(label, d) for label, d, _ in seen] == [(p.label, r.dir) for p, r in zip(course_plan("smoke"), runs)]
    assert all(s >= 0 for *_, s in seen)
    out = capsys.readouterr().out
    assert f"{len(runs)} runs, {len(runs)} already in the run cache; estimated 0 s" in out
    dgnb_main(["course", "list", "--preset", "smoke"])
    assert "| 03_pin_the_memory | ablation: w/o L_coh | pinthemem | 6 | yes | 0 s |" in capsys.readouterr().out
    dgnb_main(["course", "prepare", "--preset", "smoke", "--no-progress"])
    assert "already in the run cache" in capsys.readouterr().out
