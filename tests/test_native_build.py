"""The native library's loader (:mod:`lightning_adamtype.backends.native_build`): what it trusts, what it rebuilds,
how a failing or hanging compiler is bounded and remembered.

Each test has its own cache root (``$LIGHTNING_ADAMTYPE_CACHE`` in ``tmp_path``) and starts and ends with
:func:`native_build.reset`. Files are planted at the path the loader would use: its name (the same for every root,
for a given compiler) comes from one build in a scratch root; the planted roots are fresh, so no planted path was
ever loaded in this process (``dlopen`` would otherwise hand back the library already loaded under that name).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lightning_adamtype.backends import native_build

GCC = shutil.which("gcc")
pytestmark = pytest.mark.skipif(GCC is None, reason="needs gcc")

#: a library that is not ours: it notes when it is loaded (a constructor) and when its kernel is called
_EVIL_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
static void mark(const char *what) {
    const char *path = getenv("ADAMTYPE_TEST_EVIL_MARKER");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) { fputs(what, f); fclose(f); }
}
__attribute__((constructor)) static void on_load(void) { mark("loaded\n"); }
#ifdef ABI
int adamtype_abi_version(void) { return ABI; }
#endif
int adamtype_group_terms(void) { mark("called\n"); return 0; }
"""


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """A fresh cache root and no native_build variables from the environment; reset before and after."""
    for name in ("LIGHTNING_ADAMTYPE_NATIVE", "LIGHTNING_ADAMTYPE_COMPILE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", GCC or "gcc")
    monkeypatch.setenv("ADAMTYPE_TEST_EVIL_MARKER", str(tmp_path / "evil-marker"))
    native_build.reset()
    yield
    native_build.reset()


@pytest.fixture(scope="module")
def expected_name(tmp_path_factory):
    """The library's file name with CC=gcc (built once in a scratch root)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("LIGHTNING_ADAMTYPE_NATIVE", raising=False)
        patch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(tmp_path_factory.mktemp("scratch") / "cache"))
        patch.setenv("CC", GCC)
        native_build.reset()
        native_build.library()
        name = os.path.basename(native_build.build_info().path)
        native_build.reset()
    return name


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """Impostor libraries: 'impostor' (the right ABI version), 'wrong_abi' (ABI_VERSION + 1), 'foreign' (none)."""
    folder = tmp_path_factory.mktemp("evil")
    source = folder / "evil.c"
    source.write_text(_EVIL_SOURCE)
    abi = native_build.ABI_VERSION
    variants = {"impostor": [f"-DABI={abi}"], "wrong_abi": [f"-DABI={abi + 1}"], "foreign": []}
    for name, defines in variants.items():
        subprocess.run([GCC, "-shared", "-fPIC", *defines, str(source), "-o", str(folder / f"{name}.so")], check=True)
    return folder


def cache_root(tmp_path, mode=0o700):
    root = tmp_path / "cache"
    root.mkdir()
    os.chmod(root, mode)
    return root


def counting_script(tmp_path, body: str) -> tuple[str, str]:
    """A CC script that appends a line to a counter file, then runs ``body``; (script, counter)."""
    counter = tmp_path / "compiler-runs"
    script = tmp_path / "cc.sh"
    script.write_text(f"#!/bin/sh\necho run >> '{counter}'\n{body}\n")
    os.chmod(script, 0o755)
    return str(script), str(counter)


def runs(counter: str) -> int:
    return len(Path(counter).read_text().splitlines()) if os.path.exists(counter) else 0


def check_kernel(library: ctypes.CDLL) -> None:
    """``adamtype_abi_version()`` is ABI_VERSION, and one CURRENT-mode call on one tensor (8 pieces, 2 threads) gives
    the nine terms [min η, Σ(ηg)², 0, 0, Ση, n, 0, 0, 0] of η = s / (sqrt(v) + e) (every v > 0: every coordinate
    active) as float64 computes them, and the tensor's share (Σ(ηg)², 0, 0, 0)."""
    assert library.adamtype_abi_version() == native_build.ABI_VERSION
    generator = torch.Generator().manual_seed(0)
    n, piece = 1000, 128
    v = torch.rand(n, generator=generator) + 0.01
    g = torch.randn(n, generator=generator)
    table = torch.tensor([[1e-3, 1e-8]], dtype=torch.float32)
    v_ptrs, g_ptrs = (ctypes.c_int64 * 1)(v.data_ptr()), (ctypes.c_int64 * 1)(g.data_ptr())
    offsets, sizes = torch.zeros(1, dtype=torch.int64), torch.tensor([n])
    first_piece = torch.tensor([0, -(-n // piece)])
    partials = torch.empty(int(first_piece[-1]), 9, dtype=torch.float64)
    out = torch.full((9,), float("nan"), dtype=torch.float64)
    per_tensor = torch.full((1, 4), float("nan"), dtype=torch.float64)
    code = library.adamtype_group_terms(
        2, 0, 1, ctypes.addressof(v_ptrs), ctypes.addressof(g_ptrs), None, offsets.data_ptr(), sizes.data_ptr(),
        first_piece.data_ptr(), piece, table.data_ptr(), 2, 1.0, 0.0, 1e-6, partials.data_ptr(), out.data_ptr(),
        per_tensor.data_ptr(), 0, None, 1.0, None, None, 2,
    )
    assert code == 0
    s, e = table.double()[0]
    eta = s / (v.double().sqrt() + e)
    zero = eta.new_zeros(())
    b = ((eta * g.double()) ** 2).sum()
    expected = torch.stack([eta.min(), b, zero, zero, eta.sum(), eta.new_tensor(float(n)), zero, zero, zero])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(per_tensor, torch.stack([b, zero, zero, zero]).reshape(1, 4), rtol=1e-5, atol=0)


def test_fresh_cache_builds_once_then_loads_without_compiling(tmp_path, monkeypatch):
    root = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(root))
    script, counter = counting_script(tmp_path, f"exec '{GCC}' \"$@\"")
    monkeypatch.setenv("CC", script)
    old_umask = os.umask(0)  # the folders and the file are private even so
    try:
        library = native_build.library()
    finally:
        os.umask(old_umask)
    check_kernel(library)
    info = native_build.build_info()
    assert (info.from_cache, info.cache_note, info.reason) == (False, "", "")
    assert os.path.dirname(info.path) == str(root)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", root):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
    assert stat.S_IMODE(os.stat(info.path).st_mode) & 0o077 == 0
    built = runs(counter)
    assert built >= 1

    native_build.reset()  # as a new process would
    check_kernel(native_build.library())
    assert runs(counter) == built
    assert native_build.build_info().from_cache and native_build.build_info().path == info.path
    # no marker, no leftover build folder; the lock file the build held
    assert sorted(os.listdir(root)) == sorted([os.path.basename(info.path), os.path.basename(info.path)[:-3] + ".lock"])


def test_a_build_waits_for_the_process_building_it_and_loads_its_library(tmp_path, monkeypatch, expected_name):
    """Another process holds the build lock of the cache root (here a thread of this test, through its own open
    file) and puts the library in place before it lets go: the build waits for it and loads that library from the
    cache instead of running the compiler (the ranks of a distributed run compile once)."""
    import fcntl
    import threading

    monkeypatch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(tmp_path / "scratch"))
    native_build.reset()
    built = native_build.build_info().path  # a library to put in place, built in another root
    native_build.reset()
    root = cache_root(tmp_path)
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_CACHE", str(root))
    lock = os.open(root / (expected_name[:-3] + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)

    def other_builder():
        time.sleep(0.5)
        shutil.copy(built, root / expected_name)
        os.chmod(root / expected_name, 0o700)
        os.close(lock)  # (lets go of the lock)

    thread = threading.Thread(target=other_builder)
    start = time.monotonic()
    thread.start()
    check_kernel(native_build.library())
    waited = time.monotonic() - start
    thread.join()
    info = native_build.build_info()
    assert info.from_cache and info.path == str(root / expected_name) and info.reason == ""
    assert waited >= 0.45


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_cache_root_of_another_user_is_not_used(tmp_path):
    root = cache_root(tmp_path)
    os.chown(root, 65534, 65534)
    library, reason = native_build.availability()
    assert reason == ""
    check_kernel(library)
    info = native_build.build_info()
    assert not info.path.startswith(str(root) + os.sep) and not info.from_cache
    assert "owned by uid 65534" in info.cache_note
    assert os.listdir(root) == []


@pytest.mark.parametrize("case", ["group-writable folder", "world-writable file", "symbolic link"])
def test_untrusted_library_is_never_loaded(tmp_path, expected_name, evil, case):
    root = cache_root(tmp_path, 0o775 if case == "group-writable folder" else 0o700)
    planted = root / expected_name
    if case == "symbolic link":
        target = tmp_path / "elsewhere.so"
        shutil.copy(evil / "impostor.so", target)
        os.chmod(target, 0o700)
        os.symlink(target, planted)
    else:
        shutil.copy(evil / "impostor.so", planted)
        os.chmod(planted, 0o666 if case == "world-writable file" else 0o700)
    check_kernel(native_build.library())  # a loaded impostor would note its loading and its call
    assert not (tmp_path / "evil-marker").exists()
    info = native_build.build_info()
    assert info.path != str(planted) and not info.from_cache
    assert ("writable by group or others" if case != "symbolic link" else "not a regular file") in info.cache_note
    assert os.path.lexists(planted)  # left for someone to look at


@pytest.mark.parametrize("case", ["foreign", "wrong_abi", "corrupt"])
def test_broken_cached_library_is_rebuilt_and_never_called(tmp_path, expected_name, evil, case):
    root = cache_root(tmp_path)
    planted = root / expected_name
    if case == "corrupt":
        planted.write_bytes(os.urandom(4096))
    else:
        shutil.copy(evil / f"{case}.so", planted)
    os.chmod(planted, 0o700)
    check_kernel(native_build.library())
    info = native_build.build_info()
    assert info.path != str(planted) and not info.from_cache and str(planted) in info.cache_note
    marks = (tmp_path / "evil-marker").read_text().split() if case != "corrupt" else []
    assert marks == ([] if case == "corrupt" else ["loaded"])  # loaded (trusted: ours), checked, not called
    assert not planted.exists()  # ours and broken: removed, so the next process builds it into the cache again


def test_hanging_compiler_costs_one_timeout_and_is_remembered(tmp_path, monkeypatch):
    root = cache_root(tmp_path)
    pid_file = tmp_path / "sleep-pid"
    script, counter = counting_script(tmp_path, f"sleep 60 &\necho $! > '{pid_file}'\nwait")
    monkeypatch.setenv("CC", script)
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_COMPILE_TIMEOUT", "1")
    start = time.monotonic()
    library, reason = native_build.availability()
    assert time.monotonic() - start < 10  # a bound on a hang (about 1 s expected), not a performance claim
    assert library is None and "timed out after 1 s" in reason and "LIGHTNING_ADAMTYPE_COMPILE_TIMEOUT" in reason
    assert runs(counter) == 1  # not once more per optional flag set
    sleeper = f"/proc/{pid_file.read_text().strip()}/stat"
    # the compiler's own children are killed too (at most a zombie is left); a SIGKILL takes effect asynchronously,
    # so on a busy machine the state is read again for up to 5 s
    deadline = time.monotonic() + 5
    state = "gone"
    while os.path.exists(sleeper) and time.monotonic() < deadline:
        try:
            state = Path(sleeper).read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            state = "gone"
        if state in ("Z", "X", "gone"):
            break
        time.sleep(0.05)
    assert state in ("Z", "X", "gone") or not os.path.exists(sleeper), state
    markers = [name for name in os.listdir(root) if name.endswith(".failed")]
    assert len(markers) == 1

    native_build.reset()  # a later process: does not run the compiler, says how to retry
    library, reason = native_build.availability()
    assert library is None and runs(counter) == 1
    assert "earlier build" in reason and "timed out" in reason and f"delete {root / markers[0]} to retry" in reason
    with pytest.raises(native_build.NativeUnavailable, match="to retry"):
        native_build.library()

    os.unlink(root / markers[0])
    native_build.reset()
    assert native_build.availability()[0] is None and runs(counter) == 2


def test_failing_compiler_tries_every_flag_set_once_and_is_remembered(tmp_path, monkeypatch):
    cache_root(tmp_path)
    script, counter = counting_script(tmp_path, "echo 'fatal error: no such luck' >&2\nexit 1")
    monkeypatch.setenv("CC", script)
    library, reason = native_build.availability()
    assert library is None and "no such luck" in reason
    tried = runs(counter)
    assert tried >= 2
    native_build.reset()
    library, reason = native_build.availability()
    assert library is None and runs(counter) == tried and "no such luck" in reason and "to retry" in reason


def test_untrusted_failure_marker_is_ignored(tmp_path, expected_name):
    root = cache_root(tmp_path)
    marker = root / expected_name.replace(".so", ".failed")
    marker.write_text("planted\n")
    os.chmod(marker, 0o666)
    check_kernel(native_build.library())
    assert native_build.build_info().path == str(root / expected_name)


def test_no_compiler(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("CC", str(tmp_path / "nonexistent"))
    monkeypatch.setenv("PATH", str(empty))
    library, reason = native_build.availability()
    assert library is None and "no C compiler found" in reason and "CC" in reason
    assert native_build.build_info().reason == reason


def test_disabled(monkeypatch):
    monkeypatch.setenv("LIGHTNING_ADAMTYPE_NATIVE", "0")
    assert native_build.availability() == (None, native_build.build_info().reason)
    assert native_build.availability()[1].startswith("disabled by LIGHTNING_ADAMTYPE_NATIVE=0")
    with pytest.raises(native_build.NativeUnavailable, match="disabled"):
        native_build.library()


def test_kernel_terms_and_source():
    assert "int adamtype_abi_version(void)" in native_build.SOURCE and native_build.COMPILE_TIMEOUT_S == 30
    library = native_build.library()
    assert native_build.library() is library  # once per process
    check_kernel(library)
