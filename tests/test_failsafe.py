"""Fail-safe rule: a monitor must never hurt the run it watches.

Nothing the package raises may leave ``optimizer.step()`` or a Lightning hook; what it cannot measure it leaves out
with one warning; training stays bitwise as without it.

Every case runs a tracked model and an untracked twin (same seed, same data, same surgery) and checks:
(1) every parameter, gradient and optimizer-state tensor is ``torch.equal`` after training, (2) no exception,
(3) the warning count of the case (package warnings, with the twin's own warnings, if any, subtracted), and
(4) what ``compute()`` reports, against a per-parameter float64 oracle (:class:`ParamOracle` below).

``tests/reference.py``'s ``Reference`` keys η_{t−1} by (group index, position in the group); the rule under test
keys it by the parameter object, so this file has its own oracle (Adam only), keyed by parameter, with groups
followed by their "params" list (the one ``optimizer.load_state_dict`` keeps). Only public API is used.
"""

from __future__ import annotations

import copy
import gc
import math
import pickle
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

import lightning_adamtype
from lightning_adamtype import ConditionTracker, NotMapped, find_adapter, register_adapter

try:  # tests/ as a package or as plain sibling modules
    from .reference import Reference
except ImportError:
    from reference import Reference

KERNELS = ["auto", "foreach"]  # on a CPU: the native C kernel (default), and the torch paths
# tolerances of tests/test_reference.py: the tracker computes η in float32, the oracle in float64
RTOL = {"a": 1e-4, "b": 1e-4, "a_mean": 1e-4, "c": 1e-3, "c2": 1e-3, "c_mean": 1e-3}


# ---------------------------------------------------------------------------------------------- the oracle


def _f64(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).clone()


def adam_eta(group: dict, state: dict) -> Tensor:
    """Adam's η = (lr/(1 − β1^t)) / (sqrt(v)/sqrt(1 − β2^t) + eps), float64."""
    beta1, beta2 = (float(b) for b in group["betas"])
    t = float(state["step"])
    v = _f64(state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"])
    return (float(group["lr"]) / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + float(group["eps"]))


def measurable(p: Tensor) -> bool:
    """What the rule says can be measured: real floating point, not on the meta device, not empty."""
    return p.is_floating_point() and not p.is_meta and p.numel() > 0 and (p.grad is None or not p.grad.is_sparse)


class ParamOracle:
    """steps, a, b, c, c2, a_mean, c_mean per group in float64 (Adam, no weight decay, no maximize).

    η_{t−1} is keyed by the parameter object; c counts a parameter only when it had an η at the previous observed
    step *of the same shape* (a resized parameter starts over). Groups are keyed by their "params" list."""

    KEYS = ("steps", "a", "b", "c", "c2", "a_mean", "c_mean")

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.observations = 0
        self.acc: dict[int, dict[str, float]] = {}
        self._lists: dict[int, list] = {}  # keeps the lists alive, so that their ids stay unique
        self.previous: dict[Tensor, tuple[int, Tensor]] = {}
        self._grads: dict[Tensor, Tensor] = {}

    def before_step(self) -> None:
        self._grads = {
            p: _f64(p.grad)
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and measurable(p)
        }

    def after_step(self) -> None:
        self.observations += 1
        fresh: dict[Tensor, Tensor] = {}
        for group in self.optimizer.param_groups:
            etas = {}
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if p in self._grads and state:
                    etas[p] = adam_eta(group, state)
            if not etas:
                continue
            key = id(group["params"])
            self._lists[key] = group["params"]
            acc = self.acc.setdefault(key, dict.fromkeys(self.KEYS, 0.0))
            acc["steps"] += 1
            acc["a"] += min(e.min().item() for e in etas.values())
            acc["b"] += sum(((e * self._grads[p]) ** 2).sum().item() for p, e in etas.items())
            acc["a_mean"] += sum(e.sum().item() for e in etas.values()) / sum(e.numel() for e in etas.values())
            c = c2 = 0.0
            n_previous = 0
            for p, eta in etas.items():
                old = self.previous.get(p)
                if old is not None and old[0] == self.observations - 1 and old[1].shape == eta.shape:
                    d = eta - old[1]
                    c += d.abs().sum().item()
                    c2 += (d * d).sum().item()
                    n_previous += d.numel()
            acc["c"] += c
            acc["c2"] += c2
            if n_previous:
                acc["c_mean"] += c / n_previous
            fresh.update(etas)
        for p, eta in fresh.items():
            self.previous[p] = (self.observations, eta)
        self._grads = {}

    def compute(self) -> list[dict[str, float] | None]:
        """Per group of the optimizer, in its current order; None for a group never observed."""
        return [self.acc.get(id(group["params"])) for group in self.optimizer.param_groups]


def assert_matches(tracker: ConditionTracker, oracle: ParamOracle, where: str = "") -> dict[str, dict[str, float]]:
    got = tracker.compute()
    names = tracker.group_names()
    expected = oracle.compute()
    assert set(got) == {n for n, e in zip(names, expected) if e is not None}, where
    for name, exp in zip(names, expected):
        if exp is None:
            continue
        row = got[name]
        assert row["measured"] == 1.0, (where, name)
        assert row["steps"] == exp["steps"], (where, name)
        for key, rtol in RTOL.items():
            assert row[key] == pytest.approx(exp[key], rel=rtol, abs=1e-12), (where, name, key, row[key], exp[key])
    return got


# ---------------------------------------------------------------------------------------------- twins and warnings


@contextmanager
def recorded():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def package_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "lightning_adamtype" in str(w.message)]


def snapshot(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[Any]:
    """Every parameter, gradient and state value (in the given order), detached clones."""
    out: list[Any] = []
    for p in params:
        out.append(("param", p.detach().clone()))
        out.append(("grad", None if p.grad is None else p.grad.detach().clone()))
        for k, v in sorted(opt.state.get(p, {}).items()):
            out.append((k, v.detach().clone() if isinstance(v, Tensor) else v))
    return out


def assert_bitwise(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for i, ((ka, x), (kb, y)) in enumerate(zip(a, b)):
        assert ka == kb, i
        if isinstance(x, Tensor):
            assert isinstance(y, Tensor) and x.shape == y.shape and x.dtype == y.dtype and x.device == y.device, (i, ka)
            if x.is_meta:
                continue  # a meta tensor has no values
            assert torch.equal(x, y), (i, ka)
        else:
            assert x == y, (i, ka)


def twin(scenario: Callable[[bool], dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Run ``scenario(tracked)`` untracked and tracked; assert bitwise equality; return the tracked run and the
    package warnings it added. ``scenario`` returns {"state": snapshot(...), ...}."""
    with recorded() as plain_caught:
        plain = scenario(False)
    with recorded() as caught:
        tracked = scenario(True)
    assert_bitwise(tracked["state"], plain["state"])
    ours = package_warnings(caught)
    # the tracker adds its own warnings and nothing else
    assert len(caught) - len(ours) == len(plain_caught) - len(package_warnings(plain_caught))
    assert not package_warnings(plain_caught)
    return tracked, ours


def set_grads(params: list[Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        if p.is_meta:
            p.grad = torch.empty(p.shape, device="meta", dtype=p.dtype)
        else:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)


class Net(nn.Module):
    """4 → 4 → 4 → 1; ``l1.weight`` and ``l2.weight`` have one shape (for the swap)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 4)
        self.l3 = nn.Linear(4, 1)
        with torch.no_grad():
            self.l2.weight.mul_(3.0)  # different gradient scales in the two weights: a swap moves η a lot

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def backward(model: nn.Module, seed: int, extra: Tensor | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, 1, generator=g)
    model.zero_grad(set_to_none=True)
    out = model(x)
    if extra is not None:
        extra.grad = None
        out = out + extra
    nn.functional.mse_loss(out, y).backward()


def step(opt: torch.optim.Optimizer, oracle: ParamOracle | None) -> None:
    if oracle is not None:
        oracle.before_step()
    opt.step()
    if oracle is not None:
        oracle.after_step()


# ---------------------------------------------------------------------------------------------- 1. complex


@pytest.mark.parametrize("kernel", KERNELS)
def test_complex_parameter_is_left_out_real_is_measured(kernel):
    def scenario(tracked):
        torch.manual_seed(0)
        z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        w = nn.Parameter(torch.randn(5))
        opt = torch.optim.Adam([z, w], lr=0.01)
        tracker = ConditionTracker(opt, kernel=kernel) if tracked else None
        oracle = ParamOracle(opt) if tracked else None
        for t in range(1, 7):
            set_grads([z, w], t)
            step(opt, oracle)
            if tracked:
                assert_matches(tracker, oracle, f"step {t}")
        return {"state": snapshot(opt, [z, w]), "tracker": tracker, "oracle": oracle}

    run, ours = twin(scenario)
    assert len(ours) == 1, ours
    assert "complex64" in ours[0]
    got = assert_matches(run["tracker"], run["oracle"])
    row = got["Adam/pg0"]
    assert row["steps"] == 6 and row["c"] > 0
    # the real parameter alone: a_mean is its mean η (5 coordinates), not diluted by the complex one
    assert run["tracker"].stepsizes()["Adam/pg0"].numel() == 5


# ---------------------------------------------------------------------------------------------- 2. meta device


def test_meta_parameters_do_not_crash_the_tracker():
    # torch's Adam does step on meta tensors (its single-tensor path only runs shape-level ops there), so no
    # custom optimizer is needed: a meta parameter sits in a group next to a real one, another group is all meta.
    def scenario(tracked):
        torch.manual_seed(0)
        m = nn.Parameter(torch.empty(3, device="meta"))
        w = nn.Parameter(torch.randn(3))
        only_meta = nn.Parameter(torch.empty(2, 2, device="meta"))
        opt = torch.optim.Adam([{"params": [m, w]}, {"params": [only_meta]}], lr=0.01)
        tracker = ConditionTracker(opt) if tracked else None
        oracle = ParamOracle(opt) if tracked else None
        for t in range(1, 6):
            set_grads([m, w, only_meta], t)
            step(opt, oracle)
        return {"state": snapshot(opt, [m, w, only_meta]), "tracker": tracker, "oracle": oracle}

    run, ours = twin(scenario)
    assert len(ours) == 1, ours
    assert "meta" in ours[0]
    got = assert_matches(run["tracker"], run["oracle"])
    assert list(got) == ["Adam/pg0"]  # the all-meta group is never observed: left out
    assert got["Adam/pg0"]["steps"] == 5


# ---------------------------------------------------------------------------------------------- 3. net surgery


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("surgery", ["state-deleted", "state-replaced"])
def test_resized_parameter_starts_over(kernel, surgery):
    def scenario(tracked):
        torch.manual_seed(0)
        w1 = nn.Parameter(torch.randn(5))
        w2 = nn.Parameter(torch.randn(3, 4))
        w3 = nn.Parameter(torch.randn(2))
        params = [w1, w2, w3]
        opt = torch.optim.Adam(params, lr=0.01)
        tracker = ConditionTracker(opt, kernel=kernel) if tracked else None
        oracle = ParamOracle(opt) if tracked else None
        steps_c = []
        for t in range(1, 9):
            if t == 4:  # surgery between steps 3 and 4
                g = torch.Generator().manual_seed(123)
                w2.data = torch.randn(2, 6, generator=g)
                if surgery == "state-deleted":
                    del opt.state[w2]
                else:
                    opt.state[w2] = {
                        "step": torch.tensor(3.0),
                        "exp_avg": torch.zeros(2, 6),
                        "exp_avg_sq": torch.full((2, 6), 0.04),
                    }
            set_grads(params, t)
            step(opt, oracle)
            if tracked:
                steps_c.append(assert_matches(tracker, oracle, f"step {t}")["Adam/pg0"]["c"])
        return {"state": snapshot(opt, params), "tracker": tracker, "oracle": oracle, "c": steps_c, "w2": w2}

    run, ours = twin(scenario)
    assert len(ours) == 1, ours
    assert "shape" in ours[0]
    # every step matched the oracle (in the scenario): at step 4 c counts only w1 and w3 (w2's η_{t−1} has the old
    # shape), from step 5 on w2 counts again with its new shape
    assert_matches(run["tracker"], run["oracle"])
    assert run["oracle"].previous[run["w2"]][1].shape == (2, 6)
    assert all(later > earlier for earlier, later in zip(run["c"][1:], run["c"][2:]))  # c grows at every step ≥ 2


# ---------------------------------------------------------------------------------------------- 4. groups change


@pytest.mark.parametrize("kernel", KERNELS)
def test_param_group_deleted_and_added(kernel):
    def scenario(tracked):
        model = Net()
        extra = nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam(
            [{"params": model.l1.parameters()}, {"params": model.l2.parameters(), "lr": 0.02},
             {"params": model.l3.parameters(), "lr": 0.005}],
            lr=0.01,
        )
        tracker = ConditionTracker(opt, kernel=kernel) if tracked else None
        oracle = ParamOracle(opt) if tracked else None
        for t in range(1, 10):
            if t == 4:
                del opt.param_groups[0]
            if t == 7:
                opt.add_param_group({"params": [extra], "lr": 0.03})
            backward(model, t, extra)
            step(opt, oracle)
            if tracked:
                assert_matches(tracker, oracle, f"step {t}")
        return {"state": snapshot(opt, [*model.parameters(), extra]), "tracker": tracker, "oracle": oracle}

    run, ours = twin(scenario)
    assert len(ours) == 1, ours
    assert "removed" in ours[0]
    got = assert_matches(run["tracker"], run["oracle"])
    assert [got[n]["steps"] for n in ("Adam/pg0", "Adam/pg1", "Adam/pg2")] == [9, 9, 3]


# ---------------------------------------------------------------------------------------------- 5. adapter raises


class _DelegatingAdapter:
    """Adam's registered adapter through ``effective_stepsizes`` only; raises KeyError for the group named "bad"
    from its ``fail_from``-th call on."""

    def __init__(self, fail_from: int = 3, error: Exception | None = None) -> None:
        self.base = find_adapter(torch.optim.Adam([nn.Parameter(torch.zeros(1))]))
        self.fail_from = fail_from
        self.error = error if error is not None else KeyError("exp_avg_sq")
        self.calls = 0

    def effective_stepsizes(self, group, states):
        if group.get("name") == "bad":
            self.calls += 1
            if self.calls >= self.fail_from:
                raise self.error
        return self.base.effective_stepsizes(group, states)

    def coupled_weight_decay(self, group):
        return self.base.coupled_weight_decay(group)


@pytest.fixture
def fresh_adam():
    """``make(name, adapter)``: a fresh subclass of Adam with ``adapter`` registered (the registry is global: no other
    test sees the subclass), unregistered afterwards where the package has ``unregister_adapter``."""
    made: list[type] = []

    def make(name: str, adapter: Any) -> type:
        cls = type(name, (torch.optim.Adam,), {})
        register_adapter(cls, adapter)
        made.append(cls)
        return cls

    yield make
    unregister = getattr(lightning_adamtype, "unregister_adapter", None)
    for cls in made:
        if unregister is not None:
            unregister(cls)


@pytest.mark.parametrize("kernel", KERNELS)
def test_user_adapter_raising_keyerror_disables_only_its_group(kernel, fresh_adam):
    adapter = _DelegatingAdapter(fail_from=3)
    KeyErrorAdam = fresh_adam(f"KeyErrorAdam_{kernel}", adapter)
    bad_steps = []

    def scenario(tracked):
        model = Net()
        opt = KeyErrorAdam(
            [{"params": [*model.l1.parameters(), *model.l2.parameters()]},
             {"params": model.l3.parameters(), "name": "bad", "lr": 0.005}],
            lr=0.01,
        )
        tracker = ConditionTracker(opt, kernel=kernel) if tracked else None
        oracle = ParamOracle(opt) if tracked else None
        adapter.calls = 0
        counts = []
        with recorded() as inner:
            for t in range(1, 9):
                backward(model, t)
                step(opt, oracle)
                counts.append(len(package_warnings(inner)))
                if tracked and t == 2:
                    bad_steps.append(tracker.compute()[f"{type(opt).__name__}/bad"]["steps"])
        for w in inner:  # hand them on to the twin's recorder
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return {"state": snapshot(opt, list(model.parameters())), "tracker": tracker, "oracle": oracle, "counts": counts}

    run, ours = twin(scenario)
    name = f"KeyErrorAdam_{kernel}"
    assert len(ours) == 1, ours
    message = ours[0]
    assert name in message and f"{name}/bad" in message and "KeyError" in message and "exp_avg_sq" in message
    assert run["counts"] == [0, 0, 1, 1, 1, 1, 1, 1]  # warned at the failing step, never again
    got = run["tracker"].compute()
    bad = got[f"{name}/bad"]
    assert bad["measured"] == 0.0
    assert bad["steps"] == bad_steps[0] == 2  # what was measured before the failure stays, nothing after
    good = got[f"{name}/pg0"]
    assert good["measured"] == 1.0
    expected = run["oracle"].compute()[0]
    assert good["steps"] == expected["steps"] == 8
    for key, rtol in RTOL.items():
        assert good[key] == pytest.approx(expected[key], rel=rtol), key


def test_an_adapter_that_does_not_map_a_group_says_so_without_calling_it_a_failure(fresh_adam):
    """An adapter raising :class:`lightning_adamtype.NotMapped` (settings it knowingly does not map): one warning
    that gives its reason and does not ask for a bug report; the group is not measured, the other group is, and
    training is bitwise that of an untracked twin."""
    adapter = _DelegatingAdapter(fail_from=1, error=NotMapped("settings of group 'bad' are not mapped (a test)"))
    Unmapped = fresh_adam("UnmappedAdam", adapter)

    def scenario(tracked):
        model = Net()
        opt = Unmapped([{"params": [*model.l1.parameters(), *model.l2.parameters()]},
                        {"params": model.l3.parameters(), "name": "bad", "lr": 0.005}], lr=0.01)
        tracker = ConditionTracker(opt, kernel="foreach") if tracked else None
        for t in range(1, 6):
            backward(model, t)
            step(opt, None)
        return {"state": snapshot(opt, list(model.parameters())), "tracker": tracker}

    run, ours = twin(scenario)
    assert len(ours) == 1, ours
    assert "UnmappedAdam/bad" in ours[0] and "is not measured: settings of group 'bad' are not mapped" in ours[0]
    assert "report" not in ours[0] and "failed" not in ours[0]
    got = run["tracker"].compute()
    assert got["UnmappedAdam/bad"]["measured"] == 0.0 and got["UnmappedAdam/pg0"]["measured"] == 1.0


# ---------------------------------------------------------------------------------------------- 6. swapped params


@pytest.mark.parametrize("kernel", KERNELS)
def test_swapped_parameters_keep_their_own_previous_stepsize(kernel):
    def scenario(tracked):
        model = Net()
        opt = torch.optim.Adam(
            [{"params": [model.l1.weight, model.l2.weight, model.l1.bias, model.l2.bias]},
             {"params": model.l3.parameters(), "lr": 0.005}],
            lr=0.01,
        )
        tracker = ConditionTracker(opt, kernel=kernel) if tracked else None
        oracle = ParamOracle(opt) if tracked else None
        positional = Reference(opt) if tracked else None
        for t in range(1, 9):
            if t == 5:
                g = opt.param_groups[0]["params"]
                g[0], g[1] = g[1], g[0]
            backward(model, t)
            if tracked:
                positional.before_step()
            step(opt, oracle)
            if tracked:
                positional.after_step()
                assert_matches(tracker, oracle, f"step {t}")
        return {"state": snapshot(opt, list(model.parameters())), "tracker": tracker, "oracle": oracle,
                "positional": positional}

    run, ours = twin(scenario)
    assert ours == []
    got = assert_matches(run["tracker"], run["oracle"])
    right = run["oracle"].compute()[0]["c"]
    wrong = run["positional"].compute()[0]["c"]
    assert abs(wrong - right) > 0.05 * right  # the case tells the two keyings apart
    assert got["Adam/pg0"]["c"] == pytest.approx(right, rel=1e-3)


# ---------------------------------------------------------------------------------------------- 7. state replaced


@pytest.mark.parametrize("kernel", KERNELS)
def test_load_state_dict_and_replaced_state_tensors(kernel):
    def scenario(tracked):
        model = Net()
        opt = torch.optim.Adam(
            [{"params": [*model.l1.parameters(), *model.l2.parameters()]},
             {"params": model.l3.parameters(), "lr": 0.005}],
            lr=0.01,
        )
        tracker = ConditionTracker(opt, kernel=kernel) if tracked else None
        oracle = ParamOracle(opt) if tracked else None
        saved = None
        for t in range(1, 12):
            if t == 4:
                saved = copy.deepcopy(opt.state_dict())
            if t == 7:
                opt.load_state_dict(saved)  # rewinds the optimizer state (new group dicts, same params lists)
            if t == 9:
                for p in model.parameters():
                    opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"].clone()
                    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone()
            if t == 10:
                p = model.l1.weight  # and a state tensor replaced by one with other values
                opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"] * 4.0
            backward(model, t)
            step(opt, oracle)
            if tracked:
                assert_matches(tracker, oracle, f"step {t}")
        return {"state": snapshot(opt, list(model.parameters())), "tracker": tracker, "oracle": oracle}

    run, ours = twin(scenario)
    assert ours == []
    got = assert_matches(run["tracker"], run["oracle"])
    assert all(row["steps"] == 11 for row in got.values())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("reset", ["state-cleared", "one-state-deleted", "one-state-replaced"])
def test_optimizer_state_reset_mid_run(kernel, reset):
    """The optimizer's state reset between steps (same shapes, same number of entries in optimizer.state once the
    optimizer re-creates them): η is read from the new state."""

    def scenario(tracked):
        model = Net()
        opt = torch.optim.Adam(
            [{"params": [*model.l1.parameters(), *model.l2.parameters()]},
             {"params": model.l3.parameters(), "lr": 0.005}],
            lr=0.01,
        )
        tracker = ConditionTracker(opt, kernel=kernel) if tracked else None
        oracle = ParamOracle(opt) if tracked else None
        for t in range(1, 8):
            if t == 4:
                p = model.l1.weight
                if reset == "state-cleared":
                    opt.state.clear()
                elif reset == "one-state-deleted":
                    del opt.state[p]
                else:
                    opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                    "exp_avg_sq": torch.zeros_like(p)}
            backward(model, t)
            step(opt, oracle)
            if tracked:
                assert_matches(tracker, oracle, f"step {t}")
        return {"state": snapshot(opt, list(model.parameters())), "tracker": tracker, "oracle": oracle}

    run, ours = twin(scenario)
    assert ours == []
    assert_matches(run["tracker"], run["oracle"])


# ---------------------------------------------------------------------------------------------- 8. named checkpoint


def _remapped_optimizer_state(saved: dict, old_params: list[Tensor], new_opt: torch.optim.Optimizer,
                              names_old: dict[Tensor, str], names_new: dict[Tensor, str]) -> dict:
    """``saved`` (an optimizer state_dict over ``old_params``, in their order) re-indexed for ``new_opt``'s order."""
    index_of_name = {names_old[p]: i for i, p in enumerate(old_params)}
    new_params = [p for group in new_opt.param_groups for p in group["params"]]
    state = {j: copy.deepcopy(saved["state"][index_of_name[names_new[p]]]) for j, p in enumerate(new_params)}
    groups = []
    j = 0
    for saved_group, group in zip(saved["param_groups"], new_opt.param_groups):
        g = {k: v for k, v in saved_group.items() if k != "params"}
        g["params"] = list(range(j, j + len(group["params"])))
        j += len(group["params"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("kernel", KERNELS)
def test_named_checkpoint_survives_reordered_parameters(kernel):
    model_a = Net()
    names_a = {p: n for n, p in model_a.named_parameters()}
    order_a = [model_a.l1.weight, model_a.l2.weight, model_a.l1.bias, model_a.l2.bias]
    opt_a = torch.optim.Adam([{"params": order_a}, {"params": model_a.l3.parameters(), "lr": 0.005}], lr=0.01)
    with recorded() as caught:
        tracker_a = ConditionTracker(opt_a, kernel=kernel, parameter_names=names_a)
        for t in range(1, 6):
            backward(model_a, t)
            opt_a.step()
        sd = copy.deepcopy(tracker_a.state_dict())
        opt_sd = copy.deepcopy(opt_a.state_dict())
        model_b = copy.deepcopy(model_a)
        before = tracker_a.compute()

        # the uninterrupted run: one more step
        backward(model_a, 6)
        opt_a.step()
        uninterrupted = tracker_a.compute()

        # the resumed run: same weights, the same-shape weights swapped in the group, the state mapped by name
        names_b = {p: n for n, p in model_b.named_parameters()}
        order_b = [model_b.l2.weight, model_b.l1.weight, model_b.l2.bias, model_b.l1.bias]
        opt_b = torch.optim.Adam([{"params": order_b}, {"params": model_b.l3.parameters(), "lr": 0.005}], lr=0.01)
        old_params = [p for group in opt_a.param_groups for p in group["params"]]
        opt_b.load_state_dict(_remapped_optimizer_state(opt_sd, old_params, opt_b, names_a, names_b))
        tracker_b = ConditionTracker(opt_b, kernel=kernel, parameter_names=names_b)
        tracker_b.load_state_dict(sd)
        backward(model_b, 6)
        opt_b.step()
        resumed = tracker_b.compute()
    assert package_warnings(caught) == []
    for (na, pa), (nb, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na  # the remapping is right: both runs took the same step
    for name in ("Adam/pg0", "Adam/pg1"):
        assert resumed[name]["c"] - before[name]["c"] > 0  # the step's c is not empty (η_{t−1} was found)
        for key in ("steps", "a", "b", "c", "c2", "a_mean", "c_mean"):
            assert resumed[name][key] == pytest.approx(uninterrupted[name][key], rel=1e-6), (name, key)


# ---------------------------------------------------------------------------------------------- 9. backend raises


def _raise_runtime(self, step):
    raise RuntimeError("boom in the backend")


def test_backend_raising_inside_the_hook_stays_inside(monkeypatch):
    from lightning_adamtype.backends.foreach import ForeachBackend

    def scenario(tracked):
        model = Net()
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)  # the pre-hook runs too
        tracker = None
        with monkeypatch.context() as m:
            if tracked:
                m.setattr(ForeachBackend, "run", _raise_runtime)
                tracker = ConditionTracker(opt, kernel="foreach")
            for t in range(1, 7):
                backward(model, t)
                opt.step()  # must not raise
        return {"state": snapshot(opt, list(model.parameters())), "tracker": tracker}

    run, ours = twin(scenario)
    assert len(ours) == 1, ours
    assert "RuntimeError" in ours[0] and "boom in the backend" in ours[0]
    row = run["tracker"].compute()["Adam/pg0"]
    assert row["measured"] == 0.0


def test_adapter_raising_in_the_pre_step_hook_stays_inside(fresh_adam):
    class PreHookAdapter(_DelegatingAdapter):
        def coupled_weight_decay(self, group):
            self.calls += 1
            if self.calls >= 3:
                raise ValueError("weight decay unreadable")
            return 0.0

    adapter = PreHookAdapter()
    cls = fresh_adam("PreHookAdam", adapter)

    def scenario(tracked):
        model = Net()
        opt = cls(model.parameters(), lr=0.01)
        adapter.calls = 0
        tracker = ConditionTracker(opt) if tracked else None
        for t in range(1, 7):
            backward(model, t)
            opt.step()
        return {"state": snapshot(opt, list(model.parameters())), "tracker": tracker}

    run, ours = twin(scenario)
    assert len(ours) == 1, ours
    assert "ValueError" in ours[0] and "weight decay unreadable" in ours[0]
    assert not run["tracker"].attached  # it detached itself
    run["tracker"].compute()  # still readable


def test_native_backend_failing_falls_back_to_foreach(monkeypatch):
    from lightning_adamtype.backends.native import NativeBackend

    def scenario(tracked):
        model = Net()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        tracker = oracle = None
        with monkeypatch.context() as m:
            if tracked:
                m.setattr(NativeBackend, "run", _raise_runtime)
                tracker = ConditionTracker(opt, kernel="auto")
                oracle = ParamOracle(opt)
            for t in range(1, 7):
                backward(model, t)
                step(opt, oracle)
        return {"state": snapshot(opt, list(model.parameters())), "tracker": tracker, "oracle": oracle}

    run, ours = twin(scenario)
    assert len(ours) == 1, ours
    assert "native" in ours[0] and "boom in the backend" in ours[0]
    assert_matches(run["tracker"], run["oracle"])
    assert run["tracker"].backends() == {"Adam/pg0": "foreach"}


# ---------------------------------------------------------------------------------------------- 10./11. Lightning

pl = pytest.importorskip("pytorch_lightning")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_adamtype import AdamTypeMonitor  # noqa: E402


class LitNet(pl.LightningModule):
    def __init__(self, opt_cls: type = torch.optim.Adam) -> None:
        super().__init__()
        self.net = Net()
        self.opt_cls = opt_cls

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return self.opt_cls(
            [{"params": [*self.net.l1.parameters(), *self.net.l2.parameters()]},
             {"params": self.net.l3.parameters(), "name": "bad", "lr": 0.005}],
            lr=0.01,
        )


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g)), batch_size=8)


def _fit(model: pl.LightningModule, callbacks: list, max_steps: int = 5) -> Any:
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(model, _loader())
    return trainer


def same_rows(x: dict[str, dict[str, float]], y: dict[str, dict[str, float]]) -> bool:
    """Equal compute() outputs, NaN equal to NaN (the slopes are NaN before the detectors' first sample)."""

    def same(u: Any, v: Any) -> bool:
        return (isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v)) or u == v

    return x.keys() == y.keys() and all(
        x[g].keys() == y[g].keys() and all(same(x[g][k], y[g][k]) for k in x[g]) for g in x
    )


def _params(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


def test_lightning_fit_with_a_raising_adapter_completes_untouched(fresh_adam):
    adapter = _DelegatingAdapter(fail_from=2)
    cls = fresh_adam("LitKeyErrorAdam", adapter)
    with recorded() as plain_caught:
        plain = LitNet(cls)
        adapter.calls = 0
        _fit(plain, [])
    with recorded() as caught:
        tracked = LitNet(cls)
        adapter.calls = 0
        # log at every step, and through the progress bar: compute() runs inside on_train_batch_end
        monitor = AdamTypeMonitor(log_every_n_steps=1, progress_bar=True)
        trainer = _fit(tracked, [monitor])
    assert trainer.global_step == 5
    assert package_warnings(plain_caught) == []
    ours = package_warnings(caught)
    assert len(ours) == 1, ours
    assert "LitKeyErrorAdam/bad" in ours[0] and "KeyError" in ours[0]
    for (na, pa), (nb, pb) in zip(_params(tracked), _params(plain)):
        assert torch.equal(pa, pb), na
    got = monitor.compute()
    assert got["LitKeyErrorAdam/bad"]["measured"] == 0.0
    assert got["LitKeyErrorAdam/pg0"]["measured"] == 1.0 and got["LitKeyErrorAdam/pg0"]["steps"] == 5


def test_monitor_reused_for_a_second_fit_releases_the_first_optimizer():
    monitor = AdamTypeMonitor()
    model1 = LitNet()
    trainer1 = _fit(model1, [monitor], max_steps=3)
    first = weakref.ref(monitor.trackers[0].optimizer)
    assert first() is not None
    model2 = LitNet()
    trainer2 = _fit(model2, [monitor], max_steps=3)
    assert monitor.trackers[0].optimizer is not first()
    del model1, trainer1
    gc.collect()
    assert first() is None, [type(r).__name__ for r in gc.get_referrers(first())]
    assert monitor.compute()["Adam/pg0"]["steps"] == 3
    del trainer2


def test_monitor_copies_are_detached_with_one_warning():
    monitor = AdamTypeMonitor()
    model = LitNet()
    _fit(model, [monitor], max_steps=3)
    original = monitor.compute()
    for make in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        with recorded() as caught:
            clone = make(monitor)
        ours = package_warnings(caught)
        assert len(ours) == 1 and "copy" in ours[0] and "detached" in ours[0], ours
        assert clone.trackers == [] and clone.compute() == {}
        assert clone.state_dict()["trackers"].keys() == monitor.state_dict()["trackers"].keys()
        assert same_rows(monitor.compute(), original)  # the original is untouched
        assert len(monitor.trackers) == 1 and monitor.trackers[0].optimizer is not None


def modules_reachable(obj: Any) -> list[str]:
    """Class names of the ``nn.Module`` objects that pickling ``obj`` would write."""
    import io

    found: list[str] = []

    class Spy(pickle.Pickler):
        def persistent_id(self, o: Any) -> None:
            if isinstance(o, nn.Module):
                found.append(type(o).__name__)
            return None

    Spy(io.BytesIO()).dump(obj)
    return found


def test_monitor_copy_carries_no_lightning_module():
    """A detached copy holds the monitor's state only, not the model: Lightning sets ``callback.log`` /
    ``callback.log_dict`` to the LightningModule's bound methods at every fit, and a copy that keeps them carries
    (deepcopy: duplicates) the whole LightningModule with its parameters."""
    monitor = AdamTypeMonitor()
    _fit(LitNet(), [monitor], max_steps=2)
    assert modules_reachable(monitor.state_dict()) == []
    with recorded():
        clone = copy.deepcopy(monitor)
        thawed = pickle.loads(pickle.dumps(monitor))
    assert modules_reachable(clone) == []
    assert modules_reachable(thawed) == []


class WithLambda(LitNet):
    def __init__(self) -> None:
        super().__init__()
        self.transform = lambda x: x  # a LightningModule need not be picklable


def test_monitor_pickles_after_fitting_an_unpicklable_module():
    monitor = AdamTypeMonitor()
    _fit(WithLambda(), [monitor], max_steps=2)
    with recorded() as caught:
        thawed = pickle.loads(pickle.dumps(monitor))  # the monitor's own state is plain data
    assert len(package_warnings(caught)) == 1
    assert thawed.state_dict()["trackers"].keys() == {"Adam"}


def test_monitor_copied_mid_fit_keeps_the_original_attached():
    copies = []

    class CopyAtStep2(pl.Callback):
        def __init__(self, monitor):
            self.monitor = monitor

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                copies.append(copy.deepcopy(self.monitor))
                assert all(t.attached for t in self.monitor.trackers)

    plain_monitor = AdamTypeMonitor()
    plain = LitNet()
    _fit(plain, [plain_monitor])
    monitor = AdamTypeMonitor()
    copied = LitNet()
    with recorded() as caught:
        _fit(copied, [monitor, CopyAtStep2(monitor)])
    assert len(package_warnings(caught)) == 1 and len(copies) == 1
    for (na, pa), (nb, pb) in zip(_params(copied), _params(plain)):
        assert torch.equal(pa, pb), na
    assert same_rows(monitor.compute(), plain_monitor.compute())
    # the copy resumes from the copied state at its next fit
    assert copies[0].state_dict()["trackers"]["Adam"]["observations"] == 2


def test_tracker_cannot_be_copied_or_pickled():
    opt = torch.optim.Adam(Net().parameters(), lr=0.01)
    tracker = ConditionTracker(opt)
    with pytest.raises(TypeError, match="cannot be copied.*state_dict"):
        copy.deepcopy(tracker)
    with pytest.raises(TypeError, match="cannot be pickled.*state_dict"):
        pickle.dumps(tracker)
    assert tracker.attached  # the failed copy left the tracker alone


def test_a_callback_hook_that_fails_stays_inside(monkeypatch):
    """An error while reading the numbers inside a Lightning hook (here compute(), patched to raise, read by the
    logging in on_train_batch_end) gives one warning; fit completes and trains as without the monitor; a checkpoint
    of the monitor is then an empty state, not an exception."""
    with recorded() as plain_caught:
        plain = LitNet()
        _fit(plain, [])

    def broken(self):
        raise RuntimeError("cannot read")

    monkeypatch.setattr(ConditionTracker, "compute", broken)
    monkeypatch.setattr(ConditionTracker, "state_dict", broken)
    with recorded() as caught:
        tracked = LitNet()
        monitor = AdamTypeMonitor(log_every_n_steps=1, progress_bar=True)
        trainer = _fit(tracked, [monitor])
        state = monitor.state_dict()
    assert trainer.global_step == 5 and state == {}
    assert package_warnings(plain_caught) == []
    ours = package_warnings(caught)
    assert len(ours) == 1 and "on_train_batch_end" in ours[0] and "cannot read" in ours[0], ours
    for (na, pa), (nb, pb) in zip(_params(tracked), _params(plain)):
        assert torch.equal(pa, pb), na
