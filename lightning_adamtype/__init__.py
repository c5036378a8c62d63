"""lightning_adamtype: measure the convergence conditions of Adam-type optimizers while training.

Chen, Liu, Sun & Hong, "On the Convergence of A Class of Adam-Type Algorithms for Non-Convex Optimization",
ICLR 2019 (arXiv:1808.02941).

- :class:`ConditionTracker`: plain PyTorch (no Lightning import), hooks one optimizer.
- :class:`AdamTypeMonitor`: the Lightning ``Callback`` (imported lazily, so the core works without Lightning).
"""

from __future__ import annotations

from typing import Any

from .adapter_kit import NotMapped, OptimizerAdapter
from .adapters import find_adapter, register_adapter, registered_adapters, unregister_adapter
from .options import TrackerOptions
from .row import ACCUMULATOR_KEYS
from .tracker import ConditionTracker
from .trend import TrendDetector, TrendOptions
from . import optim  # noqa: F401  (registers AdaFom's adapter)

__all__ = [
    "AdamTypeMonitor",
    "ConditionTracker",
    "OptimizerAdapter",
    "TrendDetector",
    "TrendOptions",
    "TrackerOptions",
    "ACCUMULATOR_KEYS",
    "NotMapped",
    "find_adapter",
    "register_adapter",
    "registered_adapters",
    "unregister_adapter",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "AdamTypeMonitor":
        from .callback import AdamTypeMonitor

        return AdamTypeMonitor
    raise AttributeError(f"module 'lightning_adamtype' has no attribute {name!r}")
