"""Build and load the native CPU kernel's shared library safely: compile once per machine, trust only our own files.

The C source (:data:`SOURCE`: the kernel, its float32 sums taken over blocks of 64 or 256 coordinates, plus ``int
adamtype_abi_version(void)``) is compiled at run time with the system's C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``) and loaded with :mod:`ctypes`, by the rules of :mod:`.trusted_build` (a cached or compiled artefact
is used only when the current user owns it and nobody else can write it; the compiler bounded by
:data:`COMPILE_TIMEOUT_S` seconds and a failure remembered). The library is ``adamtype_native_<key>.so`` in the
cache root, the key a hash of the source, the flags, the compiler's path and the CPU's feature flags. After
:class:`ctypes.CDLL` loads a file, ``adamtype_abi_version()`` must exist and return :data:`ABI_VERSION` before
anything else is called. ``LIGHTNING_ADAMTYPE_NATIVE=0`` disables the library.
"""

from __future__ import annotations

import ctypes
import os
import platform

from . import trusted_build
from .trusted_build import BuildInfo

__all__ = [
    "ABI_VERSION",
    "COMPILE_TIMEOUT_S",
    "SOURCE",
    "BuildInfo",
    "NativeUnavailable",
    "availability",
    "build_info",
    "library",
    "reset",
]

#: the version of the library's C interface; a loaded library whose ``adamtype_abi_version()`` differs is not used
#: (3: the nine-term row over active coordinates, signed η, per-parameter shares, per-piece partial rows; 4: the
#: shares also accumulated into a caller's [n, 4] table with the step; 5: ``adamtype_group_terms_f64`` for float64)
ABI_VERSION = 5
#: seconds one compiler run may take (``$LIGHTNING_ADAMTYPE_COMPILE_TIMEOUT`` overrides it)
COMPILE_TIMEOUT_S = 30

_COMMON_SOURCE = r"""
#include <math.h>
#include <stdint.h>

enum { FIRST = 0, STORED = 1, CURRENT = 2, RECOMPUTED = 3 };
/* a row of terms (lightning_adamtype.row.TERM_KEYS): min η, Σ(ηg)², Σ|Δη|, Σ(Δη)², Ση, counted, pairs, activations,
   inactive; a parameter's share: Σ(ηg)², Σ|Δη|, activations, inactive; the accumulators: ROW sums, then 2 levels */
enum { TERMS = 9, SHARES = 4, SUMS = 9 };

/* Coordinates summed in float32 before they are folded into float64. Many values of one magnitude (Adam's first
   steps give |ηg| ≈ lr everywhere) added one after another in float32 drift: summed over whole pieces of 16384,
   Σ(ηg)² was 6e-5 relative off at 40M coordinates where the loop is not vectorised (no OpenMP) and 9e-7 where it is.
   With at most 64 additions per float32 accumulator (a block of 64, or of 256 over ≥ 4 SIMD lanes) it stays below
   2e-7 (1.3e-7 measured on that case, either way). The counts are sums of 0/1 in float32: exact below 2^24. */
#ifdef _OPENMP
enum { BLOCK = 256 };
#else
enum { BLOCK = 64 };
#endif

/* A coordinate is inactive at t when v == 0 (it never had a non-zero gradient); everything else is active (a NaN
   too, so that it reaches the sums and makes the step non-finite). Inactive at t − 1: a stored η_{t−1} with its sign
   bit set (−η, −0 included), or a rebuilt v_{t−1} ≤ zero · v_t (then taken as 0, the v it had). Counted: active at t (every coordinate when `all`); pairs:
   counted and active at t − 1 (every coordinate when `all`, with |η_{t−1}|). */
#define COUNT_TERMS(et, step, act)                                                                                    \
    {                                                                                                                 \
        int counted_ = all | (act);                                                                                   \
        REAL low_ = counted_ ? (et) : INFINITY;                                                                       \
        lo = lo < low_ ? lo : low_;                                                                                   \
        b += counted_ ? (step) * (step) : 0.0f;                                                                       \
        total += counted_ ? (et) : 0.0f;                                                                              \
        counted += counted_ ? 1.0f : 0.0f;                                                                            \
        idle += (act) ? 0.0f : 1.0f;                                                                                  \
    }
#define PAIR_TERMS(diff, act, was)                                                                                    \
    {                                                                                                                 \
        int pair_ = all | ((act) & (was));                                                                            \
        c += pair_ ? REAL_ABS(diff) : 0.0f;                                                                           \
        c2 += pair_ ? (diff) * (diff) : 0.0f;                                                                         \
        pairs += pair_ ? 1.0f : 0.0f;                                                                                 \
        started += ((act) & !(was)) ? 1.0f : 0.0f;                                                                    \
    }

"""

#: the typed part: block_terms, piece_terms and adamtype_group_terms for float32 tensors (REAL = float); 
#: :func:`_float64_kernel` derives the float64 ones from it
_FLOAT32_KERNEL = r"""
#define REAL float
#define REAL_ABS(x) fabsf(x)
/* One block [0, len) (len <= BLOCK) of one tensor: its sums (in float32) folded into row[TERMS] (in float64). */
static void block_terms(int mode, int all, const float *restrict v, const float *restrict g, float *restrict eta,
                        int64_t len, float s, float e, float s_prev, float e_prev, float inverse_keep, float weight,
                        float zero, double *row) {
    float lo = INFINITY, b = 0.0f, c = 0.0f, c2 = 0.0f, total = 0.0f;
    float counted = 0.0f, pairs = 0.0f, started = 0.0f, idle = 0.0f;
    if (mode == FIRST) {
        #pragma omp simd reduction(min:lo) reduction(+:b, total, counted, idle)
        for (int64_t j = 0; j < len; j++) {
            float x = v[j];
            float et = s / (sqrtf(x) + e);
            float step = et * g[j];
            int act = x != 0.0f;
            COUNT_TERMS(et, step, act)
            eta[j] = act ? et : -et;
        }
    } else if (mode == STORED) {
        #pragma omp simd reduction(min:lo) reduction(+:b, c, c2, total, counted, pairs, started, idle)
        for (int64_t j = 0; j < len; j++) {
            float x = v[j], old = eta[j];
            float et = s / (sqrtf(x) + e);
            float step = et * g[j];
            float diff = et - fabsf(old);
            int act = x != 0.0f, was = copysignf(1.0f, old) > 0.0f;
            COUNT_TERMS(et, step, act)
            PAIR_TERMS(diff, act, was)
            eta[j] = act ? et : -et;
        }
    } else if (mode == CURRENT) {
        #pragma omp simd reduction(min:lo) reduction(+:b, total, counted, idle)
        for (int64_t j = 0; j < len; j++) {
            float x = v[j];
            float et = s / (sqrtf(x) + e);
            float step = et * g[j];
            int act = x != 0.0f;
            COUNT_TERMS(et, step, act)
        }
    } else { /* RECOMPUTED: v_{t-1} = (v_t - w g_t^2) / k, 0 unless > zero * v_t; one division for both η */
        #pragma omp simd reduction(min:lo) reduction(+:b, c, c2, total, counted, pairs, started, idle)
        for (int64_t j = 0; j < len; j++) {
            float x = v[j], gj = g[j];
            float a = sqrtf(x) + e;
            float previous = (x - weight * (gj * gj)) * inverse_keep;
            int act = x != 0.0f, was = previous > zero * x;
            previous = was ? previous : 0.0f; /* inactive at t - 1: v_{t-1} was 0 (the rest is v_t's roundings) */
            float a_prev = sqrtf(previous) + e_prev;
            float r = 1.0f / (a * a_prev);
            float et = s * a_prev * r;
            float diff = (s * a_prev - s_prev * a) * r;
            float step = et * gj;
            COUNT_TERMS(et, step, act)
            PAIR_TERMS(diff, act, was)
        }
    }
    row[0] = lo < row[0] ? lo : row[0];
    row[1] += b; row[2] += c; row[3] += c2; row[4] += total;
    row[5] += counted; row[6] += pairs; row[7] += started; row[8] += idle;
}

/* One piece [start, start + len) of one tensor, BLOCK coordinates at a time, into its own row (set here). */
static void piece_terms(int mode, int all, const float *restrict v, const float *restrict g, float *restrict eta,
                        int64_t len, float s, float e, float s_prev, float e_prev, float inverse_keep, float weight,
                        float zero, double *row) {
    row[0] = INFINITY;
    for (int k = 1; k < TERMS; k++) row[k] = 0.0;
    for (int64_t k = 0; k < len; k += BLOCK) {
        int64_t m = len - k < BLOCK ? len - k : BLOCK;
        block_terms(mode, all, v + k, g + k, eta ? eta + k : eta, m, s, e, s_prev, e_prev, inverse_keep, weight,
                    zero, row);
    }
}

/* One call per group and step. Tensor i (of n) has pieces first_piece[i] .. first_piece[i + 1] - 1 of `piece`
   coordinates, shared among `threads` OpenMP threads (a static schedule); piece p writes its row of TERMS into
   partials[p * TERMS ..]. The rows are then folded in float64, in piece order: the group's terms into out[TERMS]
   and tensor i's share (Σ(ηg)², Σ|Δη|, activations, inactive) into per_tensor[i * SHARES ..].
   With accumulate, also lightning_adamtype.row.add_step: with N = counted, P = pairs, a finite row
   [1, N > 0 ? min η : 0, Σ(ηg)², Σ|Δη|, Σ(Δη)², N > 0 ? Ση / N : 0, P > 0 ? Σ|Δη| / P : 0, 0, activations] adds
   observe_weight times itself to acc[0 .. SUMS - 1] and sets the levels acc[SUMS] = inactive, acc[SUMS + 1] = the
   coordinates (Σ sizes); a non-finite one adds 1 to acc[7] only; *finite says which. A finite accumulated step
   with `shares` (not NULL) also adds observe_weight times tensor i's Σ(ηg)², Σ|Δη|, activations to
   shares[i * SHARES ..] and sets its inactive count there (lightning_adamtype.tensor_shares). Returns 0. */
int adamtype_group_terms(int mode, int all, int64_t n, const int64_t *v_ptrs, const int64_t *g_ptrs, float *eta,
                         const int64_t *eta_offsets, const int64_t *sizes, const int64_t *first_piece, int64_t piece,
                         const float *table, int64_t table_stride, float inverse_keep, float weight, float zero,
                         double *partials, double *out, double *per_tensor, int accumulate, double *acc,
                         double observe_weight, uint8_t *finite, double *shares, int threads) {
    int64_t pieces = first_piece[n];
    all = all != 0;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t i = 0;
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < pieces; p++) {
            while (first_piece[i + 1] <= p) i++;  /* a thread's pieces are one increasing run (static schedule) */
            int64_t start = (p - first_piece[i]) * piece;
            int64_t len = sizes[i] - start < piece ? sizes[i] - start : piece;
            const float *tab = table + i * table_stride;
            float s_prev = mode == RECOMPUTED ? tab[2] : 0.0f, e_prev = mode == RECOMPUTED ? tab[3] : 0.0f;
            float *eta_i = (mode == FIRST || mode == STORED) ? eta + eta_offsets[i] + start : 0;
            piece_terms(mode, all, (const float *)(intptr_t)v_ptrs[i] + start,
                        (const float *)(intptr_t)g_ptrs[i] + start, eta_i, len, tab[0], tab[1], s_prev, e_prev,
                        inverse_keep, weight, zero, partials + p * TERMS);
        }
    }
    double terms[TERMS] = {INFINITY, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    double numel = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double share[SHARES] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t p = first_piece[i]; p < first_piece[i + 1]; p++) {
            const double *row = partials + p * TERMS;
            terms[0] = row[0] < terms[0] ? row[0] : terms[0];
            for (int k = 1; k < TERMS; k++) terms[k] += row[k];
            share[0] += row[1]; share[1] += row[2]; share[2] += row[7]; share[3] += row[8];
        }
        for (int k = 0; k < SHARES; k++) per_tensor[i * SHARES + k] = share[k];
        numel += (double)sizes[i];
    }
    for (int k = 0; k < TERMS; k++) out[k] = terms[k];
    if (accumulate) {
        double counted = terms[5], pairs = terms[6];
        double row[SUMS] = {
            1.0, counted > 0 ? terms[0] : 0.0, terms[1], terms[2], terms[3], counted > 0 ? terms[4] / counted : 0.0,
            pairs > 0 ? terms[2] / pairs : 0.0, 0.0, terms[7],
        };
        int ok = 1;
        for (int k = 0; k < SUMS; k++) ok = ok && isfinite(row[k]);
        if (ok) {
            for (int k = 0; k < SUMS; k++) acc[k] += row[k] * observe_weight;
            acc[SUMS] = terms[8];
            acc[SUMS + 1] = numel;
            if (shares) {
                for (int64_t i = 0; i < n; i++) {
                    for (int k = 0; k < SHARES - 1; k++) shares[i * SHARES + k] += per_tensor[i * SHARES + k] * observe_weight;
                    shares[i * SHARES + SHARES - 1] = per_tensor[i * SHARES + SHARES - 1];
                }
            }
        } else {
            acc[7] += 1.0;
        }
        *finite = (uint8_t)ok;
    }
    return 0;
}
#undef REAL
#undef REAL_ABS
"""

_ABI_SOURCE = """
/* The version of this interface: the loader checks it before the first call of adamtype_group_terms. */
int adamtype_abi_version(void) { return %d; }
"""

#: the C source compiled: the kernel and the ABI version
def _float64_kernel(source: str) -> str:
    """The float64 kernel: :data:`_FLOAT32_KERNEL` with double for float (tensors, η, the table, the scalars and the
    block sums), the double math functions, and ``_f64`` after each function's name."""
    for old, new in (("float ", "double "), ("float *", "double *"), ("sqrtf(", "sqrt("), ("fabsf(", "fabs("),
                     ("copysignf(", "copysign("), ("0.0f", "0.0"), ("1.0f", "1.0"), ("#define REAL float", "#define REAL double"),
                     ("block_terms(", "block_terms_f64("), ("piece_terms(", "piece_terms_f64("),
                     ("adamtype_group_terms(", "adamtype_group_terms_f64(")):
        source = source.replace(old, new)
    return source


SOURCE = _COMMON_SOURCE + _FLOAT32_KERNEL + _float64_kernel(_FLOAT32_KERNEL) + _ABI_SOURCE % ABI_VERSION

_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off")
#: the optional flags, tried in this order until one set compiles (a timeout ends the search): a compiler without
#: OpenMP builds the single-threaded loop, one without ``-march=native`` the generic vector code
_OPTIONAL_FLAGS: tuple[tuple[str, ...], ...] = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())

#: the library cannot be used (the message: one line saying why and what to do)
NativeUnavailable = trusted_build.Unavailable


def _cpu_key() -> tuple[str, ...]:
    """What ``-march=native`` depends on: the CPU's feature flags (one build per kind of CPU sharing a cache)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line, platform.machine()
    except OSError:
        pass
    return platform.processor() or platform.machine(), platform.machine()


def _load(path: str) -> tuple[ctypes.CDLL | None, str]:
    """Load ``path`` and check its ABI version before anything else; (library, '') or (None, what is wrong)."""
    try:
        library = ctypes.CDLL(path)
    except OSError as error:
        return None, f"cannot be loaded ({trusted_build.one_line(str(error))})"
    try:
        version = library.adamtype_abi_version
        function = library.adamtype_group_terms
    except AttributeError:
        return None, "is not this package's library (adamtype_abi_version or adamtype_group_terms missing)"
    version.argtypes, version.restype = [], ctypes.c_int
    found = version()
    if found != ABI_VERSION:
        return None, f"has ABI version {found}, not {ABI_VERSION}"
    p, i64, f32, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int
    function64 = getattr(library, "adamtype_group_terms_f64", None)
    if function64 is None:
        return None, "is not this package's library (adamtype_group_terms_f64 missing)"
    for f, real in ((function, f32), (function64, f64)):
        f.argtypes = [i32, i32, i64, p, p, p, p, p, p, i64, p, i64, real, real, real, p, p, p, i32, p, f64, p, p, i32]
        f.restype = i32
    return library, ""


def _disabled() -> str:
    if os.environ.get("LIGHTNING_ADAMTYPE_NATIVE", "1") == "0":
        return "disabled by LIGHTNING_ADAMTYPE_NATIVE=0 (unset it to use the native kernel)"
    return ""


RECIPE = trusted_build.Recipe(
    prefix="adamtype_native", source=SOURCE, source_name="adamtype_native.c",
    compilers=lambda: (os.environ.get("CC"), "cc", "gcc", "clang"), language="C",
    flags=_FLAGS, optional_flags=_OPTIONAL_FLAGS, libraries=("-lm",), key=_cpu_key, load=_load,
    disabled=_disabled, skip_hint="set CC to another compiler, or LIGHTNING_ADAMTYPE_NATIVE=0 to skip it",
    timeout_s=COMPILE_TIMEOUT_S,
)
_attempt = trusted_build.Attempt(RECIPE)


def library() -> ctypes.CDLL:
    """The loaded library, ``adamtype_group_terms``'s argtypes and restype set (compiled or loaded from the cache at
    the first call of the process; later calls return the same object). Raises :class:`NativeUnavailable`."""
    loaded, info = _attempt.result()
    if loaded is None:
        raise NativeUnavailable(info.reason)
    return loaded


def availability() -> tuple[ctypes.CDLL | None, str]:
    """(library, '') when the library can be used, else (None, the one-line reason); never raises."""
    loaded, info = _attempt.result()
    return loaded, info.reason


def build_info() -> BuildInfo:
    """How this process's attempt went: the path loaded, whether from the cache, why the cache was not used, why
    the library is unavailable (makes the attempt if none was made; never raises)."""
    return _attempt.result()[1]


def reset() -> None:
    """Forget this process's attempt, so the next call looks again (for tests, or after changing the environment
    variables). A library already loaded stays loaded."""
    _attempt.reset()
