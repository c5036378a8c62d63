"""``python -m lightning_adamtype.report``: compare runs from TensorBoard event files (figure + table).

Most tests write the event files themselves with ``torch.utils.tensorboard.SummaryWriter`` (runs with known
values, verdicts 1 / 0 / NaN / missing, keys left out); one reads the event files of a real (tiny) Lightning run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("matplotlib", reason="the report draws with matplotlib: pip install matplotlib")
from matplotlib.colors import to_hex  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from lightning_adamtype.report import (  # noqa: E402
    PLOT_KEYS,
    format_table,
    load_runs,
    main,
    optimizer_of,
    plot_runs,
    summarize,
    verdict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (10, 20, 40, 80, 160)
ADAM = os.path.join("adam", "version_0")
AMSGRAD = os.path.join("amsgrad", "version_0")
SGD = os.path.join("sgd", "version_0")
NEW_KEYS = ("inactive_share", "activations", "variance_window_ratio", "bias_window_ratio")


def _write(logdir, run: str, groups: dict[str, dict[str, list[float]]], steps=STEPS, extra=None) -> None:
    """One run folder with ``adamtype/<group>/<key>`` scalars at ``steps`` (one value per step and key)."""
    writer = SummaryWriter(os.path.join(str(logdir), run))
    for group, keys in groups.items():
        for key, values in keys.items():
            assert len(values) == len(steps)
            for step, value in zip(steps, values):
                writer.add_scalar(f"adamtype/{group}/{key}", value, step)
    for tag, step, value in extra or ():
        writer.add_scalar(tag, value, step)
    writer.close()


def _curves(a0: float, c_slope: float, verdicts: dict[str, list[float]], new_keys: bool = True) -> dict[str, list[float]]:
    """a = a0·t, b = 0.1·√t, c = t^(1+c_slope) … with their ratios, as the monitor logs them."""
    t = [float(s) for s in STEPS]
    a = [a0 * s for s in t]
    b = [0.1 * math.sqrt(s) for s in t]
    c = [0.5 * s ** (1 + c_slope) for s in t]
    keys = {
        "steps": t,
        "a": a,
        "b": b,
        "c": c,
        "c2": [0.01 * s for s in t],
        "variance_ratio": [bi / ai for bi, ai in zip(b, a)],
        "bias_ratio": [ci / ai for ci, ai in zip(c, a)],
        "variance_slope": [-0.5] * len(t),
        "bias_slope": [c_slope] * len(t),
        **verdicts,
    }
    if new_keys:
        keys.update(
            inactive_share=[0.2, 0.15, 0.1, 0.1, 0.05],
            activations=[0.0, 3.0, 5.0, 6.0, 6.0],
            variance_window_ratio=[r * 0.8 for r in keys["variance_ratio"]],
            bias_window_ratio=[r * 0.8 for r in keys["bias_ratio"]],
        )
    return keys


NAN = float("nan")


def _three_runs(logdir) -> None:
    """adam: bias violation / variance holds (and the new keys, a switch marker at step 40 in a second group);
    amsgrad: bias holds / variance NaN (unknown), without the new keys; sgd: a different group, no verdict keys,
    no c2."""
    adam = _curves(1e-3, 0.0, {"bias_violation": [0, 0, 1, 1, 1], "variance_violation": [0] * 5})
    _write(
        logdir,
        ADAM,
        {"Adam/pg0": adam, "Adam/head": {"a": adam["a"], "bias_ratio": adam["bias_ratio"]}},
        extra=[("adamtype/Adam/head/switched", 40, 1.0), ("train/loss", 10, 1.0)],
    )
    amsgrad = _curves(
        1e-3, -0.9, {"bias_violation": [0] * 5, "variance_violation": [0, 0, 0, 1, NAN]}, new_keys=False
    )
    _write(logdir, AMSGRAD, {"Adam/pg0": amsgrad})
    sgd = _curves(0.1, -1.0, {})
    del sgd["c2"]
    _write(logdir, SGD, {"SGD/pg0": sgd})


def _table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    lines = text.strip().splitlines()
    header = lines[0].split()
    assert header[:2] == ["run", "group"] and lines[1].startswith("---")
    rows = {}
    for line in lines[2:]:
        if line.startswith("lightning_adamtype.report:"):
            continue
        cells = line.split()
        rows[(cells[0], cells[1])] = cells
    return rows


def _line_colours(ax) -> dict[str, str]:
    """{run: colour} of the data lines of a panel (not the switch markers or the zero line)."""
    out = {}
    for line in ax.get_lines():
        label = line.get_label()
        if label.startswith("_") or "switch" in label:
            continue
        out[label.split(":")[0].split(" (")[0]] = to_hex(line.get_color())
    return out


# ---------------------------------------------------------------------------------------------- pure pieces
def test_verdict_words_and_optimizer_names():
    assert verdict(1.0) == "violation"
    assert verdict(0.0) == "holds"
    assert verdict(NAN) == "unknown" and verdict(None) == "unknown" and verdict(0.5) == "unknown"
    assert optimizer_of("Adam/pg0") == "Adam"
    assert optimizer_of("Adam-1/head") == "Adam"  # a second Adam optimizer
    assert optimizer_of("SGD/pg3") == "SGD"


def test_summarize_reads_the_final_values_and_verdicts(tmp_path):
    _three_runs(tmp_path)
    runs = load_runs(str(tmp_path))
    assert set(runs) == {ADAM, AMSGRAD, SGD}  # "train/loss" alone does not make a group
    assert set(runs[ADAM]) == {"Adam/pg0", "Adam/head"}  # group names with a slash are split at the last "/"
    assert [s for s, _ in runs[ADAM]["Adam/pg0"]["a"]] == list(STEPS)
    assert math.isnan(runs[AMSGRAD]["Adam/pg0"]["variance_violation"][-1][1])

    rows = {(r["run"], r["group"]): r for r in summarize(runs)}
    adam, head, ams, sgd = rows[ADAM, "Adam/pg0"], rows[ADAM, "Adam/head"], rows[AMSGRAD, "Adam/pg0"], rows[SGD, "SGD/pg0"]
    assert (adam["bias"], adam["variance"]) == ("violation", "holds")
    assert (ams["bias"], ams["variance"]) == ("holds", "unknown")  # last value NaN, although 1 the step before
    assert (sgd["bias"], sgd["variance"]) == ("unknown", "unknown")  # no verdict keys logged
    assert adam["steps"] == 160 and adam["a"] == pytest.approx(0.16)
    assert adam["bias_ratio"] == pytest.approx(0.5 * 160 / 0.16, rel=1e-6)
    assert ams["bias_slope"] == pytest.approx(-0.9)
    assert sgd["c2"] is None and ams.get("inactive_share") is None
    assert head["steps"] == 160  # no "steps" key: the last logged step
    assert head["switched_at"] == 40 and adam["switched_at"] is None
    assert adam["optimizer"] == "Adam" and sgd["optimizer"] == "SGD"


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_compares_runs_table_and_figure(tmp_path, capsys):
    _three_runs(tmp_path / "runs")
    out = tmp_path / "fig" / "compare.png"
    assert main([str(tmp_path / "runs"), "-o", str(out), "--title", "three runs"]) == 0
    assert out.exists() and out.stat().st_size > 20_000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    printed = capsys.readouterr().out
    rows = _table_rows(printed)
    assert set(rows) == {(ADAM, "Adam/pg0"), (ADAM, "Adam/head"), (AMSGRAD, "Adam/pg0"), (SGD, "SGD/pg0")}
    # … steps a b c b/a c/a var-slope bias-slope variance bias switched-at
    assert rows[ADAM, "Adam/pg0"][-3:] == ["holds", "violation", "—"]
    assert rows[AMSGRAD, "Adam/pg0"][-3:] == ["unknown", "holds", "—"]
    assert rows[SGD, "SGD/pg0"][-3:] == ["unknown", "unknown", "—"]
    assert rows[ADAM, "Adam/head"][-1] == "40"
    assert rows[ADAM, "Adam/pg0"][2] == "160" and rows[AMSGRAD, "Adam/pg0"][9] == "-0.9"
    assert "3 run(s), 4 group(s)" in printed and str(out) in printed


def test_figure_overlays_runs_per_group_with_verdict_legends(tmp_path):
    _three_runs(tmp_path)
    fig = plot_runs(load_runs(str(tmp_path)), str(tmp_path / "f.png"))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    by_group: dict[str, dict[str, object]] = {}
    for ax in panels:
        quantity, second, _runs = ax.get_title().split("\n")
        by_group.setdefault(second.split(" [")[0], {})[quantity] = ax

    # one panel per logged quantity and group: Adam/pg0 has all twelve (the new keys from the adam run only)
    assert len(by_group["Adam/pg0"]) == len(PLOT_KEYS) == 12
    assert len(by_group["SGD/pg0"]) == 11  # no c2
    assert len(by_group["Adam/head"]) == 2  # a, bias_ratio
    assert len(panels) == 12 + 11 + 2

    # titles name the optimizer and the runs drawn
    ratio = by_group["Adam/pg0"]["c/a (bias)"]
    assert ratio.get_title().split("\n")[1:] == ["Adam/pg0 [Adam]", f"{ADAM}, {AMSGRAD}"]
    assert by_group["Adam/pg0"]["inactive share of coordinates"].get_title().endswith(f"[Adam]\n{ADAM}")
    assert "[SGD]" in by_group["SGD/pg0"]["a: Σ min η"].get_title()
    assert ratio.get_xscale() == "log" and ratio.get_yscale() == "log"
    slope = by_group["Adam/pg0"]["slope of log c/a vs log t (bias)"]
    assert slope.get_xscale() == "log" and slope.get_yscale() == "linear"

    # overlaid runs, one colour per run, the same in every panel, different between runs
    colours: dict[str, set[str]] = {}
    for ax in panels:
        for run, c in _line_colours(ax).items():
            colours.setdefault(run, set()).add(c)
    assert set(colours) == {ADAM, AMSGRAD, SGD}
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == 3
    assert set(_line_colours(ratio)) == {ADAM, AMSGRAD}
    # the plotted values are the logged ones
    adam_line = next(ln for ln in ratio.get_lines() if ln.get_label() == ADAM)
    assert list(adam_line.get_xdata()) == list(STEPS)
    assert list(adam_line.get_ydata()) == pytest.approx([0.5 * s / (1e-3 * s) for s in STEPS], rel=1e-6)

    # the legend of each group's first panel gives every run's final verdicts
    first = by_group["Adam/pg0"]["a: Σ min η"]
    texts = [t.get_text() for t in first.get_legend().get_texts()]
    assert texts == [f"{ADAM}: bias violation, variance holds", f"{AMSGRAD}: bias holds, variance unknown"]
    sgd_texts = [t.get_text() for t in by_group["SGD/pg0"]["a: Σ min η"].get_legend().get_texts()]
    assert sgd_texts == [f"{SGD}: bias unknown, variance unknown"]
    head_first = by_group["Adam/head"]["a: Σ min η"]
    assert [t.get_text() for t in head_first.get_legend().get_texts()] == [
        f"{ADAM}: bias unknown, variance unknown",
        f"{ADAM}: switch to AMSGrad",
    ]
    # the switch marker: a dashed vertical line at step 40 in the run's colour, in that group's panels only
    for ax in by_group["Adam/head"].values():
        vertical = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [40, 40]]
        assert len(vertical) == 1 and to_hex(vertical[0].get_color()) == next(iter(colours[ADAM]))
    assert not any(list(ln.get_xdata()) == [40, 40] for ln in ratio.get_lines())


def test_match_by_param_group_compares_across_optimizers(tmp_path, capsys):
    _three_runs(tmp_path)
    fig = plot_runs(load_runs(str(tmp_path)), str(tmp_path / "f.png"), match_by="param-group", keys=["bias_ratio"])
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # pg0 (three runs, two optimizers) and head
    pg0 = next(ax for ax in panels if "Adam/pg0" in ax.get_title())
    assert "Adam/pg0 vs SGD/pg0 [Adam, SGD]" in pg0.get_title()
    assert set(_line_colours(pg0)) == {ADAM, AMSGRAD, SGD}
    texts = [t.get_text() for t in pg0.get_legend().get_texts()]
    assert f"{SGD} (SGD/pg0): bias unknown, variance unknown" in texts
    assert f"{ADAM} (Adam/pg0): bias violation, variance holds" in texts

    assert main([str(tmp_path), "-o", str(tmp_path / "m.png"), "--match-by", "param-group", "--key", "a"]) == 0
    assert (tmp_path / "m.png").exists()


def test_missing_keys_do_not_crash(tmp_path, capsys):
    # a run with nothing but a; a run whose ratio is never positive; a verdict with no curves beside it
    _write(tmp_path, "only_a", {"Adam/pg0": {"a": [1.0, 2.0, 3.0, 4.0, 5.0]}})
    _write(tmp_path, "zeros", {"Adam/pg0": {"a": [1.0] * 5, "bias_ratio": [0.0] * 5}})
    _write(tmp_path, "verdict_only", {"RMSprop/pg0": {"bias_violation": [0.0, 0.0, 0.0, 1.0, 1.0]}})
    out = tmp_path / "f.png"
    assert main([str(tmp_path), "-o", str(out)]) == 0
    assert out.exists()
    rows = _table_rows(capsys.readouterr().out)
    assert rows["only_a", "Adam/pg0"][-3:] == ["unknown", "unknown", "—"]
    assert rows["only_a", "Adam/pg0"][3] == "5" and rows["only_a", "Adam/pg0"][4] == "—"  # a, then b not logged
    assert rows["verdict_only", "RMSprop/pg0"][-2] == "violation"

    fig = plot_runs(load_runs(str(tmp_path)), str(tmp_path / "g.png"))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # Adam/pg0: a and bias_ratio; RMSprop/pg0 has nothing to plot
    ratio = next(ax for ax in panels if ax.get_title().startswith("c/a"))
    assert any(t.get_text() == "no plottable values" for t in ratio.texts)

    with pytest.raises(SystemExit, match="nothing to plot"):
        main([str(tmp_path), "-o", str(tmp_path / "h.png"), "--key", "c2"])
    assert not (tmp_path / "h.png").exists()


def test_filters_keep_the_old_cli(tmp_path, capsys):
    _three_runs(tmp_path)
    assert main([str(tmp_path), "-o", str(tmp_path / "a.png"), "--run", "adam", "--group", "Adam/pg0"]) == 0
    printed = capsys.readouterr().out
    assert set(_table_rows(printed)) == {(ADAM, "Adam/pg0")} and "1 run(s), 1 group(s)" in printed
    assert main([str(tmp_path), "--run", AMSGRAD, "--run", SGD, "--no-figure"]) == 0
    printed = capsys.readouterr().out
    assert set(_table_rows(printed)) == {(AMSGRAD, "Adam/pg0"), (SGD, "SGD/pg0")}
    assert not (tmp_path / "adamtype.png").exists() and not os.path.exists("adamtype.png")
    with pytest.raises(SystemExit, match=r"none matches the filters run=\['lion'\]"):
        main([str(tmp_path), "--run", "lion", "--no-figure"])


def test_empty_or_missing_logdir_is_a_clear_error(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(SystemExit) as info:
        main([str(empty), "-o", str(tmp_path / "x.png")])
    message = str(info.value)
    assert "no adamtype/<group>/<key> scalars found" in message and str(empty) in message
    assert "no TensorBoard event files" in message and "AdamTypeMonitor" in message

    # event files without adamtype tags do not count either
    writer = SummaryWriter(str(empty / "other"))
    writer.add_scalar("loss", 1.0, 1)
    writer.close()
    with pytest.raises(SystemExit, match="event files hold no such tags"):
        main([str(empty), "-o", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()

    with pytest.raises(SystemExit, match="is not a directory"):
        main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_runs(str(tmp_path / "missing"))


def test_table_formats_nan_and_missing():
    rows = [{"run": "r", "group": "Adam/pg0", "steps": 3.0, "a": NAN, "variance": "unknown", "bias": "holds",
             "switched_at": None}]
    lines = format_table(rows).splitlines()
    assert len(lines) == 3
    assert lines[2].split() == ["r", "Adam/pg0", "3", "nan", "—", "—", "—", "—", "—", "—", "unknown", "holds", "—"]


# ---------------------------------------------------------------------------------------------- a real run
pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_adamtype import AdamTypeMonitor  # noqa: E402
from tiny_lightning import Tiny  # noqa: E402


def _lightning_run(logdir, name: str, optimizer: str = "adam", steps: int = 16) -> None:
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)), batch_size=4)
    trainer = pl.Trainer(
        default_root_dir=logdir,
        accelerator="cpu",
        max_steps=steps,
        logger=TensorBoardLogger(logdir, name=name, version=0),
        callbacks=[AdamTypeMonitor(log_every_n_steps=2)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Tiny(optimizer), data)


def test_real_lightning_runs_through_the_module_entry_point(tmp_path):
    _lightning_run(tmp_path, "adam")
    _lightning_run(tmp_path, "sgd", optimizer="sgd")
    runs = load_runs(str(tmp_path))
    assert set(runs) == {ADAM, SGD}
    assert set(runs[ADAM]) == {"Adam/pg0", "Adam/head"} and set(runs[SGD]) == {"SGD/pg0", "SGD/head"}
    a = runs[ADAM]["Adam/pg0"]["a"]
    assert [s for s, _ in a] == list(range(2, 17, 2)) and all(v > 0 for _, v in a)
    assert {"a", "b", "c", "c2", "variance_ratio", "bias_ratio"} <= set(runs[ADAM]["Adam/head"])

    out = tmp_path / "real.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_adamtype.report", str(tmp_path), "-o", str(out), "--match-by", "param-group"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows(proc.stdout)
    assert set(rows) == {(ADAM, "Adam/pg0"), (ADAM, "Adam/head"), (SGD, "SGD/pg0"), (SGD, "SGD/head")}
    for (run, group), cells in rows.items():
        assert cells[2] == str(int(runs[run][group]["steps"][-1][1]))  # the last logged value of steps
        assert cells[-3] in ("holds", "violation", "unknown") and cells[-2] in ("holds", "violation", "unknown")
    assert "2 run(s), 4 group(s)" in proc.stdout and out.exists() and out.stat().st_size > 20_000
