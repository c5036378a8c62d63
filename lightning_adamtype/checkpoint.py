"""A tracker's checkpoint: accumulators, verdict state and increment window per group; η_{t−1} and the
per-tensor shares per parameter.

Per-parameter entries are keyed by the parameter's name when the tracker was given ``parameter_names`` (the
callback passes ``module.named_parameters()``), else by its position in the group, and carry the parameter's shape:
an entry whose parameter is missing, or has another shape, is dropped on load (that parameter adds no c at its
first step), with one warning. Version 1 checkpoints (positional, from earlier releases) load too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import sharding
from .group_state import GroupState
from .row import ACCUMULATOR_KEYS, accumulator_dtype
from .trend import TrendDetector

__all__ = ["load_tracker_state", "tracker_state"]

VERSION = 2


def _cpu(x: Any) -> Any:
    return sharding.local_view(x).detach().cpu().clone() if isinstance(x, Tensor) else x


def _keys(tracker: Any, group: dict[str, Any]) -> list[tuple[str, Tensor]]:
    names = tracker.parameter_names
    return [(names.get(p, str(pi)), p) for pi, p in enumerate(group["params"])]


def tracker_state(tracker: Any) -> dict[str, Any]:
    """The tracker's state as plain CPU values."""
    groups = []
    for state in tracker._groups:
        parameters = {}
        shares = {id(p): values for p, values in state.tensors.read()}
        for key, p in _keys(tracker, state.group or {"params": []}):
            i = id(p)
            if i not in tracker.memory.seen:
                continue
            entry: dict[str, Any] = {"seen": tracker.memory.seen[i], "shape": list(p.shape)}  # (a DTensor's: global)
            if i in shares:
                entry["shares"] = shares[i]
            if i in tracker.memory.previous and not state.sharded:  # a sharded η_{t−1} differs per rank: not saved
                entry["eta"] = _cpu(tracker.memory.previous[i])
            if i in tracker.memory.scales:
                entry["scales"] = _cpu(tracker.memory.scales[i])
            parameters[key] = entry
        groups.append({
            "accumulators": None if state.accumulators is None else state.accumulators.detach().cpu().clone(),
            "count": state.count,
            "clock_offset": state.clock_offset,
            "clock": state.clock,
            "detectors": {kind: d.state_dict() for kind, d in state.detectors.items()},
            "window": state.window.state_dict(),
            "disabled": state.disabled,
            "parameters": parameters,
        })
    return {"version": VERSION, "observations": tracker.observations, "switched": dict(tracker.switched), "groups": groups,
            "verdicts_seen": tracker.verdict_watch.state_dict()}


def _version1_parameters(saved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pi, seen in saved.get("last_seen", {}).items():
        entry: dict[str, Any] = {"seen": int(seen)}
        if pi in saved.get("previous", {}):
            entry["eta"] = saved["previous"][pi]
        if pi in saved.get("previous_scales", {}):
            entry["scales"] = saved["previous_scales"][pi]
        out[str(pi)] = entry
    return out


def load_tracker_state(tracker: Any, state_dict: dict[str, Any]) -> None:
    """Restore :func:`tracker_state`'s output into ``tracker`` (its optimizer's groups, by position)."""
    tracker.observations = int(state_dict.get("observations", 0))
    tracker.switched = {str(k): int(v) for k, v in state_dict.get("switched", {}).items()}
    tracker.verdict_watch.load_state_dict(state_dict.get("verdicts_seen", []))
    tracker.memory.clear()
    groups = tracker.optimizer.param_groups
    tracker._groups = []
    for gi, saved in enumerate(state_dict.get("groups", [])):
        group = groups[gi] if gi < len(groups) else None
        params = group["params"] if group is not None else []
        device = sharding.local_view(params[0]).device if params else torch.device("cpu")
        state = GroupState(group=group)
        acc = saved.get("accumulators")
        if acc is not None:
            acc = acc.to(device=device, dtype=accumulator_dtype(device)).clone()
            if acc.numel() < len(ACCUMULATOR_KEYS):
                acc = torch.cat([acc, acc.new_zeros(len(ACCUMULATOR_KEYS) - acc.numel())])
            state.accumulators = acc
        state.count = int(saved.get("count", 0))
        state.clock_offset = int(saved.get("clock_offset", 0))
        state.clock = int(saved.get("clock", state.count))
        state.disabled = str(saved.get("disabled", "") or "")
        for kind, det_state in saved.get("detectors", {}).items():
            det = TrendDetector(tracker.trend_options, device=device, dtype=accumulator_dtype(device))
            det.load_state_dict(det_state)
            state.detectors[kind] = det
        if saved.get("window") is not None:
            state.window.load_state_dict(saved["window"], device)
        entries = saved["parameters"] if "parameters" in saved else _version1_parameters(saved)
        if group is not None:
            _restore_parameters(tracker, state, group, entries)
        tracker._groups.append(state)


def _restore_parameters(tracker: Any, state: GroupState, group: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
    by_key = dict(_keys(tracker, group))
    dropped = 0
    shares: list[tuple[Tensor, list[float]]] = []
    for key, entry in entries.items():
        p = by_key.get(str(key))
        local = sharding.local_view(p) if p is not None else None
        eta = entry.get("eta")
        shape = entry.get("shape", list(eta.shape) if isinstance(eta, Tensor) and eta.numel() > 1 else None)
        if local is None or p is None or (shape is not None and list(p.shape) != list(shape)):
            dropped += 1
            continue
        i = id(p)
        tracker.memory.params[i] = p
        tracker.memory.seen[i] = int(entry["seen"])
        if eta is not None:
            tracker.memory.previous[i] = eta.to(local.device).clone() if isinstance(eta, Tensor) else eta
        if entry.get("scales") is not None:
            tracker.memory.scales[i] = entry["scales"].to(local.device).clone()
        if entry.get("shares") is not None:
            shares.append((p, [float(x) for x in entry["shares"]]))
    if shares:
        state.tensors.load(shares, sharding.local_view(shares[0][0]).device)
    if dropped:
        tracker._warn_once(
            "checkpoint-dropped",
            f"{dropped} parameter(s) of the checkpoint are not in the optimizer or changed shape; they start over",
        )
