"""Train a CIFAR-style ResNet on CIFAR-10 and watch the Adam-type convergence conditions in TensorBoard.

    python examples/cifar10.py --optimizer adam --max-epochs 30                 # ResNet-18, GPU if available
    python examples/cifar10.py --arch resnet8 --max-steps 300 --synthetic       # offline CPU smoke run
    tensorboard --logdir runs/cifar10                                           # CUSTOM SCALARS: b, a, b/a | c, a, c/a
    python -m lightning_adamtype.report runs/cifar10 -o cifar10.png             # paper-style log-log figure

Data: ``torchvision.datasets.CIFAR10`` under ``--data-dir`` (``cifar-10-batches-py/``), downloaded when missing
unless ``--no-download``. Training augmentation: random crop 32 with padding 4, horizontal flip, per-channel
normalisation. ``--synthetic`` uses random class-dependent images instead (no torchvision download, offline).

Model: a CIFAR ResNet (3×3 stem, no max-pool). ``resnet18`` = BasicBlocks [2, 2, 2, 2] with widths
64·w, 128·w, 256·w, 512·w; ``resnet8`` = [1, 1, 1] with widths 16·w, 32·w, 64·w (fast; used by the tests).

``AdamTypeMonitor`` logs ``adamtype/<optimizer>/pg0/{a,b,c,c2,variance_ratio,bias_ratio,...}`` to the
``TensorBoardLogger``, writes the custom-scalars layout, histograms of the effective stepsizes η, and shows
both ratios in the progress bar. The real data needs torchvision (``pip install "torchvision>=0.16"``; its wheels
bring a CUDA build of torch, which also runs on a CPU); ``--synthetic`` and ``--help`` run without it.

Lightning's own notices that say nothing about this example (the ``LeafSpec`` deprecation warning from its
pytree helper, the "💡 Tip" adverts for litlogger / litmodels) are filtered out while it runs; see
``quiet_lightning``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:
    import lightning_adamtype  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_adamtype import AdamTypeMonitor

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
OPTIMIZERS = ("adam", "adamw", "amsgrad", "adagrad", "rmsprop", "sgd")
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "amsgrad": 1e-3, "adagrad": 1e-2, "rmsprop": 1e-3, "sgd": 0.1}
LR_SCHEDULES = ("constant", "inv_sqrt", "cosine")  # inv_sqrt as in examples/divergence.py
DEPRECATED_LR_SCHEDULES = {"invsqrt": "inv_sqrt"}  # the old spelling, still accepted


# ---------------------------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: 3×3 stem conv (no max-pool), BasicBlock stages, global average pool, linear."""

    ARCHS = {"resnet18": ((2, 2, 2, 2), (64, 128, 256, 512)), "resnet8": ((1, 1, 1), (16, 32, 64))}

    def __init__(self, arch: str = "resnet18", width: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"arch={arch!r}: expected one of {sorted(self.ARCHS)}")
        blocks, widths = self.ARCHS[arch]
        widths = tuple(max(1, int(round(w * width))) for w in widths)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (n, cout) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer named on the command line (SGD: heavy-ball momentum 0.9; AMSGrad: Adam(amsgrad=True))."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "amsgrad":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=True)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"--optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


class CifarModule(pl.LightningModule):
    def __init__(
        self,
        arch: str = "resnet18",
        width: float = 1.0,
        optimizer: str = "adam",
        lr: float | None = None,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = CifarResNet(arch, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams  # AttributeDict
        lr = hp.lr if hp.lr is not None else DEFAULT_LR[hp.optimizer]
        opt = make_optimizer(hp.optimizer, self.parameters(), lr, hp.weight_decay)
        schedule = DEPRECATED_LR_SCHEDULES.get(hp.lr_schedule, hp.lr_schedule)
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={hp.lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
        if schedule == "constant":
            return opt
        sched: torch.optim.lr_scheduler.LRScheduler
        if schedule == "inv_sqrt":  # α_t = α/√t, the schedule of the paper's guarantees
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / math.sqrt(step + 1))
        else:  # cosine over the whole run
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------------------------------------------- data
class SyntheticCifar(Dataset):
    """Random 32×32 images, already normalised: class-dependent mean pattern + noise, so the net can learn."""

    def __init__(self, n: int, seed: int = 0, noise: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.images = 0.5 * templates[self.labels] + noise * torch.randn(n, 3, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def missing_data_message(data_dir: str, download: bool, error: BaseException) -> str:
    where = os.path.join(os.path.abspath(data_dir), "cifar-10-batches-py")
    how = (
        "the download failed (offline?)" if download else "--no-download was given"
    )
    return (
        f"CIFAR-10 not found (or corrupted) under {where!r} and {how}: {type(error).__name__}: {error}\n"
        "Fix: run once with network access and --download (the default), or extract cifar-10-python.tar.gz "
        f"from https://www.cs.toronto.edu/~kriz/cifar.html into {os.path.abspath(data_dir)!r}, "
        "or pass --synthetic for an offline smoke run on random images."
    )


def cifar10_datasets(data_dir: str, download: bool) -> tuple[Dataset, Dataset]:
    """torchvision's CIFAR10 train/test sets with the standard augmentation; SystemExit with a fix when missing."""
    try:
        import torchvision
        from torchvision import transforms as T
    except Exception as exc:  # ImportError, or "operator torchvision::nms does not exist" with a CPU-only torch
        raise SystemExit(
            f"examples/cifar10.py needs torchvision ({type(exc).__name__}: {exc}). "
            'Install it with: pip install "torchvision>=0.16" (it brings a matching CUDA build of torch, which '
            "also runs on a CPU), or pass --synthetic."
        ) from exc
    normalize = T.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test_tf = T.Compose([T.ToTensor(), normalize])
    try:
        train = torchvision.datasets.CIFAR10(data_dir, train=True, transform=train_tf, download=download)
        test = torchvision.datasets.CIFAR10(data_dir, train=False, transform=test_tf, download=download)
    except (RuntimeError, OSError) as exc:  # not found / corrupted; URLError and socket errors are OSErrors
        raise SystemExit(missing_data_message(data_dir, download, exc)) from exc
    return train, test


# ---------------------------------------------------------------------------------------------------- CLI
def _count_or_fraction(text: str) -> int | float:
    """"10" → 10 batches, "0.1" → 10 % of the batches (Lightning's limit_*_batches semantics)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer count or a fraction in [0, 1]")
        return value


def _lr_schedule(text: str) -> str:
    """``--lr-schedule``: the old spelling ``invsqrt`` is read as ``inv_sqrt``, with a one-line notice."""
    if text in DEPRECATED_LR_SCHEDULES:
        new = DEPRECATED_LR_SCHEDULES[text]
        print(f"examples/cifar10.py: --lr-schedule {text} is deprecated, use --lr-schedule {new}", file=sys.stderr)
        return new
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line. Every option's help states its default once, written here (not by the formatter)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data", help="where cifar-10-batches-py/ is, or is downloaded to (default: data)")
    # Two plain flags, not BooleanOptionalAction: on Python < 3.12 that appends its own "(default: …)" to the help.
    p.add_argument("--download", dest="download", action="store_true", default=True,
                   help="download CIFAR-10 when it is missing (default: on)")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="stop with a message saying where it looked when CIFAR-10 is missing (default: off)")
    p.add_argument(
        "--synthetic", action="store_true",
        help="random class-dependent images instead of CIFAR-10: offline, no torchvision needed (default: off)",
    )
    p.add_argument("--synthetic-size", type=int, default=5000, help="training images with --synthetic (default: 5000)")
    p.add_argument("--arch", choices=sorted(CifarResNet.ARCHS), default="resnet18", help="network (default: resnet18)")
    p.add_argument("--width", type=float, default=1.0, help="channel-width multiplier (default: 1.0)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer (default: adam)")
    p.add_argument(
        "--lr", type=float, default=None,
        help="learning rate (default: 1e-3 for adam, adamw, amsgrad and rmsprop, 1e-2 for adagrad, 0.1 for sgd)",
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default: 0.0)")
    p.add_argument(
        "--lr-schedule", type=_lr_schedule, choices=LR_SCHEDULES, default="constant",
        help="constant; inv_sqrt: lr/sqrt(t); cosine: cosine annealing over the run (default: constant)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--max-epochs", type=int, default=30, help="stop after this many epochs (default: 30)")
    p.add_argument(
        "--max-steps", type=int, default=-1, help="stop after this many optimizer steps (default: -1, no limit)"
    )
    p.add_argument(
        "--limit-batches", type=_count_or_fraction, default=None,
        help="limit train and val batches per epoch: a count (10) or a fraction (0.1) (default: all batches)",
    )
    p.add_argument(
        "--switch-to-amsgrad", action="store_true",
        help="switch Adam to AMSGrad when the bias condition trends toward violation (default: off)",
    )
    p.add_argument("--log-every", type=int, default=10, help="log the conditions every this many steps (default: 10)")
    p.add_argument(
        "--eta-histogram-every", type=int, default=10, help="η histogram every this many logs, 0: none (default: 10)"
    )
    p.add_argument(
        "--precision", default="32-true", help="Lightning precision: 32-true, 16-mixed, bf16-mixed, ... (default: 32-true)"
    )
    p.add_argument("--accelerator", default="auto", help="auto (a GPU when there is one), cpu, gpu, ... (default: auto)")
    p.add_argument("--devices", default="auto", help="devices for Lightning: a count, a list like 0,1, or auto (default: auto)")
    p.add_argument(
        "--num-workers", type=int, default=min(4, os.cpu_count() or 1),
        help="data-loader worker processes (default: the CPU count, at most 4)",
    )
    p.add_argument("--logdir", default=os.path.join("runs", "cifar10"), help="TensorBoard log folder (default: runs/cifar10)")
    p.add_argument("--run-name", default=None, help="TensorBoard run name (default: <arch>-<optimizer>)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress-bar", action="store_true", help="no progress bar (default: a progress bar)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see :func:`build_parser`); ``--devices 2`` becomes the int 2."""
    args = build_parser().parse_args(argv)
    if args.devices != "auto":
        try:
            args.devices = int(args.devices)
        except ValueError:
            pass  # e.g. "0,1"
    return args


# ---------------------------------------------------------------------------------------------------- quiet
# Lightning's notices that are not about this example: adverts for its cloud products, printed at every fit, and a
# deprecation warning of its own pytree helper (pytorch_lightning/utilities/_pytree.py using torch's LeafSpec).
_NOT_OURS_LOG = ("💡 Tip:", "litlogger", "litmodels")
_NOT_OURS_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",)
_LIGHTNING_LOGGERS = (
    "pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning", "lightning.pytorch",
    "lightning.pytorch.utilities.rank_zero", "lightning_fabric", "lightning_fabric.utilities.rank_zero",
    "lightning.fabric", "lightning.fabric.utilities.rank_zero",
)


class _DropNotOurs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOT_OURS_LOG)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """While the example runs: drop Lightning's "💡 Tip" / litlogger / litmodels log lines and its ``LeafSpec``
    deprecation warning (both are Lightning's, not ours and not the user's). Everything else is shown as usual.
    The filters are attached to Lightning's loggers and their handlers and removed on exit."""
    drop = _DropNotOurs()
    attached: list[logging.Filterer] = []
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            target.addFilter(drop)
            attached.append(target)
    try:
        with warnings.catch_warnings():
            for message in _NOT_OURS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            yield
    finally:
        for target in attached:
            target.removeFilter(drop)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Train; returns the final ``AdamTypeMonitor.compute()`` ({group: {key: value}})."""
    args = parse_args(argv)
    with quiet_lightning():
        return _train(args)


def _train(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    pl.seed_everything(args.seed, workers=True)
    if args.synthetic:
        train_set: Dataset = SyntheticCifar(args.synthetic_size, seed=args.seed)
        val_set: Dataset = SyntheticCifar(max(args.synthetic_size // 5, args.batch_size), seed=args.seed + 1)
    else:
        train_set, val_set = cifar10_datasets(args.data_dir, args.download)
    loader_kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train_set, shuffle=True, drop_last=True, **loader_kw)
    val_loader = DataLoader(val_set, shuffle=False, **loader_kw)

    module = CifarModule(args.arch, args.width, args.optimizer, args.lr, args.weight_decay, args.lr_schedule)
    monitor = AdamTypeMonitor(
        log_every_n_steps=args.log_every,
        switch_to_amsgrad=args.switch_to_amsgrad,
        histogram_every_n_logs=args.eta_histogram_every or None,
        progress_bar=not args.no_progress_bar,
    )
    logger = TensorBoardLogger(args.logdir, name=args.run_name or f"{args.arch}-{args.optimizer}")
    limits: dict[str, Any] = {}
    if args.limit_batches is not None:
        limits = dict(limit_train_batches=args.limit_batches, limit_val_batches=args.limit_batches)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        logger=logger,
        callbacks=[monitor],
        log_every_n_steps=args.log_every,
        enable_progress_bar=not args.no_progress_bar,
        enable_checkpointing=False,
        deterministic=False,
        **limits,
    )
    trainer.fit(module, train_loader, val_loader)
    final = monitor.compute()
    for group, values in final.items():
        print(
            f"{group}: steps={values['steps']:.0f} a={values['a']:.4g} b={values['b']:.4g} c={values['c']:.4g} "
            f"b/a={values['variance_ratio']:.4g} c/a={values['bias_ratio']:.4g}"
        )
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {args.logdir})")
    return final


if __name__ == "__main__":
    main()
