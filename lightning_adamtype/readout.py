"""Reading a tracker's device state on the host: one transfer for every group (:func:`read_groups`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .row import ACCUMULATOR_KEYS

__all__ = ["read_groups", "tensors_in", "with_ratios"]


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
