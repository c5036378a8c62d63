"""One C call per parameter group for the square-root form on the CPU (``kernel="native"``, the CPU default).

The CPU counterpart of :mod:`lightning_adamtype.triton_kernels`, with the same interface (:class:`GroupLaunch`) and
the same modes. For a group of n float32 tensors with η_i = s_i / (sqrt(v_i) + e_i), one call of
``adamtype_group_terms`` reads every v and g once (and the stored η_{t−1} once, writing η_t over it) in one loop,
cut into pieces of :data:`PIECE` coordinates shared among OpenMP threads (each thread folds its pieces into its own
row of partial sums: nothing per piece is kept), and folds the rows into the group's five terms

    [min_j η_j,  Σ_j (η_j g_j)²,  Σ_j |η_j − η_{t−1,j}|,  Σ_j (η_j − η_{t−1,j})²,  Σ_j η_j]

and, when asked, adds the step's row to the group's float64 accumulators (what the tracker's ``_accumulate``
does). Why: ``torch.compile`` splits the same math into a reduction loop and a second loop that writes η_t (five
passes over memory and two square roots and divisions per coordinate, where one of each suffices), and the eager
paths take ≈ 30 operations per step, whose fixed costs dominate on small models.

The source below is compiled on first use with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``), with OpenMP (which then shares the OpenMP runtime torch loaded) and ``-march=native`` where the
compiler takes them, into ``$LIGHTNING_ADAMTYPE_CACHE`` (default ``~/.cache/lightning_adamtype``; where that cannot
be written, a folder in the temporary directory), one file per source, flags and CPU, so later processes load it in
milliseconds. Without a compiler :func:`available` is False and the tracker keeps its torch paths (one warning when
``kernel="native"`` was asked for).

Arithmetic: η in float32 with the optimizer's own roundings (square root, add, divide; no contraction into fused
multiply-adds), sums in float32 within a piece (as torch's own reductions do), pieces folded in float64. What a
group keeps between calls is O(tensors): its tables of sizes, offsets and addresses.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapters import Scalar, scalar_table
from .kernels import CURRENT, FIRST, RECOMPUTED, STORED, FlatEtaLayout, addresses

__all__ = ["CURRENT", "FIRST", "PIECE", "RECOMPUTED", "STORED", "GroupLaunch", "available", "unavailable_reason"]

#: coordinates per piece (one row of partial sums each, one unit of OpenMP work)
PIECE = 16384
#: groups with fewer coordinates run on one thread (an OpenMP fork and join costs more than it saves there)
PARALLEL_MIN_NUMEL = 2 * PIECE

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif

enum { FIRST = 0, STORED = 1, CURRENT = 2, RECOMPUTED = 3 };

/* One piece [start, start + len) of one tensor: its sums (in float32) folded into row[5] = min η, Σ(ηg)², Σ|Δη|,
   Σ(Δη)², Ση (in float64). */
static void piece_terms(int mode, const float *restrict v, const float *restrict g, float *restrict eta, int64_t len,
                        float s, float e, float s_prev, float e_prev, float inverse_keep, float weight, double *row) {
    float lo = INFINITY, b = 0.0f, c = 0.0f, c2 = 0.0f, total = 0.0f;
    if (mode == FIRST) {
        #pragma omp simd reduction(min:lo) reduction(+:b, total)
        for (int64_t j = 0; j < len; j++) {
            float et = s / (sqrtf(v[j]) + e);
            float step = et * g[j];
            lo = lo < et ? lo : et;
            b += step * step;
            total += et;
            eta[j] = et;
        }
    } else if (mode == STORED) {
        #pragma omp simd reduction(min:lo) reduction(+:b, c, c2, total)
        for (int64_t j = 0; j < len; j++) {
            float et = s / (sqrtf(v[j]) + e);
            float step = et * g[j];
            float diff = et - eta[j];
            lo = lo < et ? lo : et;
            b += step * step;
            c += fabsf(diff);
            c2 += diff * diff;
            total += et;
            eta[j] = et;
        }
    } else if (mode == CURRENT) {
        #pragma omp simd reduction(min:lo) reduction(+:b, total)
        for (int64_t j = 0; j < len; j++) {
            float et = s / (sqrtf(v[j]) + e);
            float step = et * g[j];
            lo = lo < et ? lo : et;
            b += step * step;
            total += et;
        }
    } else { /* RECOMPUTED: v_{t-1} = max((v_t - w g_t^2) / k, 0), one division for both stepsizes */
        #pragma omp simd reduction(min:lo) reduction(+:b, c, c2, total)
        for (int64_t j = 0; j < len; j++) {
            float x = v[j], gj = g[j];
            float a = sqrtf(x) + e;
            float previous = (x - weight * (gj * gj)) * inverse_keep;
            float a_prev = sqrtf(previous > 0.0f ? previous : 0.0f) + e_prev;
            float r = 1.0f / (a * a_prev);
            float et = s * a_prev * r;
            float diff = (s * a_prev - s_prev * a) * r;
            float step = et * gj;
            lo = lo < et ? lo : et;
            b += step * step;
            c += fabsf(diff);
            c2 += diff * diff;
            total += et;
        }
    }
    row[0] = lo < row[0] ? lo : row[0];
    row[1] += b; row[2] += c; row[3] += c2; row[4] += total;
}

/* The group's five terms into out[5] (float64); with accumulate, also the tracker's _accumulate: a finite step adds
   weight * [1, min η, Σ(ηg)², Σ|Δη|, Σ(Δη)², Ση/n, Σ|Δη|/n, 0] to acc[8], a non-finite one adds 1 to acc[7] only,
   and *finite says which it was. Tensor i has pieces first_piece[i] .. first_piece[i + 1] - 1 of `piece`
   coordinates; each thread folds its pieces (a static schedule: the same ones at every call) into its own row.
   Returns 0. */
int adamtype_group_terms(int mode, int64_t n, const int64_t *v_ptrs, const int64_t *g_ptrs, float *eta,
                         const int64_t *eta_offsets, const int64_t *sizes, const int64_t *first_piece, int64_t piece,
                         const float *table, int64_t table_stride, float inverse_keep, float weight, double *out,
                         int accumulate, double *acc, double inverse_total, double observe_weight, uint8_t *finite,
                         int threads) {
    int64_t pieces = first_piece[n];
    double rows[threads][5];
    for (int t = 0; t < threads; t++) {
        rows[t][0] = INFINITY; rows[t][1] = rows[t][2] = rows[t][3] = rows[t][4] = 0.0;
    }
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        double *row = rows[omp_get_thread_num()];
        int64_t i = 0;
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < pieces; p++) {
            while (first_piece[i + 1] <= p) i++;  /* a thread's pieces are one increasing run (static schedule) */
            int64_t start = (p - first_piece[i]) * piece;
            int64_t len = sizes[i] - start < piece ? sizes[i] - start : piece;
            const float *tab = table + i * table_stride;
            float s_prev = mode == RECOMPUTED ? tab[2] : 0.0f, e_prev = mode == RECOMPUTED ? tab[3] : 0.0f;
            float *eta_i = (mode == FIRST || mode == STORED) ? eta + eta_offsets[i] + start : 0;
            piece_terms(mode, (const float *)(intptr_t)v_ptrs[i] + start, (const float *)(intptr_t)g_ptrs[i] + start,
                        eta_i, len, tab[0], tab[1], s_prev, e_prev, inverse_keep, weight, row);
        }
    }
    double lo = INFINITY, b = 0.0, c = 0.0, c2 = 0.0, total = 0.0;
    for (int t = 0; t < threads; t++) {
        lo = rows[t][0] < lo ? rows[t][0] : lo;
        b += rows[t][1]; c += rows[t][2]; c2 += rows[t][3]; total += rows[t][4];
    }
    out[0] = lo; out[1] = b; out[2] = c; out[3] = c2; out[4] = total;
    if (accumulate) {
        double mean = total * inverse_total, c_mean = c * inverse_total;
        int ok = isfinite(lo) && isfinite(b) && isfinite(c) && isfinite(c2) && isfinite(mean);
        if (ok) {
            double k = observe_weight;
            acc[0] += k; acc[1] += lo * k; acc[2] += b * k; acc[3] += c * k; acc[4] += c2 * k;
            acc[5] += mean * k; acc[6] += c_mean * k;
        } else {
            acc[7] += 1.0;
        }
        *finite = (uint8_t)ok;
    }
    return 0;
}
"""

_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off"]
#: the optional flags, tried in this order until one set compiles: a compiler without OpenMP (Apple's clang without
#: libomp) builds the single-threaded loop, one without ``-march=native`` (older Apple clang on arm64, some cross
#: compilers) the generic vector code
_OPTIONAL_FLAGS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (one build per kind of CPU sharing a cache)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dirs() -> list[str]:
    """Where the library is kept: ``$LIGHTNING_ADAMTYPE_CACHE`` or ``~/.cache/lightning_adamtype``, then (a home that
    cannot be written, as on some clusters and containers) a folder of this user's in the temporary directory."""
    user = os.getuid() if hasattr(os, "getuid") else os.getpid()
    return [
        os.environ.get("LIGHTNING_ADAMTYPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightning_adamtype"),
        os.path.join(tempfile.gettempdir(), f"lightning_adamtype-{user}"),
    ]


def _compile_into(compiler: str, directory: str, path: str) -> None:
    """Compile the source into ``path`` (in ``directory``) with the first set of optional flags that works."""
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        source = os.path.join(tmp, "adamtype_native.c")
        with open(source, "w") as f:
            f.write(_SOURCE)
        built = os.path.join(tmp, "adamtype_native.so")
        for optional in _OPTIONAL_FLAGS:
            result = subprocess.run(
                [compiler, *_FLAGS, *optional, source, "-o", built, "-lm"], capture_output=True, text=True, timeout=120
            )
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"{os.path.basename(compiler)} failed: {(result.stderr or result.stdout).strip()[:300]}")
        os.replace(built, path)  # atomic: processes building at once each load a whole file


def _build() -> ctypes.CDLL:
    """Compile (once per source, flags, compiler and CPU) and load the shared library; raises OSError/RuntimeError."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    flags = [*_FLAGS, *(flag for optional in _OPTIONAL_FLAGS for flag in optional)]
    key = hashlib.sha256("\0".join([_SOURCE, *flags, compiler, _cpu_key(), platform.machine()]).encode()).hexdigest()[:16]
    errors = []
    for directory in _cache_dirs():
        path = os.path.join(directory, f"adamtype_native_{key}.so")
        try:
            if not os.path.exists(path):
                _compile_into(compiler, directory, path)
            break
        except OSError as error:  # this folder cannot be written: the next one
            errors.append(f"{directory}: {error}")
    else:
        raise OSError("no cache folder could be written (" + "; ".join(errors) + ")")
    library = ctypes.CDLL(path)
    function = library.adamtype_group_terms
    p, i64, f32, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int
    function.argtypes = [i32, i64, p, p, p, p, p, p, i64, p, i64, f32, f32, p, i32, p, f64, f64, p, i32]
    function.restype = i32
    return library


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("LIGHTNING_ADAMTYPE_NATIVE", "1") == "0":
        return None, "disabled by LIGHTNING_ADAMTYPE_NATIVE=0"
    try:
        return _build(), ""
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"{type(error).__name__}: {error}"


def available(device: torch.device) -> bool:
    """The compiled library loads and ``device`` is the CPU (the first call may compile it: about a second)."""
    return device.type == "cpu" and _library()[0] is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    return _library()[1]


def _table(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)


@dataclass
class GroupLaunch(FlatEtaLayout):
    """One group's pieces (built once per list of sizes), address arrays (rewritten at each call) and reused
    outputs; η lives in the group's flat buffer as :class:`~lightning_adamtype.kernels.FlatEtaLayout` places
    it (the layout of :class:`lightning_adamtype.triton_kernels.GroupLaunch` too)."""

    device: torch.device
    out: Tensor = field(init=False)  # float64 [5]: the terms of the latest call
    finite: Tensor = field(init=False)  # uint8: was the latest accumulated step finite
    finite_flag: Tensor = field(init=False)  # the same byte as a bool tensor (made once: a view per step costs)
    _first_piece: Tensor = field(init=False)  # int64 [n + 1]: tensor i has pieces first_piece[i] .. first_piece[i+1]-1
    _eta_offsets: Tensor = field(init=False)
    _sizes: Tensor = field(init=False)
    _tables: tuple[ctypes.Array, ctypes.Array] = field(init=False)  # the addresses of v and g (rewritten per call)
    _threads: int = field(init=False)  # OpenMP threads per call; 0: torch's thread count at each call
    _host_table: Tensor = field(init=False)  # float32 [n, 2]: the (s, e) of the latest :meth:`scalar_table` ...
    _host_table_type: type = field(init=False)  # ... whose memory is written through this ctypes array type (a view
    # made at each call from the tensor's address, never kept: a copy of the launch then writes its own table)

    def __post_init__(self) -> None:
        super().__post_init__()
        first_piece = [0]
        for n in self.sizes:
            first_piece.append(first_piece[-1] + -(-n // PIECE))
        self._first_piece = _table(first_piece)
        self._eta_offsets = _table(self.offsets)
        self._sizes = _table(list(self.sizes))
        self.out = torch.empty(5, dtype=torch.float64)
        self.finite = torch.empty((), dtype=torch.uint8)
        self.finite_flag = self.finite.view(torch.bool)
        self._tables = ((ctypes.c_int64 * len(self.sizes))(), (ctypes.c_int64 * len(self.sizes))())
        self._host_table = torch.empty(len(self.sizes), 2, dtype=torch.float32)
        self._host_table_type = ctypes.c_float * (2 * len(self.sizes))
        self._threads = 1 if sum(self.sizes) < PARALLEL_MIN_NUMEL else 0

    def scalar_table(self, scalars: Sequence[tuple[Scalar, Scalar]]) -> Tensor:
        """The float32 [n, 2] (s, e) table :meth:`terms` takes. Host floats are written into one table kept by the
        launch (no tensor is made: right after an optimizer step a tensor factory costs tens of microseconds), so
        the result is overwritten by the next call; other scalars go through :func:`adapters.scalar_table`."""
        if len(scalars) == len(self.sizes) and all(type(s) is float and type(e) is float for s, e in scalars):
            self._host_table_type.from_address(self._host_table.data_ptr())[:] = [x for pair in scalars for x in pair]
            return self._host_table
        return scalar_table(scalars, torch.float32, self.device)

    def address_tables(self, vs: list[Tensor], gs: list[Tensor]) -> tuple[ctypes.Array, ctypes.Array]:
        """int64 arrays of the addresses of ``vs`` and ``gs``, written in place (two arrays per launch)."""
        v_ptrs, g_ptrs = self._tables
        v_ptrs[:] = addresses(vs)
        g_ptrs[:] = addresses(gs)
        return self._tables

    def terms(
        self,
        vs: list[Tensor],
        gs: list[Tensor],
        eta: Tensor | None,
        table: Tensor,
        mode: int,
        inverse_keep: float = 1.0,
        weight: float = 0.0,
        accumulate: tuple[Tensor, float, float] | None = None,
    ) -> Tensor:
        """The group's five terms (float64 ``[5]``, :attr:`out`, overwritten by the next call) in one call; ``vs``,
        ``gs`` contiguous float32 CPU tensors, ``eta`` the flat float32 η buffer of :attr:`eta_numel` elements (read
        and/or written per ``mode``), ``table`` float32 ``[n, 2]`` (s, e), or ``[n, 4]`` (s, e, s', e') for
        ``RECOMPUTED``. ``accumulate`` = (float64 accumulators ``[8]``, 1/n, k): also adds the step's row, weighted
        by k, to the accumulators and writes whether the step was finite into :attr:`finite`."""
        library, reason = _library()
        if library is None:
            raise RuntimeError(f"the native kernel is not available: {reason}")
        self.check_launch(vs, gs, eta, table, mode)
        v_ptrs, g_ptrs = self.address_tables(vs, gs)
        if accumulate is not None:
            accumulators, inverse_total, observe_weight = accumulate
            if accumulators.dtype != torch.float64 or not accumulators.is_contiguous() or accumulators.device.type != "cpu":
                raise ValueError("the native kernel accumulates into contiguous float64 CPU accumulators")
            acc_ptr = accumulators.data_ptr()
        else:
            acc_ptr, inverse_total, observe_weight = None, 1.0, 1.0
        library.adamtype_group_terms(
            mode, len(self.sizes), ctypes.addressof(v_ptrs), ctypes.addressof(g_ptrs), eta.data_ptr() if eta is not None else None,
            self._eta_offsets.data_ptr(), self._sizes.data_ptr(), self._first_piece.data_ptr(), PIECE,
            table.data_ptr(), table.shape[1], float(inverse_keep), float(weight), self.out.data_ptr(),
            accumulate is not None, acc_ptr, float(inverse_total), float(observe_weight), self.finite.data_ptr(),
            self._threads or max(1, torch.get_num_threads()),
        )
        return self.out
