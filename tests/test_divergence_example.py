"""End-to-end check of examples/divergence.py: Lightning training, TensorBoard logs, figure and verdict."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytorch_lightning")
pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "divergence.py"
TAG_KEYS = ("steps", "a", "b", "c", "c2", "variance_ratio", "bias_ratio")
RUN_NAMES = ("adam", "amsgrad", "adam_switch")
# Long enough for the switch (optimizer step 423 with seed 0) and for x to come back (|x| ~ 0.01 at 8000).
STEPS = 8000


@pytest.fixture(scope="module")
def divergence():
    spec = importlib.util.spec_from_file_location("divergence_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def run(divergence, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("divergence")
    out = tmp / "figure" / "divergence.png"
    result = divergence.main(
        ["--steps", str(STEPS), "--logdir", str(tmp / "runs"), "--out", str(out), "--seed", "0"]
    )
    return result, tmp, out


@pytest.mark.parametrize("x", [0.0, 0.3, -0.7, 1.0, -1.0, 1.5, -4.0, 281.0])
@pytest.mark.parametrize("i", [1, 2, 11])
def test_loss_gradient_is_the_papers_stochastic_gradient(divergence, x, i):
    param = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    divergence.stochastic_loss(param, i).backward()
    assert param.grad.item() == divergence.stochastic_gradient(x, i)


def test_index_draws_are_seeded_and_in_range(divergence):
    a = divergence.draw_indices(1000, seed=3)
    assert torch.equal(a, divergence.draw_indices(1000, seed=3))
    assert not torch.equal(a, divergence.draw_indices(1000, seed=4))
    assert a.min() >= 1 and a.max() <= 11
    assert set(a.tolist()) == set(range(1, 12))


def test_batches_cover_every_step(divergence):
    batches = divergence.make_batches(95, seed=0, steps_per_batch=10)
    assert [len(b) for b in batches] == [10] * 9 + [5]
    assert torch.equal(torch.cat(batches), divergence.draw_indices(95, seed=0))


def test_figure_is_written(run):
    _, _, out = run
    assert out.is_file()
    assert out.stat().st_size > 20_000, "the figure looks empty"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_event_files_hold_the_monitor_tags(run, divergence):
    result, tmp, _ = run
    for name in RUN_NAMES:
        log_dir = Path(result["results"][name]["log_dir"])
        assert log_dir.is_relative_to(tmp / "runs" / name)
        assert list(log_dir.glob("events.out.tfevents.*"))
        scalars = divergence.read_scalars(log_dir)
        for key in TAG_KEYS:
            assert f"adamtype/Adam/pg0/{key}" in scalars, sorted(scalars)
        assert divergence.ABS_X_TAG in scalars
        steps, values = scalars["adamtype/Adam/pg0/steps"]
        assert steps[-1] == STEPS and values[-1] == pytest.approx(STEPS)
        assert len(steps) >= 10


def test_adam_drifts_and_amsgrad_does_not(run):
    result, _, _ = run
    adam, amsgrad = result["results"]["adam"], result["results"]["amsgrad"]
    assert adam["steps"] == amsgrad["steps"] == STEPS
    assert adam["abs_x"] > amsgrad["abs_x"]
    assert adam["abs_x"] > 1.0
    assert adam["final"]["bias_ratio"] > amsgrad["final"]["bias_ratio"]


def test_the_switch_run_switches_and_comes_back(run, divergence):
    result, _, _ = run
    adam, switch = result["results"]["adam"], result["results"]["adam_switch"]
    assert adam["switched_at"] is None and result["results"]["amsgrad"]["switched_at"] is None
    assert switch["steps"] == STEPS
    step = switch["switched_at"]
    assert step is not None and 0 < step < STEPS
    # The marker is in the event files, at the step the monitor reports, and only in the switch run.
    assert divergence.SWITCHED_TAG in switch["scalars"]
    steps, values = switch["scalars"][divergence.SWITCHED_TAG]
    assert steps == [step] and values == [1.0]
    assert switch["switched_at_logged"] == step
    assert divergence.SWITCHED_TAG not in adam["scalars"]
    # Identical to Adam until the switch; afterwards x comes back to 0 while Adam drifts away.
    curves = result["curves"]
    before = step - 1
    assert divergence.value_at(curves["Adam + switch"]["abs_x"], before) == divergence.value_at(
        curves["Adam"]["abs_x"], before
    )
    assert switch["abs_x"] < 0.1
    assert switch["abs_x"] < 1e-3 * adam["abs_x"]
    assert switch["final"]["bias_ratio"] < 0.5 * adam["final"]["bias_ratio"]


def test_logged_bias_ratio_ends_where_compute_ends(run):
    result, _, _ = run
    for name in RUN_NAMES:
        r = result["results"][name]
        steps, values = r["scalars"]["adamtype/Adam/pg0/bias_ratio"]
        assert values[-1] == pytest.approx(r["final"]["bias_ratio"], rel=1e-5)


def test_verdict_table(run):
    result, _, _ = run
    rows = {row["optimizer"]: row for row in result["rows"]}
    assert rows["Adam"]["bias_condition"] == "violated"
    assert rows["AMSGrad"]["bias_condition"] == "holds"
    assert rows["Adam + switch"]["bias_condition"] == "holds"
    assert rows["AMSGrad"]["slope"] < rows["Adam"]["slope"]
    assert rows["Adam + switch"]["slope"] < rows["Adam"]["slope"]
    assert all(math.isfinite(row["ca_10"]) and math.isfinite(row["ca_100"]) for row in rows.values())
    assert "switched at |" in result["table"].splitlines()[0]
    assert f"| Adam | {STEPS} |" in result["table"]
    step = result["results"]["adam_switch"]["switched_at"]
    switch_line = next(line for line in result["table"].splitlines() if line.startswith("| Adam + switch |"))
    assert switch_line.endswith(f"| {step} |")
    assert next(line for line in result["table"].splitlines() if line.startswith("| Adam |")).endswith("| — |")


def test_loglog_slope(divergence):
    xs = [10.0 ** k for k in range(1, 6)]
    assert divergence.loglog_slope((xs, [x**-0.5 for x in xs]), 1, 1e6) == pytest.approx(-0.5)
    assert math.isnan(divergence.loglog_slope(([1.0], [1.0]), 0, 10))


def test_bad_arguments_are_refused(divergence):
    with pytest.raises(SystemExit):
        divergence.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        divergence.parse_args(["--lr-schedule", "cosine"])
