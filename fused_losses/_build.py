"""How the compiled extensions are built: sources, compiler flags, CUDA toolkit, build record.

The one place that defines them, used by ``setup.py`` (ahead of time, when torch is importable at
build time) and by ``fused_losses/_ext.py`` (just in time, on first use, when the installed
extension is missing or was built for another torch).  Torch is imported only inside functions
and nothing of ``fused_losses`` is imported: ``setup.py`` loads this file by path, in a build
environment that may have no torch at all.

Extensions:

- ``fused_losses._C``: C++ CPU kernels (csrc/bindings_cpu.cpp, csrc/cpu_ops.cpp,
  csrc/cpu/kernels_{generic,avx2,avx512}.cpp: the same tile code per ISA, picked at load time).
- ``fused_losses._cuda``: CUDA kernels (csrc/cuda/*.cu, csrc/bindings_cuda.cpp), built only with
  a CUDA build of torch and a CUDA toolkit.

The build record (``<name>.build.json`` next to the compiled module, or in its JIT cache folder)
says which torch, Python and sources it was built from; a module whose record does not match the
running torch is never imported (an extension built against another torch can fail to import
with an undefined symbol, or import and crash).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# Sources shipped inside the installed package (a wheel/sdist install), copied there by
# setup.py's build_py; in a source checkout (editable install) they are ../csrc.
SHIPPED_CSRC = "_csrc"
SOURCE_SUFFIXES = (".h", ".inc", ".cpp", ".cu", ".cuh")
EXTENSIONS = ("_C", "_cuda")
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
# The fields of a build record that must equal the running interpreter's for the module to load.
ABI_FIELDS = ("torch", "torch_git", "torch_cuda", "cxx11_abi", "python", "sources")


def find_csrc(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The C++/CUDA sources: shipped in the package, else the checkout's csrc/."""
    shipped = package_dir / SHIPPED_CSRC
    if (shipped / "bindings_cpu.cpp").is_file():
        return shipped
    checkout = package_dir.parent / "csrc"
    if (checkout / "bindings_cpu.cpp").is_file() and (package_dir.parent / "setup.py").is_file():
        return checkout
    return None


def source_files(csrc: Path) -> list[Path]:
    """Every file the extension builds read (the standalone C++ tests under tests/ excluded)."""
    return sorted(p for p in csrc.rglob("*")
                  if p.suffix in SOURCE_SUFFIXES and p.is_file()
                  and "tests" not in p.relative_to(csrc).parts)


def sources_hash(csrc: Path) -> str:
    h = hashlib.sha256()
    for p in source_files(csrc):
        h.update(p.relative_to(csrc).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def extension_sources(name: str, csrc: Path) -> list[Path]:
    if name == "_C":
        return [csrc / "bindings_cpu.cpp", csrc / "cpu_ops.cpp",
                *sorted((csrc / "cpu").glob("*.cpp"))]
    if name == "_cuda":
        return [*sorted((csrc / "cuda").glob("*.cu")), csrc / "bindings_cuda.cpp"]
    raise ValueError(f"unknown extension {name!r}; expected one of {EXTENSIONS}")


# ---- C++ standard: what the torch headers require ------------------------------------------

_CPLUSPLUS_GUARD = re.compile(r"__cplusplus\s*<\s*(\d{6})L")
_STANDARDS = {201703: "c++17", 202002: "c++20", 202302: "c++23"}


def required_cxx_std(header_texts) -> str:
    """The C++ standard torch's public headers insist on (their ``#if __cplusplus < N`` /
    ``#error ... compiler is required`` guard): c++17 up to torch 2.13, c++20 from 2.14.
    The oldest standard that passes every guard; c++17 when no header has one."""
    need = max((int(v) for text in header_texts for v in _CPLUSPLUS_GUARD.findall(text)),
               default=201703)
    for value, std in sorted(_STANDARDS.items()):
        if value >= need:
            return std
    raise RuntimeError(f"torch requires __cplusplus >= {need}L, newer than {max(_STANDARDS)}")


def torch_cxx_std(torch) -> str:
    include = Path(torch.__file__).parent / "include"
    headers = [include / "torch/csrc/api/include/torch/all.h", include / "ATen/ATen.h"]
    return required_cxx_std(h.read_text(errors="replace") for h in headers if h.is_file())


# ---- flags -----------------------------------------------------------------------------------

def compile_args(name: str, torch) -> dict[str, list[str]]:
    """cxx / nvcc / ld flags of an extension, for the torch being built against."""
    std = "-std=" + torch_cxx_std(torch)
    # -g0: setuptools passes Python's own CFLAGS, which carry -g; debug information for torch's
    # headers nearly doubles the compile (bindings_cpu.cpp: 44 -> 24 s CPU, a 16 MB -> 0.3 MB
    # object, gcc 12, torch 2.13).
    if name == "_C":
        # Same math flags torch itself is built with; no -march: portable builds (the tile code
        # has its own AVX2 and AVX-512 builds, see csrc/cpu/simd.h).
        cxx = ["-O3", std, "-g0", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]
        ld = []
        if torch.backends.openmp.is_available():
            cxx.append("-fopenmp")
            ld.append("-fopenmp")
        return {"cxx": cxx, "nvcc": [], "ld": ld}
    if name == "_cuda":
        # No --use_fast_math: fp32 results must meet the reference to 1e-5 (SPEC §7); expf/logf
        # stay the accurate ones.  Same flags as scripts/check_cuda_compile.sh (register report).
        return {"cxx": ["-O3", std, "-g0"], "nvcc": ["-O3", std, "-lineinfo"], "ld": []}
    raise ValueError(f"unknown extension {name!r}; expected one of {EXTENSIONS}")


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for the CUDA extension (the user's, else sm_80 + sm_90a)."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS


# ---- tools -----------------------------------------------------------------------------------

def _is_cuda_home(path) -> bool:
    return bool(path) and (Path(path) / "include" / "cuda_runtime_api.h").is_file() \
        and (Path(path) / "bin" / "nvcc").is_file()


def find_cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH when valid, else where the ``nvcc`` on PATH
    really lives (nvcc -dryrun's TOP, which sees through wrapper scripts such as
    /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc), else /usr/local/cuda.  torch's own
    guess (dirname of dirname of ``which nvcc``) is /usr/local for such a wrapper."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_cuda_home(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        guess = Path(os.path.realpath(nvcc)).parent.parent
        if _is_cuda_home(guess):
            return str(guess)
        try:
            proc = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o",
                                   os.devnull], capture_output=True, text=True, timeout=60)
            out = proc.stdout + proc.stderr
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r"^#\$ TOP=(.+)$", out, re.M)  # TOP=<toolkit>/bin/..
        if m and _is_cuda_home(Path(m.group(1).strip()).resolve()):
            return str(Path(m.group(1).strip()).resolve())
    return "/usr/local/cuda" if _is_cuda_home("/usr/local/cuda") else None


def tool_path() -> str:
    """PATH with the running interpreter's scripts folder and the ``ninja`` wheel's binary in
    front: a venv used without activation still finds the ninja that pip installed."""
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI wheel; a dependency of fused-losses

        extra.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    parts = extra + os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(dict.fromkeys(p for p in parts if p))


# ---- build records ---------------------------------------------------------------------------

def fingerprint(torch, csrc: Path | None) -> dict:
    """What a compiled module must have been built with to be loadable here."""
    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": sys.implementation.cache_tag,
        "sources": sources_hash(csrc) if csrc is not None else None,
    }


def record_path(module_dir, name: str) -> Path:
    return Path(module_dir) / f"{name}.build.json"


def write_record(module_dir, name: str, torch, csrc: Path, built_by: str,
                 seconds: float) -> dict:
    rec = {"extension": f"fused_losses.{name}", **fingerprint(torch, csrc),
           "cxx_std": torch_cxx_std(torch), "flags": compile_args(name, torch),
           "built_by": built_by, "seconds": round(seconds, 1)}
    if name == "_cuda":
        rec["cuda_archs"] = cuda_arch_list()
    path = record_path(module_dir, name)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: a record exists only for a finished build
    return rec


def read_record(module_dir, name: str) -> dict | None:
    try:
        return json.loads(record_path(module_dir, name).read_text())
    except (OSError, ValueError):
        return None


def mismatch(record: dict | None, current: dict) -> str | None:
    """Why a module with this build record must not be loaded here (None: it may)."""
    if record is None:
        return "it has no build record (built by an older fused-losses or by hand)"
    if record.get("torch") != current["torch"] or record.get("torch_git") != current["torch_git"]:
        return f"it was built for torch {record.get('torch')} and this is torch {current['torch']}"
    for key in ABI_FIELDS:
        if key == "sources" and current["sources"] is None:
            continue  # sources not shipped: nothing to compare against
        if record.get(key) != current[key]:
            what = "its C++/CUDA sources changed" if key == "sources" else \
                f"it was built with {key}={record.get(key)} and this is {current[key]}"
            return what + " since it was built"
    return None


# ---- just-in-time build (runs in a child process started by fused_losses/_ext.py) -----------

def jit_build(name: str, csrc: Path, build_dir: Path) -> None:
    """Build ``name`` from ``csrc`` into ``build_dir`` with torch.utils.cpp_extension.load and
    ninja (verbose: ninja's progress goes to stdout, filtered by the parent), import it once to
    prove it loads, then write its build record."""
    t0 = time.monotonic()
    import torch
    from torch.utils.cpp_extension import load

    args = compile_args(name, torch)
    if name == "_cuda":
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name=name, sources=[str(s) for s in extension_sources(name, csrc)],
         extra_cflags=args["cxx"], extra_cuda_cflags=args["nvcc"] or None,
         extra_ldflags=args["ld"], extra_include_paths=[str(csrc)],
         build_directory=str(build_dir), verbose=True, with_cuda=name == "_cuda")
    write_record(build_dir, name, torch, csrc, "jit", time.monotonic() - t0)


if __name__ == "__main__":  # _build.py NAME CSRC BUILD_DIR: the child of fused_losses/_ext.py
    jit_build(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
