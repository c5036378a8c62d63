"""Test-session setup.

Without CUDA, Triton (installed by the ``test`` extra on Linux x86-64) runs its kernels in its interpreter, so the
Triton path (:mod:`lightning_adamtype.triton_kernels`) is checked against the float64 oracle on the CPU too. The
switch must be set before Triton is first imported, and only where no GPU would need Triton's real compiler.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
