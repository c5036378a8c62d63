"""One-pass per-tensor kernels of the condition math, for optimizers whose η has the "square-root form".

Adam, AdamW, Adagrad and RMSprop (not centered) all write their effective stepsize as

    η_t = s_t / (sqrt(v_t) + e_t)

with one second-moment tensor v_t and two scalars per parameter (Adam: s = lr·sqrt(1 − β2^t)/(1 − β1^t),
e = eps·sqrt(1 − β2^t); see each adapter's ``sqrt_form``). For one parameter tensor the kernels below return
the five per-step terms

    [min_j η_j,  Σ_j (η_j g_j)²,  Σ_j |η_j − η_{t−1,j}|,  Σ_j (η_j − η_{t−1,j})²,  Σ_j η_j]

reading each input once, with no full-size temporaries when compiled. η_{t−1} comes either from a buffer the
tracker keeps (``stored_terms``, which then overwrites the buffer with η_t) or, when the optimizer's update of
v is linear, v_t = k·v_{t−1} + w·g_t², from the state itself (``recomputed_terms``):

    v_{t−1} = max((v_t − w·g_t²) / k, 0),     η_{t−1} = s_{t−1} / (sqrt(v_{t−1}) + e_{t−1}).

That is exact up to the rounding of v_t (a coordinate whose v grew by more than ~10⁷× in one step loses
η_{t−1}'s digits below float32's resolution of v_t) and needs no per-coordinate memory.

The same Python functions run eagerly (``compiled=False``) or through ``torch.compile(dynamic=True)``
(one fused loop per tensor; needs a C++ compiler on CPU, Triton on GPU). Sums are taken in the working dtype
(float32 for float32/bf16 state, float64 for float64 state); the tracker adds the per-tensor terms in float64.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

__all__ = ["SquareRootKernels", "sqrt_form_kernels"]


def _work(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _terms(eta: Tensor, g: Tensor, diff: Tensor | None) -> Tensor:
    step = eta * g
    parts = [eta.amin(), step.square().sum(), None, None, eta.sum()]
    if diff is None:
        zero = torch.zeros((), dtype=eta.dtype, device=eta.device)
        parts[2] = parts[3] = zero
    else:
        parts[2] = diff.abs().sum()
        parts[3] = diff.square().sum()
    return torch.stack(parts)


def current_terms(v: Tensor, g: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """The five terms with no η_{t−1} (the oscillation terms are 0): η = s / (sqrt(v) + e)."""
    v = _work(v)
    eta = scale / (v.sqrt() + offset)
    return _terms(eta, _work(g).to(eta.dtype), None)


def first_terms(v: Tensor, g: Tensor, out: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """Like :func:`current_terms`, and writes η_t into ``out`` (the tracker's η_{t−1} buffer for the next step)."""
    v = _work(v)
    eta = scale / (v.sqrt() + offset)
    out.copy_(eta)
    return _terms(eta, _work(g).to(eta.dtype), None)


def stored_terms(v: Tensor, g: Tensor, previous: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """The five terms with η_{t−1} read from ``previous``, which is then overwritten with η_t."""
    v = _work(v)
    eta = scale / (v.sqrt() + offset)
    diff = eta - previous
    terms = _terms(eta, _work(g).to(eta.dtype), diff)
    previous.copy_(eta)
    return terms


def first_terms_out(v: Tensor, g: Tensor, scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """(the five terms with no η_{t−1}, η_t as a new tensor)."""
    v = _work(v)
    eta = scale / (v.sqrt() + offset)
    return _terms(eta, _work(g).to(eta.dtype), None), eta


def stored_terms_out(v: Tensor, g: Tensor, previous: Tensor, scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """(the five terms with η_{t−1} read from ``previous``, η_t as a new tensor that replaces it).

    Compiled, this is one loop that reads v, g and η_{t−1} and writes η_t; writing η_t back into ``previous``
    instead (:func:`stored_terms`) makes inductor emit a second loop for the write (10–15 % slower at 10M on CPU).
    The old buffer is freed when the tracker drops it, so the memory held stays one η per coordinate.
    """
    v = _work(v)
    eta = scale / (v.sqrt() + offset)
    return _terms(eta, _work(g).to(eta.dtype), eta - previous), eta


def recomputed_terms(
    v: Tensor,
    g: Tensor,
    scale: Tensor,
    offset: Tensor,
    previous_scale: Tensor,
    previous_offset: Tensor,
    keep: Tensor,
    weight: Tensor,
) -> Tensor:
    """The five terms with η_{t−1} rebuilt from the state: v_{t−1} = max((v_t − w·g_t²)/k, 0)."""
    v = _work(v)
    g = _work(g).to(v.dtype)
    eta = scale / (v.sqrt() + offset)
    v_previous = ((v - weight * (g * g)) / keep).clamp_min(0)
    diff = eta - previous_scale / (v_previous.sqrt() + previous_offset)
    return _terms(eta, g, diff)


class SquareRootKernels:
    """The kernels, eager or compiled (one compiled graph per rank/dtype/layout, sizes dynamic)."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        wrap: Callable[[Callable], Callable]
        if compiled:
            wrap = functools.partial(torch.compile, dynamic=True, fullgraph=True)
        else:
            wrap = lambda f: f  # noqa: E731
        self.current = wrap(current_terms)
        self.first = wrap(first_terms)
        self.stored = wrap(stored_terms)
        self.recomputed = wrap(recomputed_terms)
        self.first_out = wrap(first_terms_out)
        self.stored_out = wrap(stored_terms_out)


@functools.lru_cache(maxsize=2)
def sqrt_form_kernels(compiled: bool) -> SquareRootKernels:
    """Shared kernels (compiled graphs are cached by torch per function, so share the wrappers too)."""
    return SquareRootKernels(compiled)
