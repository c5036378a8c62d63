"""The tracker against a plain float64 oracle (tests/reference.py) for every supported optimizer and implementation.

Each run: a small float32 model with two parameter groups (different lr), an LR scheduler stepping every step,
one parameter whose grad is None at some steps, at least 12 steps. Tolerances (the tracker works in float32,
the oracle in float64 from the same optimizer state): rtol 1e-4 for a, b, a_mean, variance_ratio;
1e-3 for c, c2, c_mean, bias_ratio; steps exactly.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import lightning_adamtype
from lightning_adamtype import ConditionTracker
from lightning_adamtype.adapters import AdamAdapter

try:  # tests/ as a package or as plain sibling modules
    from .reference import Reference, f64, radam_rectified
except ImportError:
    from reference import Reference, f64, radam_rectified

from tiny_optimizers import TinyRMS  # noqa: E402
from runs import (  # noqa: E402
    CONFIG_IDS, CONFIGS, STEPS, A, AW, assert_matches, assert_same, make_run, train,
)

# ---------------------------------------------------------------------------------------------- the main comparison


@pytest.mark.parametrize("kernel", ["auto", "foreach"])  # on a CPU: the native kernel, and the torch paths
@pytest.mark.parametrize("attach_after", [0, 3], ids=["from-start", "attached-after-3"])
@pytest.mark.parametrize("name,cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_float64_reference(name, cls, kwargs, attach_after, kernel):
    model, opt, sched, data = make_run(cls, kwargs)
    # A tracker attached late sees the optimizer mid-run; the oracle starts observing at the same point.
    train(model, opt, sched, data, range(1, attach_after + 1))
    tracker = ConditionTracker(opt, kernel=kernel)
    ref = Reference(opt)
    train(model, opt, sched, data, range(attach_after + 1, STEPS + 1), ref)
    got = assert_matches(tracker, ref)

    assert len(got) == 2
    for values in got.values():
        assert values["steps"] == STEPS - attach_after
        assert values["a"] > 0 and values["b"] > 0
        # the scheduler changes lr every step, so η moves and c is strictly positive
        assert values["c"] > 0 and values["c2"] > 0
    if kwargs.get("amsgrad"):
        # the maximum must matter, or the test could not tell max_exp_avg_sq from exp_avg_sq
        assert any(not torch.equal(s["max_exp_avg_sq"], s["exp_avg_sq"]) for s in opt.state.values())
    if cls is torch.optim.RAdam:
        steps_seen = {float(s["step"]) for s in opt.state.values()}
        group = opt.param_groups[0]
        branches = {radam_rectified(group, t) for t in range(attach_after + 1, STEPS + 1)}
        assert branches == {True, False}, steps_seen


CUDA_CONFIGS = [
    ("adam-fused", A, dict(lr=1e-2, fused=True, weight_decay=0.1)),
    ("adam-capturable-foreach", A, dict(lr=1e-2, capturable=True, foreach=True)),
    ("adam-capturable-forloop", A, dict(lr=1e-2, capturable=True, foreach=False)),
    ("adamw-amsgrad-fused", AW, dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), fused=True)),
    ("adagrad-foreach", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, foreach=True)),
    ("rmsprop-capturable", torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5, capturable=True)),
    ("sgd-fused", torch.optim.SGD, dict(lr=0.1, momentum=0.9, fused=True)),
    ("adamax-capturable", torch.optim.Adamax, dict(lr=2e-2, capturable=True, foreach=True)),
    ("nadam-capturable", torch.optim.NAdam, dict(lr=2e-2, capturable=True, foreach=True)),
    ("radam-capturable", torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9), capturable=True, foreach=True)),
    ("radam-capturable-forloop", torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9), capturable=True, foreach=False)),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (device step counters, fused/capturable paths)")
@pytest.mark.parametrize("name,cls,kwargs", CUDA_CONFIGS, ids=[c[0] for c in CUDA_CONFIGS])
def test_matches_float64_reference_cuda(name, cls, kwargs):
    """The device-tensor paths (step counters on the GPU, RAdam's torch.where branch) against the same oracle."""
    model, opt, sched, data = make_run(cls, kwargs, device="cuda")
    train(model, opt, sched, data, range(1, 3))
    tracker = ConditionTracker(opt)
    ref = Reference(opt)
    train(model, opt, sched, data, range(3, STEPS + 1), ref)
    got = assert_matches(tracker, ref)
    assert all(v["steps"] == STEPS - 2 and v["c"] > 0 for v in got.values())


def test_reference_counts_by_hand():
    """The oracle itself on a hand-computable case: SGD, one coordinate, constant lr, c only from step 2."""
    p = nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref = Reference(opt)
    for _ in range(3):
        p.grad = torch.tensor([2.0])
        ref.before_step()
        opt.step()
        ref.after_step()
        sched.step()
    (r,) = ref.compute()
    # η = 0.5, 0.25, 0.125; g = 2
    assert r["steps"] == 3
    assert r["a"] == pytest.approx(0.875)
    assert r["b"] == pytest.approx(4 * (0.25 + 0.0625 + 0.015625))
    assert r["c"] == pytest.approx(0.25 + 0.125)
    assert r["c2"] == pytest.approx(0.0625 + 0.015625)


def test_group_without_any_grad_at_some_steps():
    """A group whose only parameter has no grad at a step: not a step for that group; c restarts after the gap."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    lonely = nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([{"params": [w]}, {"params": [lonely], "lr": 3e-3}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    tracker = ConditionTracker(opt)
    ref = Reference(opt)
    for t in range(1, 13):
        w.grad = torch.randn(3)
        lonely.grad = None if t in {3, 4, 8} else torch.randn(4)
        ref.before_step()
        opt.step()
        ref.after_step()
        sched.step()
    got = assert_matches(tracker, ref)
    assert got["Adam/pg0"]["steps"] == 12
    assert got["Adam/pg1"]["steps"] == 9


# ---------------------------------------------------------------------------------------------- LR as a tensor


@pytest.mark.parametrize("impl", [dict(foreach=False), dict(fused=True)], ids=["forloop", "fused"])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_tensor_lr(cls, impl):
    model, opt, sched, data = make_run(cls, dict(lr=torch.tensor(1e-2), **impl))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["lr"].dim() == 0
    tracker = ConditionTracker(opt)
    ref = Reference(opt)
    train(model, opt, sched, data, range(1, STEPS + 1), ref)
    got = assert_matches(tracker, ref)
    assert all(math.isfinite(v["a"]) and v["a"] > 0 for v in got.values())


# ---------------------------------------------------------------------------------------------- unsupported / custom


def test_unsupported_optimizer_warns_once_and_trains():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3))
    opt = torch.optim.LBFGS([p], lr=0.1, max_iter=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = ConditionTracker(opt)
        before = p.detach().clone()

        def closure():
            opt.zero_grad()
            loss = ((p - 1.0) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(4):
            opt.step(closure)
        tracker.compute()
    ours = [w for w in caught if "lightning_adamtype" in str(w.message) or "LBFGS" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "LBFGS" in message and "register_adapter" in message
    assert not torch.equal(p.detach(), before)  # training went on
    assert tracker.compute() == {}


class TinyRMSAdapter:
    def effective_stepsizes(self, group, states):
        return [group["lr"] / (s["v"].sqrt() + group["eps"]) for s in states]

    def coupled_weight_decay(self, group):
        return 0.0


def tiny_rms_eta(group, state, p):
    return group["lr"] / (f64(state["v"]).sqrt() + group["eps"])


class TinySignSGD(torch.optim.Optimizer):
    """x ← x − lr·sign(g)... kept stateless on purpose; mapped as a uniform-η method (η = lr)."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class UniformAdapter:
    def uniform_stepsize(self, group):
        return group["lr"]

    def coupled_weight_decay(self, group):
        return 0.0


def test_custom_adapter_makes_custom_optimizer_tracked():
    model, _, _, data = make_run(torch.optim.SGD, dict(lr=0.1))
    with pytest.warns(UserWarning, match="register_adapter"):
        untracked = ConditionTracker(TinyRMS(model.parameters()))
    assert not untracked.attached

    lightning_adamtype.register_adapter(TinyRMS, TinyRMSAdapter())
    model, _, _, data = make_run(torch.optim.SGD, dict(lr=0.1))
    opt = TinyRMS([{"params": [model.l1.weight, model.l1.bias]}, {"params": [model.l2.weight, model.extra], "lr": 3e-3}])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker = ConditionTracker(opt)
    ref = Reference(opt, eta_fn=tiny_rms_eta)
    train(model, opt, sched, data, range(1, STEPS + 1), ref)
    got = assert_matches(tracker, ref)
    assert got["TinyRMS/pg0"]["steps"] == STEPS and got["TinyRMS/pg0"]["c"] > 0


def test_custom_uniform_adapter_on_stateless_optimizer():
    """An optimizer without per-parameter state (like plain SGD) mapped with ``uniform_stepsize`` is tracked."""
    lightning_adamtype.register_adapter(TinySignSGD, UniformAdapter())
    model, _, _, data = make_run(torch.optim.SGD, dict(lr=0.1))
    opt = TinySignSGD([{"params": [model.l1.weight, model.l1.bias]}, {"params": [model.l2.weight, model.extra], "lr": 3e-3}])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    tracker = ConditionTracker(opt)
    ref = Reference(opt, eta_fn=lambda g, s, p: torch.full(p.shape, float(g["lr"]), dtype=torch.float64))
    train(model, opt, sched, data, range(1, STEPS + 1), ref)
    assert_matches(tracker, ref)


# ---------------------------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize(
    "cls,kwargs",
    [(torch.optim.Adam, dict(lr=1e-2, foreach=True)), (torch.optim.SGD, dict(lr=0.1, momentum=0.9))],
    ids=["Adam", "SGD"],
)
def test_remove_stops_accumulation(cls, kwargs):
    model, opt, sched, data = make_run(cls, kwargs)
    tracker = ConditionTracker(opt)
    ref = Reference(opt)
    train(model, opt, sched, data, range(1, 7), ref)
    before = assert_matches(tracker, ref)
    tracker.remove()
    assert not tracker.attached
    train(model, opt, sched, data, range(7, STEPS + 1))
    assert_same(tracker.compute(), before, rel=0.0)
    assert tracker.observations == 6


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
        (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, fused=True)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
        (torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9))),
        (torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5)),
    ],
    ids=["Adam", "AdamW", "SGD", "RAdam", "RMSprop"],
)
@pytest.mark.parametrize("split", [5, 6], ids=["resume-after-5", "resume-after-6-gap"])
def test_state_dict_resume_matches_uninterrupted(cls, kwargs, split):
    # uninterrupted
    model, opt, sched, data = make_run(cls, kwargs)
    full = ConditionTracker(opt)
    train(model, opt, sched, data, range(1, STEPS + 1))
    expected = full.compute()

    # interrupted at `split`; the tracker's state goes through torch.save / torch.load(weights_only=True)
    model, opt, sched, data = make_run(cls, kwargs)
    first = ConditionTracker(opt)
    train(model, opt, sched, data, range(1, split + 1))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.remove()
    model2, opt2, sched2 = copy.deepcopy((model, opt, sched))
    del model, opt, sched
    buffer.seek(0)
    resumed = ConditionTracker(opt2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(model2, opt2, sched2, data, range(split + 1, STEPS + 1))
    got = resumed.compute()

    assert_same(got, expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------- no host sync


class _HostReadRecorder:
    """Wraps Tensor.item/tolist/__bool__/__float__/__int__ and records the tensors they run on while `active`."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self) -> None:
        self.active = False
        self.calls: list[tuple[str, torch.Tensor]] = []
        self._saved: dict[str, tuple[bool, object]] = {}

    def __enter__(self):
        for name in self.METHODS:
            own = name in torch.Tensor.__dict__
            original = getattr(torch.Tensor, name)
            self._saved[name] = (own, torch.Tensor.__dict__.get(name))

            def wrapper(t, *args, _name=name, _original=original, **kwargs):
                if self.active:
                    self.calls.append((_name, t))
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, (own, value) in self._saved.items():
            if own:
                setattr(torch.Tensor, name, value)
            else:
                delattr(torch.Tensor, name)

    def on(self, *args, **kwargs):
        self.active = True

    def off(self, *args, **kwargs):
        self.active = False


def host_reads_in_hooks(opt: torch.optim.Optimizer, tracker_cls=ConditionTracker, steps: int = 64):
    """(calls to host-reading methods made inside the tracker's hooks, allowed tensors, the tracker).

    Only the tracker's own hooks are watched: recording is switched on by hooks registered just before the
    tracker's and off by hooks registered just after (the optimizer runs its hooks in registration order). The
    first step is not counted: there the tracker checks each group's adapter once (one host read of a flag tensor,
    lightning_adamtype.adapters.validate_first_step), as tests/test_hot_path.py leaves its first step unwatched.
    """
    torch.manual_seed(0)
    rec = _HostReadRecorder()
    opt.register_step_pre_hook(rec.on)
    opt.register_step_post_hook(rec.on)
    tracker = tracker_cls(opt)
    opt.register_step_pre_hook(rec.off)
    opt.register_step_post_hook(rec.off)
    with rec:
        for _ in range(steps):
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.randn_like(p)
            opt.step()
            if tracker.observations == 1:
                rec.calls.clear()  # (the first observed step: the adapter check)
    # Reading a 0-dim CPU step counter, lr or NAdam's mu_product on the host is free (no device sync).
    allowed = set()
    for state in opt.state.values():
        for key in ("step", "mu_product"):
            if isinstance(state.get(key), torch.Tensor):
                allowed.add(id(state[key]))
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            allowed.add(id(group["lr"]))
    bad = [
        (name, tuple(t.shape), t.device.type, t.dtype)
        for name, t in rec.calls
        if not (t.device.type == "cpu" and t.dim() == 0 and id(t) in allowed)
    ]
    return bad, rec.calls, tracker


def _two_group_params():
    torch.manual_seed(0)
    return [
        {"params": [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))]},
        {"params": [nn.Parameter(torch.randn(4))], "lr": 1e-3},
    ]


NO_SYNC = [
    ("adam-foreach", torch.optim.Adam, dict(lr=1e-2, foreach=True, weight_decay=0.1)),
    ("adam-fused", torch.optim.Adam, dict(lr=1e-2, fused=True)),
    ("adamw-amsgrad-fused", torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, fused=True)),
    ("adam-tensor-lr-fused", torch.optim.Adam, dict(lr=torch.tensor(1e-2), fused=True)),
    ("nadam-foreach", torch.optim.NAdam, dict(lr=1e-2, foreach=True)),
    ("radam-foreach", torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9), foreach=True)),
    ("adagrad", torch.optim.Adagrad, dict(lr=1e-2, foreach=True)),
    ("rmsprop-centered", torch.optim.RMSprop, dict(lr=1e-2, centered=True, foreach=True)),
    ("sgd-momentum", torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    ("adamax", torch.optim.Adamax, dict(lr=1e-2)),
]


@pytest.mark.parametrize("name,cls,kwargs", NO_SYNC, ids=[c[0] for c in NO_SYNC])
def test_hooks_make_no_host_reads_except_cpu_step_counters(name, cls, kwargs):
    opt = cls(_two_group_params(), **kwargs)
    bad, calls, tracker = host_reads_in_hooks(opt)
    assert not bad, bad
    assert tracker.observations == 64
    assert tracker.compute()  # it did measure


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,cls,kwargs", CUDA_CONFIGS, ids=[c[0] for c in CUDA_CONFIGS])
def test_hooks_make_no_host_reads_on_cuda(name, cls, kwargs):
    """On the GPU nothing at all may be read on the host inside the hooks (CPU lr and step counters excepted)."""
    groups = _two_group_params()
    for group in groups:
        group["params"] = [nn.Parameter(p.detach().cuda()) for p in group["params"]]
    opt = cls(groups, **kwargs)
    bad, calls, tracker = host_reads_in_hooks(opt)
    assert not bad, bad
    assert all(t.device.type == "cpu" for _, t in calls)
    assert tracker.compute()


class _LeakyAdam(torch.optim.Adam):
    """An Adam whose adapter reads its state on the host (what the guard must catch)."""


class _LeakyAdapter(AdamAdapter):
    read = "__float__"

    def sqrt_form(self, group, states):
        form = super().sqrt_form(group, states)
        if self.read == "__float__":
            float(form[0][0].sum())
        elif form[0][0].sum():  # __bool__
            pass
        return form


@pytest.mark.parametrize("read", ["__float__", "__bool__"])
def test_no_sync_guard_catches_a_host_read_in_the_hooks(read):
    """The guard above is not vacuous: an adapter that reads a state tensor on the host inside the hooks is caught."""
    adapter = _LeakyAdapter()
    adapter.read = read
    lightning_adamtype.register_adapter(_LeakyAdam, adapter)
    try:
        opt = _LeakyAdam(_two_group_params(), lr=1e-2, foreach=True)
        bad, _, _ = host_reads_in_hooks(opt)
    finally:
        lightning_adamtype.unregister_adapter(_LeakyAdam)
    assert bad and all(name == read for name, *_ in bad)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
        (torch.optim.Adam, dict(lr=1e-3, weight_decay=0.1, maximize=True, fused=True)),
        (torch.optim.Adagrad, dict(lr=0.1, weight_decay=0.1)),
        (torch.optim.RMSprop, dict(lr=1e-2, weight_decay=0.1)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    ],
    ids=["adam", "adam-maximize-fused", "adagrad", "rmsprop", "sgd"],
)
@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_closure_step_with_coupled_weight_decay(cls, kwargs, how):
    """With ``opt.step(closure)`` the gradients appear inside step(), after the pre-hook (Lightning always steps
    this way): g_t = ∇ + λ·x_t still uses the parameter before the update, as the oracle does."""
    model, opt, sched, data = make_run(cls, kwargs)
    tracker = ConditionTracker(opt)
    ref = Reference(opt)
    for t in range(1, STEPS + 1):
        x, y = data[t - 1]

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            ref.before_step()  # the oracle copies x_t once the gradients exist
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step(closure) if how == "positional" else opt.step(closure=closure)
        ref.after_step()
        sched.step()
    assert_matches(tracker, ref)


class _TrustRatioAdam(torch.optim.Adam):
    """A subclass that changes the update (a Lamb-style trust ratio): it is not Adam's algorithm."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(0.999)
        return loss


class _PlainAdam(torch.optim.Adam):
    """A subclass that keeps Adam's update (only a new name)."""


def test_a_subclass_that_overrides_step_is_not_measured_as_its_parent():
    """Measured as Adam, a trust-ratio subclass would give a wrong `a` with no warning: it gets one warning naming the
    class and register_adapter instead, and trains untouched; a subclass that keeps step() inherits Adam's adapter."""
    p = nn.Parameter(torch.randn(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = ConditionTracker(_TrustRatioAdam([p], lr=1e-2))
    assert not tracker.attached
    assert len(caught) == 1 and "_TrustRatioAdam overrides step()" in str(caught[0].message)
    assert "register_adapter" in str(caught[0].message)
    plain = ConditionTracker(_PlainAdam([nn.Parameter(torch.randn(3))], lr=1e-2))
    assert plain.attached and plain.adapter is lightning_adamtype.find_adapter(torch.optim.Adam([p]))
