"""``python -m lightning_adamtype.report``: event files of a real (tiny) Lightning run → log-log figure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("matplotlib", reason="the report draws with matplotlib: pip install matplotlib")
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from lightning_adamtype import AdamTypeMonitor  # noqa: E402
from lightning_adamtype.report import load_runs, main, plot_runs  # noqa: E402
from tiny_lightning import Tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(logdir, name: str, optimizer: str = "adam", steps: int = 16) -> TensorBoardLogger:
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)), batch_size=4)
    logger = TensorBoardLogger(logdir, name=name, version=0)
    trainer = pl.Trainer(
        default_root_dir=logdir,
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=[AdamTypeMonitor(log_every_n_steps=2)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Tiny(optimizer), data)
    return logger


def test_load_runs_reads_every_run_and_group(tmp_path):
    _run(tmp_path, "adam")
    _run(tmp_path, "sgd", optimizer="sgd")
    runs = load_runs(str(tmp_path))
    assert set(runs) == {os.path.join("adam", "version_0"), os.path.join("sgd", "version_0")}
    adam = runs[os.path.join("adam", "version_0")]
    assert set(adam) == {"Adam/pg0", "Adam/head"}  # group names with a slash are split at the last "/"
    a = adam["Adam/pg0"]["a"]
    assert [s for s, _ in a] == list(range(2, 17, 2))
    assert all(v > 0 for _, v in a)
    assert {"a", "b", "c", "variance_ratio", "bias_ratio"} <= set(adam["Adam/head"])
    assert set(runs[os.path.join("sgd", "version_0")]) == {"SGD/pg0", "SGD/head"}


def test_cli_writes_a_figure_with_switch_lines(tmp_path):
    logger = _run(tmp_path / "logs", "adam")
    # a switch marker, as AdamTypeMonitor(switch_to_amsgrad=True) logs it
    logger.log_metrics({"adamtype/Adam/pg0/switched": 1.0}, step=6)
    logger.experiment.flush()
    out = tmp_path / "fig" / "conditions.png"
    assert main([str(tmp_path / "logs"), "-o", str(out), "--title", "tiny"]) == 0
    assert out.exists() and out.stat().st_size > 10_000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    runs = load_runs(str(tmp_path / "logs"))
    assert runs[os.path.join("adam", "version_0")]["Adam/pg0"]["switched"] == [(6, 1.0)]
    fig = plot_runs(runs, str(tmp_path / "again.png"))
    axes = fig.axes
    assert len(axes) == 4  # two groups × (accumulated, ratios)
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in axes)
    # the switched group's row has the vertical line on both panels, the other group's row none
    rows = {ax.get_title().split(":")[0]: ax for ax in axes}
    vertical = lambda ax: [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [6, 6]]  # noqa: E731
    pg0 = [ax for ax in axes if "Adam/pg0" in ax.get_title()]
    head = [ax for ax in axes if "Adam/head" in ax.get_title()]
    assert rows and len(pg0) == 2 and len(head) == 2
    assert all(len(vertical(ax)) == 1 for ax in pg0)
    assert all(not vertical(ax) for ax in head)
    labels = {ln.get_label() for ln in pg0[1].get_lines()}
    assert {"b/a (variance)", "c/a (bias)"} <= labels


def test_group_filter_and_module_entry_point(tmp_path):
    _run(tmp_path, "adam", steps=6)
    out = tmp_path / "head.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_adamtype.report", str(tmp_path), "-o", str(out), "--group", "Adam/head"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 group(s)" in proc.stdout and out.exists()


def test_no_adamtype_tags_is_a_clear_error(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    # event files without adamtype tags do not count either
    logger = TensorBoardLogger(empty, name="other", version=0)
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.experiment.flush()
    with pytest.raises(SystemExit) as info:
        main([str(empty), "-o", str(tmp_path / "x.png")])
    message = str(info.value)
    assert "no adamtype/<group>/<key> scalars found" in message and str(empty) in message
    assert not (tmp_path / "x.png").exists()

    with pytest.raises(SystemExit, match="is not a directory"):
        main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")])
