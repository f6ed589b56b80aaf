"""Methods, registered by name. Importing this package registers every method."""

from . import erm  # noqa: F401  (registers)
from . import mldg  # noqa: F401  (registers)
from . import pinthemem  # noqa: F401  (registers)
from .base import REGISTRY, Method, OptimConfig, build_method, register

__all__ = ["REGISTRY", "Method", "OptimConfig", "build_method", "register"]
