"""End-to-end check of examples/divergence.py: Lightning training, TensorBoard logs, figure and verdict."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from example_modules import example_module  # noqa: E402

pytest.importorskip("pytorch_lightning")
pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "divergence.py"
TAG_KEYS = ("steps", "a", "b", "c", "c2", "variance_ratio", "bias_ratio")
RUN_NAMES = ("adam", "amsgrad", "adam_switch")
# Long enough for the switch (optimizer step 423 with seed 0) and for x to come back (|x| ~ 0.01 at 8000).
STEPS = 8000
# The variance case: long enough for both trend detectors (the cumulative-ratio one and the windowed-increment
# one) to settle with seed 0 (the earliest verdict is due at step ~440), short enough for four Trainer runs.
VARIANCE_STEPS = 3000
VARIANCE_RUN_NAMES = (
    "variance_amsgrad_constant", "variance_amsgrad_inv_sqrt", "variance_adagrad_constant", "variance_adagrad_inv_sqrt",
)
CONSTANT_RUNS = ("variance_amsgrad_constant", "variance_adagrad_constant")
INV_SQRT_RUNS = ("variance_amsgrad_inv_sqrt", "variance_adagrad_inv_sqrt")


@pytest.fixture(scope="module")
def divergence():
    with example_module(EXAMPLE, "divergence_example") as module:
        yield module


@pytest.fixture(scope="module")
def run(divergence, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("divergence")
    out = tmp / "figure" / "divergence.png"
    result = divergence.main(
        ["--problem", "bias", "--steps", str(STEPS), "--logdir", str(tmp / "runs"), "--out", str(out), "--seed", "0"]
    )
    return result, tmp, out


@pytest.fixture(scope="module")
def variance_run(divergence, tmp_path_factory):
    """The variance case through the script's Trainer path: four runs of VARIANCE_STEPS steps, seed 0."""
    tmp = tmp_path_factory.mktemp("variance")
    out = tmp / "figure" / "variance.png"
    result = divergence.main(
        ["--problem", "variance", "--steps", str(VARIANCE_STEPS), "--logdir", str(tmp / "runs"),
         "--out-variance", str(out), "--seed", "0"]
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
    with pytest.raises(SystemExit):
        divergence.parse_args(["--lr-schedule", "inv-sqrt"])
    with pytest.raises(SystemExit):
        divergence.parse_args(["--problem", "all"])
    with pytest.raises(SystemExit):
        divergence.parse_args(["--log-every-n-steps", "0"])


def test_defaults(divergence):
    args = divergence.parse_args([])
    assert args.problem == "both" and args.steps == 20_000 and args.lr_schedule == "constant"
    assert args.out == "divergence.png" and args.out_variance == "divergence_variance.png"
    assert divergence.parse_args(["--out", "figs/d.png"]).out_variance == str(Path("figs/d_variance.png"))
    assert divergence.parse_args(["--out-variance", "v.png"]).out_variance == "v.png"
    assert divergence.parse_args(["--lr-schedule", "inv_sqrt"]).lr_schedule == "inv_sqrt"


def test_help_names_each_default_once(divergence, capsys):
    with pytest.raises(SystemExit) as exit_info:
        divergence.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "{bias,variance,both}" in text and "{constant,inv_sqrt}" in text
    # Split the help into one block per option; each block names its default exactly once.
    blocks = [b for b in text.split("\n  --")[1:]]
    assert len(blocks) == 9, blocks
    for block in blocks:
        assert block.count("default") == 1, block
    for value in ("20000", "runs/divergence", "divergence.png", "divergence_variance.png"):
        assert text.count(f"(default: {value}") + text.count(f", {value})") == 1, value


def test_quiet_filters_lightning_noise(divergence):
    import logging

    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "lightning.pytorch",
                                               "lightning_fabric")]
    tips = [logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero",
                                            "lightning.pytorch.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    filters = [list(lg.filters) for lg in tips]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            divergence._quiet()
            warnings.warn(
                "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                "treespec.is_leaf()` instead.",
                FutureWarning,
            )
            warnings.warn("some other deprecation", FutureWarning)
        assert [str(w.message) for w in caught] == ["some other deprecation"]
        tip = logging.LogRecord(tips[0].name, logging.INFO, __file__, 1, "💡 Tip: try installing [litlogger]", None,
                                None)
        other = logging.LogRecord(tips[0].name, logging.INFO, __file__, 1, "GPU available: False", None, None)
        assert not tips[0].filter(tip) and tips[0].filter(other)
        assert all(lg.level == logging.ERROR for lg in loggers)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for lg, kept in zip(tips, filters):
            lg.filters[:] = kept


@pytest.mark.parametrize(
    "value, word",
    [(True, "violation"), (False, "ok"), (1.0, "violation"), (0.0, "ok"), (math.nan, "unknown"), (None, "unknown")],
)
def test_monitor_verdict_reads_bools_and_floats(divergence, value, word):
    assert divergence.monitor_verdict(value) == word


# --------------------------------------------------------------------------------- the variance case (ours)


@pytest.mark.parametrize("x", [0.0, 0.3, -0.7, 1.0, -1.0, 1.5, -4.0])
@pytest.mark.parametrize("i", [1, 2, 11])
def test_variance_loss_gradient_is_the_stated_gradient(divergence, x, i):
    param = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    divergence.variance_loss(param, i).backward()
    expected = max(-1.0, min(1.0, x)) + (-10.0 if i == 1 else 1.0)
    assert divergence.variance_gradient(x, i) == expected
    assert param.grad.item() == pytest.approx(expected, rel=1e-15, abs=1e-15)  # (autograd may round the sum)


def test_variance_noise_is_unbiased_and_bounded(divergence):
    noise = [divergence.variance_noise(i) for i in range(1, 12)]
    assert sum(noise) == 0.0  # E ξ = 0: the mean gradient is h'(x), zero only at x = 0
    assert sorted(set(noise)) == [-10.0, 1.0]
    grads = [divergence.variance_gradient(x, i) for x in (-50.0, -1.0, 0.0, 0.5, 50.0) for i in range(1, 12)]
    assert max(abs(g) for g in grads) == 11.0  # bounded gradients (an assumption of the paper's theorem)
    for x in (-3.0, -0.4, 0.0, 0.25, 2.0):
        mean = sum(divergence.variance_gradient(x, i) for i in range(1, 12)) / 11
        assert mean == pytest.approx(max(-1.0, min(1.0, x)), abs=1e-12)


def test_variance_problem_optimizers(divergence):
    """The four runs' effective stepsizes: α_t = α or α/√t, on AMSGrad's and AdaGrad's v̂."""
    etas = {}
    for kind in ("amsgrad", "adagrad"):
        for schedule in ("constant", "inv_sqrt"):
            model = divergence.VarianceProblem(kind, schedule, steps=10)
            config = model.configure_optimizers()
            opt = config["optimizer"] if isinstance(config, dict) else config
            sched = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
            lrs = []
            for _ in range(4):
                lrs.append(opt.param_groups[0]["lr"])
                model.x.grad = torch.ones_like(model.x)
                opt.step()
                if sched is not None:
                    sched.step()
            etas[kind, schedule] = lrs
            assert isinstance(opt, torch.optim.Adam if kind == "amsgrad" else torch.optim.Adagrad)
    root = [math.sqrt(t) for t in (1, 2, 3, 4)]
    assert etas["amsgrad", "constant"] == pytest.approx([0.5] * 4)
    assert etas["amsgrad", "inv_sqrt"] == pytest.approx([0.5 / r for r in root])
    # torch's Adagrad divides by √(Σ g²) = √t·√(mean g²): lr·√t is the template's constant α_t = 0.5
    assert etas["adagrad", "constant"] == pytest.approx([0.5 * r for r in root])
    assert etas["adagrad", "inv_sqrt"] == pytest.approx([0.5] * 4)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        divergence.VarianceProblem("sgd")
    with pytest.raises(ValueError, match="schedule='cosine'"):
        divergence.VarianceProblem("amsgrad", "cosine")


def test_variance_runs_log_and_draw(variance_run, divergence):
    result, tmp, out = variance_run
    assert result["results"] == {} and result["out"] is None  # --problem variance: no bias runs
    variance = result["variance"]
    assert variance["out"] == str(out) and out.is_file() and out.stat().st_size > 20_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in VARIANCE_RUN_NAMES:
        r = variance["results"][name]
        assert r["steps"] == VARIANCE_STEPS
        assert Path(r["log_dir"]).is_relative_to(tmp / "runs" / name)
        group = "Adam/pg0" if "amsgrad" in name else "Adagrad/pg0"
        for key in TAG_KEYS:
            assert f"adamtype/{group}/{key}" in r["scalars"], sorted(r["scalars"])
        assert divergence.RMS_X_TAG in r["scalars"] and divergence.ABS_X_TAG in r["scalars"]
        # the logged RMS of x over each interval is the RMS of the kept iterates over that interval
        steps, values = r["scalars"][divergence.RMS_X_TAG]
        history = r["x_history"]
        assert history.shape == (VARIANCE_STEPS,) and history[-1].abs().item() == pytest.approx(r["abs_x"])
        k = len(steps) // 2
        expected = history[steps[k - 1] : steps[k]].square().mean().sqrt().item()
        assert values[k] == pytest.approx(expected, rel=1e-5)
        final_steps, final_values = r["scalars"][f"adamtype/{group}/variance_ratio"]
        assert final_values[-1] == pytest.approx(r["final"]["variance_ratio"], rel=1e-5)
    lines = variance["table"].splitlines()
    assert lines[0].startswith("| run | steps |") and len(lines) == 2 + len(VARIANCE_RUN_NAMES)


def test_variance_case_verdicts(variance_run):
    """The constant-α_t runs are flagged on the variance condition and not on the bias condition; the α/√t runs
    on neither. The monitor's verdicts (monitor.compute()) and the script's own slope verdicts agree."""
    variance = variance_run[0]["variance"]
    results = variance["results"]
    rows = {row["optimizer"]: row for row in variance["rows"]}
    for name in CONSTANT_RUNS:
        final = results[name]["final"]
        assert final["variance_violation"] == 1, (name, final["variance_slope"])
        assert final["bias_violation"] != 1, (name, final["bias_slope"])
        row = rows[results[name]["label"]]
        assert row["variance_condition"] == "violated" and row["bias_condition"] == "holds"
        assert row["variance_slope"] > -0.2 and row["bias_slope"] < -0.6
    for name in INV_SQRT_RUNS:
        final = results[name]["final"]
        assert final["variance_violation"] == 0, (name, final["variance_slope"])
        assert final["bias_violation"] == 0, (name, final["bias_slope"])
        row = rows[results[name]["label"]]
        assert row["variance_condition"] == "holds" and row["bias_condition"] == "holds"
        assert row["variance_slope"] < -0.25
    for constant, inv_sqrt in zip(CONSTANT_RUNS, INV_SQRT_RUNS):
        c, s = rows[results[constant]["label"]], rows[results[inv_sqrt]["label"]]
        assert c["ba_100"] > 4 * s["ba_100"]
        # x keeps wandering with a constant α_t (its spread does not shrink) and converges with α/√t
        assert c["rms_late"] > 0.5 * c["rms_early"]
        assert s["rms_late"] < s["rms_early"]
        assert c["rms_late"] > 5 * s["rms_late"]
    table = variance["table"]
    for name in CONSTANT_RUNS:
        line = next(x for x in table.splitlines() if x.startswith(f"| {results[name]['label']} |"))
        assert "| violated |" in line and " / violation |" in line
    for name in INV_SQRT_RUNS:
        line = next(x for x in table.splitlines() if x.startswith(f"| {results[name]['label']} |"))
        assert "violat" not in line
