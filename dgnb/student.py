"""The student edition of the course notebooks, and the grader of a student's functions.

The instructor notebooks (`notebooks/*.py`) write the core lines of each method inside small
functions, between two marker comments (as nbgrader does)::

    def memory_read(features, memory):
        \"\"\"W = softmax over slots of the cosine similarity (Eq. 4).\"\"\"
        ### BEGIN SOLUTION: cosine similarity of l2norm(F) with every slot, then a softmax over slots
        ...
        ### END SOLUTION

- `build(src, out)` writes the student edition: every region becomes
  `raise NotImplementedError("TODO: <function>: <hint>")` (the hint is the text after
  `BEGIN SOLUTION:`); notebooks without regions are copied unchanged. Existing files are kept
  (a student's work is never overwritten) unless `force`.
- `check(paths)` reads the student's notebooks, takes the graded functions out of them (their
  definitions and the notebook's import lines only: nothing is trained), and compares each with the
  library's reference implementation on random inputs (`CHECKS`).

Command line (`make student`, `make check-student`)::

    python -m dgnb.student build [--src notebooks] [--out student/notebooks] [--force]
    python -m dgnb.student check [student/notebooks | notebook files ...]
"""

from __future__ import annotations

import argparse
import ast
import copy
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

BEGIN = re.compile(r"^(?P<indent>\s*)### BEGIN SOLUTION(?::\s*(?P<hint>.*?))?\s*$")
END = re.compile(r"^\s*### END SOLUTION\s*$")
DEF = re.compile(r"^\s*def\s+(?P<name>\w+)\s*\(")
STUDENT_NOTE = (
    "> **Student edition.** The functions marked `TODO` raise `NotImplementedError`: write their body, rerun the "
    "cell, and continue. The cells after each function compare it with the library. `make check-student` (or "
    "`python -m dgnb.student check`) grades all of them against the library's reference implementations."
)


# ----- the student edition -------------------------------------------------------------------------
def strip_solutions(source: str) -> tuple[str, list[str]]:
    """`source` with every solution region replaced by a `NotImplementedError` hole; also the names of
    the functions that got a hole."""
    out: list[str] = []
    holes: list[str] = []
    function = "this function"
    inside = False
    for line in source.splitlines():
        if inside:
            if END.match(line):
                inside = False
            continue
        m = DEF.match(line)
        if m:
            function = m["name"]
        m = BEGIN.match(line)
        if m:
            hint = m["hint"] or "write the missing lines"
            out.append(f'{m["indent"]}raise NotImplementedError({f"TODO: {function}: {hint}"!r})')
            holes.append(function)
            inside = True
            continue
        if END.match(line):
            raise ValueError(f"'### END SOLUTION' without a BEGIN in function {function}")
        out.append(line)
    if inside:
        raise ValueError(f"'### BEGIN SOLUTION' without an END in function {function}")
    return "\n".join(out), holes


def _read_notebook(path: Path):
    import jupytext
    import nbformat

    return nbformat.read(path, as_version=4) if path.suffix == ".ipynb" else jupytext.read(path)


def student_notebook(path: Path):
    """The student edition of one notebook (a nbformat NotebookNode, no outputs) and its holes."""
    import nbformat

    nb = copy.deepcopy(_read_notebook(path))
    holes: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source, found = strip_solutions(cell.source)
            holes += found
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("jupytext", None)  # a plain notebook: no paired .py next to the student's copy
    if holes:
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(STUDENT_NOTE + "\n>\n> Functions to write: "
                                                         + ", ".join(f"`{h}`" for h in holes) + "."))
    return nb, holes


def build(src: str | Path = "notebooks", out: str | Path = "student/notebooks", force: bool = False) -> dict[str, Any]:
    """Write the student edition of every notebook of `src` (`*.py`, the jupytext sources) to `out` as
    `.ipynb`. Returns {notebook name: holes} of the notebooks written; existing ones are kept unless
    `force`."""
    import nbformat

    src, out = Path(src), Path(out)
    sources = sorted(src.glob("*.py")) or sorted(src.glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no notebooks (*.py or *.ipynb) in {src}")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    for path in sources:
        target = out / f"{path.stem}.ipynb"
        if target.exists() and not force:
            print(f"kept {target} (it exists: it may hold your work; delete it or use --force to rebuild)")
            continue
        nb, holes = student_notebook(path)
        nbformat.write(nb, target)
        written[path.stem] = holes
        print(f"wrote {target}" + (f"  ({len(holes)} TODO: {', '.join(holes)})" if holes else ""))
    return written


# ----- extracting a student's functions ----------------------------------------------------------------
def _cells(path: Path) -> list[str]:
    return [c.source for c in _read_notebook(path).cells if c.cell_type == "code"]


def _parse(source: str) -> ast.Module | None:
    """A cell's AST, or None for cells that are not plain Python (magics, syntax errors)."""
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def extract_functions(path: Path, names: set[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    """The functions `names` defined in the notebook at `path` (the last definition of each), executed
    with the notebook's import lines only; and {name: error} for those that could not be built."""
    imports: list[ast.stmt] = []
    defs: dict[str, ast.FunctionDef] = {}
    sources: dict[str, str] = {}
    errors: dict[str, str] = {}
    for source in _cells(path):
        tree = _parse(source)
        if tree is None:
            found = [n for n in names if re.search(rf"^\s*def\s+{n}\s*\(", source, re.M)]
            for n in found:
                errors[n] = "the cell that defines it is not valid Python"
            continue
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.append(node)
            elif isinstance(node, ast.FunctionDef) and node.name in names:
                defs[node.name], sources[node.name] = node, source
                errors.pop(node.name, None)
    namespace: dict[str, Any] = {"__name__": f"student_{path.stem}"}
    for node in imports:
        try:
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
        except Exception as exc:  # an import the grader cannot run does not fail the functions that do not need it
            errors.setdefault("(imports)", f"{ast.unparse(node)}: {exc!r}")
    functions: dict[str, Callable] = {}
    for name, node in defs.items():
        try:
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
            functions[name] = namespace[name]
        except Exception as exc:
            errors[name] = f"could not define it: {exc!r}"
    return functions, errors


# ----- the checks: a student's function against the library's reference ---------------------------------
def _close(a, b, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    import torch

    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
    assert torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol), (
        f"{what}: differs from the library (largest difference {float((a.double() - b.double()).abs().max()):.3g})")


def _random_features(generator, b: int = 2, c: int = 8, h: int = 3, w: int = 5):
    import torch

    x = torch.randn(b, c, h, w, generator=generator, dtype=torch.float64)
    return torch.relu(x + 0.3)  # like the ReLU output F: non-negative, a few zeros


def _unit_rows(generator, n: int, c: int):
    import torch

    return torch.nn.functional.normalize(torch.rand(n, c, generator=generator, dtype=torch.float64), dim=1)


def check_memory_read(fn: Callable) -> None:
    """W = softmax_n <M[n], l2norm(F)>: values (and gradient with respect to F) as the library's."""
    import torch

    from .methods.pinthemem import cosine_scores, read_weights_from_scores

    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        feats, memory = _random_features(g), _unit_rows(g, 6, 8)
        probe = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64)
        f1, f2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
        mine, ref = fn(f1, memory), read_weights_from_scores(cosine_scores(f2, memory))
        _close(mine.detach(), ref.detach(), "W")
        (mine * probe).sum().backward()
        (ref * probe).sum().backward()
        _close(f1.grad, f2.grad, "the gradient of W with respect to F")


def check_memory_write(fn: Callable) -> None:
    """Eq. 1-3 on normalised Z and class masks: present slots move by the momentum rule and stay unit
    norm; absent ones are unchanged."""
    import torch

    from .methods.pinthemem import class_masks, masked_class_sums, momentum_update

    for seed, momentum in ((0, 0.8), (1, 0.5), (2, 0.95)):
        g = torch.Generator().manual_seed(seed)
        z = torch.nn.functional.normalize(_random_features(g), dim=1)
        labels = torch.randint(0, 4, (2, 12, 20), generator=g)
        labels[:, :2] = 255  # ignore pixels count for nothing
        masks = class_masks(labels, z.shape[-2:], 6).double()  # classes 4 and 5 absent
        memory = _unit_rows(g, 6, 8)
        mine = fn(memory.clone(), z, masks, momentum)
        ref = momentum_update(memory, *masked_class_sums(z, masks), momentum)
        _close(mine, ref, f"the written memory (momentum {momentum})")
        _close(mine[4:], memory[4:], "the slots of classes absent from the batch", atol=1e-7)


def check_cohesion_loss(fn: Callable) -> None:
    """Eq. 6 with τ = 1: scores upsampled to label size, cross-entropy over slots, ignore pixels skipped."""
    import torch

    from .methods.pinthemem import feature_cohesion_loss

    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        scores = (2 * torch.rand(2, 6, 4, 6, generator=g, dtype=torch.float64) - 1)
        labels = torch.randint(0, 6, (2, 16, 24), generator=g)
        labels[:, -3:] = 255
        s1, s2 = scores.clone().requires_grad_(), scores.clone().requires_grad_()
        mine, ref = fn(s1, labels), feature_cohesion_loss(s2, labels)
        _close(mine.detach(), ref.detach(), "L_coh")
        mine.backward()
        ref.backward()
        _close(s1.grad, s2.grad, "the gradient of L_coh with respect to the scores")


def _quadratic_problem(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    ya, yb = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    theta = {"w": torch.randn(3, generator=g, dtype=torch.float64), "s": torch.randn((), generator=g, dtype=torch.float64)}

    def loss(params, x, y):
        return ((torch.tanh(x @ params["w"]) * params["s"] - y) ** 2).mean()  # not quadratic: a real Hessian

    return theta, (lambda p: loss(p, a, ya)), (lambda p: loss(p, b, yb))


def check_adapt_parameters(fn: Callable) -> None:
    """θ' = θ − α∇L_tr(θ): the values, the meta-test gradient through θ' (first order: ∂θ'/∂θ = I; second
    order: I − α∇²L_tr), and L_tr's graph kept for the outer gradient."""
    import torch

    from .methods.meta import inner_step

    for seed in range(2):
        for first_order in (True, False):
            theta, loss_tr, loss_te = _quadratic_problem(seed)
            p1 = {k: v.clone().requires_grad_() for k, v in theta.items()}
            p2 = {k: v.clone().requires_grad_() for k, v in theta.items()}
            l1 = loss_tr(p1)
            mine = fn(l1, p1, 0.3, first_order)
            ref = inner_step(loss_tr(p2), p2, 0.3, first_order)
            assert isinstance(mine, dict) and set(mine) == set(ref), f"θ' must be a dict with the keys {sorted(ref)}"
            for k in ref:
                _close(mine[k].detach(), ref[k].detach(), f"θ'[{k!r}] (first_order={first_order})")
            g1 = torch.autograd.grad(loss_te(mine), list(p1.values()), retain_graph=True)
            g2 = torch.autograd.grad(loss_te(ref), list(p2.values()))
            for k, a, b in zip(ref, g1, g2):
                _close(a, b, f"∂L_te(θ')/∂θ[{k!r}] (first_order={first_order})")
            try:
                torch.autograd.grad(l1, list(p1.values()))
            except RuntimeError as exc:
                raise AssertionError("L_tr's graph was freed: the MLDG update differentiates L_tr again "
                                     "(use retain_graph=True)") from exc


def _tiny_segmenter(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1)).double()


def check_mldg_gradient(fn: Callable) -> None:
    """The MLDG update direction ∇_θ[L_tr(θ) + β L_te(θ')] left in `.grad`, first and second order,
    against the library's `inner_step` + `functional_forward`; returns (L_tr, L_te)."""
    import torch
    from torch.nn import functional as F

    from .methods.meta import functional_forward, inner_step, trainable_params

    def loss_fn(logits, labels):
        return F.cross_entropy(logits, labels)

    for seed in range(2):
        for first_order in (True, False):
            g = torch.Generator().manual_seed(seed)
            tr = {"image": torch.rand(2, 3, 6, 8, generator=g, dtype=torch.float64),
                  "label": torch.randint(0, 5, (2, 6, 8), generator=g)}
            te = {"image": torch.rand(2, 3, 6, 8, generator=g, dtype=torch.float64),
                  "label": torch.randint(0, 5, (2, 6, 8), generator=g)}
            mine, ref = _tiny_segmenter(seed).train(), _tiny_segmenter(seed).train()
            losses = fn(mine, loss_fn, tr, te, 0.1, 0.7, first_order)
            params = trainable_params(ref)
            l_tr = loss_fn(ref(tr["image"]), tr["label"])
            adapted = inner_step(l_tr, params, 0.1, first_order)
            l_te = loss_fn(functional_forward(ref, adapted, te["image"]), te["label"])
            (0.7 * l_te).backward()
            for (name, a), b in zip(mine.named_parameters(), ref.parameters()):
                assert a.grad is not None, f"no gradient in .grad of {name}: call backward on the MLDG objective"
                _close(a.grad, b.grad, f"the update direction for {name} (first_order={first_order})")
            assert isinstance(losses, tuple) and len(losses) == 2, "return (L_tr, L_te)"
            _close(losses[0].detach(), l_tr.detach(), "the returned L_tr")
            _close(losses[1].detach(), l_te.detach(), "the returned L_te")


def check_style_gram(fn: Callable) -> None:
    """S = F Fᵀ / (C N) per image (PFR's style, after Gatys et al.): values and gradient with respect to F."""
    import torch

    from .methods.pfr import gram_matrix

    for seed, (c, h, w) in enumerate(((8, 3, 5), (4, 6, 2), (16, 1, 7))):
        g = torch.Generator().manual_seed(seed)
        feats = _random_features(g, 2, c, h, w)
        probe = torch.randn(2, c, c, generator=g, dtype=torch.float64)
        f1, f2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
        mine, ref = fn(f1), gram_matrix(f2, "cn")
        _close(mine.detach(), ref.detach(), f"S for C = {c}, N = {h * w}")
        (mine * probe).sum().backward()
        (ref * probe).sum().backward()
        _close(f1.grad, f2.grad, "the gradient of S with respect to F")


def check_pfr_loss(fn: Callable) -> None:
    """L_pfr = Σ_i ‖S_i^s − S_i^t‖ + ‖C_i^s − C_i^t‖ (Eq. 2-4), mean over image pairs, on maps of equal size:
    values and gradients with respect to both domains' features."""
    import torch

    from .methods.pfr import STAGES, refinement_loss

    widths = (4, 6, 8, 8)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        src = {st: _random_features(g, 2, c, 4, 6) for st, c in zip(STAGES, widths)}
        tgt = {st: 1.5 * _random_features(g, 2, c, 4, 6) for st, c in zip(STAGES, widths)}
        leaves = [{k: v.clone().requires_grad_() for k, v in d.items()} for d in (src, tgt, src, tgt)]
        mine, (ref, _) = fn(leaves[0], leaves[1]), refinement_loss(leaves[2], leaves[3])
        _close(mine.detach(), ref.detach(), "L_pfr")
        mine.backward()
        ref.backward()
        for st in STAGES:
            _close(leaves[0][st].grad, leaves[2][st].grad, f"the gradient of L_pfr with respect to the source {st}")
            _close(leaves[1][st].grad, leaves[3][st].grad, f"the gradient of L_pfr with respect to the target {st}")


CHECKS: dict[str, Callable[[Callable], None]] = {
    "adapt_parameters": check_adapt_parameters,   # notebook 02: the inner step
    "mldg_gradient": check_mldg_gradient,         # notebook 02: the MLDG update
    "memory_read": check_memory_read,             # notebook 03: Eq. 4
    "memory_write": check_memory_write,           # notebook 03: Eq. 1-3
    "cohesion_loss": check_cohesion_loss,         # notebook 03: Eq. 6
    "style_gram": check_style_gram,               # notebook 07: the Gram matrix
    "pfr_loss": check_pfr_loss,                   # notebook 07: Eq. 2-4
}


def _notebooks(paths: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.ipynb")) or sorted(p.glob("*.py"))
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such notebook or folder (build the student edition with `make student`)")
    return out


def check(paths: list[str | Path], verbose: bool = True) -> dict[str, dict[str, str | None]]:
    """Grade the graded functions found in the notebooks `paths` (files or folders):
    {notebook: {function: None if it passed, else why not}}."""
    results: dict[str, dict[str, str | None]] = {}
    for path in _notebooks(paths):
        names = {n for n in CHECKS if any(re.search(rf"^\s*def\s+{n}\s*\(", s, re.M) for s in _cells(path))}
        if not names:
            continue
        functions, errors = extract_functions(path, names)
        res: dict[str, str | None] = {}
        for name in sorted(names):
            if name not in functions:
                res[name] = errors.get(name, "not found")
                continue
            try:
                CHECKS[name](functions[name])
                res[name] = None
            except NotImplementedError as exc:
                res[name] = f"not written yet ({exc})"
            except AssertionError as exc:
                res[name] = str(exc) or "an assertion failed"
            except Exception as exc:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                res[name] = f"{type(exc).__name__}: {exc} (line {frame.lineno} of {Path(frame.filename).name})"
        results[path.stem] = res
        if verbose:
            for name, why in res.items():
                print(f"{'PASS' if why is None else 'FAIL'}  {path.name}: {name}" + ("" if why is None else f"\n      {why}"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgnb.student", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the student edition (solution regions become TODO holes)")
    b.add_argument("--src", default="notebooks")
    b.add_argument("--out", default="student/notebooks")
    b.add_argument("--force", action="store_true", help="overwrite existing student notebooks")
    c = sub.add_parser("check", help="grade a student's functions against the library")
    c.add_argument("paths", nargs="*", default=["student/notebooks"])
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.src, args.out, args.force)
        return 0
    results = check(args.paths)
    if not results:
        print("no graded functions found in", ", ".join(args.paths))
        return 1
    failed = sum(why is not None for res in results.values() for why in res.values())
    total = sum(len(res) for res in results.values())
    print(f"{total - failed}/{total} functions pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
