"""User hooks named in the config as `package.module:function` (or slime's dotted `package.module.function`),
or as `path/to/file.py:function`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


def load_function(path: str) -> Callable[..., Any]:
    """Import the function a hook path names; the error says which part could not be found."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not a hook path; write package.module:function")
    try:
        module = _from_file(Path(module_name)) if module_name.endswith(".py") else importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"hook {path!r}: cannot import module {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"hook {path!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _from_file(file: Path) -> ModuleType:
    """The module of a Python file, executed once per process (a hook is looked up again for each batch)."""
    key = f"rlhpc-hook:{file.resolve()}"
    if key in sys.modules:
        return sys.modules[key]
    if not file.is_file():
        raise ImportError(f"no file {file}")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[key] = module
    return module
