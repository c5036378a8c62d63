"""TensorBoard: the custom-scalars layout, η histograms, the progress-bar option, and a real TensorBoard server
(HTTP API, and a headless Chromium screenshot of the CUSTOM SCALARS dashboard) over examples/cifar10.py's logs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lightning_adamtype import AdamTypeMonitor  # noqa: E402
from lightning_adamtype.tensorboard_layout import custom_scalars_layout, stepsize_histograms  # noqa: E402
from reference import eta_adam  # noqa: E402
from example_modules import load_example  # noqa: E402
from tiny_lightning import Tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cifar10.py")


def _fit(tmp_path, monitor, logger, steps=12, optimizer="adam", **kw):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)), batch_size=4)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=[monitor],
        enable_model_summary=False,
        enable_checkpointing=False,
        **{"enable_progress_bar": False, **kw},
    )
    trainer.fit(Tiny(optimizer), data)
    return trainer


# ------------------------------------------------------------------ layout, histograms, progress bar
def test_layout_has_one_category_per_group_with_two_multiline_charts():
    layout = custom_scalars_layout(["Adam/pg0", "Adam/head"])
    assert list(layout) == ["adamtype Adam/pg0", "adamtype Adam/head"]
    charts = layout["adamtype Adam/pg0"]
    assert charts["variance condition: b, a, b/a"] == [
        "Multiline", ["^adamtype/Adam/pg0/b$", "^adamtype/Adam/pg0/a$", "^adamtype/Adam/pg0/variance_ratio$"]
    ]
    assert charts["bias condition: c, a, c/a"] == [
        "Multiline", ["^adamtype/Adam/pg0/c$", "^adamtype/Adam/pg0/a$", "^adamtype/Adam/pg0/bias_ratio$"]
    ]
    # regex metacharacters in group names are escaped
    assert custom_scalars_layout(["SGD/pg1.x"])["adamtype SGD/pg1.x"]["bias condition: c, a, c/a"][1][0] == (
        r"^adamtype/SGD/pg1\.x/c$"
    )


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_layout_and_histograms_in_the_event_file(tmp_path, optimizer):
    monitor = AdamTypeMonitor(log_every_n_steps=2, histogram_every_n_logs=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    _fit(tmp_path, monitor, logger, steps=12, optimizer=optimizer)
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    prefix = "Adam" if optimizer == "adam" else "SGD"
    for group, numel in ((f"{prefix}/pg0", 8 * 8 + 8), (f"{prefix}/head", 8 + 1)):
        events = acc.Histograms(f"adamtype/{group}/eta")
        assert [e.step for e in events] == [4, 8, 12]  # every 2nd log of a log every 2 steps
        h = events[-1].histogram_value
        assert h.num == numel  # one value per coordinate, also for SGD's single η
        assert h.min > 0 and math.isfinite(h.max)
        if optimizer == "sgd":  # η = lr / (1 − μ) for every coordinate
            assert h.min == pytest.approx(0.1) and h.max == pytest.approx(0.1)


def test_stepsize_histograms_match_the_tracker(tmp_path):
    monitor = AdamTypeMonitor(log_every_n_steps=4)
    _fit(tmp_path, monitor, False, steps=5)
    (tracker,) = monitor.trackers
    values = stepsize_histograms(tracker)
    assert set(values) == {"Adam/pg0", "Adam/head"}
    # η of the last step (5), recomputed in float64 from the optimizer's state by the oracle, parameter by parameter
    opt = tracker.optimizer
    for name, group in zip(("Adam/pg0", "Adam/head"), opt.param_groups):
        expected = torch.cat([eta_adam(group, opt.state[p], p).reshape(-1) for p in group["params"]])
        assert all(float(opt.state[p]["step"]) == 5 for p in group["params"])
        assert values[name].dtype == torch.float32 and values[name].device.type == "cpu"
        torch.testing.assert_close(values[name].double(), expected, rtol=1e-5, atol=0)


def test_other_loggers_are_skipped(tmp_path):
    monitor = AdamTypeMonitor(log_every_n_steps=2, histogram_every_n_logs=1)
    _fit(tmp_path, monitor, CSVLogger(tmp_path, name="csv", version=0), steps=6)
    assert monitor.compute()["Adam/pg0"]["steps"] == 6


def test_layout_can_be_turned_off(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    _fit(tmp_path, AdamTypeMonitor(log_every_n_steps=2, tensorboard_layout=False), logger, steps=4)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "custom_scalars__config__" not in acc.Tags()["tensors"]
    assert "adamtype/Adam/pg0/a" in acc.Tags()["scalars"]


@pytest.mark.parametrize("bad", [dict(progress_bar=1), dict(tensorboard_layout="yes"), dict(histogram_every_n_logs=0)])
def test_bad_options_name_the_value(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        AdamTypeMonitor(**bad)


def test_progress_bar_shows_the_first_groups_ratios(tmp_path):
    monitor = AdamTypeMonitor(log_every_n_steps=3, progress_bar=True)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = _fit(tmp_path, monitor, logger, steps=9, enable_progress_bar=True)
    bar = trainer.progress_bar_metrics
    assert {"adamtype_variance_ratio", "adamtype_bias_ratio"} <= set(bar)
    # the value shown is the one logged at the last log step (step 9), of the first group
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert bar["adamtype_bias_ratio"] == pytest.approx(acc.Scalars("adamtype/Adam/pg0/bias_ratio")[-1].value, rel=1e-5)
    assert bar["adamtype_variance_ratio"] == pytest.approx(
        acc.Scalars("adamtype/Adam/pg0/variance_ratio")[-1].value, rel=1e-5
    )
    # progress-bar only: not sent to the loggers
    assert "adamtype_bias_ratio" not in acc.Tags()["scalars"]


def test_progress_bar_off_by_default(tmp_path):
    trainer = _fit(tmp_path, AdamTypeMonitor(log_every_n_steps=3), False, steps=6)
    assert not any(k.startswith("adamtype") for k in trainer.progress_bar_metrics)


# ------------------------------------------------------------------ a real TensorBoard server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, **params):
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.fixture(scope="module")
def example_logs(tmp_path_factory):
    """A short synthetic run of examples/cifar10.py (no torchvision needed)."""
    example = load_example(EXAMPLE, "cifar10_example_ui")
    logdir = tmp_path_factory.mktemp("tb_logs")
    example.main(
        ["--synthetic", "--synthetic-size", "128", "--arch", "resnet8", "--width", "0.25", "--batch-size", "16",
         "--max-steps", "12", "--log-every", "2", "--logdir", str(logdir), "--num-workers", "0", "--no-progress-bar",
         "--accelerator", "cpu", "--optimizer", "adam", "--run-name", "adam"]
    )
    return logdir


@pytest.fixture(scope="module")
def tensorboard_server(example_logs):
    port = _free_port()
    # the same program as the `tensorboard` console script, with this interpreter
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(example_logs), "--host", "127.0.0.1",
           "--port", str(port), "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                tags = _get(port, "/data/plugin/scalars/tags")
                if any("adamtype/Adam/pg0/bias_ratio" in t for t in tags.values()):
                    break
            except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("tensorboard did not serve the example's scalars within 120 s")
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_server_serves_scalars_and_layout(tensorboard_server):
    port = tensorboard_server
    tags = _get(port, "/data/plugin/scalars/tags")
    assert list(tags) == ["adam/version_0"]
    run = "adam/version_0"
    for key in ("a", "b", "c", "c2", "variance_ratio", "bias_ratio"):
        assert f"adamtype/Adam/pg0/{key}" in tags[run]
    points = _get(port, "/data/plugin/scalars/scalars", run=run, tag="adamtype/Adam/pg0/a")
    assert [step for _, step, _ in points] == [2, 4, 6, 8, 10, 12]
    values = [v for _, _, v in points]
    assert all(v > 0 for v in values) and values == sorted(values)  # A_T accumulates
    ratio = _get(port, "/data/plugin/scalars/scalars", run=run, tag="adamtype/Adam/pg0/bias_ratio")
    assert len(ratio) == 6 and all(math.isfinite(v) and v > 0 for _, _, v in ratio)

    layout = _get(port, "/data/plugin/custom_scalars/layout")
    (category,) = layout["category"]
    assert category["title"] == "adamtype Adam/pg0"
    charts = {c["title"]: c["multiline"]["tag"] for c in category["chart"]}
    assert charts == {
        "variance condition: b, a, b/a": ["^adamtype/Adam/pg0/b$", "^adamtype/Adam/pg0/a$", "^adamtype/Adam/pg0/variance_ratio$"],
        "bias condition: c, a, c/a": ["^adamtype/Adam/pg0/c$", "^adamtype/Adam/pg0/a$", "^adamtype/Adam/pg0/bias_ratio$"],
    }
    # the data behind one Multiline chart line, as the dashboard fetches it
    line = _get(port, "/data/plugin/custom_scalars/scalars", run=run, tag="^adamtype/Adam/pg0/bias_ratio$")
    assert line["regex_valid"]
    assert [e[1] for e in line["tag_to_events"]["adamtype/Adam/pg0/bias_ratio"]] == [2, 4, 6, 8, 10, 12]


def test_chromium_screenshot_of_custom_scalars(tensorboard_server, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not on PATH (Debian/Ubuntu: apt-get update && apt-get install -y chromium)")
    port = tensorboard_server
    shot = tmp_path / "custom_scalars.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
           f"--screenshot={shot}", "--window-size=1400,1000", f"http://127.0.0.1:{port}/#custom_scalars"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.exists(), f"no screenshot (rc={proc.returncode}): {proc.stderr[-2000:]}"
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("ADAMTYPE_SCREENSHOT")  # e.g. to look at it: ADAMTYPE_SCREENSHOT=/tmp/tb.png
    if keep:
        shutil.copy(shot, keep)

    matplotlib_image = pytest.importorskip("matplotlib.image", reason="reading the PNG back needs matplotlib")
    pixels = matplotlib_image.imread(str(shot))
    assert pixels.shape[:2] == (1000, 1400)
    rgb = pixels[..., :3]
    assert float(rgb.std()) > 0.02, "the screenshot is blank"
    # more than two colours: text, chart lines and the page background
    distinct = torch.unique(torch.from_numpy((rgb * 255).astype("uint8").reshape(-1, 3)), dim=0)
    assert len(distinct) > 20, f"only {len(distinct)} colours: the page did not render"
