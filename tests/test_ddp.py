"""``switch_to_amsgrad`` under torch.distributed: rank 0's verdict is broadcast, every rank switches at one step.

Two CPU processes (gloo, ``torch.multiprocessing.spawn``) train the paper's divergence example (design notes §3)
with the parameter wrapped in ``DistributedDataParallel``; both ranks read the same index stream, so DDP's
gradient average is the paper's gradient and the two replicas stay identical. To show that the decision is rank
0's, one rank gets a detector that can never flag (``patience`` out of reach; the sampling grid, and so the steps at
which the ranks meet in the broadcast, is unchanged): its own verdict stays unknown (NaN) for the whole run, while
rank 0's turns to 1.0 (trending toward violation) at sample step 422 and switches both ranks from step 423.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_adamtype import ConditionTracker, TrendOptions

try:
    from . import divergence_problem as dp
    from . import gloo_ranks
except ImportError:
    import divergence_problem as dp
    import gloo_ranks

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

STEPS = 600  # the switch happens at optimizer step 423 (seed 0)
#: same grid as the default, but no streak can reach patience within the run (1 000 samples: 10^62 steps at 16 per
#: decade), so the verdict stays NaN (unknown). (10**6, as before, overflows TrendDetector.steps_needed(): a float
#: grid step past 10^308, so compute() raises OverflowError.)
NEVER = TrendOptions(patience=1000)
#: keys that follow from a rank's own verdict (not from the shared numbers)
VERDICT_KEYS = tuple(f"{kind}_{field}" for kind in ("bias", "variance") for field in ("violation", "changed_at", "steps_needed"))


class _X(nn.Module):
    def __init__(self):
        super().__init__()
        self.x = dp.make_param()

    def forward(self, i: int):
        g = dp.stochastic_gradient(self.x.detach(), i)
        return (g * self.x).sum()  # ∂/∂x = g exactly


def _job(rank: int, deaf_rank: int | None) -> dict:
    model = nn.parallel.DistributedDataParallel(_X())
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=dp.BETAS, eps=dp.EPS)
    tracker = ConditionTracker(opt, switch_to_amsgrad=True, trend=NEVER if rank == deaf_rank else None)
    first_amsgrad_step = None
    for k, i in enumerate(dp.draw_indices(STEPS, 0)):
        opt.zero_grad(set_to_none=True)
        model(i).backward()
        opt.step()
        if first_amsgrad_step is None and opt.param_groups[0]["amsgrad"]:
            first_amsgrad_step = k + 2  # set in the post-hook of step k + 1: step k + 2 runs as AMSGrad
    return {
        "switched": tracker.switched,
        "events": [[name, step] for name, step, _ in tracker.switch_events],
        "first_amsgrad_step": first_amsgrad_step,
        "amsgrad": opt.param_groups[0]["amsgrad"],
        "x": float(model.module.x.detach()),
        "compute": tracker.compute(),
    }


def _spawn(tmp_path, deaf_rank: int | None) -> list[dict]:
    return gloo_ranks.spawn_two(tmp_path, _job, deaf_rank)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_rank_zero_decides_and_every_rank_switches_at_its_step(tmp_path):
    """Rank 1 cannot flag on its own, yet it switches at rank 0's step; the replicas stay identical."""
    r0, r1 = _spawn(tmp_path, deaf_rank=1)
    assert r0["switched"] == {"Adam/pg0": 423}
    assert r1["switched"] == {"Adam/pg0": 423}
    assert r0["events"] == r1["events"] == [["Adam/pg0", 423]]
    assert r0["first_amsgrad_step"] == r1["first_amsgrad_step"] == 423
    assert r0["amsgrad"] is True and r1["amsgrad"] is True
    assert r0["x"] == r1["x"]
    # rank 1's own verdict never became known (NaN: no streak reached its patience), rank 0's turned to violation
    # at the sample before the switch: rank 0's decision was used
    a, b = r0["compute"]["Adam/pg0"], r1["compute"]["Adam/pg0"]
    assert a["bias_violation"] == 1.0 and a["bias_changed_at"] == 422 and a["bias_steps_needed"] == 0
    assert math.isnan(b["bias_violation"]) and math.isnan(b["bias_changed_at"]) and b["bias_steps_needed"] > STEPS
    # everything but the verdicts is the same number on both ranks (the slopes and windowed ratios too: rank 1 fitted
    # the same samples, only its patience differs)
    assert a.keys() == b.keys()
    for key in a:
        if key not in VERDICT_KEYS:
            assert _same(a[key], b[key]), (key, a[key], b[key])
    # and they equal a single-process run of the same problem
    param, _, tracker = dp.run("adam", STEPS, 0, tracker_factory=lambda o: ConditionTracker(o, switch_to_amsgrad=True))
    assert tracker.switched == {"Adam/pg0": 423}
    assert r0["x"] == float(param.detach())
    single = tracker.compute()["Adam/pg0"]
    for key in a:
        assert _same(a[key], single[key]), (key, a[key], single[key])


def test_a_rank_zero_that_does_not_flag_keeps_every_rank_on_adam(tmp_path):
    """The converse: rank 1 flags on its own (its local verdict is 1.0) but rank 0's stays unknown, so no rank
    switches."""
    r0, r1 = _spawn(tmp_path, deaf_rank=0)
    assert r0["switched"] == r1["switched"] == {}
    assert r0["events"] == r1["events"] == []
    assert r0["amsgrad"] is False and r1["amsgrad"] is False
    assert r0["first_amsgrad_step"] is None and r1["first_amsgrad_step"] is None
    assert r1["compute"]["Adam/pg0"]["bias_violation"] == 1.0
    assert math.isnan(r0["compute"]["Adam/pg0"]["bias_violation"])
    assert r0["x"] == r1["x"] and abs(r0["x"]) > 10  # plain Adam keeps drifting
    # rank 1's verdict is the one of a single-process Adam run that never switches
    param, _, tracker = dp.run("adam", STEPS, 0, tracker_factory=lambda o: ConditionTracker(o))
    assert r0["x"] == float(param.detach())
    single = tracker.compute()["Adam/pg0"]
    for key, value in r1["compute"]["Adam/pg0"].items():
        assert _same(value, single[key]), (key, value, single[key])
