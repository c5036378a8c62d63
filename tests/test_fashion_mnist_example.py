"""examples/fashion_mnist.py on tiny Fashion-MNIST files written in the dataset's own on-disk format.

The test writes IDX files (big-endian header: magic 2051 + count, rows, columns for images, magic 2049 + count for
labels, then unsigned bytes) named as torchvision's ``FashionMNIST/raw/`` folder names them, gzipped or plain, in
both layouts the example accepts (``DIR/FashionMNIST/raw/`` and ``DIR`` itself), and runs ``main`` for a few steps.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import warnings
from pathlib import Path

import pytest
import torch

from example_modules import example_module  # noqa: E402

pytest.importorskip("pytorch_lightning")
pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist.py"
N_TRAIN, N_TEST = 256, 64
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
LABELS = ("Adam", "AMSGrad", "Adam + switch")


@pytest.fixture(scope="module")
def fm():
    with example_module(EXAMPLE, "fashion_mnist_example") as module:
        yield module


def idx_images(images: torch.Tensor) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">iiii", 2051, n, rows, cols) + bytes(images.to(torch.uint8).flatten().tolist())


def idx_labels(labels: torch.Tensor) -> bytes:
    return struct.pack(">ii", 2049, len(labels)) + bytes(labels.to(torch.uint8).tolist())


def make_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent 28×28 uint8 images (a bright bar whose row depends on the class) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 28, 28), generator=g)
    for k, label in enumerate(labels.tolist()):
        images[k, 2 + 2 * label: 4 + 2 * label, 4:24] = 250
    return images, labels


def write_fashion_mnist(folder: Path, compress: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """The four files under ``folder`` (``.gz`` as torchvision downloads them, or plain as it extracts them)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = make_split(N_TRAIN, seed)
    test_x, test_y = make_split(N_TEST, seed + 1)
    blobs = (idx_images(train_x), idx_labels(train_y), idx_images(test_x), idx_labels(test_y))
    for name, blob in zip(NAMES, blobs):
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def table_rows(text: str) -> dict[str, list[str]]:
    """The Markdown table's rows after the header and the rule, keyed by the first cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 2 and set(lines[1].replace("|", "")) == {"-"}, text
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


# ------------------------------------------------------------------------------------------------ the format


def test_read_idx_round_trip_gzip_and_plain(fm, tmp_path):
    written = write_fashion_mnist(tmp_path / "gz", compress=True)
    write_fashion_mnist(tmp_path / "plain", compress=False)
    for folder, suffix in ((tmp_path / "gz", ".gz"), (tmp_path / "plain", "")):
        images = fm.read_idx(folder / f"train-images-idx3-ubyte{suffix}", fm.IMAGES_MAGIC)
        labels = fm.read_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", fm.LABELS_MAGIC)
        assert images.dtype == torch.uint8 and images.shape == (N_TRAIN, 28, 28)
        assert torch.equal(images, written["train_x"].to(torch.uint8))
        assert torch.equal(labels.long(), written["test_y"])


def test_load_split_normalises_into_one_float_tensor(fm, tmp_path):
    written = write_fashion_mnist(tmp_path)
    x, y = fm.load_split(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz")
    assert x.shape == (N_TRAIN, 1, 28, 28) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64 and torch.equal(y, written["train_y"])
    expected = (written["train_x"].float() / 255 - fm.MEAN) / fm.STD
    assert torch.allclose(x[:, 0], expected, atol=1e-6)
    assert x.min() == pytest.approx(-fm.MEAN / fm.STD, abs=1e-6)


def test_bad_magic_names_the_file(fm, tmp_path):
    write_fashion_mnist(tmp_path, compress=False)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(struct.pack(">ii", 2051, N_TEST) + bytes(N_TEST))  # an images magic on a labels file
    with pytest.raises(fm.DataError) as info:
        fm.read_idx(bad, fm.LABELS_MAGIC)
    assert str(bad) in str(info.value) and "magic number 2051" in str(info.value) and "2049" in str(info.value)


def test_truncated_file_names_the_file(fm, tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">iiii", 2051, 10, 28, 28) + bytes(28 * 28 * 9))
    with pytest.raises(fm.DataError, match="truncated") as info:
        fm.read_idx(path, fm.IMAGES_MAGIC)
    assert str(path) in str(info.value) and "7840" in str(info.value)


def test_broken_gzip_names_the_file(fm, tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(fm.DataError) as info:
        fm.read_idx(path, fm.LABELS_MAGIC)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------- where to look


def test_search_order(fm, tmp_path, monkeypatch):
    fallback = tmp_path / "system"
    write_fashion_mnist(fallback)
    monkeypatch.setattr(fm, "FALLBACK_DIRS", (str(tmp_path / "cwd_data"), str(fallback)))
    # torchvision's layout wins over DIR itself, DIR itself over the fallbacks
    both = tmp_path / "both"
    write_fashion_mnist(both / "FashionMNIST" / "raw")
    write_fashion_mnist(both, compress=False)
    assert fm.locate_data(str(both))["train_images"] == both / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"
    flat = tmp_path / "flat"
    write_fashion_mnist(flat, compress=False)
    assert fm.locate_data(str(flat))["test_labels"] == flat / "t10k-labels-idx1-ubyte"
    # an incomplete --data folder falls through to the next place
    partial = tmp_path / "partial"
    write_fashion_mnist(partial)
    (partial / "t10k-images-idx3-ubyte.gz").unlink()
    assert fm.locate_data(str(partial))["train_images"].parent == fallback
    assert fm.locate_data(None)["train_images"].parent == fallback


def test_missing_data_is_a_clear_message(fm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    system = tmp_path / "usr_share"
    monkeypatch.setattr(fm, "FALLBACK_DIRS", (fm.FALLBACK_DIRS[0], str(system)))
    given = tmp_path / "nothing_here"
    partial = tmp_path / "partial"
    write_fashion_mnist(partial)
    (partial / "train-labels-idx1-ubyte.gz").unlink()
    for data, folders in ((given, (given / "FashionMNIST" / "raw", given)), (partial, (partial,))):
        code = fm.main(["--data", str(data), "--steps", "2", "--logdir", str(tmp_path / "runs"),
                        "--out", str(tmp_path / "f.png")])
        err = capsys.readouterr().err
        assert code == 2
        assert "Fashion-MNIST not found" in err
        for folder in (*folders, tmp_path / "data" / "FashionMNIST" / "raw", system):
            assert str(folder.resolve()) in err, (folder, err)
        assert "apt-get install -y dataset-fashion-mnist" in err and "download=True" in err
        assert not (tmp_path / "f.png").exists() and not (tmp_path / "runs").exists()
    assert "missing: train-labels-idx1-ubyte" in err


def test_corrupt_file_stops_main_with_the_file_named(fm, tmp_path, capsys):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    write_fashion_mnist(raw)
    bad = raw / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(struct.pack(">iiii", 1234, N_TRAIN, 28, 28) + bytes(N_TRAIN * 784)))
    code = fm.main(["--data", str(tmp_path / "data"), "--steps", "2", "--logdir", str(tmp_path / "runs"),
                    "--out", str(tmp_path / "f.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad) in err and "magic number 1234" in err
    assert not (tmp_path / "f.png").exists()


# ------------------------------------------------------------------------------------------------- the pieces


def test_model_has_about_52k_parameters(fm):
    net = fm.SmallCNN()
    assert fm.count_parameters(net) == 51_960
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_loader_is_seeded_in_memory_batches_of_128(fm):
    images, labels = torch.arange(300.0).reshape(300, 1, 1, 1), torch.arange(300)
    first = [y.tolist() for _, y in fm.train_loader(images, labels, seed=1)]
    again = [y.tolist() for _, y in fm.train_loader(images, labels, seed=1)]
    other = [y.tolist() for _, y in fm.train_loader(images, labels, seed=2)]
    assert first == again and first != other
    assert [len(b) for b in first] == [128, 128]  # the last, short batch is dropped
    assert len(set(first[0] + first[1])) == 256 and first[0] != list(range(128))
    x, y = next(iter(fm.train_loader(images, labels, seed=1)))
    assert torch.equal(x.flatten().long(), y)


@pytest.mark.parametrize(
    "value, slope, text",
    [(True, float("nan"), "violation"), (False, -0.5, "holds"), (False, float("nan"), "unknown"),
     (1.0, 0.1, "violation"), (0.0, float("nan"), "holds"), (float("nan"), 0.1, "unknown"), (None, None, "unknown")],
)
def test_verdict_text(fm, value, slope, text):
    assert fm.as_verdict(value, slope) == text


def test_table_shows_optional_keys_only_when_present(fm):
    base = {"label": "Adam", "steps": 5, "accuracy": 0.5, "switched_at": None,
            "final": {"a": 1.0, "b": 2.0, "c": 3.0, "bias_ratio": 3.0, "bias_violation": float("nan")}}
    with_share = dict(base, label="AMSGrad", switched_at=40, final=dict(base["final"], inactive_share=0.125))
    assert "inactive share" not in fm.format_table([base])
    rows = table_rows(fm.format_table([base, with_share]))
    assert rows["AMSGrad"]["inactive share"] == "0.125" and rows["Adam"]["inactive share"] == "—"
    assert rows["Adam"]["bias verdict"] == "unknown" and rows["Adam"]["bias slope"] == "—"
    assert rows["AMSGrad"]["switch step"] == "40" and rows["Adam"]["switch step"] == "—"


# ---------------------------------------------------------------------------------------------------- main


def test_all_three_runs_torchvision_layout(fm, tmp_path, capsys):
    data = tmp_path / "data"
    write_fashion_mnist(data / "FashionMNIST" / "raw", compress=True)
    out = tmp_path / "fig" / "fm.png"
    logdir = tmp_path / "runs"
    code = fm.main(["--data", str(data), "--threads", "1", "--steps", "6", "--log-every-n-steps", "2",
                    "--logdir", str(logdir), "--out", str(out), "--seed", "0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "51,960 parameters" in printed.out
    assert str((data / "FashionMNIST" / "raw").resolve()) in printed.out
    rows = table_rows(printed.out)
    assert list(rows) == list(LABELS)
    for label, row in rows.items():
        assert row["steps"] == "6"
        assert 0.0 <= float(row["test accuracy"]) <= 1.0
        assert float(row["a"]) > 0 and float(row["b"]) > 0 and math.isfinite(float(row["c"]))
        assert row["bias verdict"] in {"holds", "violation", "unknown"}
        assert row["variance verdict"] in {"holds", "violation", "unknown"}
    # Adam and Adam + switch start from the same weights and batches; nothing switches within 6 steps
    assert rows["Adam"]["a"] == rows["Adam + switch"]["a"] and rows["Adam"]["c"] == rows["Adam + switch"]["c"]
    assert rows["Adam + switch"]["switch step"] == "—"
    # the figure, and the event files it was drawn from
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    for run in ("adam", "amsgrad", "adam_switch"):
        (version,) = (logdir / run).iterdir()
        scalars = fm.read_scalars(version)
        curves = fm.group_curves(scalars, "Adam/pg0")
        for key in ("a", "c", "bias_ratio", "variance_ratio"):
            assert curves[key][0] == [2, 4, 6], (run, key, curves.get(key))
        assert "train/loss" in scalars


def test_one_run_flat_layout_plain_files(fm, tmp_path, capsys, caplog):
    data = tmp_path / "flat"
    write_fashion_mnist(data, compress=False)
    out = tmp_path / "one.png"
    caplog.set_level(logging.INFO)
    threads = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = fm.main(["--data", str(data), "--threads", "1", "--runs", "amsgrad", "--steps", "3",
                        "--log-every-n-steps", "1", "--start-step", "2", "--schedule", "cosine",
                        "--logdir", str(tmp_path / "runs"), "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert str(data.resolve()) in printed.out
    rows = table_rows(printed.out)
    assert list(rows) == ["AMSGrad"] and rows["AMSGrad"]["steps"] == "3"
    assert out.is_file()
    assert torch.get_num_threads() == threads  # --threads is undone when main returns
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["amsgrad"]
    # Lightning's noise is filtered: the LeafSpec FutureWarning and the litlogger tip of its rank-zero logger
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert not [r for r in caplog.records if "litlogger" in r.getMessage() or "Tip" in r.getMessage()]
    assert "litlogger" not in printed.out + printed.err
    # ... and only for the duration of main: the rank-zero logger is left as it was
    assert not logging.getLogger("pytorch_lightning.utilities.rank_zero").filters


def test_quick_and_bad_arguments(fm):
    assert fm.parse_args(["--quick"]).steps == fm.QUICK_STEPS
    assert fm.parse_args([]).steps == fm.DEFAULT_STEPS
    assert fm.parse_args(["--quick", "--steps", "7"]).steps == 7
    assert fm.parse_args(["--runs", "adam_switch", "adam"]).runs == ["adam_switch", "adam"]
    bad_arguments = (["--threads", "0"], ["--steps", "0"], ["--start-step", "0"], ["--runs", "sgd"],
                     ["--schedule", "step"], ["--lr", "-1"])
    for bad in bad_arguments:
        with pytest.raises(SystemExit):
            fm.parse_args(bad)
