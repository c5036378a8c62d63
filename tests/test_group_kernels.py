"""The one-call-per-group paths: ``kernel="triton"`` (``"auto"`` on CUDA, :mod:`lightning_adamtype.triton_kernels`)
and ``kernel="native"`` (``"auto"`` on the CPU, :mod:`lightning_adamtype.native_kernels`), same interface, same tests.

On a GPU the Triton kernels are compiled by Triton; on a CPU-only machine they run in Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1``), the same kernel source on CPU tensors. The native kernel is
compiled with the machine's C compiler. All against the float64 oracle: each kernel's five terms against slow
float64 sums, and the tracker over the reference runs.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from lightning_adamtype import ConditionTracker, native_kernels, triton_kernels
from lightning_adamtype.tracker import GROUP_KERNELS
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
CPU = torch.device("cpu")
NEEDS_TRITON = pytest.mark.skipif(
    not triton_kernels.available(DEVICE),
    reason="needs Triton (pip install triton; on a CPU its interpreter, TRITON_INTERPRET=1 before import)",
)
NEEDS_NATIVE = pytest.mark.skipif(
    not native_kernels.available(CPU), reason=f"needs a C compiler ({native_kernels.unavailable_reason()})"
)
#: (kernel option, the device its tests run on)
BACKENDS = [
    pytest.param(("triton", DEVICE), marks=NEEDS_TRITON, id="triton"),
    pytest.param(("native", CPU), marks=NEEDS_NATIVE, id="native"),
]
#: sizes around the edges of each kernel's unit of work
EDGES = {
    "triton": [1, 64, triton_kernels.SUB + 1, triton_kernels.BLOCK - 1, triton_kernels.BLOCK, triton_kernels.BLOCK + 1, 9000],
    "native": [1, 64, 3, native_kernels.PIECE - 1, native_kernels.PIECE, native_kernels.PIECE + 1, 9000],
}
SIZES = EDGES["triton"]


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


def _inputs(seed: int, device: torch.device = DEVICE, sizes: list[int] = SIZES):
    gen = torch.Generator().manual_seed(seed)
    vs = [(torch.rand(n, generator=gen) * 1e-3).to(device) for n in sizes]
    gs = [(torch.randn(n, generator=gen) * 1e-2).to(device) for n in sizes]
    table = torch.tensor([[1e-3 * (1 + i / 7), 1e-8 * (1 + i)] for i in range(len(sizes))], device=device)
    return vs, gs, table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["first", "stored", "current"])
def test_group_terms_match_float64_and_write_every_eta(backend, mode):
    name, device = backend
    kernels = GROUP_KERNELS[name]
    vs, gs, table = _inputs(0, device, EDGES[name])
    gen = torch.Generator().manual_seed(1)
    previous = [(torch.rand(v.numel(), generator=gen) * 1e-2).to(device) for v in vs]
    launch = kernels.GroupLaunch(tuple(v.numel() for v in vs), device)
    if mode == "first":
        buffer = torch.full((launch.eta_numel,), float("nan"), device=device)  # poisoned: every η must be written
        got = launch.terms(vs, gs, buffer, table, kernels.FIRST)
        expected, etas = _float64_terms(vs, gs, table)
    elif mode == "stored":
        buffer = torch.zeros(launch.eta_numel, device=device)
        for into, p in zip(launch.eta_views(buffer, [v.shape for v in vs]), previous):
            into.copy_(p)
        got = launch.terms(vs, gs, buffer, table, kernels.STORED)
        expected, etas = _float64_terms(vs, gs, table, previous=previous)
    else:
        buffer = None
        got = launch.terms(vs, gs, None, table, kernels.CURRENT)
        expected, etas = _float64_terms(vs, gs, table)
    torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-5, atol=0)
    if buffer is not None:
        written = torch.cat(launch.eta_views(buffer, [v.shape for v in vs]))
        torch.testing.assert_close(written.double().cpu(), torch.cat(etas), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recomputed_terms_match_float64(backend):
    name, device = backend
    kernels, sizes = GROUP_KERNELS[name], EDGES[name]
    vs_previous, gs, _ = _inputs(2, device, sizes)
    keep, weight = 0.999, 1e-3
    vs = [keep * v + weight * g * g for v, g in zip(vs_previous, gs)]
    table = torch.tensor([[1e-3 * (1 + i / 5), 1e-8 * (1 + i), 0.97e-3 * (1 + i / 5), 1.1e-8 * (1 + i)]
                          for i in range(len(sizes))], device=device)
    launch = kernels.GroupLaunch(tuple(sizes), device)
    got = launch.terms(vs, gs, None, table, kernels.RECOMPUTED, 1.0 / keep, weight)
    expected, _ = _float64_terms(vs, gs, table[:, :2], previous_table=table[:, 2:].cpu(), update=(keep, weight))
    # v_{t−1} rebuilt from float32 v_t: c, c2 to the rounding of v_t (see kernels.py), a, b as tight as above
    torch.testing.assert_close(got.double().cpu()[[0, 1, 4]], expected[[0, 1, 4]], rtol=2e-5, atol=0)
    torch.testing.assert_close(got.double().cpu()[[2, 3]], expected[[2, 3]], rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_address_tables_hold_the_current_addresses(backend):
    """Triton: device tables uploaded again only when an address changes; native: two host arrays written in
    place at every call (no allocation)."""
    name, device = backend
    vs, gs, _ = _inputs(3, device)
    launch = GROUP_KERNELS[name].GroupLaunch(tuple(SIZES), device)
    first = launch.address_tables(vs, gs)
    assert launch.address_tables(vs, list(gs)) is first  # same addresses: the same tables
    moved = [g.clone() for g in gs]
    v_table, g_table = launch.address_tables(vs, moved)
    as_list = lambda table: table.tolist() if isinstance(table, torch.Tensor) else list(table)  # noqa: E731 (ctypes)
    assert as_list(g_table) == [g.data_ptr() for g in moved] != [g.data_ptr() for g in gs]
    assert as_list(v_table) == [v.data_ptr() for v in vs]
    if name == "triton":
        assert g_table is not first[1]  # a new upload (a table still read by an earlier launch is never written)
    else:
        assert (v_table, g_table) == first and g_table is first[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_launch_refuses_inputs_its_kernel_would_read_out_of_bounds(backend):
    """The kernels follow raw addresses: a table without the (s', e') columns, a missing η buffer or a tensor too
    few is a ValueError before anything runs."""
    name, device = backend
    kernels = GROUP_KERNELS[name]
    vs, gs, table = _inputs(7, device)
    launch = kernels.GroupLaunch(tuple(SIZES), device)
    with pytest.raises(ValueError, match=r"torch.float32 table of shape \(7, 2\) \(expected contiguous float32, 7 rows of at least 4 in mode 3\)"):
        launch.terms(vs, gs, None, table, kernels.RECOMPUTED, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"a torch.float64 table of shape \(7, 2\)"):
        launch.terms(vs, gs, None, table.double(), kernels.CURRENT)
    with pytest.raises(ValueError, match=r"a non-contiguous torch.float32 table of shape \(7, 2\)"):
        launch.terms(vs, gs, None, table.t().contiguous().t(), kernels.CURRENT)
    with pytest.raises(ValueError, match="no η buffer"):
        launch.terms(vs, gs, None, table, kernels.STORED)
    with pytest.raises(ValueError, match="got 6 v, 6 g"):
        launch.terms(vs[:-1], gs[:-1], None, table[:-1], kernels.CURRENT)
    expected, _ = _float64_terms(vs, gs, table)  # the right inputs still run, and a wider table is read by its stride
    for wide in (table, torch.cat([table, torch.full_like(table, float("nan"))], dim=1)):
        got = launch.terms(vs, gs, None, wide, kernels.CURRENT)
        torch.testing.assert_close(got.double().cpu(), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_table_holds_the_pairs_as_float32(backend):
    """Host floats and 0-dim tensors give the same float32 [n, 2] table; the native launch writes host floats
    into the one table it keeps (overwritten by the next call), so a caller that keeps a table must copy it."""
    name, device = backend
    launch = GROUP_KERNELS[name].GroupLaunch(tuple(SIZES), device)
    pairs = [(1e-3 * (i + 1) / 3, 1e-8 * (i + 2) / 7) for i in range(len(SIZES))]
    expected = torch.tensor(pairs, dtype=torch.float64).to(torch.float32)
    first = launch.scalar_table(pairs)
    assert first.dtype == torch.float32 and first.shape == (len(SIZES), 2)
    torch.testing.assert_close(first.cpu(), expected, rtol=0, atol=0)
    as_tensors = [(torch.tensor(s, dtype=torch.float64), torch.tensor(e, dtype=torch.float64)) for s, e in pairs]
    torch.testing.assert_close(launch.scalar_table(as_tensors).cpu(), expected, rtol=0, atol=0)
    second = launch.scalar_table([(2 * s, 2 * e) for s, e in pairs])
    torch.testing.assert_close(second.cpu(), 2 * expected, rtol=0, atol=0)
    if name == "native":
        assert second is first  # one kept table, written in place
    copied = copy.deepcopy(launch)  # (a copied tracker): the copy writes and reads its own table
    torch.testing.assert_close(copied.scalar_table(pairs).cpu(), expected, rtol=0, atol=0)
    torch.testing.assert_close(launch.scalar_table(pairs).cpu(), expected, rtol=0, atol=0)
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        launch.scalar_table(pairs[:-1] + [(1.0, 2.0, 3.0)])  # not a pair


def _spy(monkeypatch, name: str) -> list[int]:
    """A list that grows at each step the tracker takes the ``name`` kernel's path."""
    calls: list[int] = []
    original = ConditionTracker._group_kernel_contributions

    def spy(self, kernels, *args, **kwargs):
        calls.extend([1] if kernels is GROUP_KERNELS[name] else [])
        return original(self, kernels, *args, **kwargs)

    monkeypatch.setattr(ConditionTracker, "_group_kernel_contributions", spy)
    return calls


def _cases(configs):
    """Every configuration, but in Triton's interpreter (slow: every program in Python) one of each kind."""
    keep = {"adam-foreach", "adam-fused", "adam-wd-foreach", "adamw-foreach", "adagrad-foreach", "rmsprop-foreach"}
    some = [c for c in configs if c[0] in keep] or configs[:4]
    return [
        pytest.param(backend.values[0], *config, id=f"{backend.id}-{config[0]}", marks=backend.marks)
        for backend in BACKENDS
        for config in (some if backend.id == "triton" and DEVICE.type == "cpu" else configs)
    ]


@pytest.mark.parametrize("attach_after", [0, 3], ids=["from-start", "attached-after-3"])
@pytest.mark.parametrize("backend,name,cls,kwargs", _cases(SQRT_FORM))
def test_group_kernel_path_matches_float64_reference(monkeypatch, backend, name, cls, kwargs, attach_after):
    """The reference runs include a parameter whose grad is None at some steps: it leaves the group's tensor list,
    and the flat η buffer and the launch geometry are rebuilt for the new list."""
    kernel, device = backend
    calls = _spy(monkeypatch, kernel)
    tracker, ref = _run(cls, kwargs, attach_after, device=str(device), kernel=kernel)
    assert_matches(tracker, ref)
    if kwargs.get("centered"):
        assert not calls  # centered RMSprop has no square-root form
    else:
        assert len(calls) >= STEPS - attach_after  # the kernel's path ran every step (a silent fallback cannot pass)


@pytest.mark.parametrize("backend,name,cls,kwargs", _cases(RECOMPUTABLE))
def test_group_kernel_recomputed_matches_float64_reference(monkeypatch, backend, name, cls, kwargs):
    kernel, device = backend
    calls = _spy(monkeypatch, kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker, ref = _run(cls, kwargs, 3, device=str(device), kernel=kernel, previous_stepsize="recomputed")
    assert_matches(tracker, ref)
    assert calls and not any(g.previous for g in tracker._groups)  # no η_{t−1} stored


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_kernels_never_change_the_training(backend):
    kernel, device = backend
    assert_training_untouched((5000, 70, 3), {"kernel": kernel}, device=str(device))


def _falls_back_once(match: str, kernel: str = "triton", device: torch.device = DEVICE) -> None:
    """``kernel`` asked for on a reference run: exactly one warning matching ``match``, and the numbers of the path
    it fell back to still match the float64 oracle."""
    with pytest.warns(UserWarning, match=match) as record:
        tracker, ref = _run(torch.optim.Adam, dict(lr=1e-2), 0, device=str(device), kernel=kernel)
    assert sum(bool(re.search(match, str(w.message))) for w in record) == 1
    assert_matches(tracker, ref)


@NEEDS_TRITON
def test_triton_asked_for_where_it_cannot_run_warns_once_and_measures(monkeypatch):
    monkeypatch.setattr(triton_kernels, "available", lambda device: False)
    calls = _spy(monkeypatch, "triton")
    _falls_back_once("kernel='triton' needs Triton and a CUDA device")
    assert not calls


def test_native_asked_for_without_a_compiler_warns_once_and_measures(monkeypatch):
    """No C compiler found: one warning naming the reason, and the foreach path measures."""
    native_kernels._library.cache_clear()
    monkeypatch.setattr(native_kernels, "_compiler", lambda: None)
    try:
        calls = _spy(monkeypatch, "native")
        _falls_back_once("kernel='native' needs a CPU group and a working C compiler .* no C compiler found", "native", CPU)
        assert not calls
    finally:
        native_kernels._library.cache_clear()


@NEEDS_NATIVE
def test_native_kernel_is_built_once_and_loaded_from_the_cache(monkeypatch, tmp_path):
    """The first process compiles into the cache directory; later loads find the file and run no compiler."""
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(tmp_path))
    native_kernels._library.cache_clear()
    try:
        assert native_kernels.available(CPU)
        built = sorted(tmp_path.glob("adamtype_native_*.so"))
        assert len(built) == 1
        native_kernels._library.cache_clear()
        monkeypatch.setattr(native_kernels.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
        assert native_kernels.available(CPU) and sorted(tmp_path.glob("adamtype_native_*.so")) == built
    finally:
        native_kernels._library.cache_clear()


@NEEDS_NATIVE
def test_native_kernel_is_built_in_the_temporary_directory_when_the_cache_folder_cannot_be_written(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(blocker / "cache"))  # under a file: makedirs fails, even as root
    monkeypatch.setattr(native_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    native_kernels._library.cache_clear()
    try:
        assert native_kernels.available(CPU), native_kernels.unavailable_reason()
        assert len(list((tmp_path / "tmp").glob("lightning_adamtype-*/adamtype_native_*.so"))) == 1
        monkeypatch.setattr(native_kernels.tempfile, "gettempdir", lambda: str(blocker / "tmp"))
        native_kernels._library.cache_clear()
        assert not native_kernels.available(CPU)  # neither folder can be written: the reason names both
        reason = native_kernels.unavailable_reason()
        assert reason.startswith("OSError: no cache folder could be written") and str(blocker / "cache") in reason and str(blocker / "tmp") in reason
    finally:
        native_kernels._library.cache_clear()


@NEEDS_NATIVE
def test_native_kernel_builds_without_the_flags_a_compiler_rejects(monkeypatch, tmp_path):
    """A compiler that rejects -march=native (older Apple clang on arm64) gets the next set of flags, and the
    kernel it builds is exact."""
    real = native_kernels._compiler()
    log = tmp_path / "calls.txt"
    picky = tmp_path / "picky-cc"
    picky.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'for a in "$@"; do [ "$a" = "-march=native" ] && { echo "error: unsupported option -march=native" >&2; exit 1; }; done\n'
        f'exec "{real}" "$@"\n'
    )
    picky.chmod(0o755)
    monkeypatch.setenv("CC", str(picky))
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(tmp_path / "cache"))
    native_kernels._library.cache_clear()
    try:
        assert native_kernels.available(CPU), native_kernels.unavailable_reason()
        calls = log.read_text().splitlines()
        # (-march=native -fopenmp), (-march=native) rejected; then (-fopenmp), or () where the compiler has no OpenMP
        assert all("-march=native" in call for call in calls[:2]) and len(calls) in (3, 4)
        assert all("-march=native" not in call for call in calls[2:]) and "-fopenmp" in calls[2]
        vs, gs, table = _inputs(5, CPU)
        got = native_kernels.GroupLaunch(tuple(SIZES), CPU).terms(vs, gs, None, table, native_kernels.CURRENT)
        expected, _ = _float64_terms(vs, gs, table)
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=0)
    finally:
        native_kernels._library.cache_clear()


@NEEDS_NATIVE
@pytest.mark.skipif(DEVICE.type != "cpu", reason="on CUDA 'auto' is Triton")
def test_auto_on_the_cpu_is_native_and_never_triton(monkeypatch):
    triton_calls, native_calls = _spy(monkeypatch, "triton"), _spy(monkeypatch, "native")  # the second wraps the first
    model, opt, sched, data = make_run(torch.optim.Adam, dict(lr=1e-2))
    ConditionTracker(opt)
    train(model, opt, sched, data, range(1, 4))
    assert not triton_calls
    assert len(native_calls) >= 3  # every step (a group whose grads are all None at a step is skipped)


@NEEDS_TRITON
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["non-finite-step", "observe-every-3"])
def test_fused_accumulation_matches_the_foreach_path(backend, case):
    """The kernel adds the row to the accumulators itself (weight k, a non-finite step counted apart, the trend
    detectors' finite flag): the same results as the foreach path's ``_accumulate``."""
    name, device = backend
    results = []
    for kernel in (name, "foreach"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (300, 7)]
        opt = torch.optim.Adam(params, lr=1e-2)
        tracker = ConditionTracker(opt, kernel=kernel, observe_every=3 if case == "observe-every-3" else 1)
        gen = torch.Generator().manual_seed(1)
        for step in range(1, 10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("previous_stepsize", ["stored", "recomputed"])
@pytest.mark.parametrize("split", [5, 6], ids=["resume-after-5", "resume-after-6-gap"])
def test_group_kernel_resume_matches_uninterrupted(monkeypatch, backend, previous_stepsize, split):
    """Through torch.save / torch.load: η_{t−1} comes back as separate tensors and is copied into a new padded flat
    buffer once (stored), or the (s', e') rows come back (recomputed); the sums go on as if never interrupted."""
    kernel, device = backend
    calls = _spy(monkeypatch, kernel)
    got, expected = resumed_and_uninterrupted(
        torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1), split, device=str(device),
        kernel=kernel, previous_stepsize=previous_stepsize,
    )
    assert calls
    for group, values in expected.items():
        for key, value in values.items():
            assert got[group][key] == pytest.approx(value, rel=1e-6, nan_ok=True), (group, key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_kernel_asked_for_on_bfloat16_state_warns_once_and_measures(monkeypatch, backend):
    kernel, device = backend
    calls = _spy(monkeypatch, kernel)
    params = [torch.nn.Parameter(torch.randn(40, device=device, dtype=torch.bfloat16))]
    opt = torch.optim.Adam(params, lr=1e-2)
    with pytest.warns(UserWarning, match="contiguous float32 state") as record:
        tracker = ConditionTracker(opt, kernel=kernel)
        for _ in range(3):
            params[0].grad = torch.randn_like(params[0])
            opt.step()
    assert sum(f"kernel={kernel!r}" in str(w.message) for w in record) == 1
    assert not calls and tracker.compute()["Adam/pg0"]["steps"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("previous_stepsize", ["stored", "recomputed"])
def test_group_kernel_reads_the_scalar_table_of_device_step_counters(monkeypatch, backend, previous_stepsize):
    """Fused/capturable Adam on a GPU: the (s, e) come as one ScalarTable, passed to the kernel as is."""
    kernel, device = backend
    calls = _spy(monkeypatch, kernel)
    used = vectorize_host_steps(monkeypatch)
    tracker, ref = _run(torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1), 3, device=str(device), kernel=kernel,
                        previous_stepsize=previous_stepsize)
    assert_matches(tracker, ref)
    assert calls and used


@NEEDS_TRITON
def test_a_triton_failure_warns_once_and_the_foreach_path_measures(monkeypatch):
    """No compiler for this GPU, a driver without the needed PTX version …: training goes on, measured as before."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_00")

    monkeypatch.setattr(triton_kernels.GroupLaunch, "terms", broken)
    _falls_back_once("Triton kernels could not run .RuntimeError: PTX")


@NEEDS_NATIVE
def test_a_native_failure_warns_once_and_the_foreach_path_measures(monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("adamtype_native.so: cannot open shared object file")

    monkeypatch.setattr(native_kernels.GroupLaunch, "terms", broken)
    _falls_back_once("native kernels could not run .OSError: adamtype_native", "native", CPU)
