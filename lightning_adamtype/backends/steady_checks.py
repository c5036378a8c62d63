"""The steady plan's per-step checks and reads in one compiled call (a CPython extension built against torch).

:class:`lightning_adamtype.backends.steady.SteadyPlan` re-checks at every step that what its launch reads still
holds and re-reads the gradients' addresses and the step counts. In Python each of those passes costs 20–90 ns per
tensor (``p.grad``, ``.nbytes``, ``data_ptr()`` are each a call into torch). :func:`gather` does them all in one
C++ call over the lists, reading the tensors through torch's own headers (the whole post-step hook then grows by
0.07 µs per tensor, against 0.68 µs with the Python checks: ``benchmarks/host_time.py``):

- ``params`` (the group's list) holds the same objects as ``cached_params``, each a plain ``Tensor`` or ``Parameter``;
- the parameters that ``mask`` marks have a gradient, the others none; each gradient is a plain, dense, contiguous
  CPU tensor of the plan's dtype (float32, or float64 when ``double``; no negation or conjugation bit) with as many
  elements as its v; its address goes to ``g_out``;
- ``opt_state`` holds, in order, the same state dicts as ``cached_values``;
- each state's ``v_key`` entry is the same tensor as in ``cached_vs``, still a contiguous CPU tensor of the plan's
  dtype at the address in ``v_ptrs`` with the count in ``numels``;
- each state's ``"step"`` is a host number or a plain CPU tensor of one float32/float64 element; its value goes to
  ``steps_out``.

It returns 0 when something no longer holds (nothing is to be computed), 1 when everything holds and the step
counts are all equal, 2 when everything holds and they differ. It never raises for what it checks (a C++ error
while reading a tensor answers 0); it raises TypeError only for arguments of the wrong kind (a caller's bug).

The extension is built by :mod:`.trusted_build`'s rules (owned, private, version-checked, the compiler bounded),
with the system's C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``; C++20, which torch 2.14's headers need,
else C++17) against the running torch's headers and libraries; its key includes torch's version and build and Python's, and the module must report the same
:data:`ABI_VERSION` and ``torch.__version__`` before it is used. The build (18–19 s on 2 cores) runs in a
background thread started by the first plan: until it has loaded, plans check in Python (:func:`compiled` gives
None), so no training step waits for it. ``LIGHTNING_ADAMTYPE_STEADY_CHECKS=python`` keeps the Python checks.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from types import ModuleType

import torch

from . import trusted_build
from .trusted_build import BuildInfo

__all__ = ["ABI_VERSION", "RECIPE", "build_info", "compiled", "wait"]

#: the version of the extension's interface (gather, fill_pairs); a module that reports another is not used
#: (2: float64 tensors too, named by a last argument)
ABI_VERSION = 2
#: seconds one compiler run may take (C++ against torch's headers: 18–19 s on an idle 2-core machine)
COMPILE_TIMEOUT_S = 180
_MODULE = "adamtype_steady_checks"

_SOURCE = r"""
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

PyObject* step_key = nullptr;  /* "step", interned at import */

bool dense_cpu(const at::Tensor& t, int64_t numel, at::ScalarType dtype) {
    return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && t.scalar_type() == dtype &&
           !t.is_neg() && !t.is_conj() && t.numel() == numel && t.is_contiguous();
}

bool same_items(PyObject* a, PyObject* b) {
    Py_ssize_t n = PyList_GET_SIZE(a);
    if (PyList_GET_SIZE(b) != n) return false;
    for (Py_ssize_t i = 0; i < n; ++i)
        if (PyList_GET_ITEM(a, i) != PyList_GET_ITEM(b, i)) return false;
    return true;
}

bool read_step(PyObject* step, double* out) {
    if (PyFloat_CheckExact(step)) { *out = PyFloat_AS_DOUBLE(step); return true; }
    if (PyLong_CheckExact(step)) { *out = PyLong_AsDouble(step); if (PyErr_Occurred()) { PyErr_Clear(); return false; } return true; }
    if (!THPVariable_CheckExact(step)) return false;
    const at::Tensor& t = THPVariable_Unpack(step);
    if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || t.numel() != 1 || t.is_neg()) return false;
    if (t.scalar_type() == at::kFloat) { *out = static_cast<double>(*static_cast<const float*>(t.const_data_ptr())); return true; }
    if (t.scalar_type() == at::kDouble) { *out = *static_cast<const double*>(t.const_data_ptr()); return true; }
    return false;
}

/* gather(params, cached_params, mask, opt_state, cached_values, states, v_key, cached_vs, v_ptrs, numels, g_out,
   steps_out, double) -> 0 | 1 | 2 (see the Python module's docstring) */
int gather_checked(PyObject* const* a) {
    PyObject *params = a[0], *cached_params = a[1], *mask = a[2], *opt_state = a[3], *cached_values = a[4];
    PyObject *states = a[5], *v_key = a[6], *cached_vs = a[7];
    const int64_t* v_ptrs = static_cast<const int64_t*>(PyLong_AsVoidPtr(a[8]));
    const int64_t* numels = static_cast<const int64_t*>(PyLong_AsVoidPtr(a[9]));
    int64_t* g_out = static_cast<int64_t*>(PyLong_AsVoidPtr(a[10]));
    double* steps_out = static_cast<double*>(PyLong_AsVoidPtr(a[11]));
    at::ScalarType dtype = PyObject_IsTrue(a[12]) ? at::kDouble : at::kFloat;
    if (PyErr_Occurred()) return -1;
    if (!PyList_Check(params) || !same_items(params, cached_params)) return 0;
    Py_ssize_t n = PyList_GET_SIZE(states);
    if (PyList_GET_SIZE(cached_vs) != n) return 0;
    const char* marks = nullptr;
    if (mask != Py_None) {
        if (PyBytes_GET_SIZE(mask) != PyList_GET_SIZE(params)) return 0;
        marks = PyBytes_AS_STRING(mask);
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
        PyObject* p = PyList_GET_ITEM(params, i);
        if (!THPVariable_CheckExact(p)) return 0;
        const at::Tensor& g = THPVariable_Unpack(p).grad();
        if (marks != nullptr && !marks[i]) {
            if (g.defined()) return 0;
            continue;
        }
        if (k >= n || !dense_cpu(g, numels[k], dtype)) return 0;
        g_out[k++] = reinterpret_cast<int64_t>(g.const_data_ptr());
    }
    if (k != n) return 0;
    if (!PyDict_Check(opt_state) || PyDict_GET_SIZE(opt_state) != PyList_GET_SIZE(cached_values)) return 0;
    Py_ssize_t position = 0, j = 0;
    PyObject *key, *value;
    while (PyDict_Next(opt_state, &position, &key, &value))
        if (value != PyList_GET_ITEM(cached_values, j++)) return 0;
    bool uniform = true;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* state = PyList_GET_ITEM(states, i);
        if (!PyDict_CheckExact(state)) return 0;
        PyObject* v = PyDict_GetItemWithError(state, v_key);
        if (v == nullptr || v != PyList_GET_ITEM(cached_vs, i) || !THPVariable_CheckExact(v)) { PyErr_Clear(); return 0; }
        const at::Tensor& vt = THPVariable_Unpack(v);
        if (!dense_cpu(vt, numels[i], dtype) || reinterpret_cast<int64_t>(vt.const_data_ptr()) != v_ptrs[i]) return 0;
        PyObject* step = PyDict_GetItemWithError(state, step_key);
        if (step == nullptr) PyErr_Clear();
        if (step == nullptr || !read_step(step, &steps_out[i])) return 0;
        uniform = uniform && steps_out[i] == steps_out[0];
    }
    return uniform ? 1 : 2;
}

PyObject* gather(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 13 || !PyList_Check(args[1]) || !PyList_Check(args[4]) || !PyList_Check(args[5]) ||
        !PyList_Check(args[7]) || !PyUnicode_Check(args[6]) || (args[2] != Py_None && !PyBytes_Check(args[2]))) {
        PyErr_SetString(PyExc_TypeError, "gather(params, cached_params: list, mask: bytes | None, opt_state, "
                        "cached_values: list, states: list, v_key: str, cached_vs: list, v_ptrs, numels, g_out, steps_out, double)");
        return nullptr;
    }
    int answer;
    try {
        answer = gather_checked(args);
    } catch (const std::exception&) {
        answer = 0;  /* a tensor torch could not read here: the general path takes the step */
    }
    if (answer < 0) return nullptr;
    return PyLong_FromLong(answer);
}

template <typename Real>
void fill(void* address, Py_ssize_t n, double s, double e) {
    Real* table = static_cast<Real*>(address);
    for (Py_ssize_t i = 0; i < n; ++i) { table[2 * i] = static_cast<Real>(s); table[2 * i + 1] = static_cast<Real>(e); }
}

/* fill_pairs(address, n, s, e, double): n rows (s, e) at address, of float64 when double, else of float32 */
PyObject* fill_pairs(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 5) { PyErr_SetString(PyExc_TypeError, "fill_pairs(address, n, s, e, double)"); return nullptr; }
    void* address = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    double s = PyFloat_AsDouble(args[2]), e = PyFloat_AsDouble(args[3]);
    int real64 = PyObject_IsTrue(args[4]);
    if (PyErr_Occurred()) return nullptr;
    if (real64) fill<double>(address, n, s, e); else fill<float>(address, n, s, e);
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"gather", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(gather)), METH_FASTCALL, "the plan's checks and reads"},
    {"fill_pairs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fill_pairs)), METH_FASTCALL, "fill an (s, e) table"},
    {nullptr, nullptr, 0, nullptr},
};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "MODULE_NAME", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_MODULE_NAME(void) {
    step_key = PyUnicode_InternFromString("step");
    if (step_key == nullptr) return nullptr;
    PyObject* m = PyModule_Create(&module);
    if (m == nullptr) return nullptr;
    if (PyModule_AddIntConstant(m, "ABI_VERSION", ABI) < 0 || PyModule_AddStringConstant(m, "TORCH_VERSION", TORCH_VERSION) < 0) {
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
"""


def _torch_dirs() -> tuple[str, str]:
    """torch's include and library folders."""
    root = os.path.dirname(os.path.realpath(torch.__file__))
    return os.path.join(root, "include"), os.path.join(root, "lib")


def _source() -> str:
    """The C++ source, with the module's name, the interface version and the torch version it is built for."""
    version = torch.__version__.replace("\\", "").replace('"', "")
    defines = f'#define ABI {ABI_VERSION}\n#define TORCH_VERSION "{version}"\n'
    return defines + _SOURCE.replace("MODULE_NAME", _MODULE)


def _flags() -> tuple[str, ...]:
    include, _ = _torch_dirs()
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return ("-O2", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}",
            f"-I{sysconfig.get_paths()['include']}")


def _libraries() -> tuple[str, ...]:
    _, lib = _torch_dirs()
    return (f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{lib}")


def _key() -> tuple[str, ...]:
    return (torch.__version__, str(getattr(torch.version, "git_version", "")), sys.version, os.path.realpath(torch.__file__),
            str(sysconfig.get_config_var("EXT_SUFFIX")))


def _load(path: str) -> tuple[ModuleType | None, str]:
    """Import the extension at ``path`` (not entered in ``sys.modules``) and check its versions."""
    try:
        loader = importlib.machinery.ExtensionFileLoader(_MODULE, path)
        spec = importlib.util.spec_from_file_location(_MODULE, path, loader=loader)
        if spec is None:
            return None, "cannot be imported (no module spec)"
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError) as error:
        return None, f"cannot be imported ({trusted_build.one_line(str(error))})"
    found = getattr(module, "ABI_VERSION", None), getattr(module, "TORCH_VERSION", None)
    if found != (ABI_VERSION, torch.__version__):
        return None, f"reports interface {found[0]} for torch {found[1]}, not {ABI_VERSION} for torch {torch.__version__}"
    if not (callable(getattr(module, "gather", None)) and callable(getattr(module, "fill_pairs", None))):
        return None, "is not this package's extension (gather or fill_pairs missing)"
    return module, ""


def _disabled() -> str:
    if os.environ.get("LIGHTNING_ADAMTYPE_STEADY_CHECKS", "compiled") == "python":
        return "LIGHTNING_ADAMTYPE_STEADY_CHECKS=python (unset it to use the compiled checks)"
    if os.environ.get("LIGHTNING_ADAMTYPE_NATIVE", "1") == "0":
        return "disabled by LIGHTNING_ADAMTYPE_NATIVE=0"
    return ""


RECIPE = trusted_build.Recipe(
    prefix="adamtype_steady_checks", source=_source(), source_name="adamtype_steady_checks.cpp",
    compilers=lambda: (os.environ.get("CXX"), "c++", "g++", "clang++"), language="C++",
    flags=_flags(), optional_flags=(("-std=c++20",), ("-std=c++17",)), libraries=_libraries(), key=_key, load=_load, disabled=_disabled,
    skip_hint="set CXX to another compiler, or LIGHTNING_ADAMTYPE_STEADY_CHECKS=python to skip it",
    timeout_s=COMPILE_TIMEOUT_S,
)
_attempt = trusted_build.Attempt(RECIPE)


def compiled() -> ModuleType | None:
    """The extension when it has loaded, else None (starting its build in the background if none was started;
    never waits, never raises). None also while ``LIGHTNING_ADAMTYPE_STEADY_CHECKS=python``."""
    if os.environ.get("LIGHTNING_ADAMTYPE_STEADY_CHECKS", "compiled") == "python":
        return None
    module = _attempt.ready()
    if module is None:
        _attempt.start()
    return module


def wait(timeout: float | None = None) -> ModuleType | None:
    """Wait up to ``timeout`` seconds for the extension (building it if needed); it, or None (not built yet, or
    unavailable: :func:`build_info` says why)."""
    done = _attempt.wait(timeout)
    return None if done is None else done[0]


def build_info() -> BuildInfo:
    """How this process's attempt went (waits for it; never raises)."""
    return _attempt.result()[1]


def reset() -> None:
    """Forget this process's attempt (for tests); a module already loaded stays loaded."""
    _attempt.reset()
