"""What a tracker keeps for each parameter (:class:`ParameterMemory`), keyed by the parameter object.

The oscillation term c_t = Σ_j |η_{t,j} − η_{t−1,j}| needs each parameter's η_{t−1}: the signed η of the previous
observation (−η where the coordinate was inactive, :mod:`lightning_adamtype.row`), or, with
``previous_stepsize="recomputed"``, only its (s', e') row (η_{t−1} is rebuilt from the state). Each entry belongs to
one parameter, whatever its position in its group, so reordering, swapping, adding or removing parameters and
groups keeps every parameter's own η_{t−1}; an η_{t−1} is used only when it was taken at the previous observation
and the parameter still has its shape. Coupled weight decay also needs x_t, the parameter before the update
(``snapshots``, for the step in progress only).

Entries are keyed by ``id(parameter)`` (a tensor's own ``__hash__`` is a Python call, 10× an int's) with the
parameter held in :attr:`ParameterMemory.params`, so that an id stays its parameter's while an entry exists.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .group_state import GroupState

__all__ = ["ParameterMemory"]

_shape = operator.attrgetter("shape")


class ParameterMemory:
    """Per-parameter η_{t−1} (or its (s', e')), the observation it was taken at, and x_t for the step in progress."""

    def __init__(self) -> None:
        self.params: dict[int, Tensor] = {}
        self.previous: dict[int, Any] = {}  # η_{t−1} (a tensor of the parameter's local shape, or a float)
        self.scales: dict[int, Tensor] = {}  # (s', e') of η_{t−1} (recomputed mode)
        self.seen: dict[int, int] = {}  # the observation the parameter's η was taken at
        self.snapshots: dict[int, Tensor] = {}  # x_t (coupled weight decay), this step only

    def clear(self) -> None:
        """Forget every parameter (a checkpoint is about to be loaded)."""
        for store in (self.params, self.previous, self.scales, self.seen):
            store.clear()

    def release(self, live: set[int]) -> None:
        """Drop the entries of parameters whose ids are not in ``live`` (no longer in the optimizer)."""
        for store in (self.params, self.previous, self.scales, self.seen):
            for key in [k for k in store if k not in live]:
                del store[key]

    def take_snapshots(self, optimizer: torch.optim.Optimizer, coupled_weight_decay: Callable[[dict], float]) -> None:
        """x_t of every parameter with a gradient in a group with coupled weight decay λ ≠ 0 (g_t = ∇ + λ·x_t)."""
        self.snapshots.clear()
        for group in optimizer.param_groups:
            if coupled_weight_decay(group) != 0.0:
                for p in group["params"]:
                    if p.grad is not None:
                        self.snapshots[id(p)] = p.detach().clone()

    def previous_of(self, state: GroupState, keys: list[Tensor], params: list[Tensor], recomputed: bool,
                    observation: int, warn: Callable[[str, str], None]) -> tuple[list[Any], list[Any]]:
        """(η_{t−1} per parameter, (s', e') per parameter), one of them all None by the mode; None where η_{t−1} was
        not taken at observation − 1 or the parameter's shape changed since (one warning). When the group's
        parameters, their shapes and the mode are those of the previous observation, what the group kept is
        returned (no per-parameter look-up)."""
        last = observation - 1
        shapes = state.shapes = list(map(_shape, params))
        kept = state.kept
        if kept is not None and kept[0] == last and kept[1] == recomputed and len(kept[2]) == len(keys) and all(
            map(operator.is_, kept[2], keys)
        ) and kept[3] == shapes:
            olds = kept[4]
            return ([None] * len(keys), olds) if recomputed else (olds, [None] * len(keys))
        store = self.scales if recomputed else self.previous
        previous: list[Any] = []
        for k, p in zip(keys, params):
            i = id(k)
            old = store.get(i) if self.seen.get(i) == last else None
            if not recomputed and isinstance(old, Tensor) and old.shape != p.shape:
                warn("resized", "a parameter changed shape; its η_{t−1} is dropped and it starts over")
                old = None
            previous.append(old)
        return ([None] * len(keys), previous) if recomputed else (previous, [None] * len(keys))

    def keep(self, state: GroupState, keys: list[Tensor], etas: list[Any] | None, scales: Tensor | None,
             observation: int) -> None:
        """This step's η_t (or its (s, e) rows, recomputed mode) becomes each parameter's η_{t−1}."""
        ids = list(map(id, keys))
        if scales is not None:
            rows = scales.unbind(0)
            self.scales.update(zip(ids, rows))
            for i in ids:
                self.previous.pop(i, None)
            state.kept = (observation, True, keys, state.shapes, list(rows))
        elif etas is not None:
            self.previous.update(zip(ids, etas))
            state.kept = (observation, False, keys, state.shapes, list(etas))
        self.taken(keys, observation)

    def taken(self, keys: Iterable[Tensor], observation: int) -> None:
        """The parameters ``keys`` have their η_{t−1} as of ``observation`` (kept in place, e.g. by a steady plan)."""
        keys = list(keys)
        ids = list(map(id, keys))
        self.seen.update(dict.fromkeys(ids, observation))
        self.params.update(zip(ids, keys))

    def store(self, p: Tensor, eta: Any) -> None:
        """Set ``p``'s η_{t−1} to ``eta`` (stored mode from now on: its (s', e') row is dropped)."""
        self.previous[id(p)] = eta
        self.params[id(p)] = p
        self.scales.pop(id(p), None)
