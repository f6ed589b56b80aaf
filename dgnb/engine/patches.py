"""In-memory changes to library code, for the run cache key.

`runs.library_fingerprint` hashes the library's source files. A notebook can change what a run
executes without touching a file, and such a run must not be served from (or stored under) the key of
the unchanged library. `module_changes(module, path)` compares the live objects of an imported module
with a fresh compile of its file and reports every difference:

- a function or class of the file replaced by another object (`pinthemem.feature_cohesion_loss = mine`);
- a method put into one of the file's classes from elsewhere (`PinTheMemory.read_loss = my_read_loss`),
  or a function whose code object no longer matches the file (`f.__code__ = ...`);
- a name the file imports bound to something else (`pinthemem.segmentation_loss = mine`);
- a literal constant of the file changed (`taxonomy.IGNORE_INDEX = 0`);
- a file edited after the module was imported and not reloaded (the code that runs is the old one).

Each difference is returned as (where, description). The description of a function is a digest of its
code object (bytecode, constants, names; not the file name or line numbers, which differ between two
notebook sessions), its default values, and, recursively, the functions and simple constants it
reads from its own module's globals (a student's helper, a temperature set in a cell). So the same
notebook code gives the same key in every session, and editing the helper changes it.

Not covered: data attributes of classes, mutable module state (dicts, lists, tensors), closures'
non-function values, and code outside the modules the key covers. Those are configuration or beyond a
course's patching; `train(cfg, force=True)` retrains whatever the key says.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SIMPLE = (int, float, complex, str, bytes, bool, type(None))
_CODE_FLAGS_FUNCTION = inspect.CO_NEWLOCALS  # set for functions, lambdas and comprehensions, not class bodies


@dataclass
class DiskModule:
    """What a fresh compile of a module's file defines."""

    code: dict[str, set[str]] = field(default_factory=dict)     # qualname -> code digest(s)
    top: set[str] = field(default_factory=set)                   # top-level def / class names
    constants: dict[str, str] = field(default_factory=dict)      # name -> repr of a literal value
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # name -> (module, attribute)


def _is_simple(value: Any) -> bool:
    if isinstance(value, tuple | frozenset):
        return all(_is_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def code_digest(code: types.CodeType) -> str:
    """Digest of what a code object does: bytecode, constants (nested code recursively), names.

    File name and line numbers are left out: the same cell run in two notebook sessions gets two
    file names but must give one run key."""
    consts = tuple(_const_repr(c) for c in code.co_consts)
    blob = repr((code.co_name, code.co_code, consts, code.co_names, code.co_varnames, code.co_freevars,
                 code.co_cellvars, code.co_argcount, code.co_kwonlyargcount, code.co_flags))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _const_repr(c: Any) -> str:
    """repr of a code constant, independent of set iteration order (string hashing differs per process)."""
    if isinstance(c, types.CodeType):
        return code_digest(c)
    if isinstance(c, frozenset):
        return "frozenset(" + repr(sorted(_const_repr(v) for v in c)) + ")"
    if isinstance(c, tuple):
        return "(" + ", ".join(_const_repr(v) for v in c) + ")"
    return repr(c)


def _walk_code(code: types.CodeType, prefix: str, out: dict[str, set[str]]) -> None:
    """qualname -> digest of every function and class body compiled in `code` (as `__qualname__` names them)."""
    for c in code.co_consts:
        if not isinstance(c, types.CodeType):
            continue
        qual = prefix + c.co_name
        out.setdefault(qual, set()).add(code_digest(c))
        _walk_code(c, qual + (".<locals>." if c.co_flags & _CODE_FLAGS_FUNCTION else "."), out)


@functools.lru_cache(maxsize=256)
def _disk_module_cached(path: str, module_name: str, mtime_ns: int, size: int) -> DiskModule:
    source = Path(path).read_bytes()
    disk = DiskModule()
    _walk_code(compile(source, path, "exec", dont_inherit=True), "", disk.code)
    tree = ast.parse(source)
    package = module_name if Path(path).name == "__init__.py" else module_name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            disk.top.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) == 1 and isinstance(targets[0], ast.Name):
                try:
                    value = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                if _is_simple(value):
                    disk.constants[targets[0].id] = repr(value)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = ("." * node.level + (node.module or "")) if node.level else node.module
            try:
                source_module = importlib_resolve(base, package)
            except (ImportError, ValueError):
                continue
            for alias in node.names:
                disk.imports[alias.asname or alias.name] = (source_module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    disk.imports[alias.asname] = (alias.name, None)
                else:
                    top = alias.name.partition(".")[0]
                    disk.imports[top] = (top, None)
    return disk


def importlib_resolve(name: str, package: str) -> str:
    import importlib.util

    return importlib.util.resolve_name(name, package) if name.startswith(".") else name


def disk_module(path: Path, module_name: str) -> DiskModule:
    """The fresh compile of `path` (cached while the file's size and modification time stay the same)."""
    st = path.stat()
    return _disk_module_cached(str(path), module_name, st.st_mtime_ns, st.st_size)


def function_of(obj: Any) -> types.FunctionType | None:
    """The plain function behind `obj` (unwrapping decorators, static/class methods, properties), else None."""
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    elif isinstance(obj, property):
        obj = obj.fget
    if obj is None or isinstance(obj, type):
        return None
    try:
        obj = inspect.unwrap(obj)
    except ValueError:
        return None
    return obj if isinstance(obj, types.FunctionType) else None


def describe(obj: Any, _seen: set[int] | None = None) -> str:
    """A stable description of code that is not the library's: see the module docstring."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return "<seen>"
    seen.add(id(obj))
    fn = function_of(obj)
    if fn is not None:
        parts = [fn.__qualname__, code_digest(fn.__code__), repr(fn.__defaults__), repr(fn.__kwdefaults__)]
        for name in sorted(_names_read(fn.__code__)):
            dep = fn.__globals__.get(name)
            same_module = getattr(dep, "__module__", None) == fn.__module__
            if (function_of(dep) is not None or isinstance(dep, type)) and same_module:
                parts.append(f"{name}={describe(dep, seen)}")
            elif _is_simple(dep) and dep is not None:
                parts.append(f"{name}={dep!r}")
        return "|".join(parts)
    if isinstance(obj, type):
        members = sorted((k, describe(v, seen)) for k, v in vars(obj).items() if function_of(v) is not None)
        bases = [f"{b.__module__}.{b.__qualname__}" for b in obj.__mro__[1:]]
        return repr((obj.__qualname__, bases, members))
    return repr(obj) if _is_simple(obj) else f"<{type(obj).__module__}.{type(obj).__qualname__}>"


def _names_read(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names_read(c)
    return names


def _function_matches(fn: types.FunctionType, path: Path, disk: DiskModule, qualname: str) -> bool:
    return (fn.__code__.co_filename == str(path) and fn.__qualname__ == qualname
            and code_digest(fn.__code__) in disk.code.get(qualname, ()))


def _class_changes(cls: type, path: Path, disk: DiskModule, where: str) -> list[tuple[str, str]]:
    """Methods of a class defined in `path` that are not the file's (added, replaced, or stale)."""
    out = []
    generated = dataclasses.is_dataclass(cls)
    for name, value in vars(cls).items():
        fn = function_of(value)
        if fn is None:
            nested = f"{cls.__qualname__}.{name}"
            if isinstance(value, type) and value.__qualname__ == nested and value.__module__ == cls.__module__:
                out += _class_changes(value, path, disk, f"{where}.{name}")
            elif nested in disk.code:  # the file defines a nested class (Hparams) or method of that name
                out.append((f"{where}.{name}", describe(value)))
            continue
        if generated and fn.__code__.co_filename == "<string>" and name.startswith("__"):
            continue  # __init__, __repr__, __eq__ ... written by @dataclass
        if not _function_matches(fn, path, disk, f"{cls.__qualname__}.{name}"):
            out.append((f"{where}.{name}", describe(value)))
    return out


def module_changes(module: types.ModuleType, path: Path) -> list[tuple[str, str]]:
    """Every way the live `module` differs from a fresh compile of `path`, its file: see the module docstring."""
    path = Path(path).resolve()
    disk = disk_module(path, module.__name__)
    out: list[tuple[str, str]] = []
    here = module.__name__
    namespace = vars(module)
    for name in sorted(disk.top):
        if name not in namespace:
            continue
        obj = namespace[name]
        where = f"{here}.{name}"
        if isinstance(obj, type):
            if obj.__module__ != here or obj.__qualname__ != name:
                out.append((where, describe(obj)))
            else:
                out += _class_changes(obj, path, disk, where)
            continue
        fn = function_of(obj)
        if fn is None or not _function_matches(fn, path, disk, name):
            out.append((where, describe(obj)))
    for name, text in sorted(disk.constants.items()):
        if name in namespace and name not in disk.top and repr(namespace[name]) != text:
            out.append((f"{here}.{name}", describe(namespace[name])))
    for name, (source, attr) in sorted(disk.imports.items()):
        src = sys.modules.get(source)
        if src is None or name not in namespace:
            continue
        missing = object()
        expected = src if attr is None else getattr(src, attr, missing)
        if expected is missing and attr is not None:
            expected = sys.modules.get(f"{source}.{attr}", missing)  # `from . import submodule`
        if namespace[name] is not expected:
            out.append((f"{here}.{name}", describe(namespace[name])))
    return out
