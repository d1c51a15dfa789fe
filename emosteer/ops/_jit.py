"""First-use build of the C++ CPU kernels (``emosteer._C``) where no prebuilt one imports.

A wheel built with pip's default build isolation holds no compiled module (setup.py
cannot see the torch that will run it) but carries the C++ sources as
``emosteer/_csrc``. The first process that wants the C++ kernels compiles them with
``torch.utils.cpp_extension.load`` (the flags of setup.py, ``emosteer/ops/_build.py``)
against the torch it runs, into

    $EMOSTEER_EXT_CACHE (default ``$EMOSTEER_CACHE/ext``, ``~/.cache/emosteer/ext``)
        /<torch version>/<python tag>-<hash of the sources and flags>/_C.so

under a file lock, so that concurrent processes (vLLM starts several) compile once and
the others wait and load the result. Later processes load it directly (no compiler
needed). The build logs one line; where it cannot happen (no C++ compiler, ninja or
Python headers, or a failed compile) one line says why and the ops use the next
implementation (Triton/torch). A failed compile is remembered in the build folder
(``FAILED``, with the compiler output in ``build.log``): delete that folder to retry.

A source checkout without an in-place build compiles from ``csrc/`` the same way.
``EMOSTEER_NO_JIT=1`` turns all of this off (silently).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Optional

from emosteer.ops import _build

log = logging.getLogger("emosteer")

MODULE = "emosteer._C"
_DONE = "COMPLETE"
_FAILED = "FAILED"
LOCK_TIMEOUT_S = 1800.0  # a waiting process gives up after this long
_state: dict = {}  # "module" and "why" after the first call in this process
_thread_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("EMOSTEER_NO_JIT", "").strip().upper() not in ("1", "TRUE", "YES", "ON")


def why_unavailable() -> Optional[str]:
    """Why the first-use build gave no module in this process (None if it did or was
    not tried)."""
    return _state.get("why")


def sources_root() -> Optional[Path]:
    """The C++ sources: ``emosteer/_csrc`` in an installed wheel, ``csrc/`` in a checkout."""
    pkg = Path(__file__).resolve().parent.parent
    for cand in (pkg / "_csrc", pkg.parent / "csrc"):
        if (cand / "bindings_cpu.cpp").is_file():
            return cand
    return None


def cache_root() -> Path:
    env = os.environ.get("EMOSTEER_EXT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("EMOSTEER_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "emosteer") / "ext"


def build_spec(csrc: Path, portable_only: bool = False):
    """(sources, extra cflags, build folder) of the JIT build of the tree ``csrc``."""
    import torch

    sources = _build.cpu_sources(str(csrc), portable_only)
    cflags = list(_build.CPU_CXX_FLAGS) + ([_build.PORTABLE_ONLY_DEFINE] if portable_only else [])
    h = hashlib.sha256()
    for rel in _build.source_tree(str(csrc)):
        h.update(rel.encode() + b"\0" + (csrc / rel).read_bytes() + b"\0")
    for part in (*[os.path.relpath(s, csrc) for s in sources], *cflags, platform.machine()):
        h.update(part.encode() + b"\0")
    tag = sys.implementation.cache_tag or f"py{sys.version_info[0]}{sys.version_info[1]}"
    folder = cache_root() / torch.__version__ / f"{tag}-{h.hexdigest()[:12]}"
    return sources, cflags, folder


def _import(so: Path):
    """Import the built library as ``emosteer._C`` (its init function is PyInit__C)."""
    spec = importlib.util.spec_from_file_location(MODULE, str(so))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {so}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    import emosteer

    emosteer._C = module
    return module


def _ninja_dir() -> Optional[str]:
    """A folder holding ninja: PATH, this interpreter's bin/ (an unactivated venv), or
    the ``ninja`` package; None where there is none."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    cands = [Path(sys.executable).parent]
    try:
        import ninja

        cands.append(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for d in cands:
        if (d / "ninja").is_file() or (d / "ninja.exe").is_file():
            return str(d)
    return None


def _missing_tools() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)"
    if _ninja_dir() is None:
        return "ninja is not installed (pip install ninja)"
    include = sysconfig.get_paths().get("include") or ""
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"the Python headers are missing ({include}/Python.h; e.g. apt install python3-dev)"
    return None


@contextlib.contextmanager
def _locked(path: Path, timeout: float = LOCK_TIMEOUT_S):
    """An exclusive lock on ``path`` (released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file in the build folder only
        yield
        return
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"waited {timeout:.0f} s for {path}") from None
                time.sleep(0.25)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _compile(sources, cflags, folder: Path, csrc: Path) -> None:
    from torch.utils import cpp_extension

    # Under our lock no other emosteer process builds here, so a lock file of torch's
    # left in the folder is a dead process's: torch would wait on it forever.
    with contextlib.suppress(FileNotFoundError):
        (folder / "lock").unlink()
    ninja = _ninja_dir()
    old_path = os.environ.get("PATH", "")
    if ninja and shutil.which("ninja") is None:
        os.environ["PATH"] = ninja + os.pathsep + old_path
    try:
        cpp_extension.load(
            name="_C", sources=[str(s) for s in sources], extra_cflags=cflags,
            extra_include_paths=[str(csrc)], build_directory=str(folder),
            verbose=False, is_python_module=False,
        )
    finally:
        os.environ["PATH"] = old_path


def load(portable_only: bool = False):
    """``emosteer._C`` built on first use (or loaded from the cache), or None (and
    :func:`why_unavailable` says why). Once per process."""
    with _thread_lock:
        if "module" in _state:
            return _state["module"]
        module, why = None, None
        try:
            module, why = _load(portable_only)
        except Exception as err:  # never let the fallback path raise
            why = f"{type(err).__name__}: {err}"
        if module is None and why and enabled():
            log.warning("emosteer: the C++ CPU kernels (emosteer._C) are not available: %s; "
                        "ops use the Triton/torch implementation (EMOSTEER_NO_JIT=1 silences "
                        "this)", why)
        _state.update(module=module, why=why)
        return module


def _load(portable_only: bool):
    if not enabled():
        return None, "EMOSTEER_NO_JIT is set"
    csrc = sources_root()
    if csrc is None:
        return None, "no prebuilt module and no C++ sources (emosteer/_csrc) to build one from"
    sources, cflags, folder = build_spec(csrc, portable_only)
    so = folder / "_C.so"
    if (folder / _DONE).is_file() and so.is_file():
        return _import(so), None
    if (folder / _FAILED).is_file():
        return None, (f"its first-use build failed before (compiler output in "
                      f"{folder / 'build.log'}; delete {folder} to retry)")
    missing = _missing_tools()
    if missing:
        return None, f"it is not prebuilt and cannot be compiled here: {missing}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return None, f"cannot create its build folder {folder} ({err}; set EMOSTEER_EXT_CACHE)"
    import torch

    with _locked(folder.parent / (folder.name + ".lock")):
        if (folder / _FAILED).is_file():  # another process tried while we waited
            return None, (f"its first-use build failed (compiler output in "
                          f"{folder / 'build.log'}; delete {folder} to retry)")
        if not ((folder / _DONE).is_file() and so.is_file()):  # another process may have
            log.warning("emosteer: compiling the C++ CPU kernels (emosteer._C) for torch %s "
                        "into %s, once (about a minute; EMOSTEER_NO_JIT=1 skips it)",
                        torch.__version__, folder)
            t0 = time.monotonic()
            try:
                _compile(sources, cflags, folder, csrc)
                module = _import(so)
            except Exception as err:
                (folder / "build.log").write_text(f"{type(err).__name__}: {err}\n")
                (folder / _FAILED).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
                return None, (f"its first-use build failed (compiler output in "
                              f"{folder / 'build.log'}; delete {folder} to retry)")
            (folder / _DONE).write_text(
                f"torch {torch.__version__}, {time.monotonic() - t0:.1f} s, "
                f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            return module, None
    return _import(so), None
