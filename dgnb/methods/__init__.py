"""Methods, registered by name. Importing this package registers every method."""

from . import erm  # noqa: F401  (registers)
from . import mldg  # noqa: F401  (registers)
from . import pinthemem  # noqa: F401  (registers)
from .base import REGISTRY, Method, OptimConfig, build_method, register

__all__ = ["REGISTRY", "Method", "OptimConfig", "build_method", "register"]

# Every module of this package is imported, so a new method is one new file with a `@register`ed class:
# the CLI, the run cache and tests/test_contract.py pick it up without any other edit.
import importlib as _importlib
import pkgutil as _pkgutil

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
