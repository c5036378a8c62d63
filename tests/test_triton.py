"""The Triton path (``kernel="triton"``, and ``"auto"`` on CUDA): :mod:`lightning_adamtype.triton_kernels`.

On a GPU the kernels are compiled by Triton; on a CPU-only machine they run in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), the same kernel source on CPU tensors. Both against the float64
oracle: the kernel's five terms against slow float64 sums, and the tracker over the reference runs.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from lightning_adamtype import ConditionTracker, triton_kernels
from test_kernels import (
    RECOMPUTABLE,
    SQRT_FORM,
    _run,
    assert_training_untouched,
    resumed_and_uninterrupted,
    vectorize_host_steps,
)
from test_reference import STEPS, assert_matches, make_run, train

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_kernels.available(DEVICE),
    reason="needs Triton (pip install triton; on a CPU its interpreter, TRITON_INTERPRET=1 before import)",
)
# the interpreter runs every program in Python: CPU runs keep the optimizers the fused/foreach kinds cover once
ON_CPU = DEVICE.type == "cpu"
SIZES = [1, 64, triton_kernels.SUB + 1, triton_kernels.BLOCK - 1, triton_kernels.BLOCK, triton_kernels.BLOCK + 1, 9000]


def _float64_terms(vs, gs, table, previous=None, previous_table=None, update=None):
    """The five terms in float64: η = s/(sqrt(v)+e); η_{t−1} given, or rebuilt from v_{t−1} = (v − w·g²)/k."""
    etas, diffs = [], []
    vs, gs = [v.cpu() for v in vs], [g.cpu() for g in gs]
    previous = [p.cpu() for p in previous] if previous is not None else None
    for i, (v, g) in enumerate(zip(vs, gs)):
        s, e = table[i].double().cpu().tolist()
        eta = s / (v.double().sqrt() + e)
        etas.append(eta)
        if previous is not None:
            diffs.append(eta - previous[i].double())
        elif previous_table is not None:
            keep, weight = update
            v_previous = ((v.double() - weight * g.double() ** 2) / keep).clamp_min(0)
            ps, pe = previous_table[i].double().cpu().tolist()
            diffs.append(eta - ps / (v_previous.sqrt() + pe))
    zero = torch.zeros((), dtype=torch.float64)
    return torch.stack(
        [
            min(eta.min() for eta in etas),
            sum(((eta * g.double()) ** 2).sum() for eta, g in zip(etas, gs)),
            sum(d.abs().sum() for d in diffs) if diffs else zero,
            sum((d * d).sum() for d in diffs) if diffs else zero,
            sum(eta.sum() for eta in etas),
        ]
    ), etas


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    vs = [(torch.rand(n, generator=gen) * 1e-3).to(DEVICE) for n in SIZES]
    gs = [(torch.randn(n, generator=gen) * 1e-2).to(DEVICE) for n in SIZES]
    table = torch.tensor([[1e-3 * (1 + i / 7), 1e-8 * (1 + i)] for i in range(len(SIZES))], device=DEVICE)
    return vs, gs, table


@pytest.mark.parametrize("mode", ["first", "stored", "current"])
def test_group_terms_match_float64_and_write_every_eta(mode):
    vs, gs, table = _inputs(0)
    gen = torch.Generator().manual_seed(1)
    previous = [(torch.rand(v.numel(), generator=gen) * 1e-2).to(DEVICE) for v in vs]
    launch = triton_kernels.GroupLaunch(tuple(v.numel() for v in vs), DEVICE)
    if mode == "first":
        buffer = torch.full((launch.eta_numel,), float("nan"), device=DEVICE)  # poisoned: every η must be written
        got = launch.terms(vs, gs, buffer, table, triton_kernels.FIRST)
        expected, etas = _float64_terms(vs, gs, table)
    elif mode == "stored":
        buffer = torch.zeros(launch.eta_numel, device=DEVICE)
        for into, p in zip(launch.eta_views(buffer, [v.shape for v in vs]), previous):
            into.copy_(p)
        got = launch.terms(vs, gs, buffer, table, triton_kernels.STORED)
        expected, etas = _float64_terms(vs, gs, table, previous=previous)
    else:
        buffer = None
        got = launch.terms(vs, gs, None, table, triton_kernels.CURRENT)
        expected, etas = _float64_terms(vs, gs, table)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-5, atol=0)
    if buffer is not None:
        written = torch.cat(launch.eta_views(buffer, [v.shape for v in vs]))
        torch.testing.assert_close(written.double().cpu(), torch.cat(etas), rtol=1e-6, atol=0)


def test_recomputed_terms_match_float64():
    vs_previous, gs, _ = _inputs(2)
    keep, weight = 0.999, 1e-3
    vs = [keep * v + weight * g * g for v, g in zip(vs_previous, gs)]
    table = torch.tensor([[1e-3 * (1 + i / 5), 1e-8 * (1 + i), 0.97e-3 * (1 + i / 5), 1.1e-8 * (1 + i)]
                          for i in range(len(SIZES))], device=DEVICE)
    launch = triton_kernels.GroupLaunch(tuple(SIZES), DEVICE)
    got = launch.terms(vs, gs, None, table, triton_kernels.RECOMPUTED, 1.0 / keep, weight)
    expected, _ = _float64_terms(vs, gs, table[:, :2], previous_table=table[:, 2:].cpu(), update=(keep, weight))
    # v_{t−1} rebuilt from float32 v_t: c, c2 to the rounding of v_t (see kernels.py), a, b as tight as above
    torch.testing.assert_close(got.double().cpu()[[0, 1, 4]], expected[[0, 1, 4]], rtol=2e-5, atol=0)
    torch.testing.assert_close(got.double().cpu()[[2, 3]], expected[[2, 3]], rtol=1e-3, atol=0)


def test_address_tables_are_uploaded_only_when_an_address_changes():
    vs, gs, _ = _inputs(3)
    launch = triton_kernels.GroupLaunch(tuple(SIZES), DEVICE)
    first = launch.address_tables(vs, gs)
    assert launch.address_tables(vs, list(gs)) is first  # same addresses: no new copy
    moved = [g.clone() for g in gs]
    v_table, g_table = launch.address_tables(vs, moved)
    assert g_table is not first[1] and g_table.tolist() == [g.data_ptr() for g in moved]
    assert v_table.tolist() == [v.data_ptr() for v in vs]


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = ConditionTracker._triton_contributions

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ConditionTracker, "_triton_contributions", spy)
    return calls


def _cases(configs):
    if not ON_CPU:
        return configs
    keep = {"adam-foreach", "adam-fused", "adam-wd-foreach", "adamw-foreach", "adagrad-foreach", "rmsprop-foreach"}
    return [c for c in configs if c[0] in keep] or configs[:4]


@pytest.mark.parametrize("attach_after", [0, 3], ids=["from-start", "attached-after-3"])
@pytest.mark.parametrize("name,cls,kwargs", _cases(SQRT_FORM), ids=[c[0] for c in _cases(SQRT_FORM)])
def test_triton_path_matches_float64_reference(monkeypatch, name, cls, kwargs, attach_after):
    """The reference runs include a parameter whose grad is None at some steps: it leaves the group's tensor list,
    and the flat η buffer and the launch geometry are rebuilt for the new list."""
    calls = _spy(monkeypatch)
    tracker, ref = _run(cls, kwargs, attach_after, device=str(DEVICE), kernel="triton")
    assert_matches(tracker, ref)
    if kwargs.get("centered"):
        assert not calls  # centered RMSprop has no square-root form
    else:
        assert len(calls) >= STEPS - attach_after  # the Triton path ran every step (a silent fallback cannot pass)


@pytest.mark.parametrize("name,cls,kwargs", _cases(RECOMPUTABLE), ids=[c[0] for c in _cases(RECOMPUTABLE)])
def test_triton_recomputed_matches_float64_reference(monkeypatch, name, cls, kwargs):
    calls = _spy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker, ref = _run(cls, kwargs, 3, device=str(DEVICE), kernel="triton", previous_stepsize="recomputed")
    assert_matches(tracker, ref)
    assert calls and not any(g.previous for g in tracker._groups)  # no η_{t−1} stored


def test_triton_never_changes_the_training():
    assert_training_untouched((5000, 70, 3), {"kernel": "triton"}, device=str(DEVICE))


def _falls_back_once(match: str) -> None:
    """kernel="triton" on a reference run: exactly one warning matching ``match``, and the numbers of the path it
    fell back to still match the float64 oracle."""
    with pytest.warns(UserWarning, match=match) as record:
        tracker, ref = _run(torch.optim.Adam, dict(lr=1e-2), 0, device=str(DEVICE), kernel="triton")
    assert sum(bool(re.search(match, str(w.message))) for w in record) == 1
    assert_matches(tracker, ref)


def test_triton_asked_for_where_it_cannot_run_warns_once_and_measures(monkeypatch):
    monkeypatch.setattr(triton_kernels, "available", lambda device: False)
    calls = _spy(monkeypatch)
    _falls_back_once("kernel='triton' needs Triton and a CUDA device")
    assert not calls


@pytest.mark.skipif(not ON_CPU, reason="on CUDA 'auto' is Triton")
def test_auto_stays_off_triton_on_the_cpu(monkeypatch):
    calls = _spy(monkeypatch)
    model, opt, sched, data = make_run(torch.optim.Adam, dict(lr=1e-2))
    ConditionTracker(opt)
    train(model, opt, sched, data, range(1, 4))
    assert not calls


def test_unaligned_tensors_take_the_unhinted_kernel_and_stay_exact():
    """Views at odd offsets (not 16-byte aligned) must not get the 16-byte vector loads."""
    vs, gs, table = _inputs(4)
    flat_v = torch.cat([torch.zeros(1, device=DEVICE), *vs])
    flat_g = torch.cat([torch.zeros(1, device=DEVICE), *gs])
    starts = [1 + sum(SIZES[:i]) for i in range(len(SIZES))]
    odd_vs = [flat_v.narrow(0, s, n) for s, n in zip(starts, SIZES)]
    odd_gs = [flat_g.narrow(0, s, n) for s, n in zip(starts, SIZES)]
    launch = triton_kernels.GroupLaunch(tuple(SIZES), DEVICE)
    got = launch.terms(odd_vs, odd_gs, None, table, triton_kernels.CURRENT)
    assert not launch._aligned
    expected, _ = _float64_terms(vs, gs, table)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-5, atol=0)
    launch.terms(vs, gs, None, table, triton_kernels.CURRENT)
    assert launch._aligned


@pytest.mark.parametrize("case", ["non-finite-step", "observe-every-3"])
def test_fused_accumulation_matches_the_foreach_path(case):
    """The second launch adds the row to the accumulators itself (weight k, a non-finite step counted apart, the
    trend detectors' finite flag): the same results as the foreach path's ``_accumulate``."""
    results = []
    for kernel in ("triton", "foreach"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (300, 7)]
        opt = torch.optim.Adam(params, lr=1e-2)
        tracker = ConditionTracker(opt, kernel=kernel, observe_every=3 if case == "observe-every-3" else 1)
        gen = torch.Generator().manual_seed(1)
        for step in range(1, 10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            if case == "non-finite-step" and step == 5:
                params[1].grad[2] = float("inf")
            opt.step()
        results.append((tracker.compute(), tracker._groups[0].last_finite.item()))
    (got, got_finite), (expected, expected_finite) = results
    assert got_finite == expected_finite
    for key, value in expected["Adam/pg0"].items():
        assert got["Adam/pg0"][key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
    if case == "non-finite-step":
        assert got["Adam/pg0"]["nonfinite_steps"] >= 1


@pytest.mark.parametrize("previous_stepsize", ["stored", "recomputed"])
@pytest.mark.parametrize("split", [5, 6], ids=["resume-after-5", "resume-after-6-gap"])
def test_triton_resume_matches_uninterrupted(monkeypatch, previous_stepsize, split):
    """Through torch.save / torch.load: η_{t−1} comes back as separate tensors and is copied into a new padded flat
    buffer once (stored), or the (s', e') rows come back (recomputed); the sums go on as if never interrupted."""
    calls = _spy(monkeypatch)
    got, expected = resumed_and_uninterrupted(
        torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1), split, device=str(DEVICE),
        kernel="triton", previous_stepsize=previous_stepsize,
    )
    assert calls
    for group, values in expected.items():
        for key, value in values.items():
            assert got[group][key] == pytest.approx(value, rel=1e-6, nan_ok=True), (group, key)


def test_triton_asked_for_on_bfloat16_state_warns_once_and_measures(monkeypatch):
    calls = _spy(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(40, device=DEVICE, dtype=torch.bfloat16))]
    opt = torch.optim.Adam(params, lr=1e-2)
    with pytest.warns(UserWarning, match="contiguous float32 state") as record:
        tracker = ConditionTracker(opt, kernel="triton")
        for _ in range(3):
            params[0].grad = torch.randn_like(params[0])
            opt.step()
    assert sum("kernel='triton'" in str(w.message) for w in record) == 1
    assert not calls and tracker.compute()["Adam/pg0"]["steps"] == 3


@pytest.mark.parametrize("previous_stepsize", ["stored", "recomputed"])
def test_triton_reads_the_scalar_table_of_device_step_counters(monkeypatch, previous_stepsize):
    """Fused/capturable Adam on a GPU: the (s, e) come as one ScalarTable, passed to the kernel as is."""
    calls = _spy(monkeypatch)
    used = vectorize_host_steps(monkeypatch)
    tracker, ref = _run(torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1), 3, device=str(DEVICE), kernel="triton",
                        previous_stepsize=previous_stepsize)
    assert_matches(tracker, ref)
    assert calls and used


def test_a_triton_failure_warns_once_and_the_foreach_path_measures(monkeypatch):
    """No compiler for this GPU, a driver without the needed PTX version …: training goes on, measured as before."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_00")

    monkeypatch.setattr(triton_kernels.GroupLaunch, "terms", broken)
    _falls_back_once("Triton kernels could not run .RuntimeError: PTX")
