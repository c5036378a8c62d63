"""Regression guards for the tracker's hot path (no timing: these are deterministic and fast).

(a) On steps that are not trend-sample steps, ``optimizer.step()`` of a tracked optimizer (the optimizer's own
    step and the tracker's pre- and post-step hooks) makes no host read of a tensor (Tensor.item / tolist /
    __bool__ / __float__ / __int__), except of the optimizer's own 0-dim CPU step counters and CPU tensor lr
    (reading those never synchronises a device). The counter lives in tests/host_reads.py.
(b) The persistent memory the tracker holds (accumulators, previous η, trend-detector buffers) does not grow
    with the number of steps.
(c) Neither does the number of tensors it holds.

The timing side lives in ``benchmarks/bench.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from host_reads import NO_SAMPLES, ReadCounter, detector_samples, leaky_adam
from lightning_adamtype import ConditionTracker, TrendOptions

OPTIMIZERS = [
    ("adam-foreach", torch.optim.Adam, dict(lr=1e-2, foreach=True)),
    ("adam-forloop-wd", torch.optim.Adam, dict(lr=1e-2, foreach=False, weight_decay=0.1)),
    ("adam-fused-amsgrad", torch.optim.Adam, dict(lr=1e-2, fused=True, amsgrad=True)),
    ("adam-fused-tensor-lr", torch.optim.Adam, dict(lr=torch.tensor(1e-2), fused=True)),
    ("adamw-foreach", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
    ("adagrad", torch.optim.Adagrad, dict(lr=1e-2, lr_decay=1e-3, foreach=True)),
    ("rmsprop-centered-momentum", torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5)),
    ("sgd-momentum", torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)),
]
IDS = [o[0] for o in OPTIMIZERS]
#: on a CPU: "auto" is the native C kernel where it builds (Adam, AdamW, Adagrad; foreach for the others),
#: "foreach" the torch paths
KERNELS = ["auto", "foreach"]


def _params() -> list[dict]:
    torch.manual_seed(0)
    return [
        {"params": [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))]},
        {"params": [nn.Parameter(torch.randn(7))], "lr": 1e-3},
    ]


def _set_grads(opt: torch.optim.Optimizer, step: int) -> None:
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            # one parameter skips every third step (grad None), so the "left out" path is exercised too
            p.grad = None if (gi, pi) == (0, 1) and step % 3 == 0 else torch.randn_like(p)


def _host_reads_on_non_sample_steps(monkeypatch, cls, kwargs, steps=range(2, 51), **tracker_kwargs):
    """(bad host reads made inside ``opt.step()`` at steps 2..50, none of them a trend-sample step, the tracker)."""
    opt = cls(_params(), **kwargs)
    tracker = ConditionTracker(opt, trend=NO_SAMPLES, **tracker_kwargs)
    _set_grads(opt, 1)
    opt.step()  # step 1: lazy optimizer state, first observation (not watched: it may set things up)
    counter = ReadCounter(monkeypatch)
    for step in steps:
        _set_grads(opt, step)
        counter.step(opt)
    assert detector_samples(tracker) == 0  # no sample step
    return counter.bad(opt), tracker


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_no_host_reads_in_optimizer_step_on_non_sample_steps(monkeypatch, name, cls, kwargs, kernel):
    bad, tracker = _host_reads_on_non_sample_steps(monkeypatch, cls, kwargs, kernel=kernel)
    assert not bad, f"{len(bad)} host reads inside optimizer.step() on non-sample steps: {bad[:5]}"
    assert tracker.observations == 50 and tracker.attached
    measured = tracker.compute()
    assert set(measured) == {f"{cls.__name__}/pg0", f"{cls.__name__}/pg1"}
    assert all(v["measured"] == 1.0 and v["steps"] == 50 for v in measured.values()), measured


@pytest.mark.parametrize("kernel", KERNELS)
def test_host_read_guard_catches_a_float_in_a_hook(monkeypatch, kernel):
    """The guard is not vacuous: an adapter that reads ``float(exp_avg_sq.sum())`` once per group and step
    (tests/host_reads.leaky_adam) makes it fail, with exactly those reads."""
    with leaky_adam() as cls:
        bad, tracker = _host_reads_on_non_sample_steps(monkeypatch, cls, dict(lr=1e-2, foreach=True), kernel=kernel)
    assert bad and {name for name, *_ in bad} == {"__float__"}
    assert len(bad) == 2 * 49  # two groups, steps 2..50
    assert all(v["measured"] == 1.0 for v in tracker.compute().values())  # a read, not an error


def _random_grads(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)


def _held_equal(held: list[torch.Tensor], expected: torch.Tensor) -> bool:
    """Whether some held tensor has ``expected``'s dtype, shape and values (bit for bit; NaN equals NaN)."""

    def same(t: torch.Tensor) -> bool:
        t = t.detach().cpu()
        if expected.is_floating_point():
            return bool(((t == expected) | (t.isnan() & expected.isnan())).all())
        return torch.equal(t, expected)

    return any(t.dtype == expected.dtype and t.shape == expected.shape and same(t) for t in held)


@pytest.mark.parametrize("kernel", KERNELS)
def test_held_tensors_finds_every_kind_of_state(kernel):
    """held_tensors() reaches the accumulators, η_{t−1}, the detector buffers and (recomputed mode) the (s, e)
    pairs (each found by its value, as the public checkpoint and stepsizes() give it), and held_bytes() counts
    their storages once each: the memory tests below rest on it."""
    opt = torch.optim.Adam(_params(), lr=1e-2, foreach=True)
    tracker = ConditionTracker(opt, trend=TrendOptions(warmup=1), kernel=kernel)
    for _ in range(5):
        _random_grads(opt)
        opt.step()
    held = tracker.held_tensors()
    saved = tracker.state_dict()
    assert len(saved["groups"]) == 2
    for group in saved["groups"]:
        assert _held_equal(held, group["accumulators"])
        assert group["detectors"] and all(d["count"] > 0 for d in group["detectors"].values())
        for det in group["detectors"].values():
            buffers = {k: v for k, v in det.items() if isinstance(v, torch.Tensor)}
            assert {"x", "y", "valid", "slope", "violation"} <= set(buffers)
            assert bool((buffers["x"] != 0).any())  # the samples' log steps: not a buffer of zeros
            for key, value in buffers.items():
                assert _held_equal(held, value), key
        etas = [entry["eta"] for entry in group["parameters"].values()]
        assert len(etas) == len(group["parameters"]) > 0
        for eta in etas:
            assert eta.dtype == torch.float32 and any(
                t.numel() >= eta.numel() and eta.reshape(-1).tolist() in _windows(t, eta.numel()) for t in held
            )
    # every kept η of a group (stepsizes(): the flat η of the latest step) is among the held tensors
    flat_held = torch.cat([t.detach().reshape(-1).cpu() for t in held if t.dtype == torch.float32])
    for name, values in tracker.stepsizes().items():
        assert values.numel() == sum(p.numel() for p in opt.param_groups[int(name[-1])]["params"])
        assert set(values.tolist()) <= set(flat_held.tolist()), name
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in held}
    assert tracker.held_bytes() == sum(n for _, n in storages)
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert 4 * numel < tracker.held_bytes() <= 4 * numel + 3 * 1024  # + ~1.1 KiB per group of constants

    recomputed = ConditionTracker(torch.optim.Adam(_params(), lr=1e-2), previous_stepsize="recomputed", kernel=kernel)
    for _ in range(3):
        _random_grads(recomputed.optimizer)
        recomputed.optimizer.step()
    held = recomputed.held_tensors()
    scales = [e["scales"] for g in recomputed.state_dict()["groups"] for e in g["parameters"].values()]
    assert len(scales) == 3 and all("eta" not in e for g in recomputed.state_dict()["groups"] for e in g["parameters"].values())
    rows = [row.tolist() for t in held if t.dim() in (1, 2) and t.shape[-1] == 2 for row in t.detach().cpu().reshape(-1, 2)]
    assert all(sc.tolist() in rows for sc in scales), (scales, rows)


def _windows(t: torch.Tensor, n: int) -> list[list[float]]:
    flat = t.detach().reshape(-1).cpu().tolist()
    return [flat[i : i + n] for i in range(len(flat) - n + 1)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_persistent_memory_and_tensor_count_do_not_grow(name, cls, kwargs, kernel):
    opt = cls(_params(), **kwargs)
    tracker = ConditionTracker(opt, trend=NO_SAMPLES, kernel=kernel)
    held = {}
    for step in range(1, 51):
        _random_grads(opt)
        opt.step()
        if step in (5, 50):
            held[step] = (tracker.held_bytes(), len(tracker.held_tensors()))
    (bytes5, count5), (bytes50, count50) = held[5], held[50]
    assert bytes50 == bytes5, f"tracker memory grew from {bytes5} to {bytes50} bytes between steps 5 and 50"
    assert count50 == count5, f"tracker holds {count50} tensors at step 50, {count5} at step 5"
    # and it is bounded: at most one float32 η per coordinate plus O(1) per group
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert bytes50 <= 4 * numel + 3 * 1024  # + ~1.1 KiB per group of constants (launch tables, detectors)


def test_persistent_memory_does_not_grow_through_trend_samples():
    """Same as above across many trend-sample steps (default warm-up is skipped with warmup=1)."""
    opt = torch.optim.Adam(_params(), lr=1e-2, foreach=True)
    tracker = ConditionTracker(opt, trend=TrendOptions(warmup=1))
    sizes = {}
    for step in range(1, 201):
        _random_grads(opt)
        opt.step()
        if step in (20, 200):
            sizes[step] = (tracker.held_bytes(), len(tracker.held_tensors()))
    assert detector_samples(tracker) > 20
    assert sizes[200] == sizes[20]


def test_to_device_builds_the_values_on_the_cpu():
    from lightning_adamtype.adapter_kit import to_device

    got = to_device([[1.5, 2.0], [3.0, 4.25]], torch.float64, torch.device("cpu"))
    assert got.dtype == torch.float64 and got.tolist() == [[1.5, 2.0], [3.0, 4.25]]
    assert to_device([3, 4], None, torch.device("cpu")).dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_does_not_synchronise_on_cuda():
    from lightning_adamtype.adapter_kit import to_device

    torch.cuda.set_sync_debug_mode("error")
    try:
        got = to_device([0.5, 0.25], torch.float32, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.device.type == "cuda" and got.cpu().tolist() == [0.5, 0.25]
