"""Regression guards for the tracker's hot path (no timing: these are deterministic and fast).

(a) On steps that are not trend-sample steps, ``ConditionTracker._post_step`` makes no host read of a tensor
    (Tensor.item / tolist / __bool__ / __float__ / __int__), except of the optimizer's own 0-dim CPU step
    counters and CPU tensor lr (reading those never synchronises a device).
(b) The persistent memory the tracker holds (accumulators, previous η, trend-detector buffers) does not grow
    with the number of steps.
(c) Neither does the number of tensors it holds.

The timing side lives in ``benchmarks/bench.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adamtype import ConditionTracker, TrendOptions

READS = ("item", "tolist", "__bool__", "__float__", "__int__")

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

#: no trend-detector sample before step 1000, so every step below is a "non-logging" step.
NO_SAMPLES = TrendOptions(warmup=1000)


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


class _ReadCounter:
    """Patches the host-reading Tensor methods; records (method, tensor) while ``depth > 0``."""

    def __init__(self) -> None:
        self.depth = 0
        self.calls: list[tuple[str, torch.Tensor]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *args, _name=name, _original=original, **kwargs):
                if self.depth:
                    self.calls.append((_name, t))
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

    def watch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Record only while ``ConditionTracker._post_step`` runs (patched before the tracker is created)."""
        original = ConditionTracker._post_step

        def post_step(tracker, *args, **kwargs):
            self.depth += 1
            try:
                return original(tracker, *args, **kwargs)
            finally:
                self.depth -= 1

        monkeypatch.setattr(ConditionTracker, "_post_step", post_step)


def _allowed_ids(opt: torch.optim.Optimizer) -> set[int]:
    """The optimizer's own 0-dim CPU step counters (and NAdam's mu_product) and CPU tensor learning rates."""
    allowed = set()
    for state in opt.state.values():
        for key in ("step", "mu_product"):
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() == 0:
                allowed.add(id(t))
    for group in opt.param_groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device.type == "cpu" and lr.dim() == 0:
            allowed.add(id(lr))
    return allowed


def _host_reads_on_non_sample_steps(monkeypatch, cls, kwargs, steps=range(2, 51), **tracker_kwargs):
    counter = _ReadCounter()
    counter.watch(monkeypatch)
    opt = cls(_params(), **kwargs)
    tracker = ConditionTracker(opt, trend=NO_SAMPLES, **tracker_kwargs)
    _set_grads(opt, 1)
    opt.step()  # step 1: lazy optimizer state, first observation (not watched: it may set things up)
    counter.install(monkeypatch)
    for step in steps:
        _set_grads(opt, step)
        opt.step()
    assert all(d.num_samples == 0 for g in tracker._groups for d in g.detectors.values())  # no sample step
    allowed = _allowed_ids(opt)
    bad = [(name, tuple(t.shape), t.dtype, t.device.type) for name, t in counter.calls if id(t) not in allowed]
    return bad, counter.calls, tracker


@pytest.mark.parametrize("kernel", ["auto", "foreach"])  # on a CPU: the native kernel, and the torch paths
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_no_host_reads_in_post_step_on_non_sample_steps(monkeypatch, name, cls, kwargs, kernel):
    bad, _, tracker = _host_reads_on_non_sample_steps(monkeypatch, cls, kwargs, kernel=kernel)
    assert not bad, f"{len(bad)} host reads inside ConditionTracker._post_step on non-sample steps: {bad[:5]}"
    assert tracker.observations == 50


def test_host_read_guard_catches_a_float_of_the_accumulators(monkeypatch):
    """The guard is not vacuous: a ``float(acc[0])`` added inside ``_post_step`` makes it fail."""
    original = ConditionTracker._observe_group

    def leaky(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        acc = self._groups[args[1]].accumulators
        if acc is not None:
            float(acc[0])
        return out

    monkeypatch.setattr(ConditionTracker, "_observe_group", leaky)
    bad, _, _ = _host_reads_on_non_sample_steps(monkeypatch, torch.optim.Adam, dict(lr=1e-2, foreach=True))
    assert bad and {name for name, *_ in bad} == {"__float__"}
    assert len(bad) == 2 * 49  # two groups, steps 2..50


def test_held_tensors_finds_every_kind_of_state():
    """The walk behind held_tensors() reaches accumulators, η_{t−1}, detector buffers and (s, e) pairs, and the
    byte count matches the storages: the memory tests below rest on it."""
    opt = torch.optim.Adam(_params(), lr=1e-2, foreach=True)
    tracker = ConditionTracker(opt, trend=TrendOptions(warmup=1))
    for step in range(1, 6):
        _random_grads(opt)
        opt.step()
    held = {id(t) for t in tracker.held_tensors()}
    for g in tracker._groups:
        assert id(g.accumulators) in held
        assert all(id(eta) in held for eta in g.previous.values())
        for det in g.detectors.values():
            assert all(id(v) in held for v in vars(det).values() if isinstance(v, torch.Tensor))
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert 4 * numel < tracker.held_bytes() <= 4 * numel + 3 * 1024  # + ~1.1 KiB per group of constants
    recomputed = ConditionTracker(torch.optim.Adam(_params(), lr=1e-2), previous_stepsize="recomputed")
    for _ in range(3):
        _random_grads(recomputed.optimizer)
        recomputed.optimizer.step()
    scales = [sc for g in recomputed._groups for sc in g.previous_scales.values()]
    assert scales and all(id(sc) in {id(t) for t in recomputed.held_tensors()} for sc in scales)


def _random_grads(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)


@pytest.mark.parametrize("kernel", ["auto", "foreach"])
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
    assert bytes50 <= 4 * numel + 3 * 1024  # + ~1.1 KiB per group of constants (the small-group row layout)


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
    assert sum(d.num_samples for g in tracker._groups for d in g.detectors.values()) > 20
    assert sizes[200] == sizes[20]


def test_to_device_builds_the_values_on_the_cpu():
    from lightning_adamtype.adapters import to_device

    got = to_device([[1.5, 2.0], [3.0, 4.25]], torch.float64, torch.device("cpu"))
    assert got.dtype == torch.float64 and got.tolist() == [[1.5, 2.0], [3.0, 4.25]]
    assert to_device([3, 4], None, torch.device("cpu")).dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_does_not_synchronise_on_cuda():
    from lightning_adamtype.adapters import to_device

    torch.cuda.set_sync_debug_mode("error")
    try:
        got = to_device([0.5, 0.25], torch.float32, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.device.type == "cuda" and got.cpu().tolist() == [0.5, 0.25]
