"""Tests for lightning_adamtype.trend.TrendDetector (CPU; the CUDA sync test runs only where CUDA exists)."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch

from lightning_adamtype.trend import TrendDetector, TrendOptions

T_LONG = 20_000


# ----------------------------------------------------------------------------------------------- helpers
def power_law(p: float, steps: int, noise: float = 0.0, seed: int = 0) -> list[float]:
    """r_k = k^p * (1 + noise * N(0, 1)), k = 1..steps (clipped to stay positive)."""
    rng = random.Random(seed)
    return [k**p * max(1e-3, 1.0 + noise * rng.gauss(0.0, 1.0)) for k in range(1, steps + 1)]


def run(det: TrendDetector, seq: list[float], start: int = 1) -> list[tuple[int, float, bool]]:
    """Feed seq[i] at step start+i; return (step, slope, violation) after every stored sample."""
    out = []
    ratios = torch.tensor(seq, dtype=torch.float64)
    for i in range(len(seq)):
        step = start + i
        if det.update(step, ratios[i]):
            out.append((step, det.slope.item(), bool(det.violation.item())))
    return out


def grid_point(n: int, ppd: int = 16) -> int:
    return math.ceil(10.0 ** (n / ppd) - 1e-9)


def reference(
    seq: list[float],
    *,
    window: int = 12,
    points_per_decade: int = 16,
    warmup: int = 100,
    min_samples: int = 8,
    margin: float = 0.2,
    hysteresis: float = 0.05,
    patience: int = 4,
    sticky: bool = False,
) -> list[tuple[int, float, bool]]:
    """Slow, obvious float64 oracle of the whole detector: sampling grid, window, OLS slope and verdict."""
    grid = {grid_point(n, points_per_decade) for n in range(0, 40 * points_per_decade)}
    first = max(warmup, 1)
    samples: list[tuple[int, float]] = []  # (step, ratio), chronological
    bad = good = 0
    violation = False
    out = []
    for k, r in enumerate(seq, start=1):
        if not (k == first or (k > first and k in grid)):
            continue
        samples.append((k, r))
        win = samples[-window:]
        pts = [(math.log(s), math.log(q)) for s, q in win if math.isfinite(q) and q > 0]
        if win[-1][1] == 0.0:
            slope = -math.inf
        elif len(pts) >= min_samples:
            xb = sum(x for x, _ in pts) / len(pts)
            yb = sum(y for _, y in pts) / len(pts)
            sxx = sum((x - xb) ** 2 for x, _ in pts)
            sxy = sum((x - xb) * (y - yb) for x, y in pts)
            slope = sxy / sxx
        else:
            slope = math.nan
        if not math.isnan(slope):
            if slope > -margin:
                bad, good = bad + 1, 0
            elif slope < -(margin + hysteresis):
                bad, good = 0, good + 1
            else:
                bad = good = 0
        if bad >= patience:
            violation = True
        if not sticky and good >= patience:
            violation = False
        out.append((k, slope, violation))
    return out


def same_float(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol


def with_bad_values(seq: list[float], seed: int, frac: float = 0.15) -> list[float]:
    """Replace a random fraction of entries with NaN, +Inf, -Inf, negatives or exact zeros."""
    rng = random.Random(seed)
    out = list(seq)
    for i in range(len(out)):
        if rng.random() < frac:
            out[i] = rng.choice([math.nan, math.inf, -math.inf, -1.0, 0.0])
    return out


# ----------------------------------------------------------------------------------------------- calibration
# (p, expected final verdict): flat or rising ratios trend toward violation; ratios falling at least like
# AMSGrad's / AdaGrad's (slope <= -0.4) do not.
POWER_LAWS = [
    (0.0, True),
    (0.1, True),
    (-0.04, True),  # Adam on the paper's divergence example
    (-0.4, False),  # AMSGrad, slowest case
    (-0.5, False),  # AdaGrad
    (-1.0, False),  # AMSGrad with constant lr
]


@pytest.mark.parametrize("noise", [0.0, 0.1])
@pytest.mark.parametrize(("p", "trending"), POWER_LAWS)
def test_power_law_verdict_and_slope(p: float, trending: bool, noise: float) -> None:
    for seed in range(3):
        hist = run(TrendDetector(), power_law(p, T_LONG, noise, seed))
        steps, slopes, verdicts = zip(*hist)
        final_slope = slopes[-1]
        # (10 % noise: over the default 12-sample window this realisation biases the slope by 0.14)
        assert abs(final_slope - p) < (1e-4 if noise == 0 else 0.15), (p, seed, final_slope)
        assert verdicts[-1] is trending, (p, seed, hist[-5:])
        if trending:
            # earliest possible flag: warm-up sample n=32 (step 100), the 8th sample gives the first slope,
            # which is the 1st of 4 of patience -> grid point n = 32 + 7 + 3
            first = steps[verdicts.index(True)]
            if noise == 0:
                assert first == grid_point(32 + 7 + 3) == 422
            else:
                assert first <= 1000
            assert all(verdicts[verdicts.index(True):]), "a flat/rising ratio must stay flagged"
        else:
            assert not any(verdicts), f"falling ratio p={p} flagged at some point"


def test_noiseless_slope_is_exact_power() -> None:
    det = TrendDetector(dtype=torch.float64)
    run(det, power_law(-0.7, 5000))
    assert det.slope.dtype == torch.float64
    assert det.slope.item() == pytest.approx(-0.7, abs=1e-12)


def test_constant_zero_is_satisfied() -> None:
    det = TrendDetector()
    hist = run(det, [0.0] * T_LONG)
    assert hist, "samples must be stored"
    assert all(s == -math.inf and v is False for _, s, v in hist)
    _, _, valid, zero = det.samples()
    assert not valid.any() and zero.all()


def test_zero_after_violation_clears_it() -> None:
    seq = [1.0] * 2000 + [0.0] * 3000
    hist = run(TrendDetector(), seq)
    assert any(v for k, _, v in hist if k <= 2000)
    assert hist[-1][1] == -math.inf and hist[-1][2] is False
    assert run(TrendDetector(sticky=True), seq)[-1][2] is True


# ----------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0])
def test_bad_values_never_flip_falling(bad: float) -> None:
    seq = power_law(-0.5, T_LONG, 0.05)
    for i in range(0, T_LONG, 3):
        seq[i] = bad
    hist = run(TrendDetector(), seq)
    assert not any(v for _, _, v in hist)
    assert all(not math.isinf(s) for _, s, _ in hist)  # bad values never produce an inf slope
    known = [s for _, s, _ in hist if not math.isnan(s)]  # (a 12-sample window with bad samples may be unknown)
    assert len(known) >= 10 and all(s == pytest.approx(-0.5, abs=0.1) for s in known)


def test_bad_values_inside_flat_sequence_still_flag() -> None:
    seq = with_bad_values(power_law(0.0, T_LONG, 0.05), seed=1, frac=0.3)
    seq = [math.nan if q == 0.0 else q for q in seq]  # keep zeros out: they mean "satisfied"
    hist = run(TrendDetector(), seq)
    assert hist[-1][2] is True
    assert all(not math.isinf(s) for _, s, _ in hist)


def test_all_nan_never_flips_and_nan_block_keeps_verdict() -> None:
    det = TrendDetector()
    hist = run(det, [math.nan] * T_LONG)
    assert all(math.isnan(s) and v is False for _, s, v in hist)
    # flagged first, then a long run of NaN: the slope becomes unknown and the verdict does not move
    seq = [1.0] * 3000 + [math.nan] * 7000 + [k ** -1.0 for k in range(10_001, 10_500)]
    hist = run(TrendDetector(), seq)
    by_step = {k: (s, v) for k, s, v in hist}
    nan_phase = [(s, v) for k, (s, v) in by_step.items() if 3000 < k <= 10_000]
    assert any(math.isnan(s) for s, _ in nan_phase)
    assert all(v is True for _, v in nan_phase)


def test_nan_inside_window_is_not_counted() -> None:
    det = TrendDetector(warmup=1, window=4, min_samples=2)
    det.update(1, torch.tensor(1.0))
    det.update(2, torch.tensor(float("nan")))
    assert math.isnan(det.slope.item())  # one valid sample only
    det.update(3, torch.tensor(3.0 ** -1))
    assert det.slope.item() == pytest.approx(-1.0, abs=1e-6)  # fitted on steps 1 and 3 only
    _, _, valid, _ = det.samples()
    assert valid.tolist() == [True, False, True]


# ----------------------------------------------------------------------------------------------- warm-up, verdict logic
def test_flat_only_during_warmup_is_not_flagged() -> None:
    # flat until step 100, then falls like AdaGrad's ratio (continuous at the switch)
    seq = [1.0 if k < 100 else (k / 100) ** -0.5 for k in range(1, T_LONG + 1)]
    hist = run(TrendDetector(), seq)
    assert hist[0][0] == 100  # nothing is sampled before warm-up
    assert not any(v for _, _, v in hist)
    # the same sequence without warm-up does see the flat part
    early = run(TrendDetector(warmup=0), seq)
    assert any(v for _, _, v in early)


def test_first_sample_and_grid() -> None:
    det = TrendDetector(warmup=0, window=4, min_samples=2, points_per_decade=4)
    stored = [k for k in range(1, 1001) if det.update(k, torch.tensor(1.0))]
    assert stored == [1, 2, 4, 6, 10, 18, 32, 57, 100, 178, 317, 563, 1000]
    det2 = TrendDetector(warmup=7, window=4, min_samples=2, points_per_decade=4)
    stored2 = [k for k in range(1, 100) if det2.update(k, torch.tensor(1.0))]
    assert stored2 == [7, 10, 18, 32, 57]
    # steps may jump over grid points: one sample per call, grid resumes after the jump
    det3 = TrendDetector(warmup=0, window=4, min_samples=2, points_per_decade=4)
    assert [k for k in [1, 50, 51, 57, 99, 100] if det3.update(k, torch.tensor(1.0))] == [1, 50, 57, 100]
    assert det3.next_sample_step == 178


def test_hysteresis_band_keeps_verdict_and_clearing() -> None:
    # flat (flagged), then a long stretch falling at -0.22 (inside the hysteresis band): stays flagged
    base = 1.0
    seq = [base] * 3000 + [(k / 3000) ** -0.22 for k in range(3001, 300_001)]
    hist = run(TrendDetector(), seq)
    assert hist[-1][1] == pytest.approx(-0.22, abs=1e-3)
    assert all(v for k, _, v in hist if k >= 422)
    # falling at -0.5 instead clears it (not sticky) ... unless sticky
    seq = [base] * 3000 + [(k / 3000) ** -0.5 for k in range(3001, 100_001)]
    assert run(TrendDetector(), seq)[-1][2] is False
    assert run(TrendDetector(sticky=True), seq)[-1][2] is True


def test_patience_counts_consecutive_samples() -> None:
    # alternate flat and steep windows is impossible with a long window; use window=2 to control each slope
    det = TrendDetector(warmup=1, window=2, min_samples=2, points_per_decade=1, patience=2)
    # steps 1, 10, 100, 1000, ... one sample per decade; slope = log10 ratio change per decade
    values = {1: 1.0, 10: 1.0, 100: 0.1, 1000: 0.1, 10_000: 0.1}
    verdicts = []
    for k, r in values.items():
        det.update(k, torch.tensor(r))
        verdicts.append((round(det.slope.item(), 6), det.violation.item()))
    assert verdicts == [
        (pytest.approx(float("nan"), nan_ok=True), False),
        (0.0, False),  # one bad sample
        (-1.0, False),  # good sample resets the streak
        (0.0, False),
        (0.0, True),  # two in a row
    ]


def test_unknown_slope_neither_counts_nor_resets_streaks() -> None:
    # window 3, min_samples 3, one sample per decade: a NaN makes the next 2 slopes unknown
    def verdicts(values: list[float]) -> list[tuple[float, bool]]:
        det = TrendDetector(warmup=1, window=3, min_samples=3, points_per_decade=1, patience=2, hysteresis=0.0)
        out = []
        for n, r in enumerate(values):
            det.update(10**n, torch.tensor(r, dtype=torch.float64))
            out.append((det.slope.item(), det.violation.item()))
        return out

    nan = math.nan
    # bad, unknown x3, bad -> the two bad samples are consecutive known samples: flagged
    got = verdicts([1.0, 1.0, 1.0, nan, 1.0, 1.0, 1.0])
    assert [math.isnan(s) for s, _ in got] == [True, True, False, True, True, True, False]
    assert [v for _, v in got] == [False] * 6 + [True]
    # flagged, then good, unknown x3, good -> the two good samples are consecutive: cleared
    got = verdicts([1.0, 1.0, 1.0, 1.0, 0.1, nan, 0.01, 1e-3, 1e-4])
    assert [v for _, v in got] == [False, False, False, True, True, True, True, True, False]
    assert got[4][0] < -0.2 and all(math.isnan(s) for s, _ in got[5:8])
    assert got[8][0] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------------- float64 oracle
ORACLE_CASES = [
    ("flat_noisy", power_law(0.0, T_LONG, 0.2, seed=3), {}),
    ("falling_noisy", power_law(-0.3, T_LONG, 0.2, seed=4), {}),
    ("rising_bad_values", with_bad_values(power_law(0.1, T_LONG, 0.1, seed=5), seed=5), {}),
    ("falling_bad_values", with_bad_values(power_law(-0.6, T_LONG, 0.1, seed=6), seed=6), {}),
    (
        "flat_then_falling_small_window",
        [1.0] * 1500 + [(k / 1500) ** -0.8 for k in range(1501, T_LONG + 1)],
        dict(window=5, min_samples=3, patience=2, points_per_decade=8, warmup=10),
    ),
    ("sticky", power_law(-0.21, T_LONG, 0.3, seed=7), dict(sticky=True, margin=0.25, hysteresis=0.0)),
]


@pytest.mark.parametrize(("name", "seq", "opts"), ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_reference(name: str, seq: list[float], opts: dict, dtype: torch.dtype) -> None:
    det = TrendDetector(dtype=dtype, **opts)
    got = run(det, seq)
    want = reference(seq, **opts)
    assert [k for k, _, _ in got] == [k for k, _, _ in want]
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for (k, s, v), (_, rs, rv) in zip(got, want):
        assert same_float(s, rs, tol), (name, k, s, rs)
        if dtype == torch.float64:
            assert v == rv, (name, k)
    assert any(math.isfinite(s) for _, s, _ in got)


def test_slope_matches_numpy_on_stored_samples() -> None:
    seq = with_bad_values(power_law(-0.3, 5000, 0.3, seed=11), seed=11)
    seq = [math.nan if q == 0.0 else q for q in seq]
    det = TrendDetector(dtype=torch.float32)
    run(det, seq)
    x, y, valid, _ = det.samples()
    steps = np.rint(np.exp(x.double().numpy())).astype(int)
    raw = np.array([seq[k - 1] for k in steps], dtype=np.float64)
    ok = np.isfinite(raw) & (raw > 0)
    assert valid.numpy().tolist() == ok.tolist()
    assert ok.sum() >= 8
    xs, ys = np.log(steps[ok].astype(np.float64)), np.log(raw[ok])
    np.testing.assert_allclose(y.double().numpy()[ok], ys, rtol=0, atol=1e-5)
    ref = np.polyfit(xs, ys, 1)[0]
    assert det.slope.item() == pytest.approx(ref, abs=2e-4)


# ----------------------------------------------------------------------------------------------- paper example
def paper_example_bias_ratio(amsgrad: bool, decaying_lr: bool, steps: int, seed: int) -> list[float]:
    """C_T/A_T of Adam/AMSGrad on the paper's 1-D divergence example (design notes §3), torch's formulas."""
    rng = random.Random(seed)
    x, v, vmax, beta2, eps = 1.0, 0.0, 0.0, 0.9, 1e-8
    a = c = 0.0
    prev = None
    out = []
    for t in range(1, steps + 1):
        i = rng.randint(1, 11)
        if abs(x) <= 1:
            g = 11 * x if i == 1 else -x
        else:
            g = math.copysign(11.0, x) if i == 1 else -math.copysign(1.0, x)
        v = beta2 * v + (1 - beta2) * g * g
        vmax = max(vmax, v)
        lr = 0.5 / math.sqrt(t) if decaying_lr else 0.1
        eta = lr / (math.sqrt(vmax if amsgrad else v) / math.sqrt(1 - beta2**t) + eps)
        x -= eta * g  # beta1 = 0: m_t = g_t
        a += eta
        if prev is not None:
            c += abs(eta - prev)
        prev = eta
        out.append(c / a)
    return out


@pytest.mark.parametrize("decaying_lr", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_divergence_example(decaying_lr: bool, seed: int) -> None:
    adam = run(TrendDetector(), paper_example_bias_ratio(False, decaying_lr, T_LONG, seed))
    ams = run(TrendDetector(), paper_example_bias_ratio(True, decaying_lr, T_LONG, seed))
    assert adam[-1][2] is True and abs(adam[-1][1]) < 0.15
    assert ams[-1][2] is False and ams[-1][1] < -0.3
    if not decaying_lr:
        assert not any(v for _, _, v in ams)


# ----------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("cut", [50, 99, 100, 421, 422, 5000, 5001])
def test_state_dict_round_trip_matches_uninterrupted(cut: int) -> None:
    seq = with_bad_values(power_law(-0.1, 8000, 0.2, seed=cut), seed=cut, frac=0.05)
    ratios = torch.tensor(seq, dtype=torch.float64)

    def trace(det: TrendDetector, lo: int, hi: int) -> list[tuple[float, bool]]:
        out = []
        for k in range(lo, hi + 1):
            det.update(k, ratios[k - 1])
            out.append((det.slope.item(), det.violation.item()))
        return out

    full = TrendDetector()
    want = trace(full, 1, len(seq))

    first = TrendDetector()
    got = trace(first, 1, cut)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    first.update(cut + 1, torch.tensor(123.0))  # mutating the old detector must not touch the saved state
    buf.seek(0)
    resumed = TrendDetector()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got += trace(resumed, cut + 1, len(seq))
    assert len(got) == len(want)
    for i, ((s, v), (ws, wv)) in enumerate(zip(got, want), start=1):
        assert same_float(s, ws, 0.0) and v == wv, (i, s, ws, v, wv)
    assert resumed.num_samples == full.num_samples
    assert resumed.next_sample_step == full.next_sample_step
    for a, b in zip(resumed.samples(), full.samples()):
        assert torch.equal(a, b)


def test_load_state_dict_checks_layout() -> None:
    det = TrendDetector()
    run(det, [1.0] * 500)
    state = det.state_dict()
    with pytest.raises(ValueError, match="window"):
        TrendDetector(window=8, min_samples=4).load_state_dict(state)
    with pytest.raises(ValueError, match="points_per_decade"):
        TrendDetector(points_per_decade=8).load_state_dict(state)
    other = TrendDetector(patience=2)  # verdict options may change on resume
    other.load_state_dict(state)
    assert other.violation.item() is True
    with pytest.raises(ValueError, match="step must"):
        other.update(500, torch.tensor(1.0))  # resumed clock: step 500 was already seen


def test_reset_and_to() -> None:
    det = TrendDetector()
    run(det, [1.0] * 1000)
    assert det.violation.item()
    det.reset()
    assert det.num_samples == 0 and not det.violation.item() and math.isnan(det.slope.item())
    assert det.to("cpu") is det and det.slope.device.type == "cpu"
    det.update(1, torch.tensor(1.0))  # clock restarted


def test_buffers_follow_first_stored_ratio_device() -> None:
    # the "meta" device stands in for an accelerator on CPU-only machines: no data, same code path
    det = TrendDetector(warmup=0)
    det.update(1, torch.tensor(0.5, device="meta"))
    assert det.device.type == "meta"
    assert all(t.device.type == "meta" for t in (det.slope, det.violation, *det.samples()))
    pinned = TrendDetector(warmup=0, device="cpu")
    pinned.update(1, torch.tensor(0.5, dtype=torch.float64))
    assert pinned.device.type == "cpu" and pinned.slope.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- options, inputs
BAD_OPTIONS = [
    ("window", 1),
    ("window", 2.5),
    ("window", True),
    ("points_per_decade", 0),
    ("points_per_decade", 1.5),
    ("warmup", -1),
    ("warmup", 10.0),
    ("min_samples", 1),
    ("min_samples", 17),  # > default window
    ("margin", -0.1),
    ("margin", math.nan),
    ("margin", math.inf),
    ("margin", "0.2"),
    ("hysteresis", -0.05),
    ("hysteresis", math.inf),
    ("hysteresis", None),
    ("patience", 0),
    ("patience", 2.0),
    ("sticky", 1),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS)
def test_bad_options_raise_value_error(name: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        TrendDetector(**{name: value})
    msg = str(info.value)
    assert repr(name) in msg and repr(value) in msg and "must be" in msg
    with pytest.raises(ValueError, match=name):
        TrendOptions(**{name: value})


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError, match="windw"):
        TrendDetector(windw=4)
    with pytest.raises(ValueError, match="dtype"):
        TrendDetector(dtype=torch.int64)
    with pytest.raises(TypeError, match="TrendOptions"):
        TrendDetector({"window": 4})  # type: ignore[arg-type]
    opts = TrendOptions(window=8, min_samples=4)
    assert TrendDetector(opts, margin=0.3).options == TrendOptions(window=8, min_samples=4, margin=0.3)


def test_bad_update_arguments() -> None:
    det = TrendDetector(warmup=0)
    with pytest.raises(TypeError, match="host int"):
        det.update(torch.tensor(1), torch.tensor(1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="host int"):
        det.update(1.0, torch.tensor(1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must"):
        det.update(0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="0-dim"):
        det.update(1, torch.ones(2))
    assert det.update(np.int64(1), 0.5)  # numpy ints and python floats are accepted
    with pytest.raises(ValueError, match="step must"):
        det.update(1, torch.tensor(1.0))
    assert det.update(2, torch.tensor([0.25], dtype=torch.float16))  # one element, any float dtype


# ----------------------------------------------------------------------------------------------- no host sync
def _raise(*args: object, **kwargs: object) -> None:
    raise AssertionError("host-device sync in TrendDetector.update")


def test_update_never_syncs_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    seq = with_bad_values(power_law(0.0, 3000, 0.1), seed=2)
    ratios = torch.tensor(seq, dtype=torch.float64)
    det = TrendDetector()
    stored = 0
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _raise)
    for k in range(1, len(seq) + 1):
        stored += det.update(k, ratios[k - 1])
    monkeypatch.undo()
    # the patching was live and effective
    assert stored > 20 and det.violation.item() is True
    monkeypatch.setattr(torch.Tensor, "item", _raise)
    with pytest.raises(AssertionError, match="sync"):
        torch.tensor(1.0).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("follow", [True, False], ids=["follows_first_ratio", "device_argument"])
def test_update_never_syncs_cuda(follow: bool) -> None:
    seq = power_law(0.0, 3000, 0.1)
    seq[::7] = [math.nan] * len(seq[::7])
    ratios = torch.tensor(seq, dtype=torch.float64, device="cuda")
    det = TrendDetector() if follow else TrendDetector(device="cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(1, len(seq) + 1):
            det.update(k, ratios[k - 1])
        det.update(len(seq) + 1000, 1.0)  # a Python number is filled on the device, not copied
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert det.slope.device.type == "cuda" and det.violation.device.type == "cuda"
    cpu = TrendDetector()
    run(cpu, seq)
    cpu.update(len(seq) + 1000, 1.0)
    assert det.slope.item() == pytest.approx(cpu.slope.item(), abs=1e-5)
    assert det.violation.item() is cpu.violation.item() is True
    restored = TrendDetector()
    restored.load_state_dict(det.state_dict())
    assert restored.slope.device.type == "cpu" and restored.violation.item() is True
