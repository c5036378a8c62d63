"""torch's Adadelta and Adafactor (measured), the declined optimizers (their reason in the warning), and the check
of an adapter's first step (an adapter returning garbage is disabled with one warning, never trusted).

The float64 comparisons of Adadelta and Adafactor are in tests/test_reference.py (their CONFIGS in tests/runs.py);
here: training with the tracker is bitwise the training without it.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_adamtype import ConditionTracker, register_adapter, unregister_adapter
from twins import run_twins

MEASURED = [
    ("adadelta", lambda ps: torch.optim.Adadelta(ps, lr=1.0)),
    ("adadelta-wd-maximize-foreach", lambda ps: torch.optim.Adadelta(ps, lr=0.5, weight_decay=0.1, maximize=True, foreach=True)),
    ("adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-2)),
    ("adafactor-wd-foreach", lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1, d=2.0, foreach=True)),
]


def _ours(caught) -> list[str]:
    return [str(w.message) for w in caught if "lightning_adamtype" in str(w.message)]


@pytest.mark.parametrize("kernel", ["auto", "foreach"])
@pytest.mark.parametrize("name,make", MEASURED, ids=[m[0] for m in MEASURED])
def test_tracked_training_is_bitwise_the_untracked_one(name, make, kernel):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = run_twins(make, tracker_kwargs=dict(kernel=kernel))
        got = tracker.compute()
    assert not _ours(caught), _ours(caught)
    (values,) = got.values()
    assert values["measured"] == 1.0 and values["steps"] == 12
    assert all(math.isfinite(values[k]) and values[k] > 0 for k in ("a", "b", "c"))


DECLINED = [
    ("LBFGS", lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=2), "not a diagonal Adam-type method"),
    ("Rprop", lambda ps: torch.optim.Rprop(ps, lr=1e-2), "sign(g)"),
    ("ASGD", lambda ps: torch.optim.ASGD(ps, lr=1e-2), "before the step"),
    ("SparseAdam", lambda ps: torch.optim.SparseAdam(ps, lr=1e-2), "sparse"),
]
if hasattr(torch.optim, "Muon"):
    DECLINED.append(("Muon", lambda ps: torch.optim.Muon([p for p in ps if p.dim() == 2], lr=1e-2), "not a diagonal Adam-type method"))


@pytest.mark.parametrize("name,make,reason", DECLINED, ids=[d[0] for d in DECLINED])
def test_declined_optimizer_warns_with_its_reason_and_trains_untouched(name, make, reason):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    opt = make(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = ConditionTracker(opt)
    (message,) = _ours(caught)
    assert name in message and "declined" in message and reason in message and "register_adapter" in message
    assert not tracker.attached and tracker.compute() == {}


def test_a_registered_adapter_overrides_a_declined_class():
    class ConstantASGD(torch.optim.ASGD):
        pass

    class Uniform:
        def uniform_stepsize(self, group):
            return float(group["lr"])

        def coupled_weight_decay(self, group):
            return float(group["weight_decay"])

    register_adapter(ConstantASGD, Uniform())
    try:
        tracker = run_twins(lambda ps: ConstantASGD(ps, lr=1e-2, lambd=0.0))
    finally:
        unregister_adapter(ConstantASGD)
    (values,) = tracker.compute().values()
    assert values["measured"] == 1.0 and values["a"] == pytest.approx(12 * 1e-2)


# ---------------------------------------------------------------------------------------------- the first-step check


class BadAdam(torch.optim.Adam):
    """torch's Adam under another name, so that a (bad) adapter can be registered for it alone."""


def _eta(group, state):
    return group["lr"] / (state["exp_avg_sq"].sqrt() + group["eps"])


class _BadAdapter:
    def __init__(self, make_eta):
        self.make_eta = make_eta

    def effective_stepsizes(self, group, states):
        return [self.make_eta(group, s) for s in states]

    def coupled_weight_decay(self, group):
        return 0.0


BAD = [
    ("wrong-shape", lambda g, s: _eta(g, s).reshape(-1)[:-1] if _eta(g, s).numel() > 1 else _eta(g, s).reshape(1, 1), "shape"),
    ("int-dtype", lambda g, s: _eta(g, s).to(torch.int32), "torch.int32"),
    ("nan", lambda g, s: torch.full_like(_eta(g, s), float("nan")), "non-finite η (nan)"),
    ("negative", lambda g, s: -_eta(g, s), "negative η"),
]


@pytest.mark.parametrize("name,make_eta,problem", BAD, ids=[b[0] for b in BAD])
def test_an_adapter_returning_garbage_is_disabled_with_one_warning(name, make_eta, problem):
    register_adapter(BadAdam, _BadAdapter(make_eta))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = run_twins(lambda ps: BadAdam(ps, lr=1e-2))  # (asserts the training is bitwise untouched)
            got = tracker.compute()
    finally:
        unregister_adapter(BadAdam)
    (message,) = _ours(caught)
    assert "_BadAdapter" in message and problem in message and "no longer measured" in message, message
    assert tracker.attached
    assert all(v["measured"] == 0.0 and v["steps"] == 0.0 for v in got.values()), got


def test_non_finite_gradients_are_not_blamed_on_the_adapter():
    """A first step whose gradient is NaN gives a NaN η from a correct adapter: counted as a non-finite step, and
    the group stays measured."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=1e-2)
    tracker = ConditionTracker(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(3):
            p.grad = torch.full((3,), float("nan")) if t == 0 else torch.ones(3)
            opt.step()
        (values,) = tracker.compute().values()
    assert values["measured"] == 1.0 and values["nonfinite_steps"] >= 1.0
