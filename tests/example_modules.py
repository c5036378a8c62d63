"""The scripts of ``examples/`` as modules, for the tests that call their functions."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


def load_example(path: str | os.PathLike, name: str) -> ModuleType:
    """Execute the script at ``path`` as a module called ``name`` (registered in ``sys.modules``, where dataclasses
    and pickling look their module up) and return it."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def example_module(path: str | os.PathLike, name: str) -> Iterator[ModuleType]:
    """:func:`load_example` for the duration of the block, then removed from ``sys.modules``."""
    try:
        yield load_example(path, name)
    finally:
        sys.modules.pop(name, None)
