"""Compare runs: the Adam-type conditions logged to TensorBoard, as a figure and a table.

Usage::

    python -m lightning_adamtype.report LOGDIR -o FIGURE.png

Every run under ``LOGDIR`` (every directory that holds ``events.out.tfevents.*`` files, named by its path
relative to ``LOGDIR``, e.g. ``adam/version_0``) is read with TensorBoard's ``EventAccumulator``; only the
``adamtype/<group>/<key>`` scalars count. The figure has one block of panels per group name (``Adam/pg0``), one
panel per logged quantity, each panel overlaying every run that logged that group, one colour per run (the same
colour in every panel). Quantities, drawn where present (a missing key is no panel, never an error):

- accumulated terms (log-log):  a = A_T = Σ_t min_j η_{t,j},  b = B_T = Σ_t ‖η_t ⊙ g_t‖²,
  c = C_T = Σ_t ‖η_t − η_{t−1}‖₁,  c2 = C2_T = Σ_t ‖η_t − η_{t−1}‖²;
- the conditions (log-log):  variance_ratio = B_T / A_T,  bias_ratio = C_T / A_T, and the windowed ratios
  ``variance_window_ratio`` / ``bias_window_ratio`` (increments (B(T) − B(T/2)) / (A(T) − A(T/2)) and the same
  with C) where the monitor logs them;
- the trend detectors' slopes ``variance_slope`` / ``bias_slope`` (log x, linear y; the dotted line is 0), and
  ``inactive_share`` / ``activations`` (log x, linear y).

A condition holds when its ratio goes to 0: on a log-log plot a falling line. A flat or rising ratio trends
toward violation (Chen et al., ICLR 2019). The legend of each group's first panel gives every run's final
verdicts, read from the last logged ``variance_violation`` / ``bias_violation``: 1 → "violation", 0 → "holds",
NaN, another value or no such key → "unknown". Steps at which a group was switched to AMSGrad
(``adamtype/<group>/switched``) are dashed vertical lines in the run's colour. Panel titles name the quantity,
the group, its optimizer (the group name's prefix: ``Adam`` of ``Adam/pg0`` and of ``Adam-1/pg0``) and the runs.

``--match-by param-group`` compares across optimizers: groups are matched by the part after the optimizer
(``pg0`` of ``Adam/pg0`` and ``SGD/pg0``), so an Adam run and an SGD run share panels.

The text output is a table of the final values per run and group (steps, a, b, c, both ratios, both slopes,
both verdicts, the switch step). Matplotlib's non-interactive Agg backend draws the figure, so no display is
needed; ``--no-figure`` prints the table only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "load_runs",
    "plot_runs",
    "summarize",
    "format_table",
    "verdict",
    "optimizer_of",
    "main",
    "ACCUMULATED_KEYS",
    "RATIO_KEYS",
    "PLOT_KEYS",
    "VERDICT_KEYS",
]

PREFIX = "adamtype/"
ACCUMULATED_KEYS = ("a", "b", "c", "c2")
RATIO_KEYS = ("variance_ratio", "bias_ratio", "variance_window_ratio", "bias_window_ratio")
LINEAR_KEYS = ("variance_slope", "bias_slope", "inactive_share", "activations")
PLOT_KEYS = ACCUMULATED_KEYS + RATIO_KEYS + LINEAR_KEYS  # panel order within a group: rows of four
VERDICT_KEYS = {"variance": "variance_violation", "bias": "bias_violation"}
SWITCH_KEY = "switched"
_SLOPE_KEYS = ("variance_slope", "bias_slope")
_LABELS = {
    "a": "a: Σ min η",
    "b": "b: Σ ‖η⊙g‖²",
    "c": "c: Σ ‖Δη‖₁",
    "c2": "c2: Σ ‖Δη‖²",
    "variance_ratio": "b/a (variance)",
    "bias_ratio": "c/a (bias)",
    "variance_window_ratio": "Δb/Δa over (T/2, T] (variance, windowed)",
    "bias_window_ratio": "Δc/Δa over (T/2, T] (bias, windowed)",
    "variance_slope": "slope of log b/a vs log t (variance)",
    "bias_slope": "slope of log c/a vs log t (bias)",
    "inactive_share": "inactive share of coordinates",
    "activations": "activations (first gradients)",
}
# The table's numeric columns: (header, key).
_TABLE_COLUMNS = (
    ("steps", "steps"),
    ("a", "a"),
    ("b", "b"),
    ("c", "c"),
    ("b/a", "variance_ratio"),
    ("c/a", "bias_ratio"),
    ("var slope", "variance_slope"),
    ("bias slope", "bias_slope"),
)
_PANEL_COLUMNS = 4

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
    as when a resumed run rewrites it). Runs without adamtype scalars are left out. Raises
    ``FileNotFoundError`` when ``logdir`` is not a directory.
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


# ---------------------------------------------------------------------------------------------- final values
def optimizer_of(group: str) -> str:
    """The optimizer class of a group name: ``"Adam"`` for ``"Adam/pg0"``, ``"Adam-1/head"`` (a second Adam)."""
    head = group.split("/", 1)[0]
    base, sep, index = head.rpartition("-")
    return base if sep and base and index.isdigit() else head


def _param_group_of(group: str) -> str:
    """The part of a group name after the optimizer: ``"pg0"`` for ``"Adam/pg0"`` (the name itself without "/")."""
    _head, sep, rest = group.partition("/")
    return rest if sep and rest else group


def _last(points: list[tuple[int, float]] | None) -> float | None:
    return points[-1][1] if points else None


def verdict(value: float | None) -> str:
    """A logged ``*_violation`` value as a word: 1 → ``"violation"``, 0 → ``"holds"``, NaN / other / None →
    ``"unknown"``."""
    if value is None or not math.isfinite(value):
        return "unknown"
    if value == 1.0:
        return "violation"
    if value == 0.0:
        return "holds"
    return "unknown"


def summarize(runs: Runs) -> list[dict[str, Any]]:
    """One row per (run, group), sorted: ``run``, ``group``, ``optimizer``, the last logged value of every key
    (``None`` for a key of :data:`PLOT_KEYS` or a verdict key that was never logged; ``steps`` falls back to the
    last logged step of any key), the verdict words ``variance`` / ``bias`` (see :func:`verdict`) and
    ``switched_at`` (the first step whose ``switched`` marker is > 0, else ``None``)."""
    rows = []
    for run, groups in sorted(runs.items()):
        for group, keys in sorted(groups.items()):
            row: dict[str, Any] = {"run": run, "group": group, "optimizer": optimizer_of(group)}
            row.update(dict.fromkeys(("steps", *PLOT_KEYS, *VERDICT_KEYS.values())))
            for key, points in keys.items():
                row[key] = _last(points)
            if row.get("steps") is None:
                last_steps = [points[-1][0] for points in keys.values() if points]
                row["steps"] = float(max(last_steps)) if last_steps else None
            for word, key in VERDICT_KEYS.items():
                row[word] = verdict(row.get(key))
            switches = [s for s, v in keys.get(SWITCH_KEY, []) if math.isfinite(v) and v > 0]
            row["switched_at"] = switches[0] if switches else None
            rows.append(row)
    return rows


def _number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize`'s rows: run, group, the final values, the verdicts."""
    header = ["run", "group", *(h for h, _ in _TABLE_COLUMNS), "variance", "bias", "switched at"]
    body = [
        [row["run"], row["group"], *(_number(row.get(k)) for _, k in _TABLE_COLUMNS), row["variance"], row["bias"],
         _number(row["switched_at"])]
        for row in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    numeric = set(range(2, 2 + len(_TABLE_COLUMNS))) | {len(header) - 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


# ---------------------------------------------------------------------------------------------- figure
def _points(points: list[tuple[int, float]], log_y: bool) -> tuple[list[int], list[float]]:
    """Points a log-x axis can show: step ≥ 1, a finite value, and > 0 on a log-y axis."""
    kept = [(s, v) for s, v in points if s >= 1 and math.isfinite(v) and (v > 0 or not log_y)]
    return [s for s, _ in kept], [v for _, v in kept]


def _run_label(run: str) -> str:
    return "(logdir)" if run == "." else run


def _names(items: Sequence[str], limit: int = 60) -> str:
    text = ", ".join(items)
    return text if len(text) <= limit else f"{len(items)} runs"


def _match(group: str, match_by: str) -> str:
    return _param_group_of(group) if match_by == "param-group" else group


def plot_runs(
    runs: Runs,
    output: str,
    title: str | None = None,
    dpi: int = 120,
    keys: Sequence[str] | None = None,
    match_by: str = "group",
) -> Any:
    """Draw the comparison figure and save it to ``output``; returns the matplotlib figure.

    One block of panels per group name (``match_by="group"``) or per param-group name across optimizers
    (``match_by="param-group"``: ``pg0`` of ``Adam/pg0`` and ``SGD/pg0``); in a block one panel per key of
    ``keys`` (default :data:`PLOT_KEYS`) that some run logged for it, rows of four. Each panel overlays every run
    that has the group, one colour per run throughout; the first panel of a block carries the legend with each
    run's final verdicts. Raises ``ValueError`` when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if match_by not in ("group", "param-group"):
        raise ValueError(f"match_by={match_by!r}: expected 'group' or 'param-group'")
    wanted = tuple(keys) if keys else PLOT_KEYS
    run_names = sorted(runs)
    cmap = plt.get_cmap("tab10" if len(run_names) <= 10 else "tab20")
    colour = {run: cmap(i % cmap.N) for i, run in enumerate(run_names)}
    width = {run: max(1.0, 2.8 - 0.6 * i) for i, run in enumerate(run_names)}  # a later run over an earlier one

    # block name → [(run, group name, {key: points})]
    blocks: dict[str, list[tuple[str, str, dict[str, list[tuple[int, float]]]]]] = {}
    for run in run_names:
        for group, series in sorted(runs[run].items()):
            blocks.setdefault(_match(group, match_by), []).append((run, group, series))
    layout = []  # (block, [keys present])
    for block, members in sorted(blocks.items()):
        present = [k for k in wanted if any(series.get(k) for _, _, series in members)]
        if present:
            layout.append((block, present))
    if not layout:
        raise ValueError(
            "lightning_adamtype.report: nothing to plot"
            + (f" (none of the keys {list(wanted)} was logged)" if keys else "")
        )
    ncols = min(_PANEL_COLUMNS, max(len(present) for _, present in layout))
    block_rows = [math.ceil(len(present) / ncols) for _, present in layout]
    nrows = sum(block_rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.4 * ncols, 6.4), 3.5 * nrows), squeeze=False)
    summary = {(r["run"], r["group"]): r for r in summarize(runs)}

    row0 = 0
    for (block, present), n_rows in zip(layout, block_rows):
        members = blocks[block]
        block_axes = [axes[row0 + i // ncols][i % ncols] for i in range(n_rows * ncols)]
        for ax in block_axes[len(present):]:
            ax.set_visible(False)
        for index, (key, ax) in enumerate(zip(present, block_axes)):
            log_y = key not in LINEAR_KEYS
            drawn_runs = []
            for run, group, series in members:
                xs, ys = _points(series.get(key, []), log_y)
                if not xs:
                    continue
                drawn_runs.append(run)
                if index == 0:
                    s = summary[(run, group)]
                    label = f"{_run_label(run)}: bias {s['bias']}, variance {s['variance']}"
                    if match_by == "param-group":
                        label = f"{_run_label(run)} ({group}): bias {s['bias']}, variance {s['variance']}"
                else:
                    label = _run_label(run)
                marker = "o" if len(xs) == 1 else None
                ax.plot(xs, ys, label=label, color=colour[run], lw=width[run], marker=marker)
                switches = [step for step, value in series.get(SWITCH_KEY, []) if math.isfinite(value) and value > 0]
                for k, step in enumerate(switches):
                    switch_label = f"{_run_label(run)}: switch to AMSGrad" if k == 0 else None
                    ax.axvline(step, color=colour[run], ls="--", lw=1.1, label=switch_label)
            if drawn_runs:
                ax.set_xscale("log")
                if log_y:
                    ax.set_yscale("log")
                if key in _SLOPE_KEYS:
                    ax.axhline(0.0, color="0.4", ls=":", lw=1.0)
            else:
                ax.text(0.5, 0.5, "no plottable values", ha="center", va="center", transform=ax.transAxes)
            optimizers = sorted({optimizer_of(group) for _, group, _ in members})
            groups = sorted({group for _, group, _ in members})
            ax.set_title(
                f"{_LABELS.get(key, key)}\n{' vs '.join(groups)} [{', '.join(optimizers)}]\n"
                f"{_names([_run_label(r) for r in drawn_runs], limit=50) or 'no run'}",
                fontsize=8,
            )
            ax.set_xlabel("optimizer step", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(labelsize=7)
            if index == 0:
                ax.legend(fontsize=7, loc="best", title="final verdicts", title_fontsize=7)
        row0 += n_rows
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return fig


# ---------------------------------------------------------------------------------------------- CLI
def _selected(run: str, wanted: Sequence[str]) -> bool:
    """``--run adam`` picks ``adam`` and everything under it (``adam/version_0``); ``--run adam/version_0`` one."""
    norm = os.path.normpath(run)
    return any(norm == os.path.normpath(w) or norm.startswith(os.path.normpath(w) + os.sep) for w in wanted)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m lightning_adamtype.report LOGDIR -o FIGURE.png``; prints the table, writes the figure."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_adamtype.report",
        description="Compare runs: plot the Adam-type convergence conditions logged by lightning_adamtype to "
        "TensorBoard event files (one panel per quantity and group, one colour per run, the final verdicts in the "
        "legend) and print a table of the final values.",
    )
    parser.add_argument("logdir", help="directory searched recursively for TensorBoard event files")
    parser.add_argument("-o", "--output", default="adamtype.png", help="figure file (default: adamtype.png)")
    parser.add_argument("--group", action="append", default=None, help="only this group name, e.g. Adam/pg0 (repeatable)")
    parser.add_argument(
        "--run", action="append", default=None,
        help="only this run: its path relative to LOGDIR, or a folder above it (repeatable)",
    )
    parser.add_argument(
        "--key", action="append", default=None, choices=PLOT_KEYS, metavar="KEY",
        help=f"plot only this quantity (repeatable; default: all logged of {', '.join(PLOT_KEYS)})",
    )
    parser.add_argument(
        "--match-by", choices=("group", "param-group"), default="group",
        help="group: one block of panels per group name (default); param-group: match groups across optimizers by "
        "the name after the optimizer (pg0 of Adam/pg0 and SGD/pg0)",
    )
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--dpi", type=int, default=120, help="figure resolution (default: 120)")
    parser.add_argument("--no-figure", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    where = os.path.abspath(args.logdir)
    if not os.path.isdir(args.logdir):
        raise SystemExit(f"lightning_adamtype.report: {args.logdir!r} is not a directory ({where})")
    runs = load_runs(args.logdir)
    found = bool(runs)
    if args.run:
        runs = {r: g for r, g in runs.items() if _selected(r, args.run)}
    if args.group:
        runs = {r: {n: k for n, k in g.items() if n in args.group} for r, g in runs.items()}
        runs = {r: g for r, g in runs.items() if g}
    if not runs:
        if found:
            why = f"none matches the filters run={args.run}, group={args.group}"
        elif _event_dirs(args.logdir):
            why = "its TensorBoard event files hold no such tags"
        else:
            why = "there are no TensorBoard event files (events.out.tfevents.*) there"
        raise SystemExit(
            f"lightning_adamtype.report: no adamtype/<group>/<key> scalars found under {where!r}: {why}. "
            "Train with lightning_adamtype.AdamTypeMonitor and a TensorBoardLogger writing there, "
            "and pass that logger's directory (or a parent of it)."
        )
    print(format_table(summarize(runs)))
    n_groups = sum(len(g) for g in runs.values())
    if args.no_figure:
        print(f"lightning_adamtype.report: {len(runs)} run(s), {n_groups} group(s)")
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"lightning_adamtype.report: the figure needs matplotlib ({exc}): pip install matplotlib, "
            "or pass --no-figure for the table only"
        ) from exc
    try:
        plot_runs(runs, args.output, title=args.title, dpi=args.dpi, keys=args.key, match_by=args.match_by)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    print(f"lightning_adamtype.report: {len(runs)} run(s), {n_groups} group(s) → {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
