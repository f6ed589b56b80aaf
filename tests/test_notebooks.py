"""Every notebook runs top to bottom on the smoke preset (its `parameters` cell is overridden)."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.py"))


def with_parameters(nb: nbformat.NotebookNode, **params: object) -> nbformat.NotebookNode:
    """Insert a cell overriding `params` right after the cell tagged `parameters` (papermill's rule)."""
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    assert idx is not None, "every notebook needs a cell tagged 'parameters'"
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def test_every_notebook_is_paired():
    for py in NOTEBOOKS:
        assert py.with_suffix(".ipynb").is_file(), f"{py.name} has no paired .ipynb: run `make notebooks`"
        ipynb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
        assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code"), f"{py.stem}.ipynb has outputs"
        src = [c.source for c in jupytext.read(py).cells]
        assert src == [c.source for c in ipynb.cells], f"{py.stem}: .py and .ipynb differ: run `make notebooks`"


def parameters(path: Path) -> dict[str, object]:
    """The values the `parameters` cell of a notebook assigns."""
    cell = next(c for c in jupytext.read(path).cells if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict[str, object] = {}
    exec(cell.source, namespace)
    return {k: v for k, v in namespace.items() if k.isupper()}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_parameters_cell_and_exercises(path, monkeypatch):
    monkeypatch.delenv("DGNB_PRESET", raising=False)
    params = parameters(path)
    assert params["PRESET"] == "quick" and isinstance(params.get("SEED"), int), f"{path.stem}: PRESET and SEED"
    monkeypatch.setenv("DGNB_PRESET", "smoke")  # what the browser test and `DGNB_PRESET=smoke jupyter lab` use
    assert parameters(path)["PRESET"] == "smoke"
    source = path.read_text()
    if "train(" in source:  # notebooks that train list their method's hyperparameters and pass them to preset()
        assert isinstance(params.get("HPARAMS"), dict) and params["HPARAMS"], f"{path.stem}: HPARAMS"
        assert "hparams=changed_hparams(" in source, f"{path.stem}: HPARAMS must reach preset()"
    last = next(c for c in reversed(jupytext.read(path).cells) if c.cell_type == "markdown")
    assert last.source.startswith("## Exercises"), f"{path.stem} must end with an Exercises section"
    assert "rerun" in last.source.lower(), f"{path.stem}: exercises should include things to change and rerun"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_smoke(path, course_home, monkeypatch):
    monkeypatch.setenv("DGNB_HOME", str(course_home))  # shared by the notebooks: data generated once
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = with_parameters(jupytext.read(path), PRESET="smoke")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
