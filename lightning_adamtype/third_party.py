"""Adapters for optimizers of other packages (timm, transformers, schedulefree, pytorch-optimizer, bitsandbytes).

None of those packages is a dependency: an optimizer class is recognised by its module and qualified name, and
its adapter is built only when such an optimizer is actually tracked, so nothing here imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapters import OptimizerAdapter


def lookup(optimizer_cls: type) -> tuple[OptimizerAdapter | None, str] | None:
    """(adapter, '') or (None, why it is declined) for a known third-party optimizer class (or a subclass of one);
    None when the class is not one this module knows."""
    return None
