"""FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank holds a shard of every parameter and of its optimizer
state; the tracker combines the shards (a: minimum over ranks; b, c, c2, Ση and coordinate counts: sums) and
must give the numbers of the same run unsharded.

Two CPU processes (gloo, ``torch.multiprocessing.spawn``). Both ranks see the same batch each step, so FSDP's
gradient average equals the single-process gradient and the sharded run is the unsharded run, split by rows (an
odd row count leaves rank 1 one row short, and a 1-row parameter leaves it an empty shard). The reference is a
plain single-process run, checked with the same tolerances as the float64 oracle comparisons.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_adamtype import ConditionTracker
from lightning_adamtype.tracker import ACCUMULATOR_KEYS, _GroupState

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

STEPS = 12
KEYS = ("steps", "a", "b", "c", "c2", "a_mean", "c_mean", "nonfinite_steps")
CASES = {
    "adam-wd": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-foreach": (torch.optim.AdamW, dict(lr=1e-2, foreach=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.1)),
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "nadam": (torch.optim.NAdam, dict(lr=1e-2)),
}
TRACKER_OPTIONS = {"stored": {}, "recomputed": dict(previous_stepsize="recomputed"), "every-4": dict(observe_every=4)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    # rows: 7 (4 + 3), 7, 3 (2 + 1), 1 (1 + 0: an empty shard on rank 1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 1))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(STEPS)]


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    for x, y in _batches():
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def _worker(rank: int, world: int, port: int, out_dir: str, case: str, option: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        _train_sharded(rank, out_dir, case, option)
        dist.barrier()  # both ranks have written their results
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without the interpreter's teardown: destroying FSDP2's gloo state at exit aborts now and then
    # ("terminate called without an active exception", SIGABRT) after all the work is done.
    os._exit(0)


def _train_sharded(rank: int, out_dir: str, case: str, option: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    cls, kwargs = CASES[case]
    opt = cls(model.parameters(), **kwargs)
    tracker = ConditionTracker(opt, **TRACKER_OPTIONS[option])
    _train(model, opt)
    local_rows = [p.to_local().shape[0] if p.dim() else 1 for p in model.parameters()]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"compute": tracker.compute(), "local_rows": local_rows}, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("option", list(TRACKER_OPTIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_sharded_run_matches_the_unsharded_run(tmp_path, case, option):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path), case, option), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # really sharded, unevenly, with an empty shard
    assert ranks[0]["local_rows"] != ranks[1]["local_rows"] and 0 in ranks[1]["local_rows"], ranks

    cls, kwargs = CASES[case]
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    tracker = ConditionTracker(opt, **TRACKER_OPTIONS[option])
    _train(model, opt)
    expected = tracker.compute()["%s/pg0" % cls.__name__]

    for r, got in enumerate(ranks):
        values = got["compute"]["%s/pg0" % cls.__name__]
        for key in KEYS:
            rel = 1e-4 if key in ("a", "b", "a_mean") else 1e-3
            assert values[key] == pytest.approx(expected[key], rel=rel, abs=1e-12), (r, key, values[key], expected[key])
        assert values["c"] > 0 and math.isfinite(values["bias_ratio"])
    assert ranks[0]["compute"] == ranks[1]["compute"]  # one combined number, the same on every rank


# ---------------------------------------------------------------------------------------------- through Lightning


def _run_script(out, devices: int):
    import subprocess
    import sys

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning_fsdp2_script.py")
    run = subprocess.run(
        [sys.executable, script, str(out), "--devices", str(devices)],
        env=env, capture_output=True, text=True, timeout=300, start_new_session=True,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def test_model_parallel_strategy_is_monitored_and_matches_one_process(tmp_path):
    """Lightning's ModelParallelStrategy (FSDP2) on two CPU processes: the monitor is accepted, combines the shards,
    and every rank reports the numbers of the same training on one process (both groups: one with coupled weight
    decay, one whose single row leaves rank 1 an empty shard)."""
    r0, r1 = _run_script(tmp_path / "sharded", 2)
    (single,) = _run_script(tmp_path / "single", 1)
    assert r0["strategy"] == "ModelParallelStrategy" and r0["steps"] == single["steps"] == 12
    assert r0["local_rows"] != r1["local_rows"] and 0 in r1["local_rows"], (r0["local_rows"], r1["local_rows"])
    assert r0["compute"] == r1["compute"]
    assert set(r0["compute"]) == set(single["compute"]) == {"Adam/pg0", "Adam/head"}
    for group, expected in single["compute"].items():
        for key in KEYS:
            rel = 1e-4 if key in ("a", "b", "a_mean") else 1e-3
            got = r0["compute"][group][key]
            assert got == pytest.approx(expected[key], rel=rel, abs=1e-12), (group, key, got, expected[key])


def test_resume_of_a_sharded_group_restarts_the_oscillation_chain():
    """A sharded group's checkpoint carries no η_{t−1} (it differs per rank; Lightning saves rank 0's callback
    state): the resumed tracker adds no c at its first step, then counts as before; with
    previous_stepsize="recomputed" nothing is lost. (Emulated on one process by marking the group sharded.)"""
    import copy

    def run(option, split=None):
        torch.manual_seed(0)
        x = nn.Parameter(torch.randn(20))
        opt = torch.optim.Adam([x], lr=1e-2)
        tracker = ConditionTracker(opt, **TRACKER_OPTIONS[option])
        gen = torch.Generator().manual_seed(1)
        for t in range(STEPS):
            if t == split:
                tracker._groups[0].sharded = True
                saved = tracker.state_dict()
                tracker.remove()
                tracker = ConditionTracker(opt, **TRACKER_OPTIONS[option])
                tracker.load_state_dict(copy.deepcopy(saved))
            x.grad = torch.randn(20, generator=gen)
            opt.step()
        return tracker.compute()["Adam/pg0"]

    full, resumed = run("stored"), run("stored", split=6)
    assert resumed["steps"] == full["steps"] and resumed["a"] == pytest.approx(full["a"], rel=1e-12)
    assert 0 < resumed["c"] < full["c"]  # one step's oscillation is missing
    assert run("recomputed", split=6)["c"] == pytest.approx(run("recomputed")["c"], rel=1e-12)


def test_sharded_reduction_masks_a_step_a_grad_scaler_skipped():
    """A fused step that a GradScaler skipped (device ``found_inf`` > 0) adds nothing and is not counted as
    non-finite, as on the unsharded path (one process: the reduction itself is the identity here)."""
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(3))], lr=1e-2)
    tracker = ConditionTracker(opt)
    tracker._groups.append(_GroupState())
    state = tracker._groups[0]
    state.accumulators = torch.zeros(len(ACCUMULATOR_KEYS), dtype=torch.float64)
    terms = torch.tensor([1.0, 0.5, 2.0, 0.25, 0.125, 0.5, 0.1], dtype=torch.float64)
    for skipped, expected_steps in ((1.0, 0.0), (0.0, 1.0)):
        combined = tracker._combine_shards(terms, 3, 3, None, torch.device("cpu"))
        tracker._accumulate(state, combined, torch.tensor([skipped]))
        values = dict(zip(("steps", "a", "b", "c"), state.accumulators.tolist()))
        assert values["steps"] == expected_steps and values["b"] == 2.0 * expected_steps
        assert state.accumulators[-1].item() == 0.0  # never counted as a non-finite step
