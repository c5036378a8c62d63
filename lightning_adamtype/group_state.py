"""What a tracker keeps for one parameter group (:class:`GroupState`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .increments import IncrementWindow
from .tensor_shares import TensorShares
from .trend import TrendDetector

__all__ = ["GroupState"]


@dataclass
class GroupState:
    """What the tracker keeps for one parameter group (the group's dict is its identity)."""

    group: dict[str, Any] | None = None
    accumulators: Tensor | None = None
    count: int = 0  # observations of this group
    clock_offset: int = 0  # the optimizer's step at the first observation, less observe_every (verdict clock)
    clock: int = 0  # the verdict clock at the latest observation: clock_offset + observe_every · count
    last_finite: Tensor | None = None  # device bool: was the latest step finite (else the detectors see NaN)
    detectors: dict[str, TrendDetector] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # the backends' launch plans and η buffer
    backend: str = ""  # the backend of the latest step
    disabled: str = ""  # why this group is no longer measured ('' while it is)
    shapes: list = field(default_factory=list)  # the shapes of the parameters of the step being observed
    kept: tuple | None = None  # (observation, recomputed, parameters, shapes, what they kept): the fast path
    sharded: bool = False
    window: IncrementWindow = field(default_factory=IncrementWindow)  # snapshots for the windowed ratios
    tensors: TensorShares = field(default_factory=TensorShares)  # each parameter's share of b and c
