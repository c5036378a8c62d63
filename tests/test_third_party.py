"""Adapters for other packages' optimizers (lightning_adamtype/third_party.py) against a float64 oracle written from
each optimizer's published recurrence (tests/third_party_reference.py), twin runs bitwise untouched, and the declined
classes. Each package is optional: its tests skip, with the install command, where it is missing (timm needs
torchvision: CI runs this file in .ci-venv)."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn

import lightning_adamtype
from lightning_adamtype import ConditionTracker

import third_party_reference as tpr
from runs import STEPS, make_run, train

INSTALL = {
    "timm": 'pip install timm (needs torchvision, i.e. a CUDA build of torch: .ci/run installs it in .ci-venv)',
    "pytorch_optimizer": "pip install pytorch-optimizer",
    "schedulefree": "pip install schedulefree",
    "transformers": "pip install transformers",
}
RTOL = {"a": 1e-4, "b": 1e-4, "c": 1e-3, "c2": 1e-3}
HF = "transformers.optimization:Adafactor"


def optimizer_class(path: str) -> type:
    """The class at ``package.module:Name``, or a skip naming the install command."""
    module, name = path.split(":")
    package = module.split(".")[0]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        pytest.skip(f"{package} is not installed ({error}); install it with: {INSTALL[package]}")


MAPPED = [
    ("timm-adamp", "timm.optim:AdamP", dict(lr=1e-2, weight_decay=0.1, nesterov=True), tpr.adam_corrected()),
    ("timm-nadamw", "timm.optim:NAdamW", dict(lr=1e-2, weight_decay=0.05), tpr.adam_corrected()),
    ("timm-nadamw-maximize", "timm.optim:NAdamW", dict(lr=1e-3, maximize=True, foreach=False),
     tpr.adam_corrected("maximize")),
    ("timm-adabelief-coupled", "timm.optim:AdaBelief",
     dict(lr=1e-2, weight_decay=0.1, decoupled_decay=False, eps=1e-12, betas=(0.9, 0.9)), tpr.adabelief("decoupled_decay", False, "amsgrad")),
    ("timm-adabelief-amsgrad", "timm.optim:AdaBelief", dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), rectify=False),
     tpr.adabelief("decoupled_decay", False, "amsgrad")),
    ("timm-laprop", "timm.optim:LaProp", dict(lr=1e-2, weight_decay=0.01), tpr.laprop),
    ("po-adamp", "pytorch_optimizer:AdamP", dict(lr=1e-2, weight_decay=0.1), tpr.po_adamp),
    ("po-adamp-coupled-foreach", "pytorch_optimizer:AdamP", dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, foreach=True),
     tpr.po_adamp),
    ("po-adabelief", "pytorch_optimizer:AdaBelief", dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, eps=1e-12),
     tpr.adabelief("weight_decouple", True, "ams_bound")),
    ("po-adabelief-ams-foreach", "pytorch_optimizer:AdaBelief", dict(lr=1e-2, ams_bound=True, betas=(0.9, 0.6), foreach=True),
     tpr.adabelief("weight_decouple", True, "ams_bound")),
    ("po-lamb", "pytorch_optimizer:Lamb", dict(lr=1e-2, weight_decay=0.1, foreach=False), tpr.po_lamb()),
    ("po-lamb-prenorm-foreach", "pytorch_optimizer:Lamb", dict(lr=1e-2, pre_norm=True, max_grad_norm=0.5, foreach=True),
     tpr.po_lamb(pre_norm=True, max_grad_norm=0.5)),
    ("po-lamb-coupled", "pytorch_optimizer:Lamb", dict(lr=1e-2, weight_decay=0.1, weight_decouple=False), tpr.po_lamb()),
    ("po-adan", "pytorch_optimizer:Adan", dict(lr=1e-2, weight_decay=0.02, foreach=False), tpr.po_adan),
    ("po-adan-foreach", "pytorch_optimizer:Adan", dict(lr=1e-2, foreach=True), tpr.po_adan),
    ("schedulefree", "schedulefree:AdamWScheduleFree", dict(lr=1e-2, warmup_steps=4), tpr.schedule_free),
    ("schedulefree-forloop", "schedulefree:AdamWScheduleFree", dict(lr=1e-2, warmup_steps=0, foreach=False),
     tpr.schedule_free),
    # transformers' Adafactor on the run's 2-D weights (factored) and 1-D biases/extra; with relative_step the groups'
    # lr (scheduled) is ignored by the package, without it the schedule reaches η
    ("hf-adafactor-default", HF, dict(lr=1e-2, relative_step=True), tpr.HFAdafactor()),
    ("hf-adafactor-lr", HF, dict(lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.1),
     tpr.HFAdafactor()),
    ("hf-adafactor-lr-scaled", HF, dict(lr=0.2, relative_step=False, eps=(1e-20, 0.5), decay_rate=-0.5),
     tpr.HFAdafactor()),
    ("hf-adafactor-warmup", HF, dict(lr=1e-2, relative_step=True, warmup_init=True), tpr.HFAdafactor()),
    ("hf-adafactor-clip", HF, dict(lr=1e-2, relative_step=False, clip_threshold=0.3), tpr.HFAdafactor()),
    ("hf-adafactor-beta1", HF, dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1), tpr.HFAdafactor()),
]


def _groups_keep_lr(cls: type):
    """transformers' Adafactor refuses a default lr with relative_step=True (it ignores lr then): give each of the
    run's groups its lr instead, so the ExponentialLR schedule runs (unread) as in every other configuration."""
    def make(groups, lr, **kwargs):
        return cls([{"lr": lr, **g} for g in groups], **kwargs)
    return make


def build(path: str, kwargs: dict):
    cls = optimizer_class(path)
    model, opt, sched, data = make_run(_groups_keep_lr(cls) if kwargs.get("relative_step") else cls, kwargs)
    if hasattr(opt, "train"):  # schedule-free optimizers step only in train mode
        opt.train()
    return model, opt, sched, data


@pytest.mark.parametrize("name,path,kwargs,rule", MAPPED, ids=[m[0] for m in MAPPED])
def test_matches_float64_oracle(name, path, kwargs, rule):
    """Two groups, ExponentialLR, a None gradient at some steps, 14 steps: a, b, c, c2 as the oracle's."""
    check_against_oracle(path, kwargs, rule)


def check_against_oracle(path: str, kwargs: dict, rule) -> None:
    """The tracker's a, b, c, c2 per group equal the oracle's after STEPS steps of the shared run."""
    model, opt, sched, data = build(path, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mapped optimizer attaches without a warning
        tracker = ConditionTracker(opt)
    oracle = tpr.ThirdPartyOracle(opt, rule)
    train(model, opt, sched, data, range(1, STEPS + 1), oracle)
    got = tracker.compute()
    expected = {f"{type(opt).__name__}/pg{i}": e for i, e in enumerate(oracle.compute())}
    assert set(got) == set(expected)
    for group, exp in expected.items():
        assert got[group]["steps"] == exp["steps"] == STEPS, (group, got[group]["steps"])
        assert got[group]["c"] > 0 and got[group]["a"] > 0
        for key, rtol in RTOL.items():
            assert got[group][key] == pytest.approx(exp[key], rel=rtol, abs=1e-12), (group, key, got[group][key], exp[key])


def _state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_twins_bitwise(path: str, kwargs: dict, expect_measured: bool) -> tuple[ConditionTracker, list[str]]:
    """The same run with and without a tracker: parameters, gradients and state bitwise equal after every step.
    Returns the tracker and the package's warnings (attaching and training)."""
    runs = [build(path, kwargs) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = ConditionTracker(runs[1][1])
        for t in range(1, 9):
            for model, opt, sched, data in runs:
                train(model, opt, sched, data, range(t, t + 1))
            _compare(runs)
    assert bool(tracker.compute()) == expect_measured
    return tracker, _ours(caught)


def _compare(runs) -> None:
    """Both runs' parameters, gradients, optimizer state and hyper-parameters are bitwise equal."""
    (bare, bare_opt, *_), (tracked, tracked_opt, *_) = runs
    for p, q in zip(bare.parameters(), tracked.parameters()):
        assert torch.equal(p, q)
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
        _state_equal(bare_opt.state[p], tracked_opt.state[q])
    for g, h in zip(bare_opt.param_groups, tracked_opt.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}


@pytest.mark.parametrize("name,path,kwargs,rule", MAPPED, ids=[m[0] for m in MAPPED])
def test_tracked_run_is_bitwise_untouched(name, path, kwargs, rule):
    assert_twins_bitwise(path, kwargs, expect_measured=True)


DECLINED = [
    ("timm-lamb", "timm.optim:Lamb", dict(lr=1e-2), "trust ratio"),
    ("timm-adopt", "timm.optim:Adopt", dict(lr=1e-2), "v_{t−1}"),
    ("po-lion", "pytorch_optimizer:Lion", dict(lr=1e-3), "sign"),
]


def _ours(caught) -> list[str]:
    return [str(w.message) for w in caught if "lightning_adamtype" in str(w.message)]


@pytest.mark.parametrize("name,path,kwargs,reason", DECLINED, ids=[d[0] for d in DECLINED])
def test_declined_warns_once_and_trains_untouched(name, path, kwargs, reason):
    cls = optimizer_class(path)
    tracker, messages = assert_twins_bitwise(path, kwargs, expect_measured=False)
    assert len(messages) == 1, messages
    assert cls.__qualname__ in messages[0] and "declined" in messages[0] and reason in messages[0], messages[0]
    assert "register_adapter" in messages[0]
    assert not tracker.attached


@torch.no_grad()
def _plain_sgd_step(self, closure=None):
    for group in self.param_groups:
        for p in group["params"]:
            p.add_(p.grad, alpha=-group["lr"])


def test_bitsandbytes_8bit_declined_on_cpu():
    """bitsandbytes is recognised by name (it is not installed here): its 8-bit Adam is declined with the reason."""
    for module, name in [("bitsandbytes.optim.adam", "Adam8bit"), ("bitsandbytes.optim.adamw", "AdamW8bit")]:
        stand_in = type(name, (torch.optim.Optimizer,), {"__module__": module, "step": _plain_sgd_step})
        stand_in.__qualname__ = name
        p = nn.Parameter(torch.ones(3))
        opt = stand_in([p], dict(lr=0.1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = ConditionTracker(opt)
        (message,) = _ours(caught)
        assert name in message and "needs CUDA, not yet mapped" in message and "block-quantized" in message
        p.grad = torch.ones(3)
        opt.step()
        assert torch.equal(p.detach(), torch.full((3,), 0.9)) and tracker.compute() == {}


def test_subclass_overriding_step_is_not_mapped():
    cls = optimizer_class("pytorch_optimizer:AdaBelief")

    class Tweaked(cls):  # type: ignore[misc, valid-type]
        def step(self, closure=None):
            return super().step(closure)

    class Plain(cls):  # type: ignore[misc, valid-type]
        pass

    p = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ConditionTracker(Tweaked([p])).attached
        assert ConditionTracker(Plain([p])).attached
    (message,) = _ours(caught)
    assert "Tweaked" in message and "overrides step()" in message and "register_adapter" in message
    # a registered adapter takes precedence over the name lookup
    lightning_adamtype.register_adapter(Tweaked, lightning_adamtype.find_adapter(Plain([p])))
    try:
        assert ConditionTracker(Tweaked([p])).attached
    finally:
        lightning_adamtype.adapters.unregister_adapter(Tweaked)


def test_unmapped_option_stops_that_group_with_a_reason():
    """timm's AdamP with caution=True: the group is not measured, one warning names the option; training untouched."""
    tracker, messages = assert_twins_bitwise("timm.optim:AdamP", dict(lr=1e-2, caution=True), expect_measured=True)
    assert any("caution=True" in m and "timm.optim.AdamP" in m for m in messages), messages
    assert all(v["measured"] == 0.0 for v in tracker.compute().values())


@pytest.mark.parametrize("clip,clipped", [(0.3, True), (1e6, False)], ids=["clips", "never-clips"])
def test_hf_adafactor_clip_threshold(clip, clipped):
    """The update clip d_t = max(1, RMS(U_t)/clip_threshold) is in η: it bites at some steps with a small threshold
    (and never with a huge one), and the tracker follows the oracle either way."""
    rule = tpr.HFAdafactor()
    check_against_oracle(HF, dict(lr=1e-2, relative_step=False, clip_threshold=clip), rule)
    assert (max(rule.clips) > 1.0) == clipped and min(rule.clips) >= 1.0


def test_hf_adafactor_is_mapped_not_declined():
    """transformers' Adafactor attaches without a warning and is listed as mapped."""
    cls = optimizer_class(HF)
    assert lightning_adamtype.third_party.known_classes()["transformers.optimization.Adafactor"] == "mapped"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ConditionTracker(cls([nn.Parameter(torch.ones(3, 2))])).attached


def test_hf_adafactor_untouched_coordinates_are_inactive():
    """A row of a 2-D weight and two entries of a bias never get a gradient: their V̂ is only the eps[0] = 1e-30 the
    package adds to g² (η ≈ 1e13), and they count as inactive, not in a, b, c."""
    cls = optimizer_class(HF)
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))
    opt = cls([w, b], lr=1e-2, relative_step=False)
    tracker = ConditionTracker(opt)
    for t in range(6):
        opt.zero_grad()
        ((w[1:] ** 2).sum() * (1 + t) + (b[:3] ** 3).sum()).backward()
        opt.step()
    (got,) = tracker.compute().values()
    assert got["coordinates"] == 17 and got["inactive"] == 5 and got["steps"] == 6
    assert 0 < got["a"] and got["a_mean"] < 1.0 and got["c"] < 1.0, got
