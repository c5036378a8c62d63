"""TensorBoard extras for the Adam-type conditions: a custom-scalars layout and effective-stepsize histograms.

The custom-scalars layout puts, for each parameter group, the two conditions of Chen et al. (ICLR 2019) next to
the terms they are made of, as TensorBoard "Multiline" charts (one category per group, in the
"CUSTOM SCALARS" dashboard):

- variance condition:  b = B_T = Σ_t ‖η_t ⊙ g_t‖²,  a = A_T = Σ_t min_j η_{t,j},  b/a (``variance_ratio``);
- bias condition:      c = C_T = Σ_t ‖η_t − η_{t−1}‖₁,  a,  c/a (``bias_ratio``).

Both ratios must go to 0 for the convergence guarantee; in TensorBoard, switch the chart's y axis to log scale
to see the trend.

Only loggers whose ``experiment`` is a TensorBoard ``SummaryWriter`` (``add_custom_scalars`` /
``add_histogram``) are written to; other loggers are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "custom_scalars_layout", "share_table", "stepsize_histograms", "tensorboard_writers", "write_histograms", "write_layout",
    "write_shares",
]

TAG_PREFIX = "adamtype"
CATEGORY_PREFIX = "adamtype "
VARIANCE_CHART = "variance condition: b, a, b/a"
BIAS_CHART = "bias condition: c, a, c/a"


def _tag_regex(group: str, key: str) -> str:
    # Multiline charts take regular expressions; anchor them so "pg1" does not also match "pg10".
    return "^" + re.escape(f"{TAG_PREFIX}/{group}/{key}") + "$"


def custom_scalars_layout(groups: Iterable[str]) -> dict[str, dict[str, list[Any]]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: one category per group, two Multiline charts.

    ``{"adamtype <group>": {"variance condition: b, a, b/a": ["Multiline", [b, a, variance_ratio tags]],
    "bias condition: c, a, c/a": ["Multiline", [c, a, bias_ratio tags]]}}``, tags as anchored regexes of
    ``adamtype/<group>/<key>``.
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for group in groups:
        layout[f"{CATEGORY_PREFIX}{group}"] = {
            VARIANCE_CHART: ["Multiline", [_tag_regex(group, k) for k in ("b", "a", "variance_ratio")]],
            BIAS_CHART: ["Multiline", [_tag_regex(group, k) for k in ("c", "a", "bias_ratio")]],
        }
    return layout


def tensorboard_writers(loggers: Iterable[Any]) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger among ``loggers`` (others are skipped)."""
    writers = []
    for logger in loggers:
        if "tensorboard" not in type(logger).__name__.lower():
            continue
        writer = getattr(logger, "experiment", None)
        if writer is not None and hasattr(writer, "add_custom_scalars") and hasattr(writer, "add_histogram"):
            writers.append(writer)
    return writers


def write_layout(loggers: Iterable[Any], groups: Iterable[str]) -> int:
    """Write :func:`custom_scalars_layout` to every TensorBoard logger; returns how many were written."""
    layout = custom_scalars_layout(groups)
    if not layout:
        return 0
    writers = tensorboard_writers(loggers)
    for writer in writers:
        writer.add_custom_scalars(layout)
        if hasattr(writer, "flush"):
            writer.flush()
    return len(writers)


def stepsize_histograms(tracker: Any) -> dict[str, torch.Tensor]:
    """``{group name: η of every coordinate}`` (flat, float32, CPU) from a ``ConditionTracker``'s latest observed
    step (:meth:`ConditionTracker.stepsizes`); a one-η optimizer's (SGD) is repeated over the coordinates."""
    return tracker.stepsizes()


def write_histograms(loggers: Iterable[Any], trackers: Iterable[Any], step: int) -> int:
    """``add_histogram("adamtype/<group>/eta", η, step)`` on every TensorBoard logger; returns histograms written."""
    writers = tensorboard_writers(loggers)
    if not writers:
        return 0
    written = 0
    for tracker in trackers:
        for group, values in stepsize_histograms(tracker).items():
            for writer in writers:
                writer.add_histogram(f"{TAG_PREFIX}/{group}/eta", values, step)
                written += 1
    return written


def share_table(rows: list[tuple[str, list[float]]]) -> str:
    """A markdown table of a group's per-tensor shares (from :meth:`ConditionTracker.tensor_shares`), largest share
    of c first: tensor, share of c, share of b, inactive coordinates, activations."""
    total_b = sum(v[0] for _, v in rows) or 1.0
    total_c = sum(v[1] for _, v in rows) or 1.0
    ranked = sorted(rows, key=lambda item: -item[1][1])
    lines = ["| tensor | share of c | share of b | inactive | activations |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {v[1] / total_c:.3f} | {v[0] / total_b:.3f} | {int(v[3])} | {int(v[2])} |" for n, v in ranked]
    return "\n".join(lines)


def write_shares(loggers: Iterable[Any], trackers: Iterable[Any], step: int) -> int:
    """``add_text("adamtype/<group>/tensor_shares", table, step)`` (:func:`share_table`) on every TensorBoard logger
    that has ``add_text``; returns how many tables were written."""
    writers = [w for w in tensorboard_writers(loggers) if hasattr(w, "add_text")]
    written = 0
    for tracker in trackers:
        for group, rows in tracker.tensor_shares().items():
            for writer in writers:
                writer.add_text(f"{TAG_PREFIX}/{group}/tensor_shares", share_table(rows), step)
                written += 1
    return written
