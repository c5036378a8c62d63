"""Coordinates the theory covers, windowed increments and three-state verdicts (issue: verdicts on real training).

- a, b, c, c2 over *active* coordinates (a non-zero gradient so far, v > 0), the first-gradient step left out of c
  and c2, against the float64 oracle of tests/reference.py, in both ``coordinates`` modes and both
  ``previous_stepsize`` modes, on every backend; ``coordinates="all"`` is the paper's literal definition;
- the per-tensor shares of b and c against a per-parameter float64 computation;
- :class:`lightning_adamtype.increments.IncrementWindow` on synthetic cumulative sequences;
- a verdict reads the same windows whether the tracker started at step 1 or later;
- the verdict's three states, the warning when one turns, the summary text.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_adamtype import ConditionTracker, TrendOptions
from lightning_adamtype.backends.foreach import RECOMPUTED_ZERO
from lightning_adamtype.increments import IncrementWindow

try:
    from .reference import Reference
except ImportError:
    from reference import Reference

try:
    from . import divergence_problem as dp
except ImportError:
    import divergence_problem as dp

KERNELS = ["foreach", "native", "triton"]
NO_SAMPLES = TrendOptions(warmup=100_000)


def _dead_and_late_model(seed: int = 0):
    """Two parameters; 10 of 40 input rows never get a gradient, 10 only from step 6 on."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(40, 16))
    b = torch.nn.Parameter(torch.randn(16))
    return w, b


def _train(opt, w, b, steps: int, before=None, after=None, activation=torch.relu) -> None:
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 40, generator=gen)
        x[:, :10] = 0  # dead inputs: those rows of w never get a gradient
        if t < 5:
            x[:, 10:20] = 0  # late inputs: their first gradient comes at step 6
        activation(x @ w + b).pow(2).sum().backward()
        if before:
            before()
        opt.step()
        if after:
            after()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("coordinates", ["active", "all"])
@pytest.mark.parametrize("previous", ["stored", "recomputed"])
def test_active_terms_match_float64_oracle(kernel, coordinates, previous):
    if kernel == "triton":
        pytest.importorskip("triton")
    w, b = _dead_and_late_model()
    opt = torch.optim.Adam([w, b], lr=1e-2)
    tracker = ConditionTracker(opt, kernel=kernel, coordinates=coordinates, previous_stepsize=previous, trend=NO_SAMPLES)
    # Recomputed mode rebuilds v_{t−1} = (v_t − w·g_t²)/k, which cancels where v_{t−1} ≪ v_t: it counts
    # v_{t−1} ≤ RECOMPUTED_ZERO·v_t as inactive at t − 1 (backends.foreach), and the oracle applies that rule; it is
    # checked on a smooth activation (tanh), away from ReLU units whose gradient jumps by 1e6 between steps.
    ref = Reference(opt, coordinates=coordinates, recomputed_zero=RECOMPUTED_ZERO if previous == "recomputed" else None)
    activation = torch.relu if previous == "stored" else torch.tanh
    _train(opt, w, b, 20, ref.before_step, ref.after_step, activation=activation)
    got, expected = tracker.compute()["Adam/pg0"], ref.compute()[0]
    assert got["steps"] == expected["steps"] == 20
    rel = 1e-5 if previous == "stored" else 5e-2  # (float32 cancellation of v_t − w·g_t² above the threshold)
    for key in ("a", "b", "a_mean"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    for key in ("c", "c2", "c_mean"):
        assert got[key] == pytest.approx(expected[key], rel=rel), (key, got[key], expected[key])
    assert got["activations"] == expected["activations"]
    assert expected["activations"] >= 10 * 16 - 16  # the late rows became active (those with a positive relu input)
    assert got["inactive"] == 10 * 16 and got["coordinates"] == 40 * 16 + 16
    assert got["inactive_share"] == pytest.approx(160 / 656)


def test_literal_mode_is_dominated_by_eps_and_active_mode_is_not():
    """The never-trained coordinates (η = lr/eps) and their first-gradient jumps make c in the literal mode."""
    results = {}
    for coordinates in ("active", "all"):
        w, b = _dead_and_late_model()
        opt = torch.optim.Adam([w, b], lr=1e-2)
        tracker = ConditionTracker(opt, coordinates=coordinates, trend=NO_SAMPLES)
        _train(opt, w, b, 20)
        results[coordinates] = tracker.compute()["Adam/pg0"]
    assert results["all"]["c"] > 1e4 * results["active"]["c"]
    assert results["all"]["a_mean"] > 1e3 * results["active"]["a_mean"]
    assert results["all"]["b"] == pytest.approx(results["active"]["b"], rel=1e-6)  # inactive coordinates have g = 0


def test_tensor_shares_match_per_parameter_float64():
    w, b = _dead_and_late_model()
    opt = torch.optim.Adam([w, b], lr=1e-2)
    tracker = ConditionTracker(opt, parameter_names={w: "w", b: "b"}, trend=NO_SAMPLES)
    per = {"w": [0.0, 0.0], "b": [0.0, 0.0]}
    previous: dict[str, torch.Tensor] = {}

    def after():
        for name, p in (("w", w), ("b", b)):
            st = opt.state[p]
            t = float(st["step"])
            v = st["exp_avg_sq"].double()
            eta = 1e-2 / (1 - 0.9**t) / (v.sqrt() / math.sqrt(1 - 0.999**t) + 1e-8)
            active = v > 0
            g = p.grad.double()
            per[name][0] += float(((eta * g)[active] ** 2).sum())
            if name in previous:
                old, was = previous[name]
                per[name][1] += float((eta - old).abs()[active & was].sum())
            previous[name] = (eta, active)

    _train(opt, w, b, 15, after=after)
    rows = dict(tracker.tensor_shares()["Adam/pg0"])
    assert set(rows) == {"w", "b"}
    for name in ("w", "b"):
        assert rows[name][0] == pytest.approx(per[name][0], rel=1e-4)
        assert rows[name][1] == pytest.approx(per[name][1], rel=1e-4)
    assert rows["w"][3] == 160 and rows["b"][3] == 0  # inactive coordinates of the latest step
    row = tracker.compute()["Adam/pg0"]
    total_c = per["w"][1] + per["b"][1]
    assert row["c_share_top1"] == pytest.approx(max(per["w"][1], per["b"][1]) / total_c, rel=1e-4)
    assert row["c_share_top1"] + row["c_share_top2"] == pytest.approx(1.0)
    assert math.isnan(row["c_share_top3"])  # only two tensors


# ---------------------------------------------------------------------------------------------- the window
def test_increment_window_on_power_laws():
    """C(T) = T^(1+p), A(T) = T: the windowed ratio (C(T) − C(S)) / (T − S) with S the snapshot ≤ T/2."""
    window = IncrementWindow()
    p = -0.5
    for t in range(1, 2001):
        row = torch.tensor([float(t), float(t) ** (1 + p)], dtype=torch.float64)
        window.observe(t, row)
        if t in (10, 100, 1000, 2000):
            s = window.base_step(t)
            assert s is not None and 0.42 * t <= s <= t / 2, (t, s)
            got = float(window.increment_ratio(t, row, 1, 0))
            assert got == pytest.approx((t ** (1 + p) - s ** (1 + p)) / (t - s), rel=1e-12)
    assert math.isnan(float(IncrementWindow().increment_ratio(5, torch.ones(2, dtype=torch.float64), 1, 0)))


def test_window_forgets_the_start_up_transient():
    """A burst of C in the first 10 steps (94 % of C on a real network) is gone from the windowed ratio by step 40
    while the cumulative ratio still carries it."""
    window = IncrementWindow()
    c = 0.0
    for t in range(1, 401):
        c += 1000.0 if t <= 10 else 1.0
        row = torch.tensor([float(t), c], dtype=torch.float64)
        window.observe(t, row)
    assert float(window.increment_ratio(400, row, 1, 0)) == pytest.approx(1.0)
    assert c / 400 > 20


# ---------------------------------------------------------------------------------------------- verdicts
def _divergence(kind: str, steps: int, seed: int, start_step: int):
    _, _, tracker = dp.run(kind, steps, seed, tracker_factory=lambda o: ConditionTracker(o, start_step=start_step))
    return tracker.compute()["Adam/pg0"]


@pytest.mark.parametrize("kind, flagged", [("adam", 1.0), ("amsgrad_sqrt", 0.0)])
def test_verdict_does_not_depend_on_when_the_tracker_started(kind, flagged):
    """Attached at step 300 (``start_step``) the tracker reads, from step 600 on, the windows of one attached at
    step 1 (the verdict clock is the optimizer's step): same verdict, slopes within 0.15 at 3 000 steps."""
    early, late = _divergence(kind, 3000, 0, 1), _divergence(kind, 3000, 0, 300)
    assert late["steps"] == 2701
    assert early["bias_violation"] == late["bias_violation"] == flagged
    assert late["bias_slope"] == pytest.approx(early["bias_slope"], abs=0.15)
    # the latest windowed ratios are the same windows of the same run
    assert late["bias_window_ratio"] == pytest.approx(early["bias_window_ratio"], rel=1e-9)


def test_unknown_is_its_own_state_and_says_what_it_needs():
    _, _, tracker = dp.run("adam", 200, 0, tracker_factory=ConditionTracker)
    row = tracker.compute()["Adam/pg0"]
    assert math.isnan(row["bias_violation"]) and math.isnan(row["variance_violation"])
    assert row["bias_steps_needed"] >= 200  # 8 samples to fit and 4 of patience, from step 100
    text = tracker.summary()
    assert "bias condition (C/A → 0): unknown" in text and "more steps" in text


def _tracked_adam(steps: int):
    """(parameter, Adam, its tracker, the index stream of ``steps`` steps) of the paper's problem, seed 0."""
    param = dp.make_param()
    opt, _ = dp.make_optimizer("adam", param)
    return param, opt, ConditionTracker(opt), dp.draw_indices(steps, 0)


def test_a_resumed_tracker_does_not_announce_a_turn_again():
    """The verdicts last read are part of state_dict(): a tracker resumed after the warning does not warn again for
    the same turn, and still warns for one it has not read."""
    param, opt, tracker, indices = _tracked_adam(1200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp.train(param, opt, indices[:1000])
        assert tracker.compute()["Adam/pg0"]["bias_violation"] == 1.0
        saved = tracker.state_dict()
        tracker.remove()
        resumed = ConditionTracker(opt)
        resumed.load_state_dict(saved)
        dp.train(param, opt, indices[1000:])
        assert resumed.compute()["Adam/pg0"]["bias_violation"] == 1.0
        fresh = ConditionTracker(opt)
        fresh.load_state_dict({**saved, "verdicts_seen": []})  # (a checkpoint of the previous version)
        fresh.compute()
    bias = [str(w.message) for w in caught if "the bias verdict of Adam/pg0 turned to" in str(w.message)]
    assert len(bias) == 2, bias  # the first reading, and the tracker that had not read it; not the resumed one


def test_turning_to_violation_warns_once_with_advice():
    param, opt, tracker, indices = _tracked_adam(2000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dp.train(param, opt, indices[:300])
        tracker.compute()  # unknown: no warning
        dp.train(param, opt, indices[300:1000])
        first = tracker.compute()["Adam/pg0"]
        dp.train(param, opt, indices[1000:])
        tracker.compute()
    turned = [str(w.message) for w in caught if "turned to 'trending toward violation'" in str(w.message)]
    assert first["bias_violation"] == 1.0
    bias = [m for m in turned if "the bias verdict" in m]
    assert len(bias) == 1, turned
    assert "switch_to_amsgrad=True" in bias[0] and "Adam/pg0" in bias[0]
    summary = tracker.summary()
    assert "bias condition (C/A → 0): trending toward violation" in summary
    assert "switch_to_amsgrad=True" in summary and "neither verdict predicts test accuracy" in summary
