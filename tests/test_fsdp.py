"""FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank holds a shard of every parameter and of its optimizer
state; the tracker combines the shards (a: minimum over ranks; b, c, c2, Ση and coordinate counts: sums) and
must give the numbers of the same run unsharded.

Two CPU processes (gloo, ``torch.multiprocessing.spawn``). Both ranks see the same batch each step, so FSDP's
gradient average equals the single-process gradient and the sharded run is the unsharded run, split by rows (an
odd row count leaves rank 1 one row short, and a 1-row parameter leaves it an empty shard). The reference is a
plain single-process run, checked with the same tolerances as the float64 oracle comparisons.

Also on two gloo ranks: resuming a sharded tracker from rank 0's ``state_dict()``, and
:func:`lightning_adamtype.sharding.combine` itself (an empty shard's neutral terms); on one process, a combined step
that a GradScaler skipped (:func:`lightning_adamtype.row.add_step`). The Lightning ``ModelParallelStrategy`` run is
tests/lightning_fsdp2_script.py.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_adamtype import ConditionTracker
from lightning_adamtype.row import ACCUMULATOR_KEYS, add_step
from lightning_adamtype.sharding import combine

try:
    from . import gloo_ranks
except ImportError:
    import gloo_ranks

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

STEPS = 12
KEYS = ("steps", "a", "b", "c", "c2", "a_mean", "c_mean", "nonfinite_steps", "activations", "inactive", "coordinates",
        "variance_window_ratio", "bias_window_ratio")
#: known exactly on every rank without a reduction of floats (host ints, or NaN while 12 steps are inside the warm-up)
EXACT = ("variance_violation", "bias_violation", "variance_steps_needed", "bias_steps_needed", "variance_changed_at",
         "bias_changed_at")
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


def _spawn(tmp_path, job: str, *args) -> list[dict]:
    """Run ``JOBS[job](rank, *args)`` on two gloo ranks; their results (JSON), by rank."""
    return gloo_ranks.spawn_two(tmp_path, JOBS[job], *args)


def _sharded_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _train_sharded(rank: int, case: str) -> dict:
    """One sharded run of ``case`` with a tracker of every option of TRACKER_OPTIONS on its optimizer."""
    model = _sharded_model()
    cls, kwargs = CASES[case]
    opt = cls(model.parameters(), **kwargs)
    trackers = {option: ConditionTracker(opt, **options) for option, options in TRACKER_OPTIONS.items()}
    _train(model, opt)
    local_rows = [p.to_local().shape[0] if p.dim() else 1 for p in model.parameters()]
    return {"local_rows": local_rows, **{option: {"compute": t.compute(), "attached": t.attached,
                                                    "shares": t.tensor_shares()} for option, t in trackers.items()}}


def _train_every_case(rank: int) -> dict:
    """:func:`_train_sharded` for every case of CASES, one after another in the same two ranks."""
    return {case: _train_sharded(rank, case) for case in CASES}


_sharded_runs: list[dict] = []


def _sharded_run(tmp_path, case: str) -> list[dict]:
    """The ranks' results of the sharded run of ``case`` (one spawn runs every case, shared by their tests)."""
    if not _sharded_runs:
        _sharded_runs.extend(_spawn(tmp_path, "train"))
    return [run[case] for run in _sharded_runs]


def _train_resumed(rank: int) -> dict:
    """Adam on the sharded model, for each previous_stepsize option: an uninterrupted run, and one whose tracker is
    replaced at step 6 by a new one that loads rank 0's ``state_dict()`` (what Lightning saves of a callback and
    gives every rank back on resume); their compute() and the warnings of the load."""

    def run(option: str, split: int | None) -> tuple[dict, list[str]]:
        model = _sharded_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        tracker = ConditionTracker(opt, **TRACKER_OPTIONS[option])
        warned: list[str] = []
        for t, (x, y) in enumerate(_batches()):
            if t == split:
                saved = [tracker.state_dict() if rank == 0 else None]
                dist.broadcast_object_list(saved, src=0)
                tracker.remove()
                tracker = ConditionTracker(opt, **TRACKER_OPTIONS[option])
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tracker.load_state_dict(saved[0])
                warned = [str(w.message) for w in caught]
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        return tracker.compute()["Adam/pg0"], warned

    out = {}
    for option in ("stored", "recomputed"):
        full, _ = run(option, None)
        resumed, warned = run(option, 6)
        out[option] = {"full": full, "resumed": resumed, "warnings": warned}
    return out


def _combine_terms(rank: int) -> dict:
    """sharding.combine across the two ranks: rank 0 holds coordinates, rank 1 none (neutral terms)."""
    # the nine terms (row.TERM_KEYS): min_eta, b, c, c2, eta_sum, n_counted, n_pairs, activations, inactive
    terms = torch.tensor([0.5, 2.0, 3.0, 0.25, 6.0, 4.0, 3.0, 1.0, 2.0], dtype=torch.float64)
    group = dist.group.WORLD
    out = {}
    # n (coordinates that stepped) = n_counted + inactive on each rank: 6 and 14
    both = combine(terms if rank == 0 else terms * 2 + 1, 6 if rank == 0 else 14, group, torch.device("cpu"), torch.float64)
    out["both"] = [both[0].tolist(), float(both[1])]
    one = combine(terms if rank == 0 else None, 6 if rank == 0 else 0, group, torch.device("cpu"), torch.float64)
    out["empty_rank_1"] = [one[0].tolist(), float(one[1])]
    acc = torch.zeros(len(ACCUMULATOR_KEYS), dtype=torch.float64)
    finite = add_step(acc, *one, weight=2.0)
    out["row"], out["finite"] = acc.tolist(), bool(finite)
    return out


JOBS = {"train": _train_every_case, "resume": _train_resumed, "combine": _combine_terms}


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _assert_same_on_every_rank(ranks: list[dict]) -> None:
    """Every key of every group of ``compute()`` is the same number (or NaN) on both ranks; names what differs."""
    a, b = ranks[0]["compute"], ranks[1]["compute"]
    assert a.keys() == b.keys() and all(a[group].keys() == b[group].keys() for group in a)
    differ = {f"{group}/{key}": (value, b[group][key]) for group in a for key, value in a[group].items()
              if not _same(value, b[group][key])}
    assert not differ, f"rank 0 vs rank 1: {differ}"


@pytest.mark.parametrize("option", list(TRACKER_OPTIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_sharded_run_matches_the_unsharded_run(tmp_path, case, option):
    runs = _sharded_run(tmp_path, case)
    ranks = [{"local_rows": run["local_rows"], **run[option]} for run in runs]
    assert all(r["attached"] for r in ranks)
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
        for key in EXACT:
            assert _same(values[key], expected[key]), (r, key, values[key], expected[key])
        assert values["c"] > 0 and math.isfinite(values["bias_ratio"]) and values["measured"] == 1.0
        assert math.isfinite(values["bias_window_ratio"]) and values["coordinates"] == 70  # 5·7+7 + 7·3+3 + 3+1
        assert math.isnan(values["bias_violation"]) and values["bias_steps_needed"] > 0  # unknown inside the warm-up
        # each parameter's share of b and c (summed over the shards; the empty shard adds nothing) is its share in
        # the unsharded run
        shares, expected_shares = got["shares"][f"{cls.__name__}/pg0"], tracker.tensor_shares()[f"{cls.__name__}/pg0"]
        assert [n for n, _ in shares] == [n for n, _ in expected_shares]
        for (name, row), (_, expected_row) in zip(shares, expected_shares):
            assert row == pytest.approx(expected_row, rel=1e-3, abs=1e-12), (r, name, row, expected_row)
    _assert_same_on_every_rank(ranks)  # one combined number, the same on every rank
    assert ranks[0]["shares"] == ranks[1]["shares"]


# ---------------------------------------------------------------------------------------------- through Lightning


def _run_script(out, devices: int):
    import subprocess
    import sys

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(gloo_ranks.free_port()), PYTHONWARNINGS="ignore")
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
    # every key, the verdicts' window ratios and steps_needed included, also on rank 1, whose shard of "head" is empty
    _assert_same_on_every_rank([r0, r1])
    assert set(r0["compute"]) == set(single["compute"]) == {"Adam/pg0", "Adam/head"}
    for group, expected in single["compute"].items():
        for key in KEYS:
            rel = 1e-4 if key in ("a", "b", "a_mean") else 1e-3
            got = r0["compute"][group][key]
            assert got == pytest.approx(expected[key], rel=rel, abs=1e-12), (group, key, got, expected[key])
        for key in EXACT:
            assert _same(r0["compute"][group][key], expected[key]), (group, key, r0["compute"][group][key], expected[key])


def test_resume_of_a_sharded_group_restarts_the_oscillation_chain(tmp_path):
    """A sharded group's checkpoint carries no η_{t−1} (it differs per rank; Lightning saves rank 0's callback
    state and gives it to every rank on resume): the resumed tracker adds no c at its first step, then counts as
    before; with previous_stepsize="recomputed" nothing is lost. Two gloo ranks (uneven shards), the tracker
    replaced after 6 of 12 steps by one that loads rank 0's state_dict()."""
    ranks = _spawn(tmp_path, "resume")
    for rank in ranks:
        full, resumed = rank["stored"]["full"], rank["stored"]["resumed"]
        assert resumed["steps"] == full["steps"] == STEPS and resumed["measured"] == 1.0
        for key in ("a", "b", "a_mean"):
            assert resumed[key] == pytest.approx(full[key], rel=1e-12), key
        assert 0 < resumed["c"] < full["c"]  # one step's oscillation is missing
    assert ranks[0]["stored"]["resumed"] == ranks[1]["stored"]["resumed"]
    warned = {r: rank["recomputed"]["warnings"] for r, rank in enumerate(ranks)}  # per rank, for the message
    for r, rank in enumerate(ranks):
        full, resumed = rank["recomputed"]["full"], rank["recomputed"]["resumed"]
        for key in ("steps", "c", "c2", "a", "b"):
            assert resumed[key] == pytest.approx(full[key], rel=1e-12), (r, key, resumed[key], full[key], warned)
    assert ranks[0]["recomputed"]["resumed"] == ranks[1]["recomputed"]["resumed"]


def test_combine_reduces_over_the_ranks_and_an_empty_shard_adds_neutral_terms(tmp_path):
    """sharding.combine on two gloo ranks: min_eta is the minimum, b, c, c2, Ση and the counts are sums; a rank
    with no coordinate (terms None) adds inf to the minimum and 0 to the sums, so both ranks get the other rank's
    terms; row.add_step then adds the combined step (weighted) as for an unsharded group."""
    r0, r1 = _spawn(tmp_path, "combine")
    assert r0 == r1
    terms = [0.5, 2.0, 3.0, 0.25, 6.0, 4.0, 3.0, 1.0, 2.0]
    other = [2 * t + 1 for t in terms]
    assert r0["both"] == [[min(terms[0], other[0])] + [a + b for a, b in zip(terms[1:], other[1:])], 6.0 + 14.0]
    assert r0["empty_rank_1"] == [terms, 6.0]
    # sums: k · [1, min_eta, b, c, c2, eta_sum / n_counted, c / n_pairs, 0, activations] with k = 2;
    # levels (set, not added): [inactive, n]
    assert dict(zip(ACCUMULATOR_KEYS, r0["row"])) == {
        "steps": 2.0, "a": 1.0, "b": 4.0, "c": 6.0, "c2": 0.5, "a_mean": 2 * 6.0 / 4, "c_mean": 2 * 3.0 / 3,
        "nonfinite_steps": 0.0, "activations": 2.0, "inactive": 2.0, "coordinates": 6.0,
    }
    assert r0["finite"]


def test_sharded_reduction_masks_a_step_a_grad_scaler_skipped():
    """A fused step that a GradScaler skipped (device ``found_inf`` > 0) adds nothing and is not counted as
    non-finite, as on the unsharded path (one process: the reduction over no process group is the identity)."""
    acc = torch.zeros(len(ACCUMULATOR_KEYS), dtype=torch.float64)
    # min_eta, b, c, c2, eta_sum, n_counted, n_pairs, activations, inactive (row.TERM_KEYS); n = 3 stepped
    terms = torch.tensor([1.0, 2.0, 0.25, 0.125, 1.5, 2.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    combined = combine(terms, 3, None, torch.device("cpu"), torch.float64)
    assert combined[0].tolist() == terms.tolist() and float(combined[1]) == 3.0
    for skipped, expected_steps in ((1.0, 0.0), (0.0, 1.0)):
        finite = add_step(acc, *combined, weight=1.0, skipped=torch.tensor([skipped]))
        assert bool(finite)  # a skipped step is not a non-finite one (the trend detector must not read NaN)
        values = dict(zip(ACCUMULATOR_KEYS, acc.tolist()))
        assert values["steps"] == expected_steps and values["b"] == 2.0 * expected_steps
        assert values["activations"] == expected_steps
        # the levels: left alone by the skipped step, set to [inactive, n] by the counted one
        assert (values["inactive"], values["coordinates"]) == ((0.0, 0.0) if skipped else (1.0, 3.0))
        assert values["nonfinite_steps"] == 0.0  # never counted as a non-finite step
    # a skipped step with non-finite terms adds nothing either
    finite = add_step(acc, torch.full((9,), math.nan, dtype=torch.float64), 3, skipped=torch.tensor([1.0]))
    assert bool(finite) and dict(zip(ACCUMULATOR_KEYS, acc.tolist()))["steps"] == 1.0
    # and an unskipped non-finite step is counted under nonfinite_steps only (the levels stay)
    finite = add_step(acc, torch.full((9,), math.inf, dtype=torch.float64), 5, skipped=torch.tensor([0.0]))
    assert not bool(finite)
    values = dict(zip(ACCUMULATOR_KEYS, acc.tolist()))
    assert values["steps"] == 1.0 and values["nonfinite_steps"] == 1.0 and values["b"] == 2.0
    assert (values["inactive"], values["coordinates"]) == (1.0, 3.0)
