"""Build and load a compiled artefact safely: compile once per machine, trust only our own files.

A :class:`Recipe` says what to compile (its source, compiler, flags) and how to load and check the result; this
module decides where it is built and whether a file found there may be loaded. Loading a shared library runs its
code, so the loader follows one rule:

    **a cached or compiled artefact is used only when the current user owns it and nobody else can write it.**

- The cache root is ``$LIGHTNING_ADAMTYPE_CACHE`` or ``~/.cache/lightning_adamtype`` (symbolic links in the path
  are resolved first). Missing folders are created with mode 0700 (chmod'ed again, as the umask may be 000). The
  artefact is ``<prefix>_<key>.so`` in the root, the key a hash of the source, the flags, the compiler's path and
  what the recipe adds (the CPU's feature flags, the torch and Python versions).
- Before anything is read from the cache, the root must be a real folder owned by ``os.geteuid()`` and not writable
  by group or others (``mode & 0o022 == 0``), and the file (seen with :func:`os.lstat`: a symbolic link is refused)
  a regular file passing the same test. The folders above the root are not checked: whoever can replace the root
  (the owner of its parent, or root) can replace the library anyway.
- Where the cache is refused (or cannot be written), nothing is loaded from it: the artefact is built into a fresh
  private folder (:func:`tempfile.mkdtemp`, mode 0700, created by this process, so no one else could have put a file
  there), loaded, and the folder removed (the loaded mapping stays valid). :class:`BuildInfo` says why the cache
  was not used.
- Files are written atomically: compiled into a temporary folder beside the destination, chmod'ed 0700, then
  :func:`os.replace`'d, so a concurrent process sees either no file or a whole one.
- The recipe's ``load`` checks the artefact's version symbol before anything else is called. A foreign library, a
  corrupt file or a wrong version is never called: the cached file is removed and the artefact rebuilt once into a
  fresh private folder.
- Each compiler run is bounded by the recipe's timeout (``$LIGHTNING_ADAMTYPE_COMPILE_TIMEOUT`` overrides it), its
  whole process group killed at the limit; a timeout stops the search through the optional flag sets. A build
  that fails (a timeout, or an error on every flag set) is remembered in ``<prefix>_<key>.failed`` in a trusted
  cache root, and later processes (reading the marker only if it passes the same test) do not run the compiler
  again until it is deleted. Not finding a compiler costs no compiler run, so it is not remembered.
- Processes sharing a cache root build one at a time (an exclusive lock on ``<prefix>_<key>.lock`` in the trusted
  root, the wait bounded): the ranks of a distributed run compile once, the others load the result.

Without ``os.geteuid`` (Windows) the cache is never trusted and each process builds privately.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Attempt", "BuildInfo", "Recipe", "Unavailable", "artefact_path", "build", "one_line"]


class Unavailable(RuntimeError):
    """The artefact cannot be used; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class Recipe:
    """What to compile and how to check what was compiled."""

    #: the file names' prefix (``<prefix>_<key>.so``, ``<prefix>_<key>.failed``)
    prefix: str
    #: the source text and the name it is compiled under (its suffix tells the compiler the language)
    source: str
    source_name: str
    #: the compilers to look for, in order (an environment variable's value first, when set)
    compilers: Callable[[], tuple[str | None, ...]]
    #: "C" or "C++", in messages
    language: str
    #: flags always given, then optional sets tried in order until one compiles, then what comes after the output
    flags: tuple[str, ...]
    optional_flags: tuple[tuple[str, ...], ...]
    libraries: tuple[str, ...]
    #: more key material: what the artefact depends on beyond its source, flags and compiler
    key: Callable[[], tuple[str, ...]]
    #: load a file: (the loaded object, '') or (None, what is wrong with it); checks the version before any call
    load: Callable[[str], tuple[Any, str]]
    #: why the artefact is disabled by the environment ('' when it is not)
    disabled: Callable[[], str]
    #: what to set to do without the artefact, in messages
    skip_hint: str
    #: seconds one compiler run may take by default
    timeout_s: float = 30.0


@dataclass(frozen=True)
class BuildInfo:
    """What the latest attempt of this process did."""

    #: the artefact loaded ('' when none); a private build's folder is removed once it is loaded
    path: str = ""
    #: whether it was loaded from the cache without running the compiler
    from_cache: bool = False
    #: why the cache was not used, or what was wrong with it ('' when nothing was)
    cache_note: str = ""
    #: why the artefact is unavailable ('' when it loaded)
    reason: str = ""


class _BuildError(Exception):
    """The compiler could not build the artefact (``reason``: one line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    return " ".join(text.split())[:limit]


def _compiler(recipe: Recipe) -> str | None:
    """The first of the recipe's compilers found on ``PATH`` (None when there is none)."""
    for name in recipe.compilers():
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _name(recipe: Recipe, compiler: str) -> str:
    """``<prefix>_<key>``: the key hashes the source, the flags, the compiler's path and the recipe's own key."""
    flags = [*recipe.flags, *(flag for optional in recipe.optional_flags for flag in optional), *recipe.libraries]
    material = [recipe.source, *flags, compiler, *recipe.key()]
    return f"{recipe.prefix}_{hashlib.sha256(chr(0).join(material).encode()).hexdigest()[:16]}"


def artefact_path(recipe: Recipe) -> str | None:
    """Where the recipe's artefact is looked for in the cache root (None when no compiler is found)."""
    compiler = _compiler(recipe)
    return None if compiler is None else os.path.join(_cache_root(), _name(recipe, compiler) + ".so")


def _timeout(recipe: Recipe) -> float:
    """Seconds per compiler run: ``$LIGHTNING_ADAMTYPE_COMPILE_TIMEOUT`` when a positive number, else the recipe's."""
    try:
        value = float(os.environ.get("LIGHTNING_ADAMTYPE_COMPILE_TIMEOUT", recipe.timeout_s))
    except ValueError:
        return float(recipe.timeout_s)
    return value if value > 0 else float(recipe.timeout_s)


def _uid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def _untrusted(path: str, folder: bool) -> str:
    """Why ``path`` (not followed if a link) may not be trusted: '' when it is a folder (``folder``) or regular
    file owned by the effective user that neither group nor others can write."""
    try:
        info = os.lstat(path)
    except OSError as error:
        return f"{path} cannot be examined ({error.strerror})"
    kind_ok = stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        return f"{path} is not a {'folder' if folder else 'regular file'}"
    if _uid() is None:
        return "file ownership cannot be checked on this system"
    if info.st_uid != _uid():
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {_uid()})"
    if info.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}; chmod go-w it)"
    return ""


def _cache_root() -> str:
    """``$LIGHTNING_ADAMTYPE_CACHE`` or ``~/.cache/lightning_adamtype``, links resolved."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "lightning_adamtype")
    return os.path.realpath(os.environ.get("LIGHTNING_ADAMTYPE_CACHE") or default)


def _prepare_root(root: str) -> str:
    """Create the missing folders of ``root`` with mode 0700; '' when ``root`` may then be trusted, else why not."""
    missing = []
    folder = root
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:  # made by a concurrent process: the check below decides
            continue
        except OSError as error:
            return f"the cache folder {root} cannot be created ({error.strerror})"
        os.chmod(folder, 0o700)  # the umask may have cleared bits only, but be sure of the mode
    return _untrusted(root, folder=True)


def _run(recipe: Recipe, command: list[str], timeout: float) -> tuple[int, str]:
    """Run ``command`` in its own process group with no input; (exit status, output). At ``timeout`` seconds the
    whole group (the compiler driver and what it started) is killed and :class:`_BuildError` raised."""
    with tempfile.TemporaryFile() as output:
        try:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as error:
            raise _BuildError(f"the {recipe.language} compiler {command[0]} cannot be run ({error.strerror})") from None
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (AttributeError, OSError):  # no process groups (Windows), or already gone
                process.kill()
            process.wait()
            raise _BuildError(
                f"the {recipe.language} compiler {command[0]} timed out after {timeout:g} s "
                f"(set LIGHTNING_ADAMTYPE_COMPILE_TIMEOUT higher, or {recipe.skip_hint})"
            ) from None
        output.seek(0)
        return code, output.read().decode(errors="replace")


def _compile(recipe: Recipe, compiler: str, path: str) -> None:
    """Compile the recipe's source into ``path`` atomically, with the first optional flag set that works (a
    timeout ends the search). Raises :class:`_BuildError` for the compiler's failures, OSError for the folder's."""
    build = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(path))
    try:
        source = os.path.join(build, recipe.source_name)
        with open(source, "w") as f:
            f.write(recipe.source)
        built = os.path.join(build, "artefact.so")
        timeout, output = _timeout(recipe), ""
        for optional in recipe.optional_flags:
            command = [compiler, *recipe.flags, *optional, source, "-o", built, *recipe.libraries]
            code, output = _run(recipe, command, timeout)
            if code == 0:
                break
        else:
            raise _BuildError(
                f"{os.path.basename(compiler)} failed with every flag set: {one_line(output)} "
                f"(fix the compiler, or {recipe.skip_hint})"
            )
        os.chmod(built, 0o700)
        os.replace(built, path)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _read_marker(marker: str) -> str | None:
    """The reason an earlier build failed, from a trusted marker file (None when there is none to trust)."""
    if not os.path.lexists(marker) or _untrusted(marker, folder=False):
        return None
    try:
        with open(marker, errors="replace") as f:
            return one_line(f.read()) or "no reason recorded"
    except OSError:
        return None


def _remember(marker: str, reason: str) -> None:
    """Write ``reason`` into ``marker`` atomically (mode 0600); a folder that cannot be written is let be."""
    try:
        handle, temporary = tempfile.mkstemp(prefix=".failed-", dir=os.path.dirname(marker))
        with os.fdopen(handle, "w") as f:
            f.write(reason + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, marker)
    except OSError:
        pass


def _build_private(recipe: Recipe, compiler: str, name: str, note: str,
                   marker: str | None = None) -> tuple[Any, BuildInfo]:
    """Build into a fresh private folder (removed once loaded) and load; a compiler failure is remembered in
    ``marker`` when given (a trusted cache root's)."""
    try:
        folder = tempfile.mkdtemp(prefix=f"lightning_adamtype-{_uid() if _uid() is not None else 'user'}-")
    except OSError as error:
        raise Unavailable(
            f"no private folder can be made in {tempfile.gettempdir()} ({error.strerror}; {note}); "
            f"set TMPDIR to a writable folder"
        ) from None
    try:
        path = os.path.join(folder, name + ".so")
        try:
            _compile(recipe, compiler, path)
        except _BuildError as error:
            if marker is not None:
                _remember(marker, error.reason)
            raise Unavailable(error.reason) from None
        loaded, problem = recipe.load(path)
        if loaded is None:
            raise Unavailable(
                f"the library just built at {path} {problem} (a broken compiler? set "
                f"{'CC' if recipe.language == 'C' else 'CXX'} to another, or {recipe.skip_hint})"
            )
        return loaded, BuildInfo(path=path, from_cache=False, cache_note=note)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _one_builder(recipe: Recipe, root: str, name: str) -> Iterator[None]:
    """Processes sharing the trusted ``root`` (the ranks of a distributed run, test workers) look for and build
    ``name`` one at a time: an exclusive ``flock`` on ``<name>.lock`` there, so the others wait and then find it
    built. The wait is bounded (the compiler's timeout and 10 s more: a holder that is stopped, not dead, is not
    waited for); where no lock can be taken (no ``fcntl``, a read-only root) nobody waits."""
    try:
        import fcntl
    except ImportError:  # (Windows: the cache is never trusted there anyway)
        yield
        return
    try:
        fd = os.open(os.path.join(root, name + ".lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + _timeout(recipe) + 10.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def _build_cached(recipe: Recipe, compiler: str, root: str, name: str) -> tuple[Any, BuildInfo]:
    """Load ``name`` from the trusted ``root``, or build it there, one process at a time."""
    with _one_builder(recipe, root, name):
        return _load_or_build_cached(recipe, compiler, root, name)


def _load_or_build_cached(recipe: Recipe, compiler: str, root: str, name: str) -> tuple[Any, BuildInfo]:
    """Load ``name`` from the trusted ``root``, or build it there; see the module's docstring for what is refused."""
    path, marker = os.path.join(root, name + ".so"), os.path.join(root, name + ".failed")
    if os.path.lexists(path):
        problem = _untrusted(path, folder=False)
        if problem:  # left in place: someone should look at it
            return _build_private(recipe, compiler, name, f"cache refused: {problem} (delete it)", marker)
        loaded, problem = recipe.load(path)
        if loaded is not None:
            return loaded, BuildInfo(path=path, from_cache=True)
        try:
            os.unlink(path)  # ours and broken: the next process builds it again here
        except OSError:
            pass
        return _build_private(recipe, compiler, name, f"the cached {path} {problem}: removed and rebuilt", marker)
    earlier = _read_marker(marker)
    if earlier is not None:
        raise Unavailable(f"an earlier build on this machine failed: {earlier}; delete {marker} to retry")
    try:
        _compile(recipe, compiler, path)
    except _BuildError as error:
        _remember(marker, error.reason)
        raise Unavailable(error.reason) from None
    except OSError as error:
        return _build_private(recipe, compiler, name, f"the cache folder {root} cannot be written ({error.strerror})")
    loaded, problem = recipe.load(path)
    if loaded is None:
        return _build_private(recipe, compiler, name, f"the library just built at {path} {problem}", marker)
    return loaded, BuildInfo(path=path, from_cache=False)


def build(recipe: Recipe) -> tuple[Any, BuildInfo]:
    """The loaded artefact and how it was obtained; raises :class:`Unavailable`."""
    disabled = recipe.disabled()
    if disabled:
        raise Unavailable(disabled)
    compiler = _compiler(recipe)
    if compiler is None:
        variable = "CC" if recipe.language == "C" else "CXX"
        tools = "gcc or clang" if recipe.language == "C" else "g++ or clang++"
        raise Unavailable(f"no {recipe.language} compiler found (install {tools}, or set {variable} to one)")
    name = _name(recipe, compiler)
    root = _cache_root()
    problem = _prepare_root(root)
    if problem:
        return _build_private(recipe, compiler, name, f"cache refused: {problem}")
    return _build_cached(recipe, compiler, root, name)


class Attempt:
    """One attempt per process at a recipe's artefact (until :meth:`reset`), shared by threads; never raises.

    :meth:`result` builds in the calling thread (waiting for a build another thread runs); :meth:`start` runs the
    build in a background thread and :meth:`ready` answers without waiting (None until the build is done)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self._lock = threading.Lock()
        self._done: tuple[Any, BuildInfo] | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0

    def _attempt(self) -> tuple[Any, BuildInfo]:
        try:
            return build(self.recipe)
        except Unavailable as error:
            return None, BuildInfo(reason=str(error))
        except Exception as error:  # noqa: BLE001 - an attempt must never raise
            return None, BuildInfo(reason=f"unexpected {type(error).__name__}: {one_line(str(error))} (please report it)")

    def result(self) -> tuple[Any, BuildInfo]:
        """(the artefact or None, how it went), building it now if no attempt was made."""
        with self._lock:  # threads asking at once share one build
            if self._done is None:
                self._done = self._attempt()
            return self._done

    def start(self) -> None:
        """Start the attempt in a daemon thread, unless one was made or is running (never raises: where no thread
        can be started the attempt is done, with that reason)."""
        with self._lock:
            if self._done is not None or self._thread is not None:
                return
            thread = threading.Thread(target=self._background, args=(self._generation,),
                                      name=f"{self.recipe.prefix}-build", daemon=True)
            try:
                thread.start()
            except RuntimeError as error:  # (no thread can be started: the artefact is unavailable, not an error)
                self._done = None, BuildInfo(reason=f"no build thread can be started ({one_line(str(error))})")
                return
            self._thread = thread

    def _background(self, generation: int) -> None:
        done = self._attempt()
        with self._lock:
            if generation == self._generation and self._done is None:  # (not reset meanwhile)
                self._done = done

    def ready(self) -> Any:
        """The artefact when the attempt is done and it loaded, else None (never waits)."""
        done = self._done
        return done[0] if done is not None else None

    def wait(self, timeout: float | None = None) -> tuple[Any, BuildInfo] | None:
        """Wait up to ``timeout`` seconds for an attempt started with :meth:`start` (starting it if none was);
        its result, or None if it is still running."""
        self.start()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._done

    def reset(self) -> None:
        """Forget this process's attempt (a running build is let finish, unheard), so the next call looks again."""
        with self._lock:
            self._done, self._thread = None, None
            self._generation += 1
