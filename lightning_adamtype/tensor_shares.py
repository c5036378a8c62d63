"""Where a group's b and c come from: each parameter's share (:class:`TensorShares`).

The backends return, with the step's terms, each parameter's part of it, (b_i, c_i, activations_i, inactive_i)
(:class:`lightning_adamtype.backends.StepResult`). A group keeps, per parameter, the sums over its observed finite
steps, B_i = Σ_t k·b_i, C_i = Σ_t k·c_i and the activations, and the inactive coordinates of the latest step, on
the device; the shares B_i / Σ_i B_i and C_i / Σ_i C_i say which layer oscillates.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["TENSOR_KEYS", "TensorShares"]

#: per parameter, in this order: accumulated b and c, accumulated activations, inactive coordinates (latest step)
TENSOR_KEYS = ("b", "c", "activations", "inactive")


class TensorShares:
    """Per-parameter sums of one group, held with the parameters they belong to (compared by identity)."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.values: Tensor | None = None  # float64 [parameters, 4] (TENSOR_KEYS)

    def add(self, params: Sequence[Tensor], per_tensor: Tensor, weight: float, finite: Tensor | None) -> None:
        """Add ``weight`` × (b_i, c_i, activations_i) and set inactive_i for the parameters ``params`` (a finite step
        only; no host read). A parameter new to the group starts at 0; one that left keeps nothing."""
        if self.values is None or len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            self._realign(params, per_tensor)
        assert self.values is not None
        step = per_tensor.to(self.values)
        update = torch.cat([self.values[:, :3] + weight * step[:, :3], step[:, 3:]], dim=1)
        if finite is not None:
            update = torch.where(finite.to(self.values.device), update, self.values)
        self.values.copy_(update)

    def _realign(self, params: Sequence[Tensor], like: Tensor) -> None:
        old = {id(p): i for i, p in enumerate(self.params)}
        values = torch.zeros(len(params), len(TENSOR_KEYS), dtype=torch.float64 if like.device.type != "mps" else torch.float32, device=like.device)
        if self.values is not None:
            rows = [(j, old[id(p)]) for j, p in enumerate(params) if id(p) in old]
            if rows:
                into, frm = zip(*rows)
                values[list(into)] = self.values[list(frm)]
        self.params, self.values = list(params), values

    def load(self, rows: Sequence[tuple[Tensor, list[float]]], device: Any) -> None:
        """Set the sums from :meth:`read`-style rows (a checkpoint)."""
        self.params = [p for p, _ in rows]
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        self.values = torch.tensor([v for _, v in rows], dtype=dtype).to(device)

    def clear(self) -> None:
        self.params, self.values = [], None

    def read(self) -> list[tuple[Tensor, list[float]]]:
        """``[(parameter, [B_i, C_i, activations_i, inactive_i]), ...]`` (one host transfer)."""
        if self.values is None:
            return []
        return list(zip(self.params, self.values.tolist()))
