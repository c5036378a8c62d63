"""Adam, AMSGrad and Adam + switch on Fashion-MNIST, with the Adam-type convergence conditions watched live.

A small CNN (conv 1→16 5×5, ReLU, max-pool, conv 16→32 5×5, ReLU, max-pool, fc 512→74, ReLU, fc 74→10:
51,960 parameters, the ~52k network of design.md §4) is trained with cross-entropy through a ``pytorch_lightning``
Trainer three times, from the same initial weights and the same seeded batch order:

- "Adam": ``torch.optim.Adam``;
- "AMSGrad": ``torch.optim.Adam(amsgrad=True)``;
- "Adam + switch": Adam with ``AdamTypeMonitor(switch_to_amsgrad=True)``, which switches the group to AMSGrad in
  place once its bias verdict says the condition trends toward violation.

:class:`lightning_adamtype.AdamTypeMonitor` measures the quantities of Chen, Liu, Sun & Hong (ICLR 2019) per
optimizer step — a = Σ_t min_j η_t,j, b = Σ_t ‖η_t ⊙ g_t‖², c = Σ_t ‖η_t − η_{t−1}‖₁, the variance
ratio b/a and the bias ratio c/a — and logs them to TensorBoard (``adamtype/<group>/<key>``). After each run the
script reads the monitor's final numbers (``monitor.trackers[0].compute()``) and the test accuracy on the 10,000
t10k images; at the end it prints a Markdown table (one row per run) and draws the logged bias ratio, variance
ratio, c and a of all runs, read back from the event files, into one figure (``--out``) with the final verdicts in
the legends.

    python examples/fashion_mnist.py                       # 3 runs × 4500 optimizer steps, writes fashion_mnist.png
    python examples/fashion_mnist.py --quick               # 200 steps per run: a smoke run
    python examples/fashion_mnist.py --runs adam amsgrad --start-step 300 --schedule cosine
    tensorboard --logdir runs/fashion_mnist                # the logged curves

Data: the four IDX files of Fashion-MNIST (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, gzipped or not), parsed here without torchvision. The
script looks in ``--data DIR`` (``DIR/FashionMNIST/raw/``, torchvision's layout, then ``DIR`` itself), then in
``./data/FashionMNIST/raw``, then in ``/usr/share/datasets/fashion-mnist/`` (Debian/Ubuntu:
``apt-get install -y dataset-fashion-mnist``). The whole training set is held in memory as one normalised float
tensor; batches of 128 are drawn from it by index with a seeded generator (no worker processes). torch runs on one
thread by default (``--threads``): on a 2-core machine shared with other jobs, 2 threads made each step about 5×
slower.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import logging
import math
import os
import struct
import sys
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

try:
    import lightning_adamtype  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_adamtype import AdamTypeMonitor

# ------------------------------------------------------------------------------------------------- constants

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)
# Places searched after --data, in this order (module-level so that tests can point them elsewhere).
FALLBACK_DIRS = (os.path.join("data", "FashionMNIST", "raw"), "/usr/share/datasets/fashion-mnist")
# Per-pixel mean and standard deviation of the 60,000 training images scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530
NUM_CLASSES = 10
BATCH_SIZE = 128
DEFAULT_STEPS, QUICK_STEPS = 4500, 200

# (run folder, label, Adam(amsgrad=...), AdamTypeMonitor(switch_to_amsgrad=...)); the folder is the --runs choice
RUNS = (
    ("adam", "Adam", False, False),
    ("amsgrad", "AMSGrad", True, False),
    ("adam_switch", "Adam + switch", False, True),
)
PANELS = (
    ("bias_ratio", "bias ratio C_T / A_T", "bias"),
    ("variance_ratio", "variance ratio B_T / A_T", "variance"),
    ("c", "C_T = Σ ‖η_t − η_{t−1}‖₁", None),
    ("a", "A_T = Σ min_j η_t,j", None),
)
# Keys that newer versions of the package add to compute(); a column each when present.
OPTIONAL_KEYS = (("inactive_share", "inactive share"), ("activations", "activations"))


class DataError(Exception):
    """The data is missing or a file is not a valid IDX file; the message names the files and the fix."""


# ------------------------------------------------------------------------------------------------------ data


def read_idx(path: str | os.PathLike, expected_magic: int) -> Tensor:
    """Parse one IDX file (gzipped when its name ends in ``.gz``) into a uint8 tensor of its declared shape.

    Format (big-endian): a 4-byte magic number (two zero bytes, the element type 0x08 = unsigned byte, the number
    of dimensions: 2051 for images, 2049 for labels), one 4-byte size per dimension, then the elements.
    Raises :class:`DataError` naming the file when it cannot be read, has the wrong magic or the wrong size.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from error
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file: it holds {len(data)} bytes, fewer than the 4-byte header")
    (magic,) = struct.unpack(">i", data[:4])
    if magic != expected_magic:
        kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
        raise DataError(
            f"{path} is not an IDX {kind} file: magic number {magic} (0x{magic & 0xFFFFFFFF:08x}), expected "
            f"{expected_magic} (0x{expected_magic:08x}). The file is corrupt or not Fashion-MNIST; delete it and "
            "get the data again."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, {header} needed for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}i", data[4:header])
    expected = math.prod(shape)
    if len(data) - header != expected:
        raise DataError(
            f"{path}: the header declares shape {tuple(shape)} ({expected} bytes of data) but the file holds "
            f"{len(data) - header}; the file is truncated or corrupt, get it again."
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def candidate_dirs(data: str | None) -> list[Path]:
    """The folders searched, in order: ``DATA/FashionMNIST/raw`` and ``DATA`` (when given), then the fallbacks."""
    dirs = []
    if data:
        dirs += [Path(data) / "FashionMNIST" / "raw", Path(data)]
    dirs += [Path(d) for d in FALLBACK_DIRS]
    return list(dict.fromkeys(dirs))


def find_files(folder: Path) -> dict[str, Path] | None:
    """``{role: path}`` of the four files in ``folder`` (plain preferred over ``.gz``), ``None`` if one is missing."""
    found = {}
    for role, name in FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            return None
    return found


def locate_data(data: str | None) -> dict[str, Path]:
    """The first folder (see :func:`candidate_dirs`) that holds all four files; :class:`DataError` listing every
    place looked at, and how to get the data, when none does."""
    looked = []
    for folder in candidate_dirs(data):
        files = find_files(folder)
        if files is not None:
            return files
        if folder.is_dir():
            missing = [n for n in FILES.values() if not (folder / n).is_file() and not (folder / f"{n}.gz").is_file()]
            looked.append(f"  {folder.resolve()}  (folder exists; missing: {', '.join(missing)}[.gz])")
        else:
            looked.append(f"  {folder.resolve()}  (no such folder)")
    raise DataError(
        "Fashion-MNIST not found. Looked for "
        + ", ".join(f"{n}[.gz]" for n in FILES.values())
        + " in:\n"
        + "\n".join(looked)
        + "\nTo get the data:\n"
        "  - Debian/Ubuntu: apt-get install -y dataset-fashion-mnist   (installs /usr/share/datasets/fashion-mnist/)\n"
        "  - on a machine with internet: python -c \"import torchvision; "
        "torchvision.datasets.FashionMNIST('data', download=True)\"   (writes data/FashionMNIST/raw/), "
        "then pass --data data (or copy that folder here)"
    )


def load_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    """One split as (float32 N×1×28×28 normalised images, int64 labels); :class:`DataError` on inconsistent files."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.dim() != 3:
        raise DataError(f"{images_path}: expected 3 dimensions (count, rows, columns), got shape {tuple(images.shape)}")
    if labels.dim() != 1:
        raise DataError(f"{labels_path}: expected 1 dimension (count), got shape {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {int(labels.max())} is out of range 0..{NUM_CLASSES - 1}")
    x = images.to(torch.float32).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return x.contiguous(), labels.to(torch.int64)


def load_fashion_mnist(data: str | None) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Path]:
    """(train images, train labels), (test images, test labels) and the folder they were read from."""
    files = locate_data(data)
    train = load_split(files["train_images"], files["train_labels"])
    test = load_split(files["test_images"], files["test_labels"])
    return train, test, files["train_images"].parent


def train_loader(images: Tensor, labels: Tensor, seed: int, batch_size: int = BATCH_SIZE) -> DataLoader:
    """Shuffled batches from in-memory tensors: each sampler item is a list of indices, gathered in one indexing
    operation (no per-sample ``__getitem__``, no collate, no workers); the shuffle follows a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(images, labels)
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=len(dataset) > batch_size)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=0)


# ----------------------------------------------------------------------------------------------------- model


class SmallCNN(nn.Module):
    """conv 1→16 5×5, ReLU, max-pool 2, conv 16→32 5×5, ReLU, max-pool 2, fc 512→74, ReLU, fc 74→10 (51,960
    parameters)."""

    def __init__(self, hidden: int = 74) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28 → 24 → 12
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 12 → 8 → 4
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FashionModule(pl.LightningModule):
    """:class:`SmallCNN` with cross-entropy and Adam (``amsgrad`` as given), constant or cosine lr per step."""

    def __init__(self, lr: float = 1e-3, amsgrad: bool = False, schedule: str = "constant", steps: int = 1) -> None:
        super().__init__()
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={schedule!r}: use 'constant' or 'cosine'")
        self.lr, self.amsgrad, self.schedule, self.steps = lr, amsgrad, schedule, steps
        self.net = SmallCNN()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, amsgrad=self.amsgrad)
        if self.schedule == "constant":
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.steps, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor, chunk: int = 2000) -> float:
    """Fraction of ``images`` classified as ``labels`` (evaluation mode, in chunks)."""
    if labels.numel() == 0:
        return float("nan")
    was_training = net.training
    net.eval()
    correct = sum(
        int((net(images[i:i + chunk]).argmax(1) == labels[i:i + chunk]).sum()) for i in range(0, len(labels), chunk)
    )
    net.train(was_training)
    return correct / labels.numel()


# --------------------------------------------------------------------------------------------------- quieting


class _DropMessages(logging.Filter):
    """Drops Lightning's informational lines that say nothing about this run."""

    NOISE = ("litlogger", "💡 Tip", "GPU available", "TPU available", "HPU available", "`Trainer.fit` stopped")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's noise for the duration (restored afterwards): the ``LeafSpec`` FutureWarning that
    pytorch_lightning's pytree helper triggers in torch ≥ 2.10, the "does not have many workers" hint (the batches
    come from memory on purpose), and the litlogger "💡 Tip" / accelerator lines of its rank-zero logger."""
    loggers = [
        logging.getLogger(name)
        for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                     "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    drop = _DropMessages()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


# -------------------------------------------------------------------------------------------------- training


def as_verdict(value: Any, slope: Any = None) -> str:
    """A ``*_violation`` value as text: "unknown" for NaN or absent, "violation" for 1/True, "holds" for 0/False.

    Works for the three-state float verdicts (1.0 / 0.0 / NaN) and for the older booleans; a boolean ``False``
    next to a NaN ``slope`` means the detector has not decided yet (it had too few samples), so it reads "unknown".
    """
    if value is None:
        return "unknown"
    if isinstance(value, bool) and not value and slope is not None and math.isnan(float(slope)):
        return "unknown"
    value = float(value)  # a bool becomes 0.0 / 1.0
    if math.isnan(value):
        return "unknown"
    return "violation" if value > 0.5 else "holds"


def verdict_of(final: dict[str, Any], kind: str) -> str:
    """The final verdict of the ``kind`` ("bias" or "variance") condition in a group's ``compute()`` numbers."""
    return as_verdict(final.get(f"{kind}_violation"), final.get(f"{kind}_slope"))


def train_run(
    run: str,
    label: str,
    amsgrad: bool,
    switch: bool,
    *,
    args: argparse.Namespace,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
) -> dict[str, Any]:
    """Train one run; returns its label, steps, test accuracy, the monitor's final numbers of its (first) group,
    the switch step (``None`` if not switched, -1 if the switch was refused), TensorBoard folder and seconds."""
    pl.seed_everything(args.seed, verbose=False)  # the same initial weights for every run
    module = FashionModule(lr=args.lr, amsgrad=amsgrad, schedule=args.schedule, steps=args.steps)
    loader = train_loader(*train, seed=args.seed)  # the same batch order for every run
    monitor = AdamTypeMonitor(
        log_every_n_steps=args.log_every_n_steps, start_step=args.start_step, switch_to_amsgrad=switch
    )
    logger = TensorBoardLogger(args.logdir, name=run)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[monitor],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=args.log_every_n_steps,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    logger.finalize("success")
    tracker = monitor.trackers[0]
    final = tracker.compute()
    group = sorted(final)[0] if final else None
    switched = tracker.switched.get(group) if group is not None else None
    return {
        "run": run,
        "label": label,
        "steps": int(trainer.global_step),
        "accuracy": accuracy(module.net, *test),
        "group": group,
        "final": dict(final.get(group, {})) if group is not None else {},
        "switched_at": switched,
        "log_dir": logger.log_dir,
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------------------------- reading back


def read_scalars(log_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series of one TensorBoard run folder: ``{tag: (steps, values)}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: ([e.step for e in accumulator.Scalars(tag)], [e.value for e in accumulator.Scalars(tag)])
        for tag in accumulator.Tags().get("scalars", [])
    }


Series = tuple[list[int], list[float]]


def group_curves(scalars: dict[str, Series], group: str | None) -> dict[str, Series]:
    """``{key: (optimizer steps, values)}`` of the tags ``adamtype/<group>/<key>`` (the first group if ``None``)."""
    by_group: dict[str, dict[str, Series]] = {}
    for tag, series in scalars.items():
        if tag.startswith("adamtype/"):
            name, _, key = tag[len("adamtype/"):].rpartition("/")
            by_group.setdefault(name, {})[key] = series
    if not by_group:
        return {}
    return by_group.get(group, {}) if group is not None else by_group[sorted(by_group)[0]]


# ---------------------------------------------------------------------------------------------------- output


def _num(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "—"
    value = float(value)
    return "nan" if math.isnan(value) else format(value, spec)


def _switch_text(step: int | None) -> str:
    if step is None:
        return "—"
    return "refused" if step < 0 else str(step)


def format_table(results: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table, one row per run (optional keys as extra columns when present)."""
    optional = [(key, title) for key, title in OPTIONAL_KEYS if any(key in r["final"] for r in results)]
    header = [
        "optimizer", "steps", "test accuracy", "a", "b", "c", "bias ratio", "bias slope", "bias verdict",
        "variance slope", "variance verdict", "switch step", *(title for _, title in optional),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        f = r["final"]
        cells = [
            r["label"],
            str(r["steps"]),
            _num(r["accuracy"], ".4f"),
            _num(f.get("a")),
            _num(f.get("b")),
            _num(f.get("c")),
            _num(f.get("bias_ratio")),
            _num(f.get("bias_slope"), "+.3f"),
            verdict_of(f, "bias"),
            _num(f.get("variance_slope"), "+.3f"),
            verdict_of(f, "variance"),
            _switch_text(r["switched_at"]),
            *(_num(f.get(key)) for key, _ in optional),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], out: str | os.PathLike, title: str) -> None:
    """A 2×2 figure (bias ratio, variance ratio, c, a against the optimizer step, log-log), one colour per run,
    the final verdict and slope of each run in the ratio panels' legends, the switch step as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for ax, (key, panel_title, kind) in zip(axes.flat, PANELS):
        for k, r in enumerate(results):
            color = f"C{k}"
            width = max(2.6 - 0.8 * k, 1.0)  # later runs drawn thinner, so identical curves stay visible
            xs, ys = r["curves"].get(key, ([], []))
            pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0 and math.isfinite(y)]
            label = r["label"]
            if kind is not None:
                slope = _num(r["final"].get(f"{kind}_slope"), "+.2f")
                label += f": {verdict_of(r['final'], kind)} (slope {slope})"
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=width, label=label)
            else:
                ax.plot([], [], color=color, lw=width, label=label + " — not logged")
            step = r["switched_at"]
            if step is not None and step > 0:
                ax.axvline(step, color=color, ls="--", lw=1.0, alpha=0.8, label=f"{r['label']} switched at t = {step}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(panel_title + (f"  — final {kind} verdicts in the legend" if kind else ""), fontsize=10)
        ax.set_xlabel("optimizer step t")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="folder with the IDX files (DIR/FashionMNIST/raw/ or DIR itself); then "
                        "./data/FashionMNIST/raw and /usr/share/datasets/fashion-mnist/ are searched")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per run (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK_STEPS} steps per run")
    parser.add_argument("--runs", nargs="+", choices=[r[0] for r in RUNS], default=[r[0] for r in RUNS],
                        help="which runs (default all three, in this order)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                        help="constant lr, or cosine annealing to 0 over --steps (stepped every optimizer step)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    parser.add_argument("--start-step", type=int, default=1,
                        help="the monitor ignores the optimizer steps before this one (default 1: from the start)")
    parser.add_argument("--log-every-n-steps", type=int, default=10,
                        help="log interval in optimizer steps (default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: this network is too small to gain much from more, "
                        "and more threads are several times slower when other processes share the cores)")
    parser.add_argument("--logdir", default=os.path.join("runs", "fashion_mnist"), help="TensorBoard folder")
    parser.add_argument("--out", default="fashion_mnist.png", help="figure to write (default fashion_mnist.png)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    for option in ("steps", "start_step", "log_every_n_steps", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    args.runs = [r for r in dict.fromkeys(args.runs)]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Train the chosen runs, print the summary table, write the figure; returns 0, or 2 when the data is missing or
    unreadable (the reason is printed to stderr)."""
    args = parse_args(argv)
    try:
        train, test, folder = load_fashion_mnist(args.data)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # restored when main returns
    print(f"Fashion-MNIST from {folder.resolve()}: {len(train[1])} training and {len(test[1])} test images")
    print(f"model: {count_parameters(SmallCNN()):,} parameters; {args.steps} optimizer steps per run, "
          f"batch {BATCH_SIZE}, lr {args.lr:g} ({args.schedule}), monitor from step {args.start_step}, "
          f"{torch.get_num_threads()} torch threads")

    results = []
    try:
        with quiet_lightning():
            for run, label, amsgrad, switch in RUNS:
                if run not in args.runs:
                    continue
                result = train_run(run, label, amsgrad, switch, args=args, train=train, test=test)
                result["curves"] = group_curves(read_scalars(result["log_dir"]), result["group"])
                results.append(result)
                print(f"{label}: {result['steps']} steps in {result['seconds']:.1f} s, "
                      f"test accuracy {result['accuracy']:.4f}")
    finally:
        torch.set_num_threads(threads)

    table = format_table(results)
    print(table)
    plot(
        results,
        args.out,
        f"Fashion-MNIST, {count_parameters(SmallCNN()):,}-parameter CNN, batch {BATCH_SIZE}, lr {args.lr:g} "
        f"({args.schedule}), seed {args.seed}, monitor from step {args.start_step}",
    )
    print(f"figure: {args.out}; logs: tensorboard --logdir {args.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
