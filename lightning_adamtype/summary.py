"""What the verdicts mean, said in words: the per-tensor shares, the warning when a verdict turns, the summary.

A verdict has three states (:attr:`lightning_adamtype.trend.TrendDetector.verdict`): NaN "unknown" (too few
samples: it says how many more steps it needs), 0 "holds" (the windowed ratio falls faster than the margin) and 1
"trending toward violation". :class:`VerdictWatch` compares each reading of ``compute()`` with the previous one and
warns once when a verdict turns to violation; :func:`summary_text` is the end-of-fit report.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch

__all__ = ["ADVICE", "TOP_K", "VerdictWatch", "summary_text", "top_shares", "verdict_word"]

#: how many tensors the shares name (scalars ``<key>_share_top<i>``)
TOP_K = 3

#: what each verdict means in practice
ADVICE = {
    "bias": "the effective stepsizes keep oscillating with the gradient noise (Adam with a constant β2 can diverge "
    "this way): try switch_to_amsgrad=True, a larger β2 (e.g. 0.999 → 0.9999) or AMSGrad",
    "variance": "about the learning-rate schedule: with a constant or slowly decaying lr an Adam-type method only "
    "converges to a neighbourhood whose size grows with lr; a decaying lr (∝ 1/√t or faster) clears it",
}
CAVEAT = "neither verdict predicts test accuracy; they say whether the run meets the paper's sufficient conditions"


def verdict_word(value: float) -> str:
    """"unknown" for NaN, "trending toward violation" for 1, "holds" for 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    return "trending toward violation" if value == 1 else "holds"


def top_shares(rows: Sequence[tuple[str, list[float]]], column: int, k: int = TOP_K) -> list[tuple[str, float]]:
    """The ``k`` tensors with the largest share of a column (0: B, 1: C) of :meth:`TensorShares.read` rows:
    [(name, value_i / Σ_i value_i)], largest first (empty when the column sums to 0)."""
    total = sum(values[column] for _, values in rows)
    if not total > 0:
        return []
    ranked = sorted(((name, values[column] / total) for name, values in rows), key=lambda item: -item[1])
    return ranked[:k]


def _rank_zero() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


class VerdictWatch:
    """Remembers each group's verdicts between readings; :meth:`check` warns (rank zero, once per turn) when one
    turns to violation."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}

    def state_dict(self) -> list[list[Any]]:
        """``[[group name, kind, verdict], ...]``: the verdicts last read (a resumed run does not warn again about
        a turn it already announced)."""
        return [[name, kind, value] for (name, kind), value in self.seen.items()]

    def load_state_dict(self, rows: Sequence[Sequence[Any]]) -> None:
        self.seen = {(str(name), str(kind)): float(value) for name, kind, value in rows}

    def check(self, owner: str, groups: dict[str, dict[str, float]]) -> None:
        for name, row in groups.items():
            for kind in ADVICE:
                value = row.get(f"{kind}_violation", math.nan)
                before = self.seen.get((name, kind), math.nan)
                self.seen[(name, kind)] = value
                if value == 1 and before != 1 and _rank_zero():
                    warnings.warn(
                        f"lightning_adamtype ({owner}): the {kind} verdict of {name} turned to 'trending toward "
                        f"violation' by observed step {int(row.get('steps', 0))} (slope of the windowed ratio "
                        f"{row.get(f'{kind}_slope', math.nan):.2f}); it is {ADVICE[kind]}. {CAVEAT.capitalize()}.",
                        UserWarning,
                        stacklevel=3,
                    )


def _group_lines(name: str, row: dict[str, float], switched: int | None, shares: Sequence[tuple[str, list[float]]]) -> list[str]:
    lines = [f"{name}: {int(row.get('steps', 0))} observed steps" + ("" if row.get("measured", 1) else " (measurement failed)")]
    for kind in ("bias", "variance"):
        value = row.get(f"{kind}_violation", math.nan)
        word = verdict_word(value)
        detail = f"slope {row.get(f'{kind}_slope', math.nan):.2f}"
        changed = row.get(f"{kind}_changed_at", math.nan)
        if not math.isnan(changed):
            detail += f", since step {int(changed)}"
        if word == "unknown":
            detail += f", needs at least {int(row.get(f'{kind}_steps_needed', 0) or 0)} more steps"
        lines.append(f"  {kind} condition ({'C' if kind == 'bias' else 'B'}/A → 0): {word} ({detail})")
        if word == "trending toward violation":
            lines.append(f"    → {ADVICE[kind]}")
    if switched is not None:
        lines.append("  switched to AMSGrad at step " + (str(switched) if switched >= 0 else "— (could not)"))
    if "inactive_share" in row and not math.isnan(row["inactive_share"]):
        lines.append(
            f"  inactive coordinates (no gradient yet, left out): {int(row.get('inactive', 0))} of "
            f"{int(row.get('coordinates', 0))} ({100 * row['inactive_share']:.1f} %); activations {int(row.get('activations', 0))}"
        )
    for column, key in ((1, "c"), (0, "b")):
        top = top_shares(shares, column)
        if top:
            lines.append(f"  largest shares of {key}: " + ", ".join(f"{n} {100 * s:.0f} %" for n, s in top))
    return lines


def summary_text(owner: str, groups: dict[str, dict[str, float]], switched: dict[str, int], shares: dict[str, Any]) -> str:
    """The end-of-fit report: per group both verdicts with their slopes and the step they last changed (or how
    many steps an unknown one still needs), the switch, the inactive share, the tensors with the largest shares of
    c and b, and what a violation means in practice."""
    lines = [f"lightning_adamtype summary ({owner}):"]
    for name, row in groups.items():
        lines += _group_lines(name, row, switched.get(name), shares.get(name, []))
    lines.append(f"  ({CAVEAT})")
    return "\n".join(lines)
