"""Mixed precision: bf16-mixed and 16-mixed (GradScaler) through Lightning on CPU, and bf16 parameters."""

from __future__ import annotations

import math

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from lightning_adamtype import AdamTypeMonitor, ConditionTracker  # noqa: E402
from lightning_runs import TinyModel, make_data, make_trainer  # noqa: E402


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs_and_counts_real_steps(tmp_path, precision):
    monitor = AdamTypeMonitor()
    trainer = make_trainer(tmp_path, [monitor], precision=precision)
    try:
        trainer.fit(TinyModel(), make_data())
    except (RuntimeError, ValueError) as err:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"{precision} does not run on this CPU build: {err}")
    result = monitor.compute()["Adam/pg0"]
    assert all(math.isfinite(result[k]) for k in ("a", "b", "c", "c2", "variance_ratio", "bias_ratio"))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    # a step the GradScaler skipped is not an optimizer step: the count equals the optimizer's own step count
    opt = trainer.optimizers[0]
    optimizer_steps = int(opt.state[opt.param_groups[0]["params"][0]]["step"])
    assert result["steps"] == optimizer_steps
    if precision == "16-mixed" and scaler is not None:
        assert optimizer_steps <= 12


def test_gradients_are_read_unscaled_with_16_mixed(tmp_path):
    """b is computed from the unscaled gradient: it matches a float32 run within AMP noise, not 2**16 times it."""
    fp32 = AdamTypeMonitor()
    make_trainer(tmp_path / "fp32", [fp32]).fit(TinyModel(), make_data())
    amp = AdamTypeMonitor()
    trainer = make_trainer(tmp_path / "amp", [amp], precision="16-mixed")
    try:
        trainer.fit(TinyModel(), make_data())
    except (RuntimeError, ValueError) as err:  # pragma: no cover
        pytest.skip(f"16-mixed does not run on this CPU build: {err}")
    b32, b16 = fp32.compute()["Adam/pg0"]["b"], amp.compute()["Adam/pg0"]["b"]
    assert b16 == pytest.approx(b32, rel=0.5)


def test_bf16_parameters_accumulate_in_float32_or_better():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4).to(torch.bfloat16)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    tracker = ConditionTracker(opt)
    a_ref = 0.0
    for step in range(6):
        layer.zero_grad()
        layer(torch.randn(8, 16, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
        etas = []
        for p in layer.parameters():
            st = opt.state[p]
            t = float(st["step"])
            v = st["exp_avg_sq"].double()
            etas.append((1e-3 / (1 - 0.9**t)) / (v.sqrt() / math.sqrt(1 - 0.999**t) + 1e-8))
        a_ref += min(float(e.min()) for e in etas)
    result = tracker.compute()["Adam/pg0"]
    (group,) = tracker.state_dict()["groups"]  # the public checkpoint holds copies of what the tracker keeps
    assert group["accumulators"].dtype == torch.float64
    etas = [entry["eta"] for entry in group["parameters"].values()]
    assert len(etas) == 2 and all(eta.dtype == torch.float32 for eta in etas)
    held = tracker.held_tensors()
    assert any(t.dtype == torch.float64 for t in held)
    assert not any(t.dtype in (torch.bfloat16, torch.float16) for t in held)  # nothing kept in 16 bits
    assert result["a"] == pytest.approx(a_ref, rel=1e-4)


def _scaled_run(**impl):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01, **impl)
    tracker = ConditionTracker(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    data = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(1))
    for step in range(8):
        opt.zero_grad()
        scaler.scale(layer(data[step]).pow(2).sum()).backward()
        if step == 3:
            layer.weight.grad[0, 0] = float("inf")  # the scaler must skip this step
        scaler.step(opt)
        scaler.update()
    return opt, layer, tracker


@pytest.mark.parametrize("impl", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_grad_scaler_skipped_step_is_not_a_step_and_grads_are_unscaled(impl):
    opt, layer, tracker = _scaled_run(**impl)
    result = tracker.compute()["Adam/pg0"]
    assert float(opt.state[layer.weight]["step"]) == 7
    assert result["steps"] == 7 and result["nonfinite_steps"] == 0
    # unscaled: the same numbers as the reference for-loop run (a scaled gradient would inflate b by 1024²)
    ref_opt, _, ref_tracker = _scaled_run(foreach=False)
    expected = ref_tracker.compute()["Adam/pg0"]
    for key in ("a", "b", "c", "c2"):
        assert result[key] == pytest.approx(expected[key], rel=1e-4), key
