"""How the compiled extensions are found, checked against the running torch, and rebuilt.

The logic of fused_losses/_ext.py and fused_losses/_build.py, exercised in this venv: the C++
standard chosen from torch's headers, build records and what makes one unusable, the decision to
compile just in time (the compile itself is stubbed here; CI's packaging steps run real ones),
FUSED_LOSSES_JIT=0's one-line notice under backend="auto", the reasons that name their fix, and
the CUDA toolkit found behind a wrapper script.  With a CUDA build of torch and a CUDA toolkit
(make test-cu), the CUDA extension must have been built and must register its ops.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import TOL, assert_rel, seeded

import fused_losses as FL
from fused_losses import _build, _dispatch, _ext

TORCH_213 = "#if !defined(_MSC_VER) && __cplusplus < 201703L\n#error C++17 or later compatible " \
            "compiler is required to use PyTorch.\n#endif\n"
TORCH_214 = "#if !defined(_MSC_VER) && __cplusplus < 202002L\n#error C++20 or later compatible " \
            "compiler is required to use PyTorch.\n#endif\n"


def _torch_minor() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# ---- C++ standard and flags --------------------------------------------------------------------

def test_cxx_std_is_what_torch_headers_require():
    assert _build.required_cxx_std([TORCH_213]) == "c++17"
    assert _build.required_cxx_std([TORCH_214]) == "c++20"
    assert _build.required_cxx_std([TORCH_213, TORCH_214]) == "c++20"  # every guard must pass
    assert _build.required_cxx_std(["#pragma once\n"]) == "c++17"  # no guard: C++17 (torch 2.x)
    with pytest.raises(RuntimeError, match="newer than"):
        _build.required_cxx_std(["#if __cplusplus < 202612L\n#error\n#endif"])


def test_flags_follow_the_installed_torch():
    """torch 2.13's headers accept C++17, 2.14's require C++20 (its `#error C++20 or later
    compatible compiler is required`); the flags of both extensions follow."""
    want = "c++17" if _torch_minor() < (2, 14) else "c++20"
    assert _build.torch_cxx_std(torch) == want
    c_args = _build.compile_args("_C", torch)
    cuda_args = _build.compile_args("_cuda", torch)
    assert f"-std={want}" in c_args["cxx"]
    assert f"-std={want}" in cuda_args["cxx"] and f"-std={want}" in cuda_args["nvcc"]
    assert ("-fopenmp" in c_args["cxx"]) == torch.backends.openmp.is_available()
    assert "--use_fast_math" not in cuda_args["nvcc"]  # SPEC §7 fp32 accuracy


def test_loaded_extension_was_built_for_this_torch():
    """The _C this process runs (installed or compiled on first use) has a build record that
    matches the running torch, Python and sources, and was compiled with the chosen standard."""
    module = _ext.load_cpu_ext()
    assert module is not None, _ext.cpu_ext_unavailable_reason()
    record = _build.read_record(Path(module.__file__).parent, "_C")
    assert record is not None, f"no build record beside {module.__file__}"
    current = _build.fingerprint(torch, _build.find_csrc())
    assert _build.mismatch(record, current) is None, (record, current)
    assert record["cxx_std"] == _build.torch_cxx_std(torch)
    assert f"-std={record['cxx_std']}" in record["flags"]["cxx"]


def test_shipped_sources_are_every_build_input():
    """What a wheel carries for a build on first use: every header, .inc, .cpp, .cu and .cuh the
    two extensions compile or include (the standalone C++ tests excluded)."""
    csrc = _build.find_csrc()
    assert csrc is not None
    shipped = {p.relative_to(csrc).as_posix() for p in _build.source_files(csrc)}
    for name in _build.EXTENSIONS:
        for src in _build.extension_sources(name, csrc):
            assert src.relative_to(csrc).as_posix() in shipped
    for sub, suffixes in (("cpu", (".h", ".inc", ".cpp")), ("cuda", (".h", ".cuh", ".cu"))):
        for suffix in suffixes:
            assert any(s.startswith(f"{sub}/") and s.endswith(suffix) for s in shipped), suffix
    assert not any("tests/" in s for s in shipped)


# ---- build records ---------------------------------------------------------------------------

def _current():
    return _build.fingerprint(torch, _build.find_csrc())


def test_mismatch_names_what_differs():
    cur = _current()
    assert _build.mismatch(dict(cur), cur) is None
    assert "no build record" in _build.mismatch(None, cur)
    other = dict(cur, torch="2.99.0+cu999")
    assert f"built for torch 2.99.0+cu999 and this is torch {torch.__version__}" in \
        _build.mismatch(other, cur)
    assert "torch" in _build.mismatch(dict(cur, torch_git="0" * 40), cur)
    assert "sources changed" in _build.mismatch(dict(cur, sources="0" * 16), cur)
    assert "cxx11_abi" in _build.mismatch(dict(cur, cxx11_abi=not cur["cxx11_abi"]), cur)
    assert "python" in _build.mismatch(dict(cur, python="cpython-299"), cur)
    # Without shipped sources there is nothing to compare them with; the rest still counts.
    no_src = dict(cur, sources=None)
    assert _build.mismatch(dict(cur, sources="x"), no_src) is None
    assert _build.mismatch(dict(cur, torch="1.0"), no_src) is not None


def test_write_then_read_record(tmp_path):
    rec = _build.write_record(tmp_path, "_C", torch, _build.find_csrc(), "test", 1.25)
    assert _build.read_record(tmp_path, "_C") == json.loads(
        (tmp_path / "_C.build.json").read_text()) == rec
    assert _build.mismatch(rec, _current()) is None
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    (tmp_path / "_C.build.json").write_text("{not json")
    assert _build.read_record(tmp_path, "_C") is None


# ---- the loader's decisions (compile stubbed) --------------------------------------------------

@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader with nothing loaded yet and an empty JIT cache; the process's real _C stays
    registered (torch.ops cannot unload it)."""
    monkeypatch.setattr(_ext, "_cache", {})
    monkeypatch.setattr(_ext, "_noticed", set())
    monkeypatch.setenv("FUSED_LOSSES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSED_LOSSES_JIT", raising=False)
    return tmp_path


def _installed_module_built_for(monkeypatch, tmp_path, torch_version):
    """Makes fused_losses._C look installed in tmp_path with a record for another torch; fails
    the test if anything tries to import it."""
    installed = tmp_path / "site" / "fused_losses"
    installed.mkdir(parents=True)
    so = installed / "_C.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"")
    (installed / "_C.build.json").write_text(json.dumps(dict(_current(), torch=torch_version)))
    spec = importlib.machinery.ModuleSpec("fused_losses._C", None, origin=str(so))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: spec if n == "fused_losses._C" else real_find_spec(n, *a))

    def no_import(name, *a):
        raise AssertionError(f"imported {name}, a module built for another torch")

    monkeypatch.setattr(importlib, "import_module", no_import)


def test_module_for_another_torch_is_rebuilt_not_imported(fresh_loader, monkeypatch):
    _installed_module_built_for(monkeypatch, fresh_loader, "2.99.0")
    compiled, imported = [], []

    def fake_compile(name, csrc, build_dir, why):
        compiled.append((name, build_dir, why))
        build_dir.mkdir(parents=True)
        _build.write_record(build_dir, name, torch, csrc, "jit", 0.0)

    monkeypatch.setattr(_ext, "_compile", fake_compile)
    monkeypatch.setattr(_ext, "_import_from", lambda d, n: imported.append(d) or "module")
    assert _ext.load("_C") == ("module", None)
    [(name, build_dir, why)] = compiled
    assert name == "_C" and f"built for torch 2.99.0 and this is torch {torch.__version__}" in why
    assert build_dir.parent == fresh_loader / "cache" and torch.__version__ in build_dir.name
    assert imported == [build_dir]
    # A second process finds the finished build in the cache: no compile.
    monkeypatch.setattr(_ext, "_cache", {})
    assert _ext.load("_C") == ("module", None)
    assert len(compiled) == 1 and imported == [build_dir, build_dir]


def test_failed_compile_is_a_reason_with_its_log(fresh_loader, monkeypatch):
    _installed_module_built_for(monkeypatch, fresh_loader, "2.99.0")
    monkeypatch.setattr(_ext, "_compile", lambda *a: "compiling it failed (log: /x/build.log). "
                                                     "Fix: correct the error there")
    module, why = _ext.load("_C")
    assert module is None
    assert "built for torch 2.99.0" in why and "/x/build.log" in why and "Fix:" in why


def test_jit_off_gives_one_line_notice_and_reason(fresh_loader, monkeypatch, capsys):
    """FUSED_LOSSES_JIT=0 with no usable _C: the cpu backend is unavailable with a reason naming
    the fix; the first backend="auto" call on CPU tensors says once, in one line, that it runs
    the slow reference (and still returns the right value); backend="cpu" raises that reason."""
    _installed_module_built_for(monkeypatch, fresh_loader, "2.99.0")
    monkeypatch.setenv("FUSED_LOSSES_JIT", "0")
    monkeypatch.setattr(_ext, "_compile", lambda *a: pytest.fail("compiled despite JIT=0"))
    why = _dispatch.get_backend("cpu").availability()
    assert why is not None and "FUSED_LOSSES_JIT=0" in why and "built for torch 2.99.0" in why
    assert f"`{_ext.REBUILD}`" in why
    assert "cpu" not in FL.available_backends()
    gen = seeded()
    x, y = torch.randn(9, 5, generator=gen), torch.randn(9, 5, generator=gen)
    capsys.readouterr()
    out = FL.clip_loss(x, y, 10.0)
    out2 = FL.info_nce(x, y, temperature=0.1)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fused-losses: backend='auto'") and "reference" in lines[0]
    assert why in lines[0]
    ref = FL.clip_loss(x.double(), y.double(), 10.0, backend="reference")
    assert_rel(out, ref, TOL[torch.float32], "clip_loss under auto without the cpu backend")
    assert torch.isfinite(out2)
    with pytest.raises(RuntimeError, match="FUSED_LOSSES_JIT=0"):
        FL.clip_loss(x, y, 10.0, backend="cpu")
    assert capsys.readouterr().err == ""  # said once


def test_unwritable_cache_is_a_reason_with_the_fix(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder's parent should be
    why = _ext._compile("_C", _build.find_csrc(), blocked / "cache" / "_C-x", "a test")
    assert "cannot be written" in why and "FUSED_LOSSES_CACHE_DIR" in why
    assert "cannot write" in capsys.readouterr().err


def test_no_compiler_is_a_reason_with_the_fix(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    why = _ext.jit_blocker("_C", _build.find_csrc())
    assert "no C++ compiler" in why and "no-such-compiler-xyz" in why and "apt-get" in why
    monkeypatch.delenv("CXX")
    assert _ext.jit_blocker("_C", _build.find_csrc()) is None  # g++ and ninja are here
    assert "not in this installation" in _ext.jit_blocker("_C", None)


def test_cuda_is_compiled_on_first_use_only_where_it_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("FUSED_LOSSES_CUDA", raising=False)
    assert "no CUDA device" in _ext.jit_blocker("_cuda", _build.find_csrc())
    if torch.version.cuda is not None and _build.find_cuda_home() is not None:
        monkeypatch.setenv("FUSED_LOSSES_CUDA", "1")  # forced (an image built without a GPU)
        assert _ext.jit_blocker("_cuda", _build.find_csrc()) is None
    monkeypatch.setenv("FUSED_LOSSES_CUDA", "0")
    assert _ext.jit_blocker("_cuda", _build.find_csrc()) == "FUSED_LOSSES_CUDA=0"


def test_progress_names_each_ninja_step():
    assert _ext._step_name("c++ -MMD -MF cpu_ops.o.d -DTORCH_EXTENSION_NAME=_C -O3 -c "
                           "/src/csrc/cpu_ops.cpp -o cpu_ops.o") == "cpu_ops.cpp"
    assert _ext._step_name("/usr/local/cuda-13.0/bin/nvcc --generate-dependencies-with-compile "
                           "-O3 -c /src/csrc/cuda/contrastive.cu -o contrastive.cuda.o") \
        == "contrastive.cu"
    assert _ext._step_name("c++ a.o b.o -shared -fopenmp -o _C.so") == "link _C.so"


# ---- CUDA toolkit ------------------------------------------------------------------------------

def _exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_cuda_home_found_behind_a_wrapper_script(tmp_path, monkeypatch):
    """nvcc on PATH is a wrapper script elsewhere (as /usr/local/bin/nvcc here): torch's guess
    (its dirname's dirname) has no CUDA headers; nvcc -dryrun's TOP names the real toolkit."""
    home = tmp_path / "cuda-13.9"
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda_runtime_api.h").write_text("")
    _exe(home / "bin" / "nvcc", f"#!/bin/sh\necho '#$ TOP={home}/bin/..' >&2\n")
    _exe(tmp_path / "wrap" / "bin" / "nvcc", f"#!/bin/sh\nexec {home}/bin/nvcc \"$@\"\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrap' / 'bin'}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "not-a-toolkit"))  # invalid: ignored
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert _build.find_cuda_home() == str(home)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert _build.find_cuda_home() == str(home)


HAS_CUDA_BUILD = torch.version.cuda is not None and _build.find_cuda_home() is not None
CUDA_OPS = ("contrastive_fwd", "contrastive_bwd", "ms_mine", "ms_fwd", "ms_bwd",
            "softmax_matmul_fwd", "softmax_matmul_bwd")


@pytest.mark.skipif(not HAS_CUDA_BUILD,
                    reason=f"torch {torch.__version__} is a CPU build or no CUDA toolkit is here")
def test_cuda_extension_built_and_registers_its_ops():
    """With a CUDA torch and a toolkit (make test-cu), the install compiled fused_losses._cuda
    against this torch; importing it (no GPU needed) registers torch.ops.fused_losses_cuda.*."""
    module = _ext.load_cuda_ext()
    assert module is not None, _ext.cuda_ext_unavailable_reason()
    assert module.build_info()["torch_version"] == torch.__version__.split("+")[0]
    record = _build.read_record(Path(module.__file__).parent, "_cuda")
    assert _build.mismatch(record, _current()) is None
    assert record["cxx_std"] == _build.torch_cxx_std(torch)
    missing = [op for op in CUDA_OPS if not hasattr(torch.ops.fused_losses_cuda, op)]
    assert not missing, missing
    why = _dispatch.get_backend("cuda").availability()
    assert (why is None) == torch.cuda.is_available(), why
