"""The one-pass backends' repeat step (:class:`lightning_adamtype.backends.steady.SteadyPlan`) against the
reference multi-tensor backend, across everything that may change between two optimizer steps.

Each case trains two identical models side by side, one tracked with ``kernel="native"`` or ``"triton"`` (Triton's
interpreter on the CPU; after its first full step the group runs through the plan) and one with ``kernel="foreach"``, and applies the same change to both
between two steps: a gradient missing, a state dict swapped or replaced, a state tensor replaced, the optimizer's
``load_state_dict``, an AMSGrad switch, coupled weight decay turned on, a parameter replaced in the group, a
non-contiguous gradient, step counts that differ within the group. The two trackers must give the same numbers
(the backends' summation orders differ: rtol 1e-5), and the plan must have run on the steps around the change and
declined the step where it applied.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_adamtype import ConditionTracker
from lightning_adamtype.backends import backend, steady_checks
from lightning_adamtype.backends.steady import SteadyPlan
from tiny_optimizers import TinyRMS  # noqa: E402

CPU = torch.device("cpu")
#: the one-pass backends that run here: native (the C library), triton (Triton's interpreter, without CUDA)
#: the plans tested: the native launch with the checks compiled (steady_checks) or in Python, and Triton's (which
#: checks in Python)
PLANS = ("native-compiled", "native-python", "triton")
KERNELS = [
    pytest.param(plan, marks=pytest.mark.skipif(backend(plan.split("-")[0]).unavailable(CPU) is not None,
                                                reason=f"{plan}: {backend(plan.split('-')[0]).unavailable(CPU)}"))
    for plan in PLANS
]


class _CountedChecks:
    """The compiled extension, its gather calls counted."""

    def __init__(self, module):
        self.module, self.calls, self.answers = module, 0, []

    def gather(self, *args):
        self.calls += 1
        self.answers.append(self.module.gather(*args))
        return self.answers[-1]

    def fill_pairs(self, *args):
        return self.module.fill_pairs(*args)


def _kernel(plan: str, monkeypatch) -> tuple[str, _CountedChecks | None]:
    """The kernel of ``plan``, its checks set up: compiled (waiting for the build, counted) or Python."""
    if plan == "native-compiled":
        module = steady_checks.wait(600)
        if module is None:
            pytest.skip(f"the compiled checks are unavailable: {steady_checks.build_info().reason}")
        counted = _CountedChecks(module)
        monkeypatch.setattr(steady_checks, "compiled", lambda: counted)
        return "native", counted
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_STEADY_CHECKS", "python")
    return plan.split("-")[0], None

STEPS, CHANGE_AT = 10, 5
KEYS = ("a", "b", "c", "c2", "a_mean", "c_mean", "activations", "inactive", "coordinates", "steps", "nonfinite_steps")


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _swap_states(opt, model):
    a, b = list(model.parameters())[:2]  # shapes differ: swap the dicts, then give each its own contents back
    opt.state[a], opt.state[b] = opt.state[b], opt.state[a]
    opt.state[a], opt.state[b] = dict(opt.state[b]), dict(opt.state[a])


def _replace_v(opt, model):
    p = next(iter(model.parameters()))
    opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"].clone() * 1.5


def _reload(opt, model):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _amsgrad(opt, model):
    for p in model.parameters():
        opt.state[p]["max_exp_avg_sq"] = opt.state[p]["exp_avg_sq"].clone()
    opt.param_groups[0]["amsgrad"] = True


def _weight_decay(opt, model):
    opt.param_groups[0]["weight_decay"] = 0.1


def _replace_param(opt, model):
    layer = model[2]
    old = layer.bias
    new = nn.Parameter(old.detach().clone() + 0.01)
    layer.bias = new
    params = opt.param_groups[0]["params"]
    params[next(i for i, p in enumerate(params) if p is old)] = new
    opt.state[new] = opt.state.pop(old)


def _lr(opt, model):
    opt.param_groups[0]["lr"] *= 0.3


CHANGES = {
    "none": lambda opt, model: None,
    "lr": _lr,
    "state-dicts-swapped": _swap_states,
    "v-replaced": _replace_v,
    "optimizer-load-state-dict": _reload,
    "amsgrad-switch": _amsgrad,
    "coupled-weight-decay": _weight_decay,
    "parameter-replaced": _replace_param,
}
#: changes that alter the gradients of the step instead (applied after backward)
def _drop_gradient(model):
    model[0].bias.grad = None


def _non_contiguous_gradient(model):
    model[0].weight.grad = model[0].weight.grad.t().contiguous().t()  # same values, transposed strides


def _expanded_gradient(model):
    # as many elements as the weight, one float of memory: a launch reading n floats from it would read past it
    model[0].weight.grad = torch.zeros(1).expand(model[0].weight.shape)


GRAD_CHANGES = {"gradient-missing": _drop_gradient, "gradient-non-contiguous": _non_contiguous_gradient,
                "gradient-expanded": _expanded_gradient}


class _TaggedParameter(nn.Parameter):
    """A Parameter subclass (as some libraries use): the compiled checks read only plain tensors and leave it to
    the Python checks."""


def _with_tagged_parameters(model: nn.Module) -> nn.Module:
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, _TaggedParameter(p.detach().clone()))
    return model


def _train(kernel: str, change=None, grad_change=None, skip_first_steps_of=None, dtype=torch.float32, tagged=False):
    model = _with_tagged_parameters(_model(dtype)) if tagged else _model(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = ConditionTracker(opt, kernel=kernel)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, STEPS + 1):
        x, y = torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 3, generator=gen).to(dtype)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        if skip_first_steps_of is not None and t <= 2:
            getattr(model[2], skip_first_steps_of).grad = None  # this parameter's step count lags by 2
        if t == CHANGE_AT:
            if change is not None:
                change(opt, model)
            if grad_change is not None:
                grad_change(model)
        opt.step()
    return tracker, [p.detach().clone() for p in model.parameters()]


class _Counted:
    """Counts SteadyPlan.run's answers: steps taken, steps declined."""

    def __init__(self, monkeypatch):
        self.taken = self.declined = 0
        original = SteadyPlan.run

        def run(plan, *args):
            finite = original(plan, *args)
            if finite is None:
                self.declined += 1
            else:
                self.taken += 1
            return finite

        monkeypatch.setattr(SteadyPlan, "run", run)


def _assert_same_numbers(native: ConditionTracker, foreach: ConditionTracker) -> None:
    got, expected = native.compute()["Adam/pg0"], foreach.compute()["Adam/pg0"]
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-12), (key, got[key], expected[key])
    shares_native, shares_foreach = native.tensor_shares()["Adam/pg0"], foreach.tensor_shares()["Adam/pg0"]
    assert [name for name, _ in shares_native] == [name for name, _ in shares_foreach]
    for (name, row), (_, expected_row) in zip(shares_native, shares_foreach):
        assert row == pytest.approx(expected_row, rel=1e-4, abs=1e-12), name


#: the checks are the plan's, the same for both launches: Triton's (slow) interpreter runs the cases that reach its
#: launch differently (none, a replaced v's address, the switch's other v, a reload's new state dicts)
TRITON_CASES = ("none", "v-replaced", "amsgrad-switch", "optimizer-load-state-dict")


@pytest.mark.parametrize("name,plan", [
    pytest.param(name, plan.values[0], marks=plan.marks, id=f"{name}-{plan.values[0]}")
    for plan in KERNELS for name in CHANGES if plan.values[0] != "triton" or name in TRITON_CASES
])
def test_a_change_between_steps_gives_the_reference_numbers(name, plan, monkeypatch):
    kernel, checks = _kernel(plan, monkeypatch)
    counted = _Counted(monkeypatch)
    native, params_native = _train(kernel, change=CHANGES[name])
    taken, declined = counted.taken, counted.declined
    if checks is not None:  # every step the plan took went through the compiled checks
        assert checks.calls >= taken > 0
    foreach, params_foreach = _train("foreach", change=CHANGES[name])
    assert counted.taken == taken and counted.declined == declined  # (no plan on the foreach backend)
    assert all(torch.equal(a, b) for a, b in zip(params_native, params_foreach))
    assert native.backends() == {"Adam/pg0": kernel}
    _assert_same_numbers(native, foreach)
    if name in ("none", "lr"):
        assert (taken, declined) == (STEPS - 1, 0)  # every step after the first
    elif name == "coupled-weight-decay":
        assert (taken, declined) == (CHANGE_AT - 2, 1)  # no plan is built while the group has coupled weight decay
    elif name == "parameter-replaced":
        # replaced after backward: the new parameter has no gradient at the change and its first one the step after
        # (declined again; that step has η_{t−1} for only some parameters, so the foreach backend takes it and the
        # native step after it builds the next plan)
        assert (taken, declined) == (STEPS - 4, 2)
    else:
        assert (taken, declined) == (STEPS - 2, 1)  # declined at the change; the general step there builds a new one


@pytest.mark.parametrize("plan", KERNELS)
@pytest.mark.parametrize("name", list(GRAD_CHANGES))
def test_a_gradient_change_gives_the_reference_numbers(name, plan, monkeypatch):
    kernel, _ = _kernel(plan, monkeypatch)
    counted = _Counted(monkeypatch)
    native, _ = _train(kernel, grad_change=GRAD_CHANGES[name])
    foreach, _ = _train("foreach", grad_change=GRAD_CHANGES[name])
    _assert_same_numbers(native, foreach)
    assert counted.declined >= 1 and counted.taken >= STEPS - 5


@pytest.mark.parametrize("plan", [p for p in KERNELS if p.values[0] != "triton"])
def test_a_float64_group_runs_the_plan_with_the_reference_numbers(plan, monkeypatch):
    """A float64 model on the native kernel: every step after the first through the plan (η, the sums and the table
    in float64), the numbers the foreach backend gives (rtol 1e-12: both in float64), training untouched."""
    kernel, checks = _kernel(plan, monkeypatch)
    counted = _Counted(monkeypatch)
    native, params_native = _train(kernel, dtype=torch.float64)
    assert (counted.taken, counted.declined) == (STEPS - 1, 0)
    if checks is not None:
        assert checks.calls == STEPS - 1
    foreach, params_foreach = _train("foreach", dtype=torch.float64)
    assert native.backends() == {"Adam/pg0": "native"} and foreach.backends() == {"Adam/pg0": "foreach"}
    assert all(torch.equal(a, b) for a, b in zip(params_native, params_foreach))
    got, expected = native.compute()["Adam/pg0"], foreach.compute()["Adam/pg0"]
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-300), (key, got[key], expected[key])


@pytest.mark.parametrize("plan", [p for p in KERNELS if p.values[0] != "triton"])
def test_parameter_subclasses_run_the_plan_through_the_python_checks(plan, monkeypatch):
    """Parameters of a subclass: the compiled gather declines them (it reads plain tensors only) and the same
    step's Python checks take it, so the plan still runs every step after the first, with the reference numbers."""
    kernel, checks = _kernel(plan, monkeypatch)
    counted = _Counted(monkeypatch)
    native, params_native = _train(kernel, tagged=True)
    assert (counted.taken, counted.declined) == (STEPS - 1, 0)
    if checks is not None:
        assert checks.answers == [0] * (STEPS - 1)  # asked every step, declined every step: the Python checks took it
    foreach, params_foreach = _train("foreach", tagged=True)
    assert all(torch.equal(a, b) for a, b in zip(params_native, params_foreach))
    _assert_same_numbers(native, foreach)


@pytest.mark.parametrize("plan", KERNELS)
def test_step_counts_that_differ_within_the_group(plan, monkeypatch):
    """A parameter without a gradient at the first two steps lags two steps behind the others: its (s, e) row is
    that of its own t."""
    kernel, _ = _kernel(plan, monkeypatch)
    counted = _Counted(monkeypatch)
    native, _ = _train(kernel, skip_first_steps_of="bias")
    foreach, _ = _train("foreach", skip_first_steps_of="bias")
    _assert_same_numbers(native, foreach)
    assert counted.taken >= STEPS - 4


@pytest.mark.parametrize("plan", KERNELS)
def test_checkpoint_between_plan_steps_resumes_with_the_same_numbers(plan, monkeypatch):
    """state_dict() taken while the plan runs carries every parameter's η_{t−1} as of the latest step."""
    kernel, _ = _kernel(plan, monkeypatch)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = ConditionTracker(opt, kernel=kernel)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(STEPS)]
    resumed = None
    for t, (x, y) in enumerate(batches, 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if t == CHANGE_AT:
            saved = tracker.state_dict()
            resumed_opt_state = copy.deepcopy(opt.state_dict())
    # a second run that resumes from step CHANGE_AT
    model2 = _model()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    for t, (x, y) in enumerate(batches[:CHANGE_AT], 1):  # the same weights as the first run at CHANGE_AT
        opt2.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model2(x), y).backward()
        opt2.step()
    opt2.load_state_dict(resumed_opt_state)
    resumed = ConditionTracker(opt2, kernel=kernel)
    resumed.load_state_dict(saved)
    for x, y in batches[CHANGE_AT:]:
        opt2.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model2(x), y).backward()
        opt2.step()
    got, expected = resumed.compute()["Adam/pg0"], tracker.compute()["Adam/pg0"]
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-15), key


class _HostStepAdam(TinyRMS):
    """TinyRMS with α_t = lr·√(1 − β^t): (s, e) depend on its int step count (its own class: its own adapter)."""

    def __init__(self, params):
        super().__init__(params, beta=0.99, corrected=True)


class _HostStepAdapter:
    """η = s / (√v + e), s = lr·√(1 − β^t), e = eps: (s, e) depend on the state only through t."""

    scalars_by_step = True

    def sqrt_form(self, group, states):
        pairs = [(group["lr"] * (1 - group["beta"] ** max(float(s["step"]), 1.0)) ** 0.5, group["eps"]) for s in states]
        return [s["v"] for s in states], pairs

    def effective_stepsizes(self, group, states):
        vs, pairs = self.sqrt_form(group, states)
        return [se[0] / (v.sqrt() + se[1]) for v, se in zip(vs, pairs)]

    def coupled_weight_decay(self, group):
        return 0.0


@pytest.mark.parametrize("plan", KERNELS)
def test_host_number_step_counts_are_read_afresh(plan, monkeypatch):
    """An optimizer whose step counts are Python ints (a new object every step): the plan reads them from the state
    at each step and runs every step after the first, with the reference numbers."""
    kernel, _ = _kernel(plan, monkeypatch)
    from lightning_adamtype import register_adapter, unregister_adapter

    register_adapter(_HostStepAdam, _HostStepAdapter())
    try:
        counted = _Counted(monkeypatch)
        trackers = {}
        for name in (kernel, "foreach"):
            model = _model()
            opt = _HostStepAdam(model.parameters())
            trackers[name] = ConditionTracker(opt, kernel=name)
            gen = torch.Generator().manual_seed(1)
            for _ in range(STEPS):
                x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
                opt.zero_grad(set_to_none=True)
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        assert (counted.taken, counted.declined) == (STEPS - 1, 0)
        got, expected = (trackers[k].compute()["_HostStepAdam/pg0"] for k in (kernel, "foreach"))
        for key in KEYS:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-12), key
    finally:
        unregister_adapter(_HostStepAdam)


def test_a_plan_whose_call_fails_hands_the_step_to_the_general_path(monkeypatch):
    """An error inside the plan's launch (here the C call raising from the third step on) is a backend failure: one
    warning, the native backend is not used again, the foreach backend takes that step and the next ones with the
    kept η_{t−1}, and the numbers are the foreach tracker's; training is untouched."""
    from lightning_adamtype.backends import native

    if backend("native").unavailable(CPU) is not None:
        pytest.skip(backend("native").unavailable(CPU))
    original, calls = native.GroupLaunch.call, []

    def failing(launch, *args):
        calls.append(1)
        if len(calls) >= 3:
            raise OSError("simulated failure of the C call")
        original(launch, *args)

    monkeypatch.setattr(native.GroupLaunch, "call", failing)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracked, params_tracked = _train("native")
    monkeypatch.setattr(native.GroupLaunch, "call", original)
    reference, params_reference = _train("foreach")
    ours = [str(w.message) for w in caught if "lightning_adamtype" in str(w.message)]
    assert len(ours) == 1 and "the native backend failed (OSError: simulated failure" in ours[0], ours
    assert len(calls) == 3  # never called again after the failure
    assert tracked.backends() == {"Adam/pg0": "foreach"}
    assert all(torch.equal(a, b) for a, b in zip(params_tracked, params_reference))
    _assert_same_numbers(tracked, reference)


def test_a_plan_that_cannot_be_built_costs_nothing_but_time(monkeypatch):
    """An error while building a plan (here SteadyPlan.build raising) leaves the group on the general path: no
    warning, the group measured every step with the reference numbers."""
    if backend("native").unavailable(CPU) is not None:
        pytest.skip(backend("native").unavailable(CPU))

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while building a plan")

    monkeypatch.setattr(SteadyPlan, "build", broken)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracked, _ = _train("native")
    assert not [str(w.message) for w in caught if "lightning_adamtype" in str(w.message)]
    assert tracked.backends() == {"Adam/pg0": "native"}
    reference, _ = _train("foreach")
    _assert_same_numbers(tracked, reference)
