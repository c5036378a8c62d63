"""Reading a tracker's device state on the host: one transfer for every group (:func:`read_groups`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from . import sharding
from .row import ACCUMULATOR_KEYS

__all__ = ["held_tensors", "read_groups", "stepsizes", "storage_bytes", "tensor_shares", "tensors_in", "with_ratios"]


def with_ratios(values: dict[str, float]) -> dict[str, float]:
    """Add variance_ratio = b/a, bias_ratio = c/a, bias_ratio_mean = c_mean/a_mean (NaN while a = 0) and
    inactive_share = inactive / coordinates (of the latest step)."""

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else math.nan

    values["variance_ratio"] = ratio(values["b"], values["a"])
    values["bias_ratio"] = ratio(values["c"], values["a"])
    values["bias_ratio_mean"] = ratio(values["c_mean"], values["a_mean"])
    if "inactive" in values:
        values["inactive_share"] = ratio(values["inactive"], values["coordinates"])
    return values


#: per verdict, what :func:`read_groups` reads from its detector (in this order) after the accumulators
_VERDICT_FIELDS = ("slope", "violation", "window_ratio", "changed_at")
_KINDS = ("variance", "bias")


def _verdicts(state: Any, like: Tensor) -> list[Tensor]:
    """[slope, verdict (NaN/0/1), windowed increment ratio, step of the last change] per verdict."""
    out = []
    acc = state.accumulators
    for kind, key in zip(_KINDS, ("b", "c")):
        d = state.detectors.get(kind)
        if d is None:
            out.append(torch.full((len(_VERDICT_FIELDS),), math.nan, dtype=like.dtype, device=like.device))
            continue
        window = state.window.increment_ratio(state.clock, acc, ACCUMULATOR_KEYS.index(key), ACCUMULATOR_KEYS.index("a"))
        out.append(torch.stack([d.slope.to(like), d.verdict.to(like), window.to(like), d.changed_at.to(like)]))
    return out


def read_groups(names: Sequence[str], states: Sequence[Any]) -> dict[str, dict[str, float]]:
    """``{name: row}`` for every group that was observed or disabled, in one host transfer per device.

    Per verdict (variance, bias): ``<kind>_slope``, ``<kind>_violation`` (1.0 trending toward violation, 0.0 holds,
    NaN unknown), ``<kind>_window_ratio`` (the latest windowed increment ratio), ``<kind>_changed_at`` (the
    optimizer step at which the verdict last changed, NaN while unknown) and ``<kind>_steps_needed`` (0, or
    at least how many more optimizer steps an unknown verdict needs; both on the optimizer's step clock)."""
    live = [(n, s) for n, s in zip(names, states) if s.accumulators is not None or s.disabled]
    width = len(ACCUMULATOR_KEYS) + len(_KINDS) * len(_VERDICT_FIELDS)
    rows = []
    for _, s in live:
        acc = s.accumulators
        if acc is None:
            rows.append(torch.full((width,), math.nan, dtype=torch.float64))
        else:
            rows.append(torch.cat([acc.detach(), *_verdicts(s, acc)]).to("cpu", torch.float64))
    if not rows:
        return {}
    host = torch.stack(rows).tolist()
    out = {}
    k = len(ACCUMULATOR_KEYS)
    for (name, s), values in zip(live, host):
        row = with_ratios(dict(zip(ACCUMULATOR_KEYS, values[:k])))
        for i, kind in enumerate(_KINDS):
            fields = values[k + i * len(_VERDICT_FIELDS) : k + (i + 1) * len(_VERDICT_FIELDS)]
            row.update({f"{kind}_{field}": value for field, value in zip(_VERDICT_FIELDS, fields)})
            d = s.detectors.get(kind)
            needed = d.steps_needed() if d is not None else math.nan
            row[f"{kind}_steps_needed"] = float(needed if math.isnan(row[f"{kind}_violation"]) else 0)
        row["measured"] = 0.0 if s.disabled else 1.0
        out[name] = row
    return out


def tensors_in(obj: Any) -> list[Tensor]:
    """Every tensor reachable through dict values, lists, tuples and this package's objects (each once)."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()

    def walk(x: Any) -> None:
        if id(x) in seen or x is None:
            return
        seen.add(id(x))
        if isinstance(x, Tensor):
            found[id(x)] = x
        elif isinstance(x, dict):
            for value in x.values():
                walk(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                walk(value)
        elif type(x).__module__.startswith("lightning_adamtype") and hasattr(x, "__dict__"):
            for value in vars(x).values():
                walk(value)

    walk(obj)
    return list(found.values())


def stepsizes(names: Sequence[str], groups: Sequence[Any], memory: Any, adapter: Any,
              optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """``{group name: |η| of every coordinate}`` (flat float32 CPU): each parameter's kept η (stored as −η where
    inactive), or, for a parameter whose η is recomputed, η read now from the optimizer state through the adapter;
    a scalar η is repeated over the parameter's coordinates."""
    out: dict[str, Tensor] = {}
    for name, state in zip(names, groups):
        pieces = []
        for p in (state.group or {}).get("params", []):
            eta = memory.previous.get(id(p))
            if eta is None and id(p) in memory.scales and adapter is not None and optimizer.state.get(p):
                with torch.no_grad():
                    eta = adapter.effective_stepsizes(state.group or {}, [optimizer.state[p]])[0]
            if isinstance(eta, Tensor) and eta.numel() > 1:
                pieces.append(sharding.local_view(eta).detach().reshape(-1).abs().to("cpu", torch.float32))
            elif eta is not None:
                pieces.append(torch.full((sharding.local_view(p).numel(),), abs(float(eta)), dtype=torch.float32))
        if pieces:
            out[name] = torch.cat(pieces)
    return out


def tensor_shares(names: Sequence[str], groups: Sequence[Any],
                  parameter_names: dict[Tensor, str]) -> dict[str, list[tuple[str, list[float]]]]:
    """``{group name: [(parameter name, [B_i, C_i, activations_i, inactive_i]), ...]}`` from each group's
    :class:`lightning_adamtype.tensor_shares.TensorShares`; a parameter is named by ``parameter_names``, else
    ``<group>[i]`` (its position in the group)."""
    out = {}
    named = {id(p): n for p, n in parameter_names.items()}
    for name, state in zip(names, groups):
        rows = state.tensors.read()
        if rows:
            index = {id(p): i for i, p in enumerate((state.group or {}).get("params", []))}
            out[name] = [(named.get(id(p), f"{name}[{index.get(id(p), '?')}]"), values) for p, values in rows]
    return out


def held_tensors(memory: Any, groups: Sequence[Any]) -> list[Tensor]:
    """Every tensor a tracker keeps between steps: each parameter's η_{t−1}, (s, e) and coupled-decay copy, and per
    group the accumulators, the backends' buffers, the detectors and the finite flag. (The one-pass backends'
    "eligible" entry and the steady plan hold the optimizer's own state tensors, not the tracker's; the plan's η
    buffer is the "buffer" entry.)"""
    return tensors_in([memory.previous, memory.scales, memory.snapshots, [
        (s.accumulators, {k: v for k, v in s.cache.items() if k not in ("eligible", "steady")}, s.detectors, s.last_finite)
        for s in groups
    ]])


def storage_bytes(tensors: Sequence[Tensor]) -> int:
    """Σ bytes of the distinct storages behind ``tensors`` (a storage shared by several views counts once)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(storages.values())

