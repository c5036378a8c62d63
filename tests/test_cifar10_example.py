"""examples/cifar10.py: a few steps on CIFAR-10's own on-disk format (through torchvision's loader), synthetic
data, and the message when the data is missing and --no-download is given.

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
import struct

import numpy as np
import pytest
import torch

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
    spec = importlib.util.spec_from_file_location("cifar10_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
