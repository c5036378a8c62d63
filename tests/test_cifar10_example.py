"""examples/cifar10.py: a few steps on CIFAR-10's own on-disk format (through torchvision's loader), synthetic
data (without torchvision), the message when the data is missing and --no-download is given, and the command line
(every default stated once in --help, ``inv_sqrt`` with ``invsqrt`` as a deprecated alias, Lightning's notices that
are not ours filtered out).

The CIFAR-10 files are written by the test: ``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch`` and
``batches.meta``, pickled the way the real (Python 2) files are: dicts whose keys are byte strings (``b"data"``,
a uint8 N×3072 array, ``b"labels"``, a list of ints) when read with ``encoding="bytes"``, and ``"data"`` /
``"labels"`` when read with ``encoding="latin1"`` as torchvision does. torchvision checks each file's MD5
against the real archive's; the test points those checksums at its own small files, nothing else is replaced.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from example_modules import load_example  # noqa: E402

pytest.importorskip("pytorch_lightning")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cifar10.py")
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 10
FAST = ["--arch", "resnet8", "--width", "0.25", "--num-workers", "0", "--no-progress-bar", "--seed", "0"]


def _needs_torchvision():
    try:
        return pytest.importorskip(
            "torchvision",
            reason='torchvision is not installed: pip install "torchvision>=0.29" (it brings a matching CUDA build '
            "of torch, which runs on a CPU)",
        )
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # e.g. "operator torchvision::nms does not exist" with the CPU-only torch wheel
        pytest.skip(
            f"torchvision is not usable here ({type(exc).__name__}: {exc}); install it with "
            'pip install "torchvision>=0.29" (it brings a matching CUDA build of torch, which runs on a CPU)'
        )


def _load_example():
    return load_example(EXAMPLE, "cifar10_example")


# ------------------------------------------------------------------ CIFAR-10's on-disk format
class _Py2Str(bytes):
    """A Python 2 ``str``: pickled with the (SHORT_)BINSTRING opcode, as in the real CIFAR-10 files."""


class _Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[_Py2Str] = save_py2str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_cifar10(root, per_batch: int = PER_BATCH, seed: int = 0) -> dict[str, str]:
    """Write a small CIFAR-10 in its own format under ``root/cifar-10-batches-py``; returns {file: md5}."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    md5 = {}

    def dump(name, obj):
        blob = _py2_pickle(obj)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(blob)
        md5[name] = hashlib.md5(blob).hexdigest()

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        dump(
            name,
            {
                _Py2Str(b"batch_label"): _Py2Str(name.encode()),
                _Py2Str(b"labels"): [int(v) for v in rng.integers(0, 10, per_batch)],
                _Py2Str(b"data"): rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                _Py2Str(b"filenames"): [_Py2Str(f"img_{k}.png".encode()) for k in range(per_batch)],
            },
        )
    dump(
        "batches.meta",
        {
            _Py2Str(b"label_names"): [_Py2Str(n.encode()) for n in LABEL_NAMES],
            _Py2Str(b"num_cases_per_batch"): per_batch,
            _Py2Str(b"num_vis"): 3072,
        },
    )
    return md5


def _point_checksums_at(monkeypatch, torchvision, md5):
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5["batches.meta"]))


def test_written_files_have_the_real_format(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (PER_BATCH, 3072)
    assert all(isinstance(v, int) and 0 <= v < 10 for v in entry[b"labels"])
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"] == LABEL_NAMES


# ------------------------------------------------------------------ the example
def _tags(logdir):
    runs = []
    for root, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(str(root), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
            acc.Reload()
            runs.append(acc)
    assert len(runs) == 1, runs
    return runs[0]


def test_real_format_through_torchvision(tmp_path, monkeypatch):
    torchvision = _needs_torchvision()
    example = _load_example()
    data = tmp_path / "data"
    _point_checksums_at(monkeypatch, torchvision, write_cifar10(data))

    train, test = example.cifar10_datasets(str(data), download=False)
    assert isinstance(train, torchvision.datasets.CIFAR10)
    assert len(train) == 5 * PER_BATCH and len(test) == PER_BATCH
    assert train.classes == LABEL_NAMES
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert x.min() < -1.0  # normalised (and zero-padded crops normalise below -1.8)

    logdir = tmp_path / "runs"
    final = example.main(
        ["--data-dir", str(data), "--no-download", "--optimizer", "adam", "--batch-size", "8", "--max-steps", "6",
         "--log-every", "2", "--eta-histogram-every", "1", "--logdir", str(logdir), "--accelerator", "cpu", *FAST]
    )
    assert set(final) == {"Adam/pg0"}
    assert final["Adam/pg0"]["steps"] == 6
    assert final["Adam/pg0"]["a"] > 0 and final["Adam/pg0"]["c"] > 0

    acc = _tags(logdir)
    scalars = set(acc.Tags()["scalars"])
    for key in ("a", "b", "c", "c2", "variance_ratio", "bias_ratio"):
        assert f"adamtype/Adam/pg0/{key}" in scalars
    assert [e.step for e in acc.Scalars("adamtype/Adam/pg0/a")] == [2, 4, 6]
    assert {"train/loss", "val/acc"} <= scalars
    assert "adamtype/Adam/pg0/eta" in acc.Tags()["histograms"]
    eta = acc.Histograms("adamtype/Adam/pg0/eta")[-1].histogram_value
    n_params = sum(p.numel() for p in example.CifarResNet("resnet8", 0.25).parameters())
    assert eta.num == n_params and eta.min > 0
    # the custom-scalars layout is stored as a tensor summary of the custom_scalars plugin
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


@pytest.mark.parametrize("optimizer", ["sgd", "amsgrad"])
def test_synthetic_smoke_run(tmp_path, optimizer):
    """No torchvision needed: random class-dependent images."""
    example = _load_example()
    final = example.main(
        ["--synthetic", "--synthetic-size", "64", "--optimizer", optimizer, "--batch-size", "16", "--max-steps", "5",
         "--limit-batches", "3", "--log-every", "2", "--logdir", str(tmp_path), "--accelerator", "cpu", *FAST]
    )
    group = {"sgd": "SGD/pg0", "amsgrad": "Adam/pg0"}[optimizer]
    assert final[group]["steps"] == 5
    acc = _tags(tmp_path)
    assert [e.step for e in acc.Scalars(f"adamtype/{group}/bias_ratio")] == [2, 4, 5]
    if optimizer == "sgd":  # SGD: η = lr for every coordinate, so no oscillation at a constant lr
        assert final[group]["c"] == 0.0
        # heavy ball with μ = 0.9 is the template with β1 = μ and η = lr / (1 − μ) (the buffer = EMA / (1 − μ))
        assert final[group]["a"] == pytest.approx(5 * 0.1 / (1 - 0.9))


def test_missing_data_with_no_download_is_a_clear_message(tmp_path):
    _needs_torchvision()
    example = _load_example()
    empty = tmp_path / "no_cifar_here"
    with pytest.raises(SystemExit) as info:
        example.main(["--data-dir", str(empty), "--no-download", "--logdir", str(tmp_path / "runs"), *FAST])
    message = str(info.value)
    assert "CIFAR-10 not found" in message
    assert str(empty / "cifar-10-batches-py") in message
    assert "--no-download" in message and "--synthetic" in message


def test_cli_rejects_unknown_optimizer(capsys):
    example = _load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--optimizer", "lion"])
    assert "invalid choice" in capsys.readouterr().err
    assert example.parse_args(["--limit-batches", "10"]).limit_batches == 10
    assert example.parse_args(["--limit-batches", "0.5"]).limit_batches == 0.5


# ------------------------------------------------------------------ the command line
EXPECTED_OPTIONS = [
    "--data-dir", "--download", "--no-download", "--synthetic", "--synthetic-size", "--arch", "--width", "--optimizer",
    "--lr", "--weight-decay", "--lr-schedule", "--batch-size", "--max-epochs", "--max-steps", "--limit-batches",
    "--switch-to-amsgrad", "--log-every", "--eta-histogram-every", "--precision", "--accelerator", "--devices",
    "--num-workers", "--logdir", "--run-name", "--seed", "--no-progress-bar",
]


def test_help_states_every_default_once(capsys):
    example = _load_example()
    parser = example.build_parser()
    actions = [a for a in parser._actions if a.option_strings != ["-h", "--help"]]
    assert [a.option_strings[0] for a in actions] == EXPECTED_OPTIONS
    for action in actions:
        assert action.help and action.help.count("(default") == 1, (action.option_strings, action.help)
        assert "%(default)" not in action.help
    with pytest.raises(SystemExit) as info:
        example.parse_args(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert text.count("(default") == len(EXPECTED_OPTIONS)
    assert "{constant,inv_sqrt,cosine}" in text and "invsqrt" not in text
    for option, default in [
        ("--data-dir DATA_DIR", "data"), ("--synthetic-size SYNTHETIC_SIZE", "5000"), ("--arch {resnet18,resnet8}",
        "resnet18"), ("--batch-size BATCH_SIZE", "128"), ("--max-epochs MAX_EPOCHS", "30"), ("--seed SEED", "0"),
        ("--log-every LOG_EVERY", "10"), ("--logdir LOGDIR", os.path.join("runs", "cifar10")),
    ]:
        assert re.search(re.escape(option) + r" [^(]*\(default: " + re.escape(default) + r"\)", text), option
    # the stated defaults are the parser's
    args = example.parse_args([])
    assert (args.data_dir, args.download, args.synthetic, args.synthetic_size, args.arch, args.width) == (
        "data", True, False, 5000, "resnet18", 1.0)
    assert (args.optimizer, args.lr, args.weight_decay, args.lr_schedule, args.batch_size, args.max_epochs) == (
        "adam", None, 0.0, "constant", 128, 30)
    assert (args.max_steps, args.limit_batches, args.switch_to_amsgrad, args.log_every, args.eta_histogram_every) == (
        -1, None, False, 10, 10)
    assert (args.precision, args.accelerator, args.devices, args.logdir, args.run_name, args.seed) == (
        "32-true", "auto", "auto", os.path.join("runs", "cifar10"), None, 0)
    assert args.num_workers == min(4, os.cpu_count() or 1) and args.no_progress_bar is False
    assert example.parse_args(["--no-download"]).download is False
    assert example.parse_args(["--devices", "2"]).devices == 2


def test_lr_schedule_inv_sqrt_and_the_deprecated_spelling(capsys):
    example = _load_example()
    assert example.parse_args(["--lr-schedule", "inv_sqrt"]).lr_schedule == "inv_sqrt"
    assert capsys.readouterr().err == ""
    assert example.parse_args(["--lr-schedule", "invsqrt"]).lr_schedule == "inv_sqrt"
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "examples/cifar10.py: --lr-schedule invsqrt is deprecated, use --lr-schedule inv_sqrt"
    ]
    with pytest.raises(SystemExit):
        example.parse_args(["--lr-schedule", "inverse"])
    assert "invalid choice: 'inverse'" in capsys.readouterr().err

    for spelling in ("inv_sqrt", "invsqrt"):  # lr_t = lr/√t, t = 1, 2, …
        module = example.CifarModule("resnet8", 0.25, "sgd", lr=0.4, lr_schedule=spelling)
        config = module.configure_optimizers()
        opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
        lrs = []
        for _ in range(4):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs == pytest.approx([0.4, 0.4 / 2**0.5, 0.4 / 3**0.5, 0.2])
    with pytest.raises(ValueError, match="lr_schedule='inverse'"):
        example.CifarModule("resnet8", 0.25, "sgd", lr_schedule="inverse").configure_optimizers()


# torchvision blocked (``import torchvision`` raises ImportError), then the example run as a script.
_WITHOUT_TORCHVISION = (
    "import runpy, sys; sys.modules['torchvision'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None,
    reason="torchvision is installed here, and torchmetrics (under Lightning) imports it when it is: hiding it breaks "
    "Lightning's import, not the example's; the run without torchvision is tested where it is not installed",
)
def test_synthetic_runs_without_torchvision_and_without_lightnings_notices(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCHVISION, EXAMPLE, "--synthetic", "--synthetic-size", "48",
         "--batch-size", "16", "--max-steps", "3", "--limit-batches", "2", "--log-every", "1",
         "--logdir", str(tmp_path), "--accelerator", "cpu", *FAST],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"^Adam/pg0: steps=\S+ a=", proc.stdout, re.M), output
    assert "TensorBoard logs:" in proc.stdout
    for not_ours in ("LeafSpec", "litlogger", "litmodels", "💡"):
        assert not_ours not in output, output
    assert "Trainer.fit` stopped: `max_steps=3` reached" in output  # Lightning's other messages still show

    # --help needs no torchvision either
    helper = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCHVISION, EXAMPLE, "--help"], capture_output=True, text=True, timeout=120
    )
    assert helper.returncode == 0 and "--synthetic" in helper.stdout, helper.stderr


def test_quiet_lightning_is_undone_on_exit():
    import logging
    import warnings

    example = _load_example()
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    before = list(logger.filters)
    with example.quiet_lightning():
        assert len(logger.filters) == len(before) + 1
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "💡 Tip: try litlogger", (), None)
        assert not logger.filter(record)
        keep = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "GPU available: False", (), None)
        assert logger.filter(keep)
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("something else", FutureWarning)
        assert [str(w.message) for w in caught] == ["something else"]
    assert logger.filters == before
