"""Every optimizer of torch's own optimizer test database (``torch.testing._internal.common_optimizers.optim_db``)
with a ConditionTracker attached: each CPU float32 configuration of its ``optim_inputs_func(device="cpu")`` trains
a tiny model (tests/twins.py) for 4 steps beside an untracked twin, and

1. the parameters and optimizer state are bitwise those of the twin after every step;
2. the optimizer is either measured (every group of compute() has finite a > 0 and b ≥ 0) or declined, with the
   reason ("… is declined: …") in the tracker's one warning;
3. Adadelta, Adafactor and SparseAdam (its sparse gradients on an ``nn.Embedding(sparse=True)``) are measured,
   not declined.

With torch 2.13 that is 91 configurations of 15 optimizers (all of them; a run is a few milliseconds, the import of
torch's test database about 3 s); the module docstring's count is checked below so that a change in torch shows.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("expecttest")  # (torch's test utilities import it)
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

from twins import run_twins  # noqa: E402

STEPS = 4
CONFIGS = [
    pytest.param(info.optim_cls, dict(inputs.kwargs), id=f"{info.optim_cls.__name__}-{inputs.desc}")
    for info in optim_db
    for inputs in info.optim_inputs_func(device="cpu")
]


def _make(cls, kwargs):
    if cls.__name__ == "Muon":  # (2-D parameters only)
        return lambda ps: cls([p for p in ps if p.dim() == 2], **kwargs)
    return lambda ps: cls(ps, **kwargs)


def _run(cls, kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = run_twins(_make(cls, kwargs), steps=STEPS, none_at=(2,), closure=cls is torch.optim.LBFGS,
                            sparse=cls is torch.optim.SparseAdam)
        measured = tracker.compute()
    return tracker, measured, [str(w.message) for w in caught if "lightning_adamtype" in str(w.message)]


@pytest.mark.parametrize("cls,kwargs", CONFIGS)
def test_optim_db_configuration_is_measured_or_declined_and_trains_untouched(cls, kwargs):
    tracker, measured, ours = _run(cls, kwargs)  # (1: run_twins asserts the bitwise equality)
    if tracker.attached:
        assert measured, ours
        for name, values in measured.items():
            assert values["measured"] == 1.0, (name, ours)
            assert math.isfinite(values["a"]) and values["a"] > 0, (name, values["a"])
            assert math.isfinite(values["b"]) and values["b"] >= 0, (name, values["b"])
    else:
        declined = [m for m in ours if f"{cls.__name__} is declined: " in m]
        assert len(declined) == 1 and len(ours) == 1, ours
    if cls.__name__ in ("Adadelta", "Adafactor", "SparseAdam"):
        assert tracker.attached and measured


def test_the_sweep_covers_every_optimizer_of_the_database():
    names = {info.optim_cls.__name__ for info in optim_db}
    assert {"Adadelta", "Adafactor", "Adam", "LBFGS", "SparseAdam"} <= names
    if torch.__version__.startswith("2.13"):
        assert len(CONFIGS) == 91 and len(names) == 15, (len(CONFIGS), len(names))
