"""Test-session setup.

Without CUDA, Triton (installed by the ``test`` extra on Linux x86-64) runs its kernels in its interpreter, so the
Triton path (:mod:`lightning_adamtype.triton_kernels`) is checked against the float64 oracle on the CPU too. The
switch must be set before Triton is first imported, and only where no GPU would need Triton's real compiler.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (setup.cfg: -n 2) each worker gets one intra-op thread: two workers with two torch and OpenMP
# threads each oversubscribe two cores, and threads that spin-wait between parallel regions slowed the 40M-coordinate
# tests about 10× (66 s against 7 s alone). Tests that need several threads set them themselves.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
