"""The switch to AMSGrad: exact in-place semantics, behaviour on the paper's divergence example, resume, Lightning.

``AdamAdapter.enable_amsgrad`` sets ``group["amsgrad"] = True`` and seeds ``max_exp_avg_sq`` with the current
``exp_avg_sq``. The step after it must be bit for bit the step a fresh ``torch.optim.Adam(amsgrad=True)`` (same
implementation) takes from that state, i.e. v̂_{t+1} = max(v_t, v_{t+1}) in torch's uncorrected convention.

Measured on the divergence example (β = (0, 0.9), lr 0.1, float64; default options: the trend detector reads the
windowed increment ratio (C(T) − C(S))/(A(T) − A(S)), S ≈ T/2, over active coordinates): the bias verdict turns to
violation (1.0) at sample step 422 for seeds 0 and 1 and 1155 for seed 2, which switches Adam to AMSGrad from optimizer
step 423, resp. 1156 (the first step run as AMSGrad); |x| then comes back (seed 0: |x| ≈ 0.01 at 8 000 steps while
plain Adam is at ≈ 110), and the (non-sticky) verdict clears to 0.0 (holds) once the window has left the Adam steps.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import lightning_adamtype
from lightning_adamtype import ConditionTracker, TrendOptions
from lightning_adamtype.adapters import find_adapter, registered_adapters

try:
    from . import divergence_problem as dp
except ImportError:
    import divergence_problem as dp

SWITCH_STEP = {0: 423, 1: 423, 2: 1156}  # measured: first optimizer step run as AMSGrad, per seed


# ================================================================================ exactness of the switch
IMPLS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2)
        self.late = nn.Linear(6, 2)  # no gradient before the switch: no optimizer state at switch time

    def forward(self, x, use_late: bool):
        out = self.head(torch.tanh(self.body(x)))
        return out + self.late(x) if use_late else out


def _grads(model: _Net, x, y, scale: float, use_late: bool) -> None:
    model.zero_grad(set_to_none=True)
    loss = scale * nn.functional.mse_loss(model(x, use_late), y)
    loss.backward()


def _make(cls, model, impl, amsgrad: bool):
    kw = dict(lr=1e-2, betas=(0.9, 0.6), eps=1e-8, weight_decay=0.05, amsgrad=amsgrad, **IMPLS[impl])
    return cls(model.parameters(), **kw)


def _state_snapshot(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.clone() for k, v in opt.state[p].items()}
        for name, p in model.named_parameters()
        if opt.state.get(p)
    }


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
def test_switch_then_step_is_exactly_torch_amsgrad(cls, impl, device):
    torch.manual_seed(0)
    model = _Net().to(device)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=gen).to(device), torch.randn(16, 2, generator=gen).to(device))
               for _ in range(8)]
    opt = _make(cls, model, impl, amsgrad=False)
    for x, y in batches[:5]:
        _grads(model, x, y, 1.0, use_late=False)
        opt.step()
    assert "max_exp_avg_sq" not in opt.state[model.body.weight]
    v_t = {name: s["exp_avg_sq"] for name, s in _state_snapshot(opt, model).items()}

    adapter = find_adapter(opt)
    assert adapter is lightning_adamtype.adapters.registered_adapters()[cls]
    adapter.enable_amsgrad(opt, opt.param_groups[0])
    assert opt.param_groups[0]["amsgrad"] is True
    for name, p in model.named_parameters():
        if name.startswith("late"):
            assert p not in opt.state or not opt.state[p]
        else:
            st = opt.state[p]
            assert torch.equal(st["max_exp_avg_sq"], st["exp_avg_sq"])
            assert st["max_exp_avg_sq"].data_ptr() != st["exp_avg_sq"].data_ptr()  # a copy, not an alias

    # the reference: a fresh torch AMSGrad of the same implementation, loaded from a deep copy of the switched state
    ref_model = copy.deepcopy(model)
    ref = _make(cls, ref_model, impl, amsgrad=True)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    # the same state, but never switched: shows the switch changes the step (v shrinks, so the max matters)
    plain_model = copy.deepcopy(model)
    plain = _make(cls, plain_model, impl, amsgrad=False)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["amsgrad"] = False
    plain.load_state_dict(saved)

    for k, (x, y) in enumerate(batches[5:]):
        use_late = k >= 1  # the third group of params gets its first gradient after the switch
        for m in (model, ref_model, plain_model):
            _grads(m, x, y, 0.05, use_late)  # smaller gradients: v_{t+1} < v_t for many coordinates
        before = _state_snapshot(opt, model)
        opt.step()
        ref.step()
        plain.step()
        for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
            assert torch.equal(p, q), (name, k, (p - q).abs().max())
            st, rst = opt.state[p], ref.state[q]
            if p.grad is None:  # `late` before its first gradient: no state on either side
                assert not st and not rst, name
                continue
            assert set(st) == set(rst) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, (name, set(st))
            for key in st:
                assert torch.equal(torch.as_tensor(st[key]), torch.as_tensor(rst[key])), (name, key, k)
            # the reference semantics: v̂_{t+1} = max(v̂_t, v_{t+1}) (torch's uncorrected second moments)
            if name in before:
                expected = torch.maximum(before[name]["max_exp_avg_sq"], st["exp_avg_sq"])
            else:  # first step of a parameter after the switch: torch starts the maximum from zeros
                expected = st["exp_avg_sq"]
            assert torch.equal(st["max_exp_avg_sq"], expected), (name, k)
        if k == 0:
            # the first step after the switch uses max(v_t, v_{t+1}) with v_t the pre-switch exp_avg_sq
            w = "body.weight"
            assert torch.equal(opt.state[model.body.weight]["max_exp_avg_sq"],
                               torch.maximum(v_t[w], opt.state[model.body.weight]["exp_avg_sq"]))
            shrank = opt.state[model.body.weight]["exp_avg_sq"] < v_t[w]
            assert shrank.any(), "test setup: v must shrink somewhere for the max to matter"
            assert not torch.equal(model.body.weight, plain_model.body.weight)


def test_only_adam_and_adamw_adapters_can_switch():
    adapters = {cls: a for cls, a in registered_adapters().items() if cls.__module__.startswith("torch.optim")}
    can = {cls for cls, adapter in adapters.items() if callable(getattr(adapter, "enable_amsgrad", None))}
    assert can == {torch.optim.Adam, torch.optim.AdamW}
    for cls in (torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.SGD, torch.optim.Adamax, torch.optim.NAdam,
                torch.optim.RAdam):
        assert cls in adapters and not hasattr(adapters[cls], "enable_amsgrad"), cls


# ================================================================================ on the divergence example
def _switch_tracker(opt):
    return ConditionTracker(opt, switch_to_amsgrad=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_is_switched_on_the_divergence_example(seed):
    steps = 2000
    param = dp.make_param()
    opt, _ = dp.make_optimizer("adam", param)
    tracker = _switch_tracker(opt)
    flags: list[bool] = []
    xs: list[float] = []  # |x| after each step
    at_turn: list = []  # compute() and its warnings right after the post-hook that switched

    def record(k: int) -> None:
        flags.append(opt.param_groups[0]["amsgrad"])
        xs.append(abs(float(param.detach())))
        if flags[-1] and not at_turn:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                at_turn.append(tracker.compute()["Adam/pg0"])
            at_turn.append([str(w.message) for w in caught])

    dp.train(param, opt, dp.draw_indices(steps, seed), on_step=record)
    step = SWITCH_STEP[seed]
    assert tracker.switched == {"Adam/pg0": step}
    # `step` is the first optimizer step run as AMSGrad: the flag was set in the post-hook of step `step` − 1
    assert flags.index(True) + 1 == step - 1 and all(flags[step - 2:]) and not any(flags[: step - 2])
    assert opt.param_groups[0]["amsgrad"] is True
    assert "max_exp_avg_sq" in opt.state[param]
    assert [(name, s) for name, s, _ in tracker.switch_events] == [("Adam/pg0", step)]
    reason = tracker.switch_events[0][2]
    assert "bias ratio" in reason and "slope" in reason
    # at the switch: the bias verdict had just turned to violation (1.0), at the sample step whose post-hook switched,
    # and the first reading says so in a warning
    row, messages = at_turn
    assert row["bias_violation"] == 1.0 and row["bias_changed_at"] == step - 1 and row["steps"] == step - 1
    assert row["bias_slope"] > -TrendOptions().margin
    assert sum("bias verdict of Adam/pg0 turned to 'trending toward violation'" in m for m in messages) == 1
    # the switch pulls x back: at 2 000 steps the switched run is below its |x| at the switch (9.9, 5.4, 20.7 for
    # seeds 0, 1, 2; now 6.9, 2.9, 17.5), while plain Adam, the same run up to the switch, drifts on (29.5, 22.8, 26.6)
    plain, _, _ = dp.run("adam", steps, seed)
    at_switch = xs[step - 2]  # after step `step` − 1, the last Adam step: both runs are still the same here
    assert xs[-1] < at_switch < abs(float(plain.detach())), (xs[-1], at_switch, float(plain.detach()))
    if step < steps / 4:  # switched early (seeds 0 and 1): by 2 000 steps x is well below plain Adam's
        assert xs[-1] < abs(float(plain.detach())) / 2, (xs[-1], float(plain.detach()))


def test_switched_adam_converges_like_amsgrad():
    steps = 8000
    param, opt, tracker = dp.run("adam", steps, 0, tracker_factory=_switch_tracker)
    plain, _, _ = dp.run("adam", steps, 0)
    assert tracker.switched == {"Adam/pg0": 423}
    assert abs(float(plain.detach())) > 10  # ≈ 110
    assert abs(float(param.detach())) < 0.1  # ≈ 0.011
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = tracker.compute()["Adam/pg0"]
    # once AMSGrad, the windowed ratio falls and the (non-sticky) bias verdict clears to "holds", after the switch
    assert row["bias_violation"] == 0.0 and row["bias_slope"] < -0.3, (row["bias_violation"], row["bias_slope"])
    assert 423 < row["bias_changed_at"] <= steps and row["bias_steps_needed"] == 0
    # the window forgets Adam's first 423 steps, the cumulative ratio does not
    assert row["bias_window_ratio"] < row["bias_ratio"] / 100, (row["bias_window_ratio"], row["bias_ratio"])
    assert not [w for w in caught if "bias verdict" in str(w.message)]  # a verdict that holds warns about nothing


@pytest.mark.parametrize("kind", ["amsgrad", "adagrad", "sgd"])
def test_optimizers_that_satisfy_the_condition_are_never_switched(kind):
    # Adagrad/SGD cannot switch: a flagged group would be recorded with −1 and warned about, so an empty
    # `switched` and no warning show the verdict never held at any sample step.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        param, opt, tracker = dp.run(kind, 2000, 0, tracker_factory=_switch_tracker)
    assert tracker.switched == {} and tracker.switch_events == []
    if kind == "amsgrad":
        assert opt.param_groups[0]["amsgrad"] is True
    else:
        assert "amsgrad" not in opt.param_groups[0]


def test_flagged_optimizer_that_cannot_switch_is_left_alone():
    """RMSprop (β = 0.9) violates the bias condition on this problem too (flagged for seed 0 at 2 000 steps) but has
    no AMSGrad: one warning, the group is recorded with step −1, and training is bit for bit untouched."""
    with pytest.warns(UserWarning, match="cannot switch to AMSGrad") as record:
        param, opt, tracker = dp.run("rmsprop", 2000, 0, tracker_factory=_switch_tracker)
    assert sum("cannot switch" in str(w.message) for w in record) == 1
    assert tracker.switched == {"RMSprop/pg0": -1}
    assert tracker.switch_events == []
    assert "amsgrad" not in opt.param_groups[0]
    # compute() says it too: the verdict turned to violation since the (first) reading
    with pytest.warns(UserWarning, match="bias verdict of RMSprop/pg0 turned to 'trending toward violation'"):
        row = tracker.compute()["RMSprop/pg0"]
    assert row["bias_violation"] == 1.0
    untracked, _, _ = dp.run("rmsprop", 2000, 0)
    assert torch.equal(param.detach(), untracked.detach())


# ================================================================================ resume (plain torch)
RESUME_STEPS = 1200


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _resumed_run(stop: int):
    """Train `stop` steps, checkpoint x, optimizer and tracker through torch.save, rebuild everything from the
    checkpoint and train the remaining steps. Returns (param, opt, tracker, events after resume)."""
    indices = dp.draw_indices(RESUME_STEPS, 0)
    param = dp.make_param()
    opt, _ = dp.make_optimizer("adam", param)
    tracker = _switch_tracker(opt)
    dp.train(param, opt, indices[:stop])
    ckpt = _roundtrip({"x": param.detach().clone(), "opt": opt.state_dict(), "tracker": tracker.state_dict()})
    tracker.remove()

    param2 = dp.make_param()
    with torch.no_grad():
        param2.copy_(ckpt["x"])
    opt2, _ = dp.make_optimizer("adam", param2)  # constructed as plain Adam: the checkpoint says amsgrad or not
    opt2.load_state_dict(ckpt["opt"])
    tracker2 = _switch_tracker(opt2)
    tracker2.load_state_dict(ckpt["tracker"])
    amsgrad_at_resume = opt2.param_groups[0]["amsgrad"]
    dp.train(param2, opt2, indices[stop:])
    return param2, opt2, tracker2, amsgrad_at_resume


@pytest.fixture(scope="module")
def uninterrupted():
    param, opt, tracker = dp.run("adam", RESUME_STEPS, 0, tracker_factory=_switch_tracker)
    assert tracker.switched == {"Adam/pg0": 423}
    return float(param.detach()), tracker.compute()


def _assert_same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for key, value in a[group].items():
            other = b[group][key]
            same = value == other or (isinstance(value, float) and math.isnan(value) and math.isnan(other))
            assert same, (group, key, value, other)


def test_resume_before_the_switch_switches_at_the_same_step(uninterrupted):
    x, final = uninterrupted
    param, opt, tracker, amsgrad_at_resume = _resumed_run(stop=300)
    assert amsgrad_at_resume is False
    assert tracker.switched == {"Adam/pg0": 423}
    assert [(n, s) for n, s, _ in tracker.switch_events] == [("Adam/pg0", 423)]
    assert opt.param_groups[0]["amsgrad"] is True
    assert float(param.detach()) == x
    _assert_same_numbers(tracker.compute(), final)


def test_resume_after_the_switch_stays_amsgrad(uninterrupted):
    x, final = uninterrupted
    param, opt, tracker, amsgrad_at_resume = _resumed_run(stop=700)
    assert amsgrad_at_resume is True
    assert opt.param_groups[0]["amsgrad"] is True
    assert tracker.switched == {"Adam/pg0": 423}  # restored, not re-decided
    assert tracker.switch_events == []  # no second switch
    assert float(param.detach()) == x
    _assert_same_numbers(tracker.compute(), final)


# ================================================================================ Lightning
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

try:
    import pytorch_lightning as pl
    import tensorboard  # noqa: F401

    from lightning_adamtype import AdamTypeMonitor
except ImportError:  # the plain-torch tests above still run
    pl = None

needs_lightning = pytest.mark.skipif(pl is None, reason="needs pytorch_lightning and tensorboard")
_LightningModule = pl.LightningModule if pl is not None else nn.Module

EPOCH = 600  # steps per epoch (one index per batch); the switch (step 423) happens in the first epoch


class DivergenceModule(_LightningModule):
    """x with the paper's stochastic gradient: loss = g(x, i)·x with g detached, so ∂loss/∂x = g exactly."""

    def __init__(self):
        super().__init__()
        self.x = dp.make_param()

    def training_step(self, batch, batch_idx):
        (i,) = batch
        g = dp.stochastic_gradient(self.x.detach(), int(i))
        return (g * self.x).sum()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1, betas=dp.BETAS, eps=dp.EPS)


def _loader() -> DataLoader:
    indices = torch.tensor(dp.draw_indices(EPOCH, 0))
    return DataLoader(TensorDataset(indices), batch_size=1, shuffle=False)


def _trainer(tmp_path, monitor, max_epochs: int, **kw):
    from pytorch_lightning.loggers import TensorBoardLogger

    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=[monitor, *kw.pop("callbacks", [])],
        logger=TensorBoardLogger(tmp_path, name="tb", version=kw.pop("version", 0)),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=100,
        **kw,
    )


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """One epoch (600 steps) with switch_to_amsgrad=True; ModelCheckpoint at the epoch's end."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    tmp = tmp_path_factory.mktemp("lightning_switch")
    monitor = AdamTypeMonitor(switch_to_amsgrad=True, log_every_n_steps=100)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, save_on_train_epoch_end=True)
    trainer = _trainer(tmp, monitor, max_epochs=1, callbacks=[ckpt])
    model = DivergenceModule()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.fit(model, _loader())
    return tmp, trainer, monitor, model, ckpt, out.getvalue()


@needs_lightning
def test_lightning_switch_message_tag_and_tracker(lightning_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, trainer, monitor, model, _, stdout = lightning_run
    assert trainer.global_step == EPOCH
    lines = stdout.splitlines()
    messages = [line for line in lines if line.startswith("[lightning_adamtype]") and "switched to AMSGrad" in line]
    assert len(messages) == 1, stdout
    assert "Adam/pg0" in messages[0] and "423" in messages[0] and "bias ratio" in messages[0]
    # the end-of-fit summary (summary=True by default), printed once, names the switch and the verdict
    assert lines.count("lightning_adamtype summary (Adam):") == 1, stdout
    assert lines.count("  switched to AMSGrad at step 423") == 1, stdout
    assert any(line.startswith("  bias condition (C/A → 0): ") for line in lines), stdout
    assert monitor.trackers[0].switched == {"Adam/pg0": 423}
    assert trainer.optimizers[0].param_groups[0]["amsgrad"] is True

    acc = EventAccumulator(str(tmp / "tb" / "version_0"))
    acc.Reload()
    events = acc.Scalars("adamtype/Adam/pg0/switched")
    assert [(e.step, e.value) for e in events] == [(423, 1.0)]
    assert [e.step for e in acc.Scalars("adamtype/Adam/pg0/bias_ratio")] == [100, 200, 300, 400, 500, 600]
    # the same steps as the plain loop: the callback's tracker saw exactly the plain run
    param, _, tracker = dp.run("adam", EPOCH, 0, tracker_factory=_switch_tracker)
    assert float(model.x.detach()) == float(param.detach())
    _assert_same_numbers(monitor.compute(), tracker.compute())


@needs_lightning
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed run saves no checkpoints
def test_lightning_resume_after_the_switch_stays_amsgrad(lightning_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, _, first_model, ckpt, _ = lightning_run
    path = ckpt.best_model_path or ckpt.last_model_path
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == EPOCH
    assert saved["optimizer_states"][0]["param_groups"][0]["amsgrad"] is True

    monitor = AdamTypeMonitor(switch_to_amsgrad=True, log_every_n_steps=100)
    trainer = _trainer(tmp, monitor, max_epochs=2, version=1, enable_checkpointing=False)
    model = DivergenceModule()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.fit(model, _loader(), ckpt_path=path)
    assert trainer.global_step == 2 * EPOCH
    lines = out.getvalue().splitlines()
    switch_messages = [line for line in lines if line.startswith("[lightning_adamtype]") and "switched to AMSGrad" in line]
    assert switch_messages == [], out.getvalue()  # no new switch
    # the summary reports the switch restored from the checkpoint
    assert lines.count("lightning_adamtype summary (Adam):") == 1, out.getvalue()
    assert lines.count("  switched to AMSGrad at step 423") == 1, out.getvalue()
    assert trainer.optimizers[0].param_groups[0]["amsgrad"] is True
    tracker = monitor.trackers[0]
    assert tracker.switched == {"Adam/pg0": 423}
    assert tracker.switch_events == []
    acc = EventAccumulator(str(tmp / "tb" / "version_1"))
    acc.Reload()
    assert "adamtype/Adam/pg0/switched" not in acc.Tags()["scalars"]
    # the resumed run equals the uninterrupted plain loop over two epochs of the same index stream
    indices = dp.draw_indices(EPOCH, 0)
    param = dp.make_param()
    opt, _ = dp.make_optimizer("adam", param)
    plain_tracker = _switch_tracker(opt)
    dp.train(param, opt, indices + indices)
    assert plain_tracker.switched == {"Adam/pg0": 423}
    assert float(model.x.detach()) == float(param.detach())
    _assert_same_numbers(monitor.compute(), plain_tracker.compute())
