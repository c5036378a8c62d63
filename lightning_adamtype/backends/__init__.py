"""Compute backends: one interface, three implementations, chosen per group.

The tracker gathers one :class:`GroupStep` per parameter group and step (the parameters that stepped, their
optimizer state, the gradients they consumed, the adapter's square-root form, η_{t−1} per parameter) and hands it
to a backend. A backend either **declines** the step (:meth:`Backend.decline` returns the reason) or **runs** it
(:meth:`Backend.run`) and returns a :class:`StepResult`: the nine terms of :mod:`lightning_adamtype.row` (or, when
``step.fuse`` is set, it adds the row to the accumulators and sets the levels itself), the coordinate count, each
parameter's share (b_i, c_i, activations_i, inactive_i), and the signed η_t (or the (s, e) table) to keep as the
next step's η_{t−1}.

- ``"foreach"`` (:mod:`.foreach`): the reference, multi-tensor ``torch._foreach_*`` operations, for every
  optimizer, dtype and device; sums taken in pieces and added in float64 (see its docstring).
- ``"native"`` (:mod:`.native`): one C call per group on the CPU for optimizers whose η = s / (sqrt(v) + e), float32.
- ``"triton"`` (:mod:`.triton`): two Triton launches per group on a CUDA device, same optimizers.

As torch's ``adam()`` picks ``_single_tensor_adam`` / ``_multi_tensor_adam`` / ``_fused_adam`` once, the tracker
picks a group's backend once per group *signature* (device, dtypes, sizes) with :func:`candidates`, and falls back
to ``"foreach"`` for a step a faster backend declines.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

__all__ = ["Backend", "GroupStep", "StepResult", "backend", "candidates"]


@dataclass
class GroupStep:
    """One group at one observed step, as the tracker gathered it (lists are aligned: one entry per parameter).

    ``previous[i]`` is η_{t−1} of parameter i (a tensor of its shape, or a float for one-η optimizers), or None when
    it had none at the previous observed step; in recomputed mode ``previous_scales[i]`` is the (s', e') row of
    η_{t−1} instead, and ``update`` = (k, w) of v_t = k·v_{t−1} + w·g_t²."""

    group: dict[str, Any]
    params: list[Tensor]
    states: list[dict[str, Any]]
    grads: list[Tensor]
    form: tuple[list[Tensor], Sequence[tuple[Any, Any]]] | None
    uniform: Any
    effective_stepsizes: Callable[[], list[Tensor]]
    min_stepsize: Callable[[torch.dtype], Tensor | None] | None
    update: tuple[float, float] | None
    previous: list[Any]
    previous_scales: list[Tensor | None]
    found_inf: Tensor | None
    accumulators: Tensor
    weight: float
    fuse: bool
    cache: dict[str, Any] = field(default_factory=dict)  # the group's, for the backend's launch plans
    #: per parameter, a tensor > 0 exactly where the coordinate is active (has had a non-zero gradient; the
    #: square-root form's v), or None: every coordinate is active
    activity: list[Tensor] | None = None
    #: "active" (sums over active coordinates and pairs active at t − 1) or "all" (:mod:`lightning_adamtype.row`)
    coordinates: str = "active"

    @property
    def device(self) -> torch.device:
        return self.accumulators.device

    @property
    def dtype(self) -> torch.dtype:
        return self.accumulators.dtype

    @property
    def with_previous(self) -> int:
        """How many parameters have an η_{t−1}."""
        olds = self.previous_scales if self.update is not None else self.previous
        return sum(map(operator.is_not, olds, repeat(None)))  # (no Tensor.__eq__ with None)


@dataclass
class StepResult:
    """What a backend returns: ``terms`` (float64 [9], :data:`lightning_adamtype.row.TERM_KEYS`, or None when it
    added the row itself, then ``finite`` is its device flag), n (the coordinates that stepped, a host int), what
    to keep for the next step: ``etas`` (η_t per parameter, −η_t where inactive; a float for one-η optimizers) or,
    in recomputed mode, ``scales`` (an [n, 2] (s, e) table), and ``per_tensor``: float64 [parameters, 4] with
    each parameter's share of the step, (b_i, c_i, activations_i, inactive_i) over the same coordinates as the
    terms (None when the backend does not give it)."""

    terms: Tensor | None
    n: Any
    etas: list[Any] | None = None
    scales: Tensor | None = None
    finite: Tensor | None = None
    per_tensor: Tensor | None = None


class Backend(Protocol):
    """The interface every backend implements."""

    name: str

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` at all (None when it can)."""

    def decline(self, step: GroupStep) -> str | None:
        """Why this backend does not take ``step`` (None when it does)."""

    def run(self, step: GroupStep) -> StepResult:
        """The step's terms (or the row added to ``step.accumulators`` when ``step.fuse``) and what to keep."""


_BACKENDS: dict[str, Backend] = {}
#: the one-pass backend ``kernel="auto"`` tries first on each device type
_AUTO = {"cuda": "triton", "cpu": "native"}


def backend(name: str) -> Backend:
    """The backend called ``name`` ("foreach", "native", "triton"), imported on first use."""
    if name not in _BACKENDS:
        if name == "foreach":
            from .foreach import ForeachBackend as cls
        elif name == "native":
            from .native import NativeBackend as cls  # type: ignore[assignment]
        elif name == "triton":
            from .triton import TritonBackend as cls  # type: ignore[assignment]
        else:
            raise KeyError(f"no backend {name!r}; expected 'foreach', 'native' or 'triton'")
        _BACKENDS[name] = cls()
    return _BACKENDS[name]


def candidates(kernel: str, device: torch.device) -> list[str]:
    """Backend names to try for a group on ``device`` under the ``kernel`` option, best first ("foreach" last)."""
    if kernel == "foreach":
        return ["foreach"]
    if kernel == "auto":
        first = _AUTO.get(device.type)
        return [first, "foreach"] if first else ["foreach"]
    return [kernel, "foreach"]
