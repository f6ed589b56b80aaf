"""The student edition (`make student`) and its grader (`make check-student`)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch

from dgnb import student

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
GRADED = {"02_meta_learning": {"adapt_parameters", "mldg_gradient"},
          "03_pin_the_memory": {"memory_read", "memory_write", "cohesion_loss"},
          "07_pfr": {"style_gram", "pfr_loss"}}


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def edition(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "notebooks"
    student.build(NOTEBOOKS, out)
    return out


def solutions(source: str) -> dict[str, list[str]]:
    """{function: the lines of its solution region} of an instructor cell source."""
    out, function, lines = {}, None, None
    for line in source.splitlines():
        m = student.DEF.match(line)
        if m:
            function = m["name"]
        if student.BEGIN.match(line):
            lines = []
        elif student.END.match(line):
            out[function], lines = lines, None
        elif lines is not None:
            lines.append(line)
    return out


def fill(path: Path, bodies: dict[str, list[str]]) -> None:
    """Replace the TODO holes of the student notebook at `path` with `bodies` (what a student writes)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        lines, function = [], None
        for line in cell.source.splitlines():
            m = student.DEF.match(line)
            if m:
                function = m["name"]
            if "raise NotImplementedError(" in line and function in bodies:
                lines += bodies[function]
            else:
                lines.append(line)
        cell.source = "\n".join(lines)
    nbformat.write(nb, path)


def test_strip_solutions_keeps_indentation_and_hint():
    src = "def f(x):\n    \"\"\"Doc.\"\"\"\n    ### BEGIN SOLUTION: square it\n    y = x * x\n    return y\n    ### END SOLUTION\n\nf(2)"
    out, holes = student.strip_solutions(src)
    assert holes == ["f"]
    assert out == "def f(x):\n    \"\"\"Doc.\"\"\"\n    raise NotImplementedError('TODO: f: square it')\n\nf(2)"
    with pytest.raises(ValueError, match="without an END"):
        student.strip_solutions("def g():\n    ### BEGIN SOLUTION\n    return 1")
    with pytest.raises(ValueError, match="without a BEGIN"):
        student.strip_solutions("def g():\n    return 1\n    ### END SOLUTION")


def test_student_edition_is_built_with_holes(edition):
    built = {p.stem for p in edition.glob("*.ipynb")}
    assert built == {p.stem for p in NOTEBOOKS.glob("*.py")}
    for name, functions in GRADED.items():
        nb = nbformat.read(edition / f"{name}.ipynb", as_version=4)
        text = "\n".join(c.source for c in nb.cells)
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
        for f in functions:
            assert f'raise NotImplementedError("TODO: {f}:' in text or f"raise NotImplementedError('TODO: {f}:" in text
        assert "Student edition" in nb.cells[1].source and "jupytext" not in nb.metadata
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        instructor = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells)
        for body in solutions(instructor).values():  # no solution line survives
            for line in body:
                if line.strip() and not line.strip().startswith("#"):
                    assert line not in text.splitlines(), line
    plain = nbformat.read(edition / "01_domain_shift.ipynb", as_version=4)  # no holes: the same cells
    assert [c.source for c in plain.cells] == [c.source for c in nbformat.read(NOTEBOOKS / "01_domain_shift.ipynb",
                                                                               as_version=4).cells]
    assert student.build(NOTEBOOKS, edition) == {}  # a student's work is never overwritten
    assert set(student.build(NOTEBOOKS, edition, force=True)) == built


def test_student_edition_fails_the_checks(edition):
    results = student.check([edition], verbose=False)
    assert {k: set(v) for k, v in results.items()} == GRADED
    for res in results.values():
        assert all(why is not None and "not written yet" in why for why in res.values()), res


def test_instructor_code_passes_the_checks():
    results = student.check([NOTEBOOKS], verbose=False)
    assert {k: set(v) for k, v in results.items()} == GRADED
    assert all(why is None for res in results.values() for why in res.values()), results


def test_filled_in_student_edition_passes_and_a_wrong_line_fails(tmp_path):
    out = tmp_path / "notebooks"
    student.build(NOTEBOOKS, out)
    for name in GRADED:
        instructor = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells)
        fill(out / f"{name}.ipynb", solutions(instructor))
    assert student.main(["check", str(out)]) == 0
    # a read without the l2 normalisation of the features: wrong, and graded as such
    wrong = ["    return torch.einsum('nc,bchw->bnhw', memory, features).softmax(dim=1)"]
    path = out / "03_pin_the_memory.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "def memory_read(" in c.source)
    cell.source, n = re.subn(r'(def memory_read\(.*?"""\n).*?(\n\n)', lambda m: m[1] + "\n".join(wrong) + m[2],
                             cell.source, count=1, flags=re.S)
    assert n == 1
    nbformat.write(nb, path)
    results = student.check([path], verbose=False)["03_pin_the_memory"]
    assert "differs from the library" in results["memory_read"]
    assert results["memory_write"] is None and results["cohesion_loss"] is None
    assert student.main(["check", str(path)]) == 1
