"""``AdamTypeMonitor`` in a real Lightning DDP run: two CPU processes (gloo), ``Trainer(strategy="ddp")``.

tests/test_ddp.py covers the plain ``torch.distributed`` tracker (rank 0's switch decision is broadcast). Here the
whole Lightning stack runs: the subprocess launcher re-runs tests/lightning_ddp_script.py for rank 1, Lightning
injects a shuffling ``DistributedSampler`` (each rank trains on other samples), DDP averages the gradients, and
the callback attaches, logs and switches. The script trains a small two-group Adam model (float64) for 20 optimizer
steps (2 epochs × 10 batches of 4 per rank), logs every 4 steps to a TensorBoard and a CSV logger, and each rank
dumps what it saw to ``rank<r>.json``. Checked:

1. every quantity of every group (``monitor.compute()``), each tracker's ``switched``, the AMSGrad flags and the
   parameters are exactly the same on both ranks;
2. only global rank zero logs: rank 1's loggers receive no ``adamtype/...`` call, there is one version directory and
   one event file, every logged step appears once per tag (TensorBoard events and metrics.csv), the switch marker,
   the switch message and the end-of-fit summary appear once;
3. the numbers equal (to rounding: DDP sums the two ranks' gradients in another order) a single-process run over
   the same global batches (the script replays Lightning's permutations with a one-replica ``DistributedSampler``
   and batch size 8);
4. with ``switch_to_amsgrad=True`` and a verdict forced within the run, both ranks switch every group at the same
   step and both optimizers run AMSGrad afterwards; when rank 1's own detectors can never flag, rank 1 still switches
   at rank 0's step (Lightning path of the broadcast), while its own verdicts stay unknown (NaN).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

pytest.importorskip("pytorch_lightning")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

try:
    from . import lightning_ddp_script as script
except ImportError:
    import lightning_ddp_script as script

SCRIPT = Path(__file__).with_name("lightning_ddp_script.py")
REPO = SCRIPT.parent.parent
TIMEOUT_S = 180  # a run takes about 7 s; a hung collective would otherwise wait for gloo's 30 min timeout

STEPS = script.EPOCHS * script.BATCHES  # optimizer steps (global_step at the end)
LOGGED_STEPS = sorted({*range(script.LOG_EVERY, STEPS + 1, script.LOG_EVERY), STEPS})  # 4, 8, …, 20
GROUPS = ("Adam/pg0", "Adam/head")
SWITCH_STEP = 9  # with script.FORCE: samples at 5, 6, 7 (slope known at 7), patience 2 → flagged at 8, AMSGrad from 9
#: Adam's coupled weight decay (first group) in the runs that switch ("on", "deaf", on one process and two), which
#: the coupled-decay test reads too (one launch fewer); the "off" runs have none
SWITCH_WEIGHT_DECAY = 1e-2
#: the keys that follow from a rank's own verdicts (three-state verdict, the step it last changed, steps still needed)
VERDICTS = tuple(f"{kind}_{field}" for kind in ("variance", "bias") for field in ("violation", "changed_at", "steps_needed"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One run of the script: its combined output, the per-rank dumps and the log directory."""

    def __init__(self, out: Path, returncode: int, output: str, devices: int):
        self.out, self.returncode, self.output = out, returncode, output
        dumps = [out / f"rank{r}.json" for r in range(devices)] if returncode == 0 else []
        self.ranks = [json.loads(path.read_text()) for path in dumps]
        self.logs = out / "logs"


def _run(out: Path, devices: int = 2, switch: str = "off", weight_decay: float = 0.0) -> Run:
    out.mkdir(parents=True, exist_ok=True)
    if devices == 1:  # the single-process reference: no launcher, so in this process (Lightning is imported already)
        script.main([str(out), "--devices", "1", "--switch", switch, "--weight-decay", str(weight_decay)])
        return Run(out, 0, "", devices)
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK"):  # a clean launch, not a child
        env.pop(var, None)
    cmd = [sys.executable, str(SCRIPT), str(out), "--devices", str(devices), "--switch", switch,
           "--weight-decay", str(weight_decay)]
    # Own session: on a timeout the launcher and the rank it started are killed together.
    proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    return Run(out, proc.returncode, output, devices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs on demand, each once per module: ``runs(switch, devices)``."""
    cache: dict[tuple[str, int], Run] = {}

    def get(switch: str, devices: int = 2) -> Run:
        if (switch, devices) not in cache:
            weight_decay = SWITCH_WEIGHT_DECAY if switch != "off" else 0.0
            run = _run(tmp_path_factory.mktemp(f"{switch}_{devices}dev"), devices=devices, switch=switch,
                       weight_decay=weight_decay)
            assert run.returncode == 0, run.output[-4000:]
            cache[switch, devices] = run
        return cache[switch, devices]

    return get


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _assert_identical(r0: dict, r1: dict, skip: tuple[str, ...] = ()) -> None:
    a, b = r0["compute"], r1["compute"]
    assert sorted(a) == sorted(b) == sorted(GROUPS)
    for group in GROUPS:
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            if key not in skip:
                assert _same(a[group][key], b[group][key]), (group, key, a[group][key], b[group][key])
    assert r0["params"] == r1["params"]


def _assert_ddp_ran(r0: dict, r1: dict) -> None:
    """Two DDP ranks, 20 steps, and the ranks really trained on different samples (one half of each batch each)."""
    for rank, r in enumerate((r0, r1)):
        assert (r["global_rank"], r["world_size"], r["strategy"]) == (rank, 2, "DDPStrategy")
        assert r["global_step"] == STEPS
        assert r["tracker_names"] == ["Adam"]
        assert len(r["seen"]) == STEPS and all(len(batch) == script.BATCH for batch in r["seen"])
    for epoch in range(script.EPOCHS):
        batches = slice(epoch * script.BATCHES, (epoch + 1) * script.BATCHES)
        seen0 = [i for batch in r0["seen"][batches] for i in batch]
        seen1 = [i for batch in r1["seen"][batches] for i in batch]
        assert not set(seen0) & set(seen1)
        assert sorted(seen0 + seen1) == list(range(script.N))


# ============================================================================ 1. the same numbers on every rank
@pytest.mark.parametrize("switch", ["off", "on"])
def test_every_rank_has_the_same_numbers(runs, switch):
    r0, r1 = runs(switch).ranks
    _assert_ddp_ran(r0, r1)
    _assert_identical(r0, r1)
    for group in GROUPS:
        assert r0["compute"][group]["steps"] == STEPS
        assert r0["compute"][group]["b"] > 0 and r0["compute"][group]["c"] > 0
    assert r0["switched"] == r1["switched"]
    assert r0["amsgrad"] == r1["amsgrad"]
    if switch == "off":
        assert r0["switched"] == [{}] and r0["amsgrad"] == [False, False]


# ============================================================================ 2. logged once, by rank zero
def _tags(compute: dict) -> list[str]:
    return sorted(f"adamtype/{group}/{key}" for group, values in compute.items() for key in values)


@pytest.mark.parametrize("switch", ["off", "on"])
def test_only_rank_zero_logs_and_each_step_once(runs, switch):
    run = runs(switch)
    r0, r1 = run.ranks
    tags = _tags(r0["compute"])
    switch_tags = [f"adamtype/{g}/switched" for g in GROUPS] if switch == "on" else []

    # the callback called rank 1's loggers not once; rank 0's once per log step (and once per switch marker)
    assert r1["logger_calls"] == []
    for logger in ("RecordingTB", "RecordingCSV"):
        calls = [(step, call_tags) for name, step, call_tags in r0["logger_calls"] if name == logger]
        regular = [step for step, call_tags in calls if call_tags == tags]
        assert regular == LOGGED_STEPS, (logger, calls)
        markers = [(step, call_tags) for step, call_tags in calls if call_tags != tags]
        assert markers == [(SWITCH_STEP, [t]) for t in switch_tags], (logger, markers)

    # one run directory per logger, one TensorBoard event file
    assert sorted(p.name for p in (run.logs / "tb").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run.logs / "csv").iterdir()) == ["version_0"]
    tb_dir = run.logs / "tb" / "version_0"
    assert len(list(tb_dir.glob("events.out.tfevents.*"))) == 1, sorted(p.name for p in tb_dir.iterdir())

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    scalar_tags = {t for t in acc.Tags()["scalars"] if t.startswith("adamtype/")}
    assert scalar_tags == set(tags) | set(switch_tags)
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == LOGGED_STEPS, tag
        group, key = tag.split("/", 1)[1].rsplit("/", 1)
        final = r0["compute"][group][key]
        assert events[-1].value == pytest.approx(float(final), rel=1e-6, nan_ok=True), tag
    for tag in switch_tags:
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(SWITCH_STEP, 1.0)], tag

    with open(run.logs / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(tags) | set(switch_tags) <= set(rows[0])
    for tag in tags:
        assert [int(row["step"]) for row in rows if row[tag] != ""] == LOGGED_STEPS, tag
    for tag in switch_tags:
        assert [(int(row["step"]), float(row[tag])) for row in rows if row[tag] != ""] == [(SWITCH_STEP, 1.0)], tag

    # the switch message: once per group, from rank zero only
    lines = run.output.splitlines()
    messages = [line for line in lines if line.startswith("[lightning_adamtype]") and "switched to AMSGrad" in line]
    assert len(messages) == len(switch_tags), messages
    for group in (GROUPS if switch == "on" else ()):
        assert sum(f"{group}: switched to AMSGrad from optimizer step {SWITCH_STEP}" in m for m in messages) == 1
    # the end-of-fit summary: once (rank zero), both groups, the switch step of each switched group
    assert sum(line == "lightning_adamtype summary (Adam):" for line in lines) == 1, run.output[-4000:]
    for group in GROUPS:
        assert sum(line.startswith(f"{group}: {STEPS} observed steps") for line in lines) == 1, group
    assert sum(line == f"  switched to AMSGrad at step {SWITCH_STEP}" for line in lines) == len(switch_tags)


# ============================================================================ 3. = one process, same global batches
@pytest.mark.parametrize("switch", ["off", "on"])
def test_equals_a_single_process_run_on_the_same_global_batches(runs, switch):
    r0, r1 = runs(switch).ranks
    (single,) = runs(switch, devices=1).ranks
    assert single["world_size"] == 1 and single["global_step"] == STEPS
    # the premise: step k of the single run trained on the union of both ranks' batch k
    assert [sorted(b) for b in single["seen"]] == [sorted(a + b) for a, b in zip(r0["seen"], r1["seen"])]
    assert single["switched"] == r0["switched"] and single["amsgrad"] == r0["amsgrad"]
    for group in GROUPS:
        ddp, one = r0["compute"][group], single["compute"][group]
        assert ddp.keys() == one.keys()
        for key, value in ddp.items():
            if key in VERDICTS:  # three-state floats and step counts: the same exactly
                assert _same(value, one[key]), (group, key, value, one[key])
            else:
                assert value == pytest.approx(one[key], rel=1e-9, abs=1e-12, nan_ok=True), (group, key, value, one[key])
    for name, values in r0["params"].items():
        assert values == pytest.approx(single["params"][name], rel=1e-9, abs=1e-12), name


# ============================================================================ 4. the switch on every rank
def test_switch_on_every_rank_at_the_same_step(runs):
    r0, r1 = runs("on").ranks
    for r in (r0, r1):
        assert r["switched"] == [{group: SWITCH_STEP for group in GROUPS}]
        assert r["amsgrad"] == [True, True]
        assert r["max_exp_avg_sq"] == [True, True]  # the state AMSGrad needs exists on every rank
        for group in GROUPS:
            assert r["compute"][group]["bias_violation"] == 1.0
            assert r["compute"][group]["bias_changed_at"] == SWITCH_STEP - 1  # flagged at the sample before the switch


def test_rank_one_follows_rank_zeros_decision(runs):
    """Rank 1's detectors can never flag (patience out of reach), yet it switches at rank 0's step."""
    r0, r1 = runs("deaf").ranks
    _assert_ddp_ran(r0, r1)
    for r in (r0, r1):
        assert r["switched"] == [{group: SWITCH_STEP for group in GROUPS}]
        assert r["amsgrad"] == [True, True] and r["max_exp_avg_sq"] == [True, True]
    for group in GROUPS:
        assert r0["compute"][group]["bias_violation"] == 1.0
        # rank 1 would not have switched on its own: its verdict never became known
        assert math.isnan(r1["compute"][group]["bias_violation"]) and math.isnan(r1["compute"][group]["bias_changed_at"])
        assert r1["compute"][group]["bias_steps_needed"] > 0
    _assert_identical(r0, r1, skip=VERDICTS)
    # rank 0 ran exactly as in the run where both ranks have the same detectors
    on0, _ = runs("on").ranks
    _assert_identical(r0, on0)


# ============================================================================ coupled weight decay
# Lightning computes the gradients inside the closure it passes to optimizer.step, after the step pre-hook: the
# tracker takes its copy of x_t (for g = ∇ + λx) after the closure returns (it used to crash on the first step).
def test_coupled_weight_decay_under_lightning_ddp(runs):
    """The "on" run has coupled weight decay on its first group: both ranks trained through it (and the switch), and
    every number is the same on both."""
    r0, r1 = runs("on").ranks
    _assert_ddp_ran(r0, r1)
    _assert_identical(r0, r1)
    assert all(r0["compute"][group]["b"] > 0 and r0["compute"][group]["c"] > 0 for group in GROUPS)
