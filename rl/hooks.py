"""User hooks named in the config as `package.module:function` (or slime's dotted `package.module.function`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_function(path: str) -> Callable[..., Any]:
    """Import the function a hook path names; the error says which part could not be found."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not a hook path; write package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"hook {path!r}: cannot import module {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"hook {path!r}: module {module_name!r} has no function {attr!r}")
    return fn
