"""Draw the paper-style log-log figure of the Adam-type conditions from TensorBoard event files.

Usage::

    python -m lightning_adamtype.report LOGDIR -o FIGURE.png

Every run under ``LOGDIR`` (every directory that holds ``events.out.tfevents.*`` files) is read with
TensorBoard's ``EventAccumulator``. For each run and each parameter group that logged
``adamtype/<group>/<key>`` scalars, one row of two panels is drawn against the optimizer step, both log-log:

- left: the accumulated quantities  a = A_T = Σ_t min_j η_{t,j},  b = B_T = Σ_t ‖η_t ⊙ g_t‖²,
  c = C_T = Σ_t ‖η_t − η_{t−1}‖₁;
- right: the two conditions  variance_ratio = B_T / A_T  and  bias_ratio = C_T / A_T.

A condition holds when its ratio goes to 0: on a log-log plot a falling line. A flat or rising ratio trends
toward violation (Chen et al., ICLR 2019). Steps at which a group was switched to AMSGrad
(``adamtype/<group>/switched``) are marked by vertical dashed lines on both panels.

Matplotlib's non-interactive Agg backend is used, so no display is needed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["load_runs", "plot_runs", "main", "ACCUMULATED_KEYS", "RATIO_KEYS"]

PREFIX = "adamtype/"
ACCUMULATED_KEYS = ("a", "b", "c")
RATIO_KEYS = ("variance_ratio", "bias_ratio")
SWITCH_KEY = "switched"
_LABELS = {
    "a": "a: Σ min η",
    "b": "b: Σ ‖η⊙g‖²",
    "c": "c: Σ ‖Δη‖₁",
    "variance_ratio": "b/a (variance)",
    "bias_ratio": "c/a (bias)",
}

# {run: {group: {key: [(step, value), ...]}}}
Runs = dict[str, dict[str, dict[str, list[tuple[int, float]]]]]


def _event_dirs(logdir: str) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            found.append(root)
    return sorted(found)


def _split_tag(tag: str) -> tuple[str, str] | None:
    """``adamtype/<group>/<key>`` → (group, key); the group name may itself contain slashes (``Adam/pg0``)."""
    if not tag.startswith(PREFIX):
        return None
    rest = tag[len(PREFIX):]
    group, sep, key = rest.rpartition("/")
    if not sep or not group or not key:
        return None
    return group, key


def load_runs(logdir: str) -> Runs:
    """Read every ``adamtype/<group>/<key>`` scalar of every run under ``logdir``.

    Returns ``{run: {group: {key: [(step, value), ...]}}}``, ``run`` being the event directory relative to
    ``logdir`` (``"."`` for ``logdir`` itself), values sorted by step (the last value wins for a repeated step,
    as when a resumed run rewrites it). Runs without adamtype scalars are left out.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    if not os.path.isdir(logdir):
        raise FileNotFoundError(f"lightning_adamtype.report: {logdir!r} is not a directory")
    runs: Runs = {}
    for path in _event_dirs(logdir):
        acc = EventAccumulator(path, size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        groups: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for tag in acc.Tags().get("scalars", []):
            parts = _split_tag(tag)
            if parts is None:
                continue
            by_step = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
            groups.setdefault(parts[0], {})[parts[1]] = sorted(by_step.items())
        if groups:
            runs[os.path.relpath(path, logdir)] = groups
    return runs


def _positive(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """Points that a log-log axis can show: step ≥ 1 and a finite, positive value."""
    kept = [(s, v) for s, v in points if s >= 1 and math.isfinite(v) and v > 0]
    return [s for s, _ in kept], [v for _, v in kept]


def plot_runs(runs: Runs, output: str, title: str | None = None, dpi: int = 120) -> Any:
    """Draw one row (accumulated a, b, c | ratios b/a, c/a) per (run, group), log-log, and save to ``output``.

    Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [(run, group, keys) for run, groups in sorted(runs.items()) for group, keys in sorted(groups.items())]
    if not rows:
        raise ValueError("lightning_adamtype.report: nothing to plot")
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.4 * len(rows)), squeeze=False)
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green", "variance_ratio": "tab:orange", "bias_ratio": "tab:green"}
    for (run, group, keys), (left, right) in zip(rows, axes):
        label = group if run == "." else f"{run} — {group}"
        switches = [s for s, v in keys.get(SWITCH_KEY, []) if math.isfinite(v) and v > 0]
        for ax, wanted, ylabel in (
            (left, ACCUMULATED_KEYS, "accumulated"),
            (right, RATIO_KEYS, "ratio (→ 0: condition holds)"),
        ):
            drawn = False
            for key in wanted:
                xs, ys = _positive(keys.get(key, []))
                if xs:
                    ax.plot(xs, ys, label=_LABELS[key], color=colors[key], lw=1.6)
                    drawn = True
            for k, step in enumerate(switches):
                ax.axvline(step, color="tab:red", ls="--", lw=1.2, label="switch to AMSGrad" if k == 0 else None)
            if drawn:
                ax.set_xscale("log")
                ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, "no positive values yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        left.set_title(f"{label}: accumulated terms", fontsize=10)
        right.set_title(f"{label}: variance & bias conditions", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lightning_adamtype.report LOGDIR -o FIGURE.png``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_adamtype.report",
        description="Plot the Adam-type convergence conditions (a, b, c, b/a, c/a; log-log) logged by "
        "lightning_adamtype to TensorBoard event files.",
    )
    parser.add_argument("logdir", help="directory searched recursively for TensorBoard event files")
    parser.add_argument("-o", "--output", default="adamtype.png", help="figure file (default: adamtype.png)")
    parser.add_argument("--group", action="append", default=None, help="only this group name (repeatable)")
    parser.add_argument("--run", action="append", default=None, help="only this run (relative path; repeatable)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)

    if not os.path.isdir(args.logdir):
        raise SystemExit(f"lightning_adamtype.report: {args.logdir!r} is not a directory")
    runs = load_runs(args.logdir)
    if args.run:
        runs = {r: g for r, g in runs.items() if r in args.run}
    if args.group:
        runs = {r: {n: k for n, k in g.items() if n in args.group} for r, g in runs.items()}
        runs = {r: g for r, g in runs.items() if g}
    if not runs:
        raise SystemExit(
            f"lightning_adamtype.report: no adamtype/<group>/<key> scalars found under {os.path.abspath(args.logdir)!r}"
            + (f" (filters: run={args.run}, group={args.group})" if args.run or args.group else "")
            + ". Train with lightning_adamtype.AdamTypeMonitor and a TensorBoardLogger writing there, "
            "and pass that logger's directory (or a parent of it)."
        )
    plot_runs(runs, args.output, title=args.title, dpi=args.dpi)
    n_groups = sum(len(g) for g in runs.values())
    print(f"lightning_adamtype.report: {len(runs)} run(s), {n_groups} group(s) → {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
