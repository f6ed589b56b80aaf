"""The run cache key covers the code that trains: files on disk and what a notebook patches in memory."""

from __future__ import annotations

import importlib
import sys
import types

import pytest

import dgnb.methods.losses as losses
import dgnb.methods.pinthemem as pinthemem
from dgnb.config import preset
from dgnb.engine.patches import module_changes
from dgnb.engine.runs import code_changes, library_fingerprint, run_key
from dgnb.methods import REGISTRY

KEYS = {m: run_key(preset("smoke", m, setting=REGISTRY[m].settings[0])) for m in sorted(REGISTRY)}


def keys() -> dict[str, str]:
    return {m: run_key(preset("smoke", m, setting=REGISTRY[m].settings[0])) for m in sorted(REGISTRY)}


def notebook_cell(source: str, session: int = 0) -> types.ModuleType:
    """Run `source` as a notebook cell would: in a `__main__`-like namespace, under a per-session file name."""
    module = types.ModuleType("__student__")
    exec(compile(source, f"/tmp/ipykernel_{session}/cell.py", "exec"), module.__dict__)
    return module


STUDENT = '''
import torch.nn.functional as F
TEMPERATURE = {t}

def scale(scores):
    return scores / TEMPERATURE

def my_cohesion(scores, labels, temperature=1.0):
    logits = F.interpolate(scale(scores).float(), size=labels.shape[-2:], mode="bilinear")
    return F.cross_entropy(logits, labels, ignore_index=255)
'''


def test_unpatched_library_has_no_in_memory_changes():
    for m in REGISTRY:
        assert code_changes(m) == [], m
    assert keys() == KEYS


def test_patching_a_function_in_memory_changes_the_key_and_undoing_restores_it(monkeypatch):
    monkeypatch.setattr(pinthemem, "feature_cohesion_loss", notebook_cell(STUDENT.format(t=2.0)).my_cohesion)
    patched = keys()
    assert patched["pinthemem"] != KEYS["pinthemem"]
    assert patched["erm"] == KEYS["erm"] and patched["mldg"] == KEYS["mldg"]  # pinthemem.py is not theirs
    assert [w for w, _ in code_changes("pinthemem")] == ["dgnb.methods.pinthemem.feature_cohesion_loss"]
    monkeypatch.undo()
    assert keys() == KEYS


def test_a_shared_loss_patched_in_memory_changes_every_method_using_it(monkeypatch):
    def my_loss(out, labels, aux_weight):
        return losses.F.cross_entropy(out.logits, labels, ignore_index=255), {}

    monkeypatch.setattr(losses, "segmentation_loss", my_loss)
    assert all(k != KEYS[m] for m, k in keys().items())
    monkeypatch.undo()
    assert keys() == KEYS


def test_a_method_put_into_a_library_class_or_a_changed_constant_changes_the_key(monkeypatch):
    monkeypatch.setattr(pinthemem.PinTheMemory, "read_loss", lambda self, out, labels: (0, {}))
    assert keys()["pinthemem"] != KEYS["pinthemem"]
    monkeypatch.undo()
    monkeypatch.setattr(pinthemem.PinTheMemory, "predict", lambda self, images: images)  # was inherited
    assert keys()["pinthemem"] != KEYS["pinthemem"]
    monkeypatch.undo()
    monkeypatch.setattr(pinthemem, "UPDATE_VARIANTS", ("none",))
    assert keys()["pinthemem"] != KEYS["pinthemem"]
    monkeypatch.undo()
    monkeypatch.setattr(pinthemem.feature_cohesion_loss, "__code__", (lambda s, l, t=1.0: s).__code__)
    assert keys()["pinthemem"] != KEYS["pinthemem"]
    monkeypatch.undo()
    assert keys() == KEYS


def test_student_code_gets_one_key_per_content_in_every_session(monkeypatch):
    """The same cell in a new kernel (another file name) gives the same key; editing the helper it calls or
    the constant it reads gives a new one."""
    found = {}
    for session, t in ((0, 2.0), (1, 2.0), (2, 3.0)):
        monkeypatch.setattr(pinthemem, "feature_cohesion_loss", notebook_cell(STUDENT.format(t=t), session).my_cohesion)
        found[session] = run_key(preset("smoke", "pinthemem"))
    assert found[0] == found[1] != found[2]
    cell = notebook_cell(STUDENT.format(t=2.0), 3)
    cell.scale = notebook_cell("def scale(scores):\n    return scores * 0.5\n", 3).scale
    monkeypatch.setattr(pinthemem, "feature_cohesion_loss", cell.my_cohesion)
    assert run_key(preset("smoke", "pinthemem")) not in (found[0], KEYS["pinthemem"])


def test_a_module_edited_on_disk_but_not_reloaded_is_detected(tmp_path, monkeypatch):
    """What runs is the code imported before the edit: it differs from the file the key hashes."""
    path = tmp_path / "course_tmp_mod.py"
    path.write_text("SCALE = 2\n\ndef loss(x):\n    return x * SCALE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("course_tmp_mod")
    try:
        assert module_changes(module, path) == []
        path.write_text("SCALE = 2\n\ndef loss(x):\n    return x * SCALE + 1\n")
        assert [w for w, _ in module_changes(module, path)] == ["course_tmp_mod.loss"]
        importlib.reload(module)
        assert module_changes(module, path) == []
    finally:
        sys.modules.pop("course_tmp_mod", None)


def test_a_method_registered_from_a_notebook_is_keyed_by_its_code(monkeypatch):
    source = '''
from dgnb.methods.erm import ERM

class Mine(ERM):
    name = "mine"

    def training_step(self, batch):
        return super().training_step(batch)
'''
    for body, session in ((source, 0), (source, 1), (source.replace("super()", "ERM"), 2)):
        cls = notebook_cell(source=body, session=session).Mine
        monkeypatch.setitem(REGISTRY, "mine", cls)
        assert [w for w, _ in code_changes("mine")] == ["REGISTRY['mine']"]
        if session == 0:
            first = library_fingerprint("mine")
        elif session == 1:
            assert library_fingerprint("mine") == first
        else:
            assert library_fingerprint("mine") != first
    assert library_fingerprint("mine") != library_fingerprint("erm")


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    REGISTRY.pop("mine", None)
