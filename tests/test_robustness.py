"""AdaFom, non-finite input, bad options, param groups added during training, old checkpoints."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from lightning_adamtype import ConditionTracker, TrendOptions
from lightning_adamtype.optim import AdaFom


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(dtype)


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=g, dtype=next(model.parameters()).dtype)
    model.zero_grad()
    model(x).pow(2).mean().backward()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adafom_foreach_matches_for_loop_in_float64(weight_decay):
    a, b = _model(), _model()
    opt_a = AdaFom(a.parameters(), lr=0.05, beta1=0.8, weight_decay=weight_decay, foreach=False)
    opt_b = AdaFom(b.parameters(), lr=0.05, beta1=0.8, weight_decay=weight_decay, foreach=True)
    for step in range(12):
        for model, opt in ((a, opt_a), (b, opt_b)):
            _grads(model, step)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


def test_adafom_matches_the_papers_update_written_out():
    """x_{t+1} = x_t − (lr/√t) · m_t / sqrt(mean of g²), with eps = 0."""
    model = _model()
    opt = AdaFom(model.parameters(), lr=0.1, beta1=0.5, eps=0.0)
    params = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    sq = [torch.zeros_like(p) for p in params]
    for t in range(1, 8):
        _grads(model, t)
        for i, p in enumerate(model.parameters()):
            g = p.grad
            m[i] = 0.5 * m[i] + 0.5 * g
            sq[i] = sq[i] + g * g
            params[i] = params[i] - (0.1 / math.sqrt(t)) * m[i] / (sq[i] / t).sqrt()
        opt.step()
    for p, ref in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-10, atol=1e-12)


def test_adafom_is_tracked_with_its_effective_stepsize():
    model = _model()
    opt = AdaFom(model.parameters(), lr=0.1)
    tracker = ConditionTracker(opt)
    a = 0.0
    for step in range(5):
        _grads(model, step)
        opt.step()
        a += min(float((0.1 / (opt.state[p]["sum"].sqrt() + 1e-10)).min()) for p in model.parameters())
    assert tracker.compute()["AdaFom/pg0"]["a"] == pytest.approx(a, rel=1e-5)


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(beta1=1.0), dict(eps=-1.0), dict(weight_decay=-0.1)])
def test_adafom_bad_options(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        AdaFom(_model().parameters(), **bad)


def test_adafom_satisfies_the_bias_condition_on_the_divergence_example():
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = AdaFom([x], lr=0.5, beta1=0.0)
    tracker = ConditionTracker(opt)
    idx = torch.randint(0, 11, (5000,), generator=torch.Generator().manual_seed(1)).tolist()
    for i in idx:
        xv = x.detach()
        direction = xv if abs(float(xv)) <= 1 else torch.sign(xv)
        x.grad = (11.0 if i == 0 else -1.0) * direction
        opt.step()
    result = tracker.compute()["AdaFom/pg0"]
    assert not result["bias_violation"], result
    assert result["bias_slope"] < -0.3, result
    assert abs(float(x)) < 1.0


def test_nonfinite_step_is_left_out_counted_and_warned_once():
    clean, dirty = _model(torch.float32), _model(torch.float32)
    opt_c = torch.optim.SGD(clean.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(dirty.parameters(), lr=0.1)
    ConditionTracker(opt_c)  # the clean twin is tracked too (its hooks keep it)
    tr_d = ConditionTracker(opt_d)
    for step in range(6):
        _grads(clean, step)
        opt_c.step()
        _grads(dirty, step)
        first = next(dirty.parameters())
        before = first.detach().clone()
        if step == 3:
            # a broken batch: the optimizer takes a NaN step, the tracker must not absorb it
            first.grad[0, 0] = float("nan")
        opt_d.step()
        if step == 3:
            with torch.no_grad():
                first.copy_(before)  # the user repairs the weights; later steps are clean again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tr_d.compute()["SGD/pg0"]
        tr_d.compute()
    nonfinite_warnings = [w for w in caught if "non-finite" in str(w.message)]
    assert len(nonfinite_warnings) == 1
    assert result["nonfinite_steps"] == 1 and result["steps"] == 5
    assert all(math.isfinite(result[k]) for k in ("a", "b", "c", "c2", "variance_ratio", "bias_ratio"))
    assert result["a"] == pytest.approx(0.5)  # 5 finite steps of η = 0.1


def test_nan_in_adam_state_never_poisons_or_flips():
    model = _model(torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.9))
    tracker = ConditionTracker(opt, trend=TrendOptions(warmup=1, min_samples=3, patience=1))
    for step in range(40):
        _grads(model, step)
        opt.step()
        if step == 20:
            saved = {p: opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()}
            for p in model.parameters():
                opt.state[p]["exp_avg_sq"].fill_(float("nan"))
        if step == 21:
            for p in model.parameters():
                opt.state[p]["exp_avg_sq"].copy_(saved[p])
    with pytest.warns(UserWarning, match="non-finite"):
        result = tracker.compute()["Adam/pg0"]
    assert result["nonfinite_steps"] >= 1
    assert all(math.isfinite(result[k]) for k in ("a", "b", "c", "c2", "bias_ratio"))


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(switch_to_amsgrad="yes"), "switch_to_amsgrad"), (dict(trend={"margin": 0.1}), "trend")],
)
def test_bad_tracker_options_name_the_option(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ConditionTracker(torch.optim.Adam(_model().parameters()), **kwargs)


def test_param_group_added_during_training_is_picked_up_under_its_own_name():
    model = _model()
    head = torch.nn.Linear(1, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = ConditionTracker(opt)
    for step in range(3):
        _grads(model, step)
        opt.step()
    opt.add_param_group({"params": head.parameters(), "lr": 0.001, "name": "finetune"})
    for step in range(3, 6):
        _grads(model, step)
        head.zero_grad()
        head(torch.ones(2, 1, dtype=torch.float64)).sum().backward()
        opt.step()
    result = tracker.compute()
    assert result["Adam/pg0"]["steps"] == 6
    assert result["Adam/finetune"]["steps"] == 3


def test_checkpoint_of_an_older_version_loads_with_defaults():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tracker = ConditionTracker(opt)
    for step in range(4):
        _grads(model, step)
        opt.step()
    state = copy.deepcopy(tracker.state_dict())
    # an older layout: fewer accumulators, no detectors, no switch record, no counts
    for g in state["groups"]:
        g["accumulators"] = g["accumulators"][:7]
        del g["detectors"], g["count"]
    del state["switched"], state["version"]
    fresh = ConditionTracker(opt)
    tracker.remove()
    fresh.load_state_dict(state)
    result = fresh.compute()["Adam/pg0"]
    assert result["steps"] == 4 and result["nonfinite_steps"] == 0
    assert math.isnan(result["bias_slope"])
