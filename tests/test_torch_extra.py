"""torch's Adadelta, Adafactor and SparseAdam (measured), the declined optimizers (their reason in the warning), and
the check of an adapter's first step (an adapter returning garbage is disabled with one warning, never trusted).

The float64 comparisons of Adadelta and Adafactor are in tests/test_reference.py (their CONFIGS in tests/runs.py);
here: training with the tracker is bitwise the training without it, and SparseAdam's float64 comparison (its sparse
gradients need a model of its own: embeddings with ``sparse=True`` and a hand-made uncoalesced sparse gradient).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_adamtype import ConditionTracker, register_adapter, unregister_adapter
from reference import Reference
from runs import RTOL
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


SPARSE = [
    ("sparse-adam", lambda ps: torch.optim.SparseAdam(ps, lr=1e-2)),
    ("sparse-adam-maximize-betas", lambda ps: torch.optim.SparseAdam(ps, lr=3e-2, betas=(0.5, 0.9), eps=1e-6, maximize=True)),
]


@pytest.mark.parametrize("kernel", ["auto", "foreach"])
@pytest.mark.parametrize("name,make", SPARSE, ids=[m[0] for m in SPARSE])
def test_sparse_adam_tracked_training_is_bitwise_the_untracked_one(name, make, kernel):
    """SparseAdam on an ``nn.Embedding(sparse=True)``: measured (by the foreach backend, without a warning), and
    the training bitwise that of its untracked twin (tests/twins.py asserts it after every step)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = run_twins(make, sparse=True, tracker_kwargs=dict(kernel=kernel))
        got = tracker.compute()
    assert not _ours(caught), _ours(caught)
    (values,) = got.values()
    assert values["measured"] == 1.0 and values["steps"] == 11  # (12 steps, one without a gradient)
    assert all(math.isfinite(values[k]) and values[k] > 0 for k in ("a", "b", "c", "activations", "inactive"))
    assert tracker.backends() == {"SparseAdam/pg0": "foreach"}


DECLINED = [
    ("LBFGS", lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=2), "not a diagonal Adam-type method"),
    ("Rprop", lambda ps: torch.optim.Rprop(ps, lr=1e-2), "sign(g)"),
    ("ASGD", lambda ps: torch.optim.ASGD(ps, lr=1e-2), "before the step"),
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


# ---------------------------------------------------------------------------------------------- SparseAdam's oracle

SPARSE_STEPS = 14
SPARSE_NONE_STEPS = {3, 7, 8}  # 1-based steps at which `table` has no gradient


class _SparseModel(torch.nn.Module):
    """Two sparse embeddings (row batches with repeats, so their gradients are uncoalesced) and a table whose sparse
    gradient is made by hand: uncoalesced, with explicit zeros among its values."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Embedding(12, 3, sparse=True)
        self.second = torch.nn.Embedding(7, 2, sparse=True)
        self.table = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, rows_first: torch.Tensor, rows_second: torch.Tensor) -> torch.Tensor:
        # (the first embedding's last column is touched but gets a zero gradient: it steps all the same)
        return torch.tanh(self.first(rows_first)[:, :2] + self.second(rows_second))


def _table_gradient(gen: torch.Generator) -> torch.Tensor:
    indices = torch.randint(0, 4, (1, 6), generator=gen), torch.randint(0, 3, (1, 6), generator=gen)
    index = torch.cat(indices)
    index[:, 5] = index[:, 0]  # a repeated index: coalesce adds them
    values = torch.randn(6, generator=gen)
    values[1] = 0.0  # an explicit zero: touched, so counted
    return torch.sparse_coo_tensor(index, values, (4, 3))


def _sparse_run(kernel: str, coordinates: str, maximize: bool):
    torch.manual_seed(0)
    model = _SparseModel()
    groups = [{"params": [model.first.weight]}, {"params": [model.second.weight, model.table], "lr": 2e-2}]
    opt = torch.optim.SparseAdam(groups, lr=4e-2, betas=(0.8, 0.9), maximize=maximize)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    tracker = ConditionTracker(opt, kernel=kernel, coordinates=coordinates)
    ref = Reference(opt, coordinates=coordinates)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, SPARSE_STEPS + 1):
        rows_first, rows_second = torch.randint(0, 12, (5,), generator=gen), torch.randint(0, 7, (4,), generator=gen)
        rows_second[0] = rows_second[1]
        y = torch.randn(5, 2, generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(rows_first, rows_second[torch.arange(5) % 4]), y).backward()
        if t not in SPARSE_NONE_STEPS:
            model.table.grad = _table_gradient(gen)
        ref.before_step()
        opt.step()
        ref.after_step()
        sched.step()
    return tracker, ref


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("coordinates", ["active", "all"])
@pytest.mark.parametrize("kernel", ["auto", "foreach"])
def test_sparse_adam_matches_float64_reference(kernel, coordinates, maximize):
    """SparseAdam against the oracle's replay of its lazy update (tests/reference.py, ``eta_sparse_adam``): two
    groups, an lr schedule, a parameter without a gradient at some steps; the coordinates counted at a step are those
    its sparse gradient touched (repeated indices, an explicit zero value and a zero-gradient column included)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker, ref = _sparse_run(kernel, coordinates, maximize)
        got = tracker.compute()
    assert not _ours(caught), _ours(caught)
    expected = {f"SparseAdam/pg{i}": e for i, e in enumerate(ref.compute())}
    assert set(got) == set(expected)
    for name, exp in expected.items():
        assert exp is not None and got[name]["steps"] == exp["steps"] == SPARSE_STEPS, name
        for key, rtol in RTOL.items():
            assert got[name][key] == pytest.approx(exp[key], rel=rtol, abs=1e-12), (name, key, got[name][key], exp[key])
        assert got[name]["activations"] == exp["activations"] > 0, (name, got[name]["activations"], exp["activations"])
        assert got[name]["inactive"] == exp["inactive"] > 0, (name, got[name]["inactive"], exp["inactive"])
        assert got[name]["c"] > 0 and got[name]["c2"] > 0
    # the last step's group 1 holds the table (its gradient is there at step 14) and the second embedding
    assert got["SparseAdam/pg1"]["coordinates"] == 7 * 2 + 4 * 3
