"""Loading of the compiled extensions, once per process, never one built for another torch.

For ``fused_losses._C`` (and ``fused_losses._cuda``):

1. A module installed with the package (compiled by setup.py when torch was importable at build
   time) is imported only if its build record (``_build.py``) matches the running torch, Python
   and sources; otherwise it is never imported (no undefined-symbol error, no crash).
2. Else it is compiled just in time, once per torch version and source state, into a per-user
   cache (``$FUSED_LOSSES_CACHE_DIR``, default ``~/.cache/fused_losses``) by
   ``torch.utils.cpp_extension.load`` and ninja, in a child process whose progress is shown on
   stderr (one line saying what is compiled, why, where and how long it takes; ninja's steps;
   the time it took).  ``FUSED_LOSSES_JIT=0`` forbids this; ``_cuda`` is compiled on first use
   only where a CUDA device can run it (or with ``FUSED_LOSSES_CUDA=1``).
3. When neither works the backend is unavailable with a reason that names the command that
   fixes it; ``backend="auto"`` then says once, in one line, that it runs the slow reference
   (``fallback_notice``).

Importing this module never raises and compiles nothing.  ``import fused_losses`` loads what
is already built for the running torch (``preload``); the first use compiles what is not.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from . import _build

_WHAT = {"_C": "C++ CPU kernels", "_cuda": "CUDA kernels"}
_EXPECTED_TIME = {"_C": "about 1-2 minutes on 2 cores", "_cuda": "about 1-2 minutes on 2 cores"}
REBUILD = "python -m fused_losses"  # builds what is missing, whatever FUSED_LOSSES_JIT says

_cache: dict[str, tuple[ModuleType | None, str | None]] = {}
_noticed: set[str] = set()


def say(msg: str) -> None:
    print(f"fused-losses: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    if os.environ.get("FUSED_LOSSES_CACHE_DIR"):
        return Path(os.environ["FUSED_LOSSES_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused_losses"


def jit_dir(name: str, current: dict) -> Path:
    """The cache folder of ``name`` for this torch, Python, sources and flags."""
    key = json.dumps([name, current, _build.compile_args(name, torch)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / f"{name}-torch{current['torch']}-{current['python']}-{digest}"


def jit_blocker(name: str, csrc: Path | None) -> str | None:
    """Why ``name`` cannot be compiled here (None: it can)."""
    if csrc is None:
        return ("its C++ sources are not in this installation. Fix: `pip install "
                "--force-reinstall --no-deps fused-losses`")
    path = _build.tool_path()
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx, path=path) is None:
        return (f"no C++ compiler ({cxx!r} is not on PATH). Fix: install one (e.g. `apt-get "
                f"install g++`) or set CXX, then `{REBUILD}`")
    if shutil.which("ninja", path=path) is None:
        return f"ninja is not installed. Fix: `pip install ninja`, then `{REBUILD}`"
    if name == "_cuda":
        if os.environ.get("FUSED_LOSSES_CUDA") == "0":
            return "FUSED_LOSSES_CUDA=0"
        if not torch.cuda.is_available() and os.environ.get("FUSED_LOSSES_CUDA") != "1":
            return ("no CUDA device (the CUDA kernels are compiled on first use only where they "
                    "run; FUSED_LOSSES_CUDA=1 compiles them anyway)")
        if _build.find_cuda_home() is None:
            return ("no CUDA toolkit (nvcc) found. Fix: install the toolkit of CUDA "
                    f"{torch.version.cuda} or set CUDA_HOME, then `{REBUILD}`")
    return None


_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)")


def _step_name(command: str) -> str:
    """``[k/n]`` line of ninja -v -> what it compiles or links."""
    words = command.split()
    for flag, verb in (("-c", ""), ("-o", "link ")):
        if flag in words[:-1]:
            return verb + os.path.basename(words[words.index(flag) + 1])
    return words[0] if words else ""


# Child process: loads _build.py by path (not the package: that would import this module) and
# compiles; sys.path[0] (the cwd) is dropped so that nothing there shadows torch.
_CHILD = ("import runpy, sys; sys.path.pop(0); sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


def _compile(name: str, csrc: Path, build_dir: Path, why: str) -> str | None:
    """Compiles ``name`` into ``build_dir`` in a child process; None or the failure."""
    full = f"fused_losses.{name}"
    say(f"compiling {full} ({_WHAT[name]}) for torch {torch.__version__} because {why}; into "
        f"{build_dir}; {_EXPECTED_TIME[name]}, once per torch version (FUSED_LOSSES_JIT=0 "
        "turns this off)")
    log = build_dir / "build.log"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        log.touch()
    except OSError as exc:
        say(f"cannot write {build_dir}: {exc}")
        return (f"its cache folder cannot be written ({exc.__class__.__name__}: {exc}). Fix: "
                "set FUSED_LOSSES_CACHE_DIR to a writable folder")
    env = dict(os.environ, PATH=_build.tool_path())
    if name == "_cuda":
        env["CUDA_HOME"] = _build.find_cuda_home()
    cmd = [sys.executable, "-c", _CHILD, _build.__file__, name, str(csrc), str(build_dir)]
    t0 = time.monotonic()
    with open(log, "w") as fh, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True,
                                                env=env) as proc:
        for line in proc.stdout:
            fh.write(line)
            m = _STEP.match(line)
            if m:
                say(f"  [{m[1]}/{m[2]}] {_step_name(m[3])} ({time.monotonic() - t0:.0f} s)")
        rc = proc.wait()
    seconds = time.monotonic() - t0
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        say(f"compiling {full} FAILED after {seconds:.0f} s (log: {log})")
        return f"compiling it failed (log: {log}). Fix: correct the error there, then `{REBUILD}`"
    say(f"compiled {full} in {seconds:.0f} s")
    return None


def _import_from(build_dir: Path, name: str) -> ModuleType:
    full = f"fused_losses.{name}"
    path = build_dir / (name + (".pyd" if os.name == "nt" else ".so"))
    spec = importlib.util.spec_from_file_location(full, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[full] = module
    setattr(sys.modules["fused_losses"], name, module)
    return module


def _find_or_build(name: str, may_compile: bool = True) -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why not); with ``may_compile=False``, (None, None) where only a
    compile would give the module."""
    full = f"fused_losses.{name}"
    what = f"{full} ({_WHAT[name]}) is not available"
    if name == "_cuda" and torch.version.cuda is None:
        return None, f"{what}: this torch is a CPU build"
    csrc = _build.find_csrc()
    current = _build.fingerprint(torch, csrc)
    spec = importlib.util.find_spec(full)
    if spec is not None and spec.origin:
        stale = _build.mismatch(_build.read_record(Path(spec.origin).parent, name), current)
        if stale is None:
            try:
                return importlib.import_module(full), None
            except Exception as exc:  # a broken file; the record said it matches
                stale = f"importing it failed ({exc.__class__.__name__}: {exc})"
        why = f"the installed {full} cannot be used: {stale}"
    else:
        why = f"this installation has no compiled {full}"
    build_dir = jit_dir(name, current)
    if _build.mismatch(_build.read_record(build_dir, name), current) is not None:
        if not may_compile:
            return None, None
        if os.environ.get("FUSED_LOSSES_JIT", "1") == "0":
            return None, (f"{what}: {why}, and FUSED_LOSSES_JIT=0 forbids compiling it on "
                          f"first use. Fix: unset FUSED_LOSSES_JIT, or `{REBUILD}`")
        blocker = jit_blocker(name, csrc)
        if blocker is not None:
            return None, f"{what}: {why}, and it cannot be compiled here: {blocker}"
        failure = _compile(name, csrc, build_dir, why)
        if failure is not None:
            return None, f"{what}: {why}, and {failure}"
    try:
        return _import_from(build_dir, name), None
    except Exception as exc:
        return None, (f"{what}: importing the build in {build_dir} failed "
                      f"({exc.__class__.__name__}: {exc}). Fix: delete that folder, then "
                      f"`{REBUILD}`")


def preload(name: str) -> ModuleType | None:
    """At import: loads ``name`` if it is already built for this torch (installed, or compiled
    earlier into the cache), so that its torch.ops exist from ``import fused_losses`` on; never
    compiles and says nothing (the first use does both when needed)."""
    if name not in _cache:
        found = _find_or_build(name, may_compile=False)
        if found[0] is not None:
            _cache[name] = found
    return _cache[name][0] if name in _cache else None


def load(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why it is unavailable), computed once per process; compiles
    ``name`` on the first call when needed."""
    hit = _cache.get(name)
    return hit if hit is not None else _load_now(name)


@torch.compiler.disable  # a first call inside torch.compile: run the loader eagerly
def _load_now(name: str) -> tuple[ModuleType | None, str | None]:
    if name not in _cache:
        _cache[name] = _find_or_build(name)
    return _cache[name]


def load_cpu_ext() -> ModuleType | None:
    return load("_C")[0]


def cpu_ext_unavailable_reason() -> str | None:
    return load("_C")[1]


def load_cuda_ext() -> ModuleType | None:
    return load("_cuda")[0]


def cuda_ext_unavailable_reason() -> str | None:
    return load("_cuda")[1]


def fallback_notice(backend: str, op: str, reason: str) -> None:
    """Says once per process, in one line, that ``backend="auto"`` runs the slow reference
    because ``backend`` is unavailable, and why (the reason names the fix)."""
    if backend not in _noticed:
        _notice_now(backend, op, reason)


@torch.compiler.disable
def _notice_now(backend: str, op: str, reason: str) -> None:
    if backend not in _noticed:
        _noticed.add(backend)
        say(f"backend='auto' runs {op} (and every op it would serve) on the slow reference "
            f"implementation: the {backend} backend is unavailable: {reason}")
