"""The square-root-form paths: ``kernel="compiled"`` and ``previous_stepsize="recomputed"``.

Both are compared with the float64 oracle of ``tests/reference.py`` over the same runs as the foreach path
(``test_reference.CONFIGS``: two groups, an lr scheduler, a parameter whose grad is None at some steps, a tracker
attached mid-run), and with the foreach path itself.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from lightning_adamtype import ConditionTracker, TrendOptions
from lightning_adamtype.kernels import CHUNK_LENGTHS, chunks, scratch_terms, sqrt_form_kernels
from reference import Reference
from test_hot_path import NO_SAMPLES, _host_reads_on_non_sample_steps, _params
from test_reference import CONFIGS, RTOL, STEPS, assert_matches, assert_same, make_run, train

SQRT_FORM = [c for c in CONFIGS if c[1] in (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop)]
RECOMPUTABLE = [
    c for c in SQRT_FORM if not c[2].get("amsgrad") and not c[2].get("centered") and c[2].get("betas", (0, 0.5))[1] != 0
]


def _run(cls, kwargs, attach_after: int, device: str = "cpu", **tracker_kwargs):
    """A reference run, the tracker attached after ``attach_after`` steps: (tracker, float64 oracle)."""
    model, opt, sched, data = make_run(cls, kwargs, device=device)
    train(model, opt, sched, data, range(1, attach_after + 1))
    tracker = ConditionTracker(opt, **tracker_kwargs)
    ref = Reference(opt)
    train(model, opt, sched, data, range(attach_after + 1, STEPS + 1), ref)
    return tracker, ref


#: tracker options of the tests parametrized over FLAT_MAX_NUMEL too: "auto" is the native kernel on a CPU, which
#: ignores the threshold; the torch paths ("foreach", "compiled") take the concatenated or the per-tensor path by it
TRACKER_KWARG_IDS = {
    "auto": {},
    "foreach": {"kernel": "foreach"},
    "compiled": {"kernel": "compiled"},
    "auto-recomputed": {"previous_stepsize": "recomputed"},
    "foreach-recomputed": {"kernel": "foreach", "previous_stepsize": "recomputed"},
    "compiled-recomputed": {"kernel": "compiled", "previous_stepsize": "recomputed"},
}
TRACKER_KWARGS = list(TRACKER_KWARG_IDS.values())


def _uses_sqrt_form_path(monkeypatch, tracker_kwargs) -> list[str]:
    """Record which kernels the tracker calls (so a silent fallback to foreach cannot pass these tests); the test
    models are tiny, so the concatenated path for small groups is switched off."""
    import lightning_adamtype.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "FLAT_MAX_NUMEL", 0)
    calls: list[str] = []
    original = ConditionTracker._run_kernel

    def run_kernel(self, name, *args):
        calls.append(name)
        return original(self, name, *args)

    monkeypatch.setattr(ConditionTracker, "_run_kernel", run_kernel)
    return calls


@pytest.mark.parametrize("attach_after", [0, 3], ids=["from-start", "attached-after-3"])
@pytest.mark.parametrize("name,cls,kwargs", SQRT_FORM, ids=[c[0] for c in SQRT_FORM])
def test_compiled_kernel_matches_float64_reference(monkeypatch, name, cls, kwargs, attach_after):
    calls = _uses_sqrt_form_path(monkeypatch, None)
    tracker, ref = _run(cls, kwargs, attach_after, kernel="compiled")
    assert_matches(tracker, ref)
    if not kwargs.get("centered"):
        assert "stored" in calls and "first" in calls, calls[:5]  # the compiled pass did run
    else:
        assert not calls  # centered RMSprop has no square-root form: foreach path


@pytest.mark.parametrize("kernel", ["foreach", "compiled"])
@pytest.mark.parametrize("name,cls,kwargs", RECOMPUTABLE, ids=[c[0] for c in RECOMPUTABLE])
def test_recomputed_previous_stepsize_matches_float64_reference(monkeypatch, name, cls, kwargs, kernel):
    """Attached after 3 steps, v_{t−1} is well inside float32's resolution of v_t: the usual tolerances."""
    calls = _uses_sqrt_form_path(monkeypatch, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: these settings are recomputable
        tracker, ref = _run(cls, kwargs, 3, kernel=kernel, previous_stepsize="recomputed")
    assert_matches(tracker, ref)
    assert "recomputed" in calls
    assert all(not isinstance(v, torch.Tensor) or v.numel() <= 1 for g in tracker._groups for v in g.previous.values())
    assert not any(g.previous for g in tracker._groups)  # no η_{t−1} stored at all


@pytest.mark.parametrize("name,cls,kwargs", RECOMPUTABLE, ids=[c[0] for c in RECOMPUTABLE])
def test_recomputed_from_the_first_step_within_the_documented_loss(name, cls, kwargs):
    """From step 1 some coordinates' v grows 10³–10⁵× in one step (the bias-corrected first steps of a tiny
    gradient), so rebuilding v_{t−1} from float32 v_t loses digits: a, b stay exact (η_t is not rebuilt), and
    c, c2 stay within 1 % of the oracle here (0.67 % measured: c2 of fused Adam with weight decay, the worst case;
    the same before and after the one-division kernel and the concatenated small-group path)."""
    tracker, ref = _run(cls, kwargs, 0, previous_stepsize="recomputed")
    got = tracker.compute()
    expected = {f"{type(tracker.optimizer).__name__}/pg{i}": e for i, e in enumerate(ref.compute())}
    for group, exp in expected.items():
        for key in ("a", "b"):
            assert got[group][key] == pytest.approx(exp[key], rel=RTOL[key]), (group, key)
        for key in ("c", "c2"):
            assert got[group][key] == pytest.approx(exp[key], rel=1e-2), (group, key)


def test_compiled_and_foreach_paths_agree_on_float32_and_bfloat16_state(monkeypatch):
    import lightning_adamtype.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "FLAT_MAX_NUMEL", 0)
    for dtype in (torch.float32, torch.bfloat16):
        results = []
        for kernel in ("foreach", "compiled"):
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(64, 33, dtype=dtype)), torch.nn.Parameter(torch.randn(7, dtype=dtype))]
            opt = torch.optim.Adam(params, lr=1e-2, foreach=False)
            tracker = ConditionTracker(opt, kernel=kernel)
            gen = torch.Generator().manual_seed(1)
            for _ in range(8):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                opt.step()
            results.append(tracker.compute())
        assert_same(results[1], results[0], rel=1e-5)


def _float64_rows(vs, gs, previous, table):
    """The slow, obvious rows: η = s/(sqrt(v)+e) and the five sums per tensor, in float64."""
    rows = []
    for v, g, prev, (s, e) in zip(vs, gs, previous, table.double().tolist()):
        eta = s / (v.double().sqrt() + e)
        diff = eta - prev.double() if prev is not None else torch.zeros_like(eta)
        rows.append([eta.min(), ((eta * g.double()) ** 2).sum(), diff.abs().sum(), (diff**2).sum(), eta.sum()])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("length", [1, 2, 3, 8])
def test_eager_and_compiled_kernels_match_the_float64_rows(length):
    torch.manual_seed(length)
    sizes = [1000 + 37 * i for i in range(length)]
    vs = [torch.rand(n) * 1e-3 for n in sizes]
    gs = [torch.randn(n) for n in sizes]
    previous = [torch.rand(n) * 10 for n in sizes]
    table = torch.stack([torch.tensor([0.01 * (1 + i), 1e-8 * (1 + i)]) for i in range(length)])
    expected = _float64_rows(vs, gs, previous, table)
    first_expected = _float64_rows(vs, gs, [None] * length, table)
    for compiled in (False, True):
        kernels = sqrt_form_kernels(compiled)
        torch.testing.assert_close(kernels.current(vs, gs, table).double(), first_expected, rtol=1e-5, atol=0)
        outs = [torch.full((n,), float("nan")) for n in sizes]
        torch.testing.assert_close(kernels.first(vs, gs, outs, table).double(), first_expected, rtol=1e-5, atol=0)
        buffers = [p.clone() for p in previous]
        torch.testing.assert_close(kernels.stored(vs, gs, buffers, table).double(), expected, rtol=1e-5, atol=0)
        for v, out, buf, (s, e) in zip(vs, outs, buffers, table.double().tolist()):  # η_t written in place
            eta = s / (v.double().sqrt() + e)
            torch.testing.assert_close(out.double(), eta, rtol=1e-6, atol=0)
            torch.testing.assert_close(buf.double(), eta, rtol=1e-6, atol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_recomputed_kernel_matches_float64_previous_stepsizes(compiled):
    """The one-division form against η_{t−1} = s'/(sqrt((v − w·g²)/k) + e') computed in float64."""
    torch.manual_seed(0)
    keep, weight = 0.999, 1e-3
    v_prev = [torch.rand(3000, dtype=torch.float64) * 1e-3, torch.rand(513, dtype=torch.float64) * 1e-6]
    gs64 = [torch.randn(v.shape, dtype=torch.float64) * 1e-2 for v in v_prev]
    vs64 = [keep * v + weight * g**2 for v, g in zip(v_prev, gs64)]
    table = torch.tensor([[0.01, 1e-8], [0.02, 3e-8]])
    previous_table = torch.tensor([[0.011, 1.1e-8], [0.019, 2e-8]])
    expected = _float64_rows(
        vs64, gs64, [s / (v.sqrt() + e) for v, (s, e) in zip(v_prev, previous_table.double().tolist())], table
    )
    factors = torch.tensor([1 / keep, weight])
    got = sqrt_form_kernels(compiled).recomputed([v.float() for v in vs64], [g.float() for g in gs64], table, previous_table, factors)
    torch.testing.assert_close(got[:, [0, 1, 4]].double(), expected[:, [0, 1, 4]], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[:, [2, 3]].double(), expected[:, [2, 3]], rtol=1e-3, atol=0)


@pytest.mark.parametrize("n", [0, 1, 5, 8, 15, 16, 23])
def test_chunks_cover_every_tensor_once_with_the_allowed_lengths(n):
    pieces = chunks(n)
    assert [i for a, b in pieces for i in range(a, b)] == list(range(n))
    assert all(b - a in CHUNK_LENGTHS for a, b in pieces)
    assert len({b - a for a, b in pieces if b - a < 8}) == len([1 for a, b in pieces if b - a < 8])  # ≤ one of each


def test_scratch_terms_match_the_float64_rows():
    torch.manual_seed(0)
    v, g, previous = torch.rand(5000) * 1e-3, torch.randn(5000), torch.rand(5000) * 10
    s, e = torch.tensor(0.01), torch.tensor(1e-8)
    expected = _float64_rows([v], [g], [previous], torch.tensor([[0.01, 1e-8]]))[0]
    terms, eta = scratch_terms(v.clone(), g.clone(), previous.clone(), s, e)
    torch.testing.assert_close(terms.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(eta.double(), 0.01 / (v.double().sqrt() + 1e-8), rtol=1e-6, atol=0)
    terms, _ = scratch_terms(v.clone(), g.clone(), None, s, e)
    torch.testing.assert_close(terms.double(), _float64_rows([v], [g], [None], torch.tensor([[0.01, 1e-8]]))[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "cls,kwargs",
    [(torch.optim.Adam, dict(lr=1e-2, foreach=True)), (torch.optim.Adagrad, dict(lr=1e-2)), (torch.optim.RMSprop, dict(lr=1e-2))],
    ids=["Adam", "Adagrad", "RMSprop"],
)
def test_recomputed_holds_no_per_coordinate_memory(cls, kwargs):
    opt = cls(_params(), **kwargs)
    tracker = ConditionTracker(opt, trend=NO_SAMPLES, previous_stepsize="recomputed")
    stored = ConditionTracker(cls(_params(), **kwargs), trend=NO_SAMPLES)
    for _ in range(5):
        for o in (opt, stored.optimizer):
            for group in o.param_groups:
                for p in group["params"]:
                    p.grad = torch.ones_like(p)
            o.step()
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    tensors = sum(len(g["params"]) for g in opt.param_groups)
    eta_bytes = sum(g.flat_previous.numel() * g.flat_previous.element_size() for g in stored._groups)
    assert 4 * numel <= eta_bytes <= 4 * (numel + 3 * tensors)  # stored η_{t−1}: 4 B per coordinate (+ 16-B alignment)
    # accumulators and the (s, e) pair of each parameter: O(groups + tensors), nothing per coordinate
    assert tracker.held_bytes() == stored.held_bytes() - eta_bytes + 16 * 3


@pytest.mark.parametrize("kwargs", [dict(kernel="compiled"), dict(previous_stepsize="recomputed"),
                                    dict(kernel="foreach", previous_stepsize="recomputed"),
                                    dict(kernel="compiled", previous_stepsize="recomputed")],
                         ids=["compiled", "auto-recomputed", "foreach-recomputed", "compiled-recomputed"])
@pytest.mark.parametrize("cls,opt_kwargs", [(torch.optim.Adam, dict(lr=1e-2, foreach=True, weight_decay=0.1)),
                                            (torch.optim.Adagrad, dict(lr=1e-2, lr_decay=1e-3))], ids=["Adam", "Adagrad"])
@pytest.mark.parametrize("flat_max", [0, 1 << 17], ids=["per-tensor", "small-groups-flat"])
def test_no_host_reads_on_non_sample_steps(monkeypatch, kwargs, cls, opt_kwargs, flat_max):
    import lightning_adamtype.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "FLAT_MAX_NUMEL", flat_max)
    bad, calls, tracker = _host_reads_on_non_sample_steps(monkeypatch, cls, opt_kwargs, **kwargs)
    assert not bad, bad[:5]
    assert tracker.observations == 50


@pytest.mark.parametrize("split", [5, 6], ids=["resume-after-5", "resume-after-6-gap"])
def test_recomputed_resume_matches_uninterrupted(split):
    got, expected = resumed_and_uninterrupted(
        torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, foreach=True), split, previous_stepsize="recomputed"
    )
    assert_same(got, expected, rel=1e-12)


def resumed_and_uninterrupted(cls, kwargs, split: int, device: str = "cpu", **tracker_kwargs) -> tuple[dict, dict]:
    """``compute()`` of a tracker whose state went through torch.save / torch.load(weights_only=True) after step
    ``split``, and of an uninterrupted one, over the same reference run."""
    model, opt, sched, data = make_run(cls, kwargs, device=device)
    full = ConditionTracker(opt, **tracker_kwargs)
    train(model, opt, sched, data, range(1, STEPS + 1))
    expected = full.compute()
    full.remove()

    model, opt, sched, data = make_run(cls, kwargs, device=device)
    first = ConditionTracker(opt, **tracker_kwargs)
    train(model, opt, sched, data, range(1, split + 1))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.remove()
    model2, opt2, sched2 = copy.deepcopy((model, opt, sched))
    buffer.seek(0)
    resumed = ConditionTracker(opt2, **tracker_kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(model2, opt2, sched2, data, range(split + 1, STEPS + 1))
    return resumed.compute(), expected


def test_switch_to_amsgrad_with_recomputed_continues_the_oscillation_sum():
    """After the switch the group stores η_{t−1} (AMSGrad's max cannot be undone), seeded at the switch step, so
    c keeps counting every step: it matches a stored-mode tracker on the same run."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50))]
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.0, 0.9))
    trend = TrendOptions(warmup=2, min_samples=2, patience=1, margin=10.0)  # fires at the first chance
    with pytest.warns(UserWarning, match="cannot rebuild"):
        recomputed = ConditionTracker(opt, previous_stepsize="recomputed", switch_to_amsgrad=True, trend=trend)
        stored = ConditionTracker(opt, trend=trend)
        gen = torch.Generator().manual_seed(1)
        for _ in range(60):
            params[0].grad = torch.randn(50, generator=gen)
            opt.step()
    assert recomputed.switched and opt.param_groups[0]["amsgrad"]
    got, exp = recomputed.compute()["Adam/pg0"], stored.compute()["Adam/pg0"]
    for key in ("a", "b", "c", "c2"):
        assert got[key] == pytest.approx(exp[key], rel=1e-4), key


@pytest.mark.parametrize("option,value", [("kernel", "cuda"), ("previous_stepsize", "none")])
def test_invalid_kernel_options_name_the_value(option, value):
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        ConditionTracker(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]), **{option: value})


# ---------------------------------------------------------------------------------------------- through Lightning


def test_monitor_passes_the_options_and_writes_histograms_without_stored_eta(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_adamtype import AdamTypeMonitor
    from test_callback import TinyModel, _data, _trainer

    results = {}
    for kind, options in {"default": {}, "fast": dict(kernel="compiled", previous_stepsize="recomputed")}.items():
        monitor = AdamTypeMonitor(log_every_n_steps=4, histogram_every_n_logs=1, **options)
        logger = TensorBoardLogger(tmp_path, name=kind)
        _trainer(tmp_path, [monitor], logger=logger).fit(TinyModel(), _data())
        assert all(t.kernel == options.get("kernel", "auto") for t in monitor.trackers)
        results[kind] = monitor.compute()
        acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
        acc.Reload()
        assert "adamtype/Adam/pg0/eta" in acc.Tags()["histograms"], acc.Tags()["histograms"]
        hist = acc.Histograms("adamtype/Adam/pg0/eta")[-1].histogram_value
        assert hist.num == 8 * 8 + 8 and hist.min > 0  # every coordinate of the body group
    fast = results["fast"]
    assert not any(g.previous for t in monitor.trackers for g in t._groups)  # nothing stored per coordinate
    for group, expected in results["default"].items():
        for key in ("a", "b", "c", "c2"):
            assert fast[group][key] == pytest.approx(expected[key], rel=1e-2), (group, key)
        assert fast[group]["steps"] == expected["steps"] == 12


@pytest.mark.parametrize("option,value", [("kernel", "fused"), ("previous_stepsize", 0)])
def test_monitor_refuses_invalid_kernel_options(option, value):
    from lightning_adamtype import AdamTypeMonitor

    with pytest.raises(ValueError, match=f"AdamTypeMonitor\\({option}={value!r}\\): expected one of"):
        AdamTypeMonitor(**{option: value})


# ---------------------------------------------------------------------------------------------- small groups: flat


@pytest.mark.parametrize("attach_after", [0, 3], ids=["from-start", "attached-after-3"])
@pytest.mark.parametrize("name,cls,kwargs", SQRT_FORM, ids=[c[0] for c in SQRT_FORM])
def test_flat_and_multi_tensor_paths_both_match_the_reference(monkeypatch, name, cls, kwargs, attach_after):
    """``kernel="foreach"``: groups of ≤ FLAT_MAX_NUMEL coordinates concatenate v and g (one kernel call), larger
    ones use the multi-tensor path. Both are checked against the oracle on the same run (the threshold forced to 0)."""
    import lightning_adamtype.tracker as tracker_module

    flat_calls = []
    original = ConditionTracker._flat_contributions
    monkeypatch.setattr(
        ConditionTracker, "_flat_contributions", lambda self, *a: flat_calls.append(1) or original(self, *a)
    )
    tracker, ref = _run(cls, kwargs, attach_after, kernel="foreach")
    assert_matches(tracker, ref)
    # the flat path ran unless there is no square-root form (centered) or a fused step may be skipped
    assert bool(flat_calls) == (not kwargs.get("centered")), len(flat_calls)

    monkeypatch.setattr(tracker_module, "FLAT_MAX_NUMEL", 0)
    flat_calls.clear()
    tracker, ref = _run(cls, kwargs, attach_after, kernel="foreach")
    assert_matches(tracker, ref)
    assert not flat_calls


# ---------------------------------------------------------------------------------------------- observe_every


def _quadratic_run(observe_every: int, steps: int, cls=torch.optim.Adam, seed: int = 0, **opt_kwargs):
    torch.manual_seed(seed)
    x = torch.nn.Parameter(torch.randn(200, dtype=torch.float64))
    opt = cls([x], **opt_kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(100):  # past the bias-corrected transient: the terms are then stationary
        x.grad = x.detach() + torch.randn(200, generator=gen, dtype=torch.float64)
        opt.step()
    tracker = ConditionTracker(opt, observe_every=observe_every, trend=NO_SAMPLES)
    calls = []
    original = tracker._observe_group
    tracker._observe_group = lambda *a, **k: calls.append(k.get("record", True)) or original(*a, **k)
    for _ in range(steps):
        x.grad = x.detach() + torch.randn(200, generator=gen, dtype=torch.float64)  # noisy quadratic
        opt.step()
    return tracker.compute()["%s/pg0" % cls.__name__], calls


def test_observe_every_is_exact_when_every_step_contributes_the_same():
    """SGD at constant lr with a constant gradient: every step adds the same a and b, so the weighted sample of
    every 8th step gives exactly the every-step sums (and c = 0)."""
    results = {}
    for k in (1, 8):
        torch.manual_seed(0)
        x = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=0.1)
        tracker = ConditionTracker(opt, observe_every=k)
        for _ in range(64):
            x.grad = torch.ones_like(x)
            opt.step()
        results[k] = tracker.compute()["SGD/pg0"]
    for key in ("steps", "a", "b", "c", "c2", "a_mean"):
        assert results[8][key] == pytest.approx(results[1][key], rel=1e-12, abs=0), key
    assert results[8]["steps"] == 64


def test_observe_every_estimates_the_sums_and_does_two_observations_per_k_steps():
    every, calls1 = _quadratic_run(1, 480, lr=1e-2, betas=(0.9, 0.99))
    sampled, calls8 = _quadratic_run(8, 480, lr=1e-2, betas=(0.9, 0.99))
    assert len(calls1) == 480 and all(calls1)
    assert len(calls8) == 2 * 480 // 8 and calls8.count(True) == 480 // 8  # prepare + record per 8 steps
    assert sampled["steps"] == every["steps"] == 480
    for key in ("a", "b", "c", "c2"):  # a noisy, stationary problem: the weighted sample tracks the full sum
        assert sampled[key] == pytest.approx(every[key], rel=0.1), (key, sampled[key], every[key])  # 0.4–5 % seen
    assert sampled["c"] != every["c"]  # it is an estimate, not a copy


@pytest.mark.parametrize("previous_stepsize", ["stored", "recomputed"])
def test_observe_every_resume_mid_cycle_matches_uninterrupted(previous_stepsize):
    def make():
        torch.manual_seed(0)
        x = torch.nn.Parameter(torch.randn(30))
        return x, torch.optim.Adam([x], lr=1e-2)

    def step(x, opt, t):
        x.grad = torch.sin(torch.arange(30.0) * t)
        opt.step()

    x, opt = make()
    full = ConditionTracker(opt, observe_every=4, previous_stepsize=previous_stepsize)
    for t in range(20):
        step(x, opt, t)
    x, opt = make()
    first = ConditionTracker(opt, observe_every=4, previous_stepsize=previous_stepsize)
    for t in range(11):  # stop right after a "prepare" step (11 ≡ 3 mod 4)
        step(x, opt, t)
    saved = copy.deepcopy((x, opt, first.state_dict()))
    first.remove()
    x2, opt2, state = saved
    resumed = ConditionTracker(opt2, observe_every=4, previous_stepsize=previous_stepsize)
    resumed.load_state_dict(state)
    for t in range(11, 20):
        step(x2, opt2, t)
    assert_same(resumed.compute(), full.compute(), rel=1e-12)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_invalid_observe_every_is_refused(bad):
    from lightning_adamtype import AdamTypeMonitor

    with pytest.raises(ValueError, match=f"observe_every={bad!r}"):
        ConditionTracker(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]), observe_every=bad)
    with pytest.raises(ValueError, match=f"AdamTypeMonitor\\(observe_every={bad!r}\\)"):
        AdamTypeMonitor(observe_every=bad)


@pytest.mark.parametrize("sizes", [(50,), (50, 7, 3)], ids=["one-tensor", "three-tensors"])
@pytest.mark.parametrize(
    "tracker_kwargs",
    TRACKER_KWARGS,
    ids=list(TRACKER_KWARG_IDS),
)
@pytest.mark.parametrize("flat_max", [0, 1 << 17], ids=["per-tensor-paths", "small-group-path"])
def test_the_tracker_never_changes_the_training(monkeypatch, sizes, tracker_kwargs, flat_max):
    """The kernels work in place on scratch copies: the optimizer's parameters, state and gradients stay bitwise
    equal to an untracked twin's (a one-tensor group once got a view instead of a copy)."""
    import lightning_adamtype.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "FLAT_MAX_NUMEL", flat_max)
    assert_training_untouched(sizes, tracker_kwargs)


def assert_training_untouched(sizes, tracker_kwargs: dict, device: str = "cpu", fused: bool = False) -> None:
    """Adam with and without a tracker, the same gradients: after every one of 5 steps the parameters, gradients
    and state of the tracked optimizer are bitwise equal to the untracked twin's."""
    torch.manual_seed(0)
    twins = []
    for tracked in (False, True):
        params = [torch.nn.Parameter(torch.ones(n, device=device)) for n in sizes]
        opt = torch.optim.Adam(params, lr=1e-2, fused=fused or None)
        if tracked:
            ConditionTracker(opt, **tracker_kwargs)
        twins.append((params, opt))
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
        for params, opt in twins:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        (bare, bare_opt), (tracked, tracked_opt) = twins
        for p, q in zip(bare, tracked):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(bare_opt.state[p][key], tracked_opt.state[q][key]), key


def vectorize_host_steps(monkeypatch) -> list[int]:
    """Make the adapters take their device-step-counter path (one vector of steps, a ScalarTable) for CPU step
    tensors too, so it is checked on a machine without a GPU; returns a list that grows at each use."""
    import lightning_adamtype.adapters as adapters

    used: list[int] = []

    def steps_as_vector(states):
        steps = [s["step"] for s in states]
        if not all(isinstance(t, torch.Tensor) for t in steps):
            return None
        used.append(1)
        return torch.stack(steps).to(torch.float32).clamp_min(1.0)

    monkeypatch.setattr(adapters, "device_steps", steps_as_vector)
    return used


@pytest.mark.parametrize(
    "tracker_kwargs",
    TRACKER_KWARGS,
    ids=list(TRACKER_KWARG_IDS),
)
@pytest.mark.parametrize("flat_max", [0, 1 << 17], ids=["per-tensor-paths", "small-group-path"])
@pytest.mark.parametrize("name,cls,kwargs", [c for c in SQRT_FORM if c[0] in ("adam-wd-foreach", "adamw-amsgrad-foreach")],
                         ids=["adam-wd-foreach", "adamw-amsgrad-foreach"])
def test_scalar_table_of_device_step_counters_matches_float64_reference(monkeypatch, name, cls, kwargs, tracker_kwargs, flat_max):
    """Fused and capturable optimizers keep their step counters on the GPU; Adam's adapter then computes every
    parameter's (s, e) at once into a ScalarTable. Every path reads it right (float64 oracle)."""
    import lightning_adamtype.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "FLAT_MAX_NUMEL", flat_max)
    used = vectorize_host_steps(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMSGrad + recomputed: the stored fallback's warning
        tracker, ref = _run(cls, kwargs, 3, **tracker_kwargs)
    assert_matches(tracker, ref)
    assert used
