"""The steady plan's compiled checks (:mod:`lightning_adamtype.backends.steady_checks`): built against the running
torch, version-checked, and never used when what lies at their cache path is not ours or not theirs.

What the checks decide is tested in ``test_steady.py`` (each change between steps, compiled and in Python, against
the reference backend). Here: the module's reported versions, and two impostors planted at the cache path (a plain
C extension with the module's name). The impostor cases set ``CXX`` to a compiler that fails at once, so that the
rebuild they cause costs no C++ build: what is checked is that the impostor is refused or not used.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sysconfig

import pytest
import torch

from lightning_adamtype.backends import steady_checks, trusted_build

GCC = shutil.which("gcc")

#: a C extension that takes the module's name: it notes when it is imported and when its gather is called
_IMPOSTOR = r"""
#include <Python.h>
#include <stdio.h>
#include <stdlib.h>
static void mark(const char *what) {
    const char *path = getenv("ADAMTYPE_TEST_IMPOSTOR_MARKER");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) { fputs(what, f); fclose(f); }
}
static PyObject *gather(PyObject *self, PyObject *args) { mark("called\n"); return PyLong_FromLong(1); }
static PyMethodDef methods[] = {{"gather", gather, METH_VARARGS, ""}, {"fill_pairs", gather, METH_VARARGS, ""},
                                {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "adamtype_steady_checks", NULL, -1, methods};
PyMODINIT_FUNC PyInit_adamtype_steady_checks(void) {
    mark("loaded\n");
    PyObject *m = PyModule_Create(&module);
    PyModule_AddIntConstant(m, "ABI_VERSION", ABI);
    PyModule_AddStringConstant(m, "TORCH_VERSION", "0.0-impostor");
    return m;
}
"""


def test_the_compiled_checks_build_and_report_their_interface_and_torch_version():
    """Where a C++ compiler and Python's headers exist the extension builds against the installed torch (its
    headers' C++ standard changes between versions: .ci/run also runs this file with torch's CUDA build)."""
    module = steady_checks.wait(600)
    reason = steady_checks.build_info().reason
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    if module is None and (trusted_build.artefact_path(steady_checks.RECIPE) is None or not headers or "disabled" in reason
                           or "STEADY_CHECKS=python" in reason):
        pytest.skip(f"the compiled checks cannot be built here: {reason or 'no Python headers'}")
    assert module is not None, reason
    assert (module.ABI_VERSION, module.TORCH_VERSION) == (steady_checks.ABI_VERSION, torch.__version__)
    with pytest.raises(TypeError, match="gather"):
        module.gather([], [])


@pytest.fixture
def planted(monkeypatch, tmp_path):
    """A fresh cache root holding an impostor at the extension's path; the attempt reset before and after."""
    if GCC is None:
        pytest.skip("needs gcc")
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LIGHTNING_ADAMTYPE_STEADY_CHECKS", raising=False)
    monkeypatch.setenv("ADAMTYPE_TEST_IMPOSTOR_MARKER", str(tmp_path / "marker"))
    monkeypatch.setenv("CXX", shutil.which("false") or "false")  # a rebuild fails at once (its path is in the key)
    path = trusted_build.artefact_path(steady_checks.RECIPE)
    if path is None:
        pytest.skip("no C++ compiler")
    os.makedirs(os.path.dirname(path), mode=0o700)
    source = tmp_path / "impostor.c"
    source.write_text(_IMPOSTOR)
    subprocess.run([GCC, "-shared", "-fPIC", f"-DABI={steady_checks.ABI_VERSION}",
                    f"-I{sysconfig.get_paths()['include']}", str(source), "-o", path], check=True)
    os.chmod(path, 0o700)
    steady_checks.reset()
    yield path, tmp_path / "marker"
    steady_checks.reset()


def _marks(marker) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def test_an_impostor_others_can_write_is_never_loaded(planted):
    path, marker = planted
    os.chmod(path, 0o722)
    assert steady_checks.wait(60) is None
    assert _marks(marker) == []  # never imported: its initialisation never ran
    assert "failed" in steady_checks.build_info().reason
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o722  # left in place for someone to look at


def test_an_owned_extension_of_another_torch_is_loaded_but_never_called_and_removed(planted):
    path, marker = planted
    assert steady_checks.wait(60) is None
    assert _marks(marker) == ["loaded"]  # imported to read its versions, then refused: gather never called
    assert not os.path.lexists(path)  # removed: the next process builds it again
    assert "failed" in steady_checks.build_info().reason


def test_where_no_build_thread_can_start_the_plan_checks_in_python(monkeypatch):
    """``threading.Thread.start`` raising (a process at its thread limit): the extension is unavailable, with that
    reason, nothing leaves ``optimizer.step()``, no warning, and the group is measured on the native backend (its plan
    with the Python checks)."""
    import threading
    import warnings

    from lightning_adamtype import ConditionTracker
    from lightning_adamtype.backends import backend

    if backend("native").unavailable(torch.device("cpu")) is not None:
        pytest.skip(backend("native").unavailable(torch.device("cpu")))

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.delenv("LIGHTNING_ADAMTYPE_STEADY_CHECKS", raising=False)
    monkeypatch.setattr(threading.Thread, "start", refuse)
    steady_checks.reset()
    try:
        p = torch.nn.Parameter(torch.randn(40))
        opt = torch.optim.Adam([p], lr=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = ConditionTracker(opt)
            for _ in range(4):
                p.grad = torch.randn_like(p)
                opt.step()
        assert steady_checks.compiled() is None
        assert "no build thread can be started (can't start new thread)" in steady_checks.build_info().reason
        assert not [w for w in caught if "lightning_adamtype" in str(w.message)]
        assert tracker.backends() == {"Adam/pg0": "native"} and tracker.compute()["Adam/pg0"]["steps"] == 4
    finally:
        monkeypatch.undo()
        steady_checks.reset()
