"""Build of fused-losses.

Sources, flags and build records of the compiled extensions are defined once, in
fused_losses/_build.py (loaded here by path: this file must run in a build environment without
torch); fused_losses/_ext.py uses the same definitions to build them just in time.

- torch importable at build time (``pip install --no-build-isolation .``, ``pip install -e .
  --no-build-isolation``, ``make test``): ``fused_losses._C`` (C++ CPU kernels; skip with
  FUSED_LOSSES_CPU_EXT=0) and, with a CUDA build of torch and a CUDA toolkit,
  ``fused_losses._cuda`` (FUSED_LOSSES_CUDA=0/1 to skip/force; TORCH_CUDA_ARCH_LIST honoured,
  default "8.0;9.0a") are compiled now, against that torch, each with a build record.
- no torch at build time (pip's default isolated build, ``python -m build``): nothing is
  compiled; the wheel is pure Python and carries the C++/CUDA sources (fused_losses/_csrc),
  which fused_losses/_ext.py compiles on first use against the torch that runs them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("_fused_losses_build",
                                                  ROOT / "fused_losses" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _load_build_module()


class BuildPy(build_py):
    """Also ships the C++/CUDA sources inside the package, for a build on first use."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's csrc/
        dest = Path(self.build_lib) / "fused_losses" / B.SHIPPED_CSRC
        for src in B.source_files(CSRC):
            target = dest / src.relative_to(CSRC)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _rel(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def extensions():
    try:
        import torch
    except ImportError:
        print("fused-losses: torch is not importable at build time (an isolated build): no "
              "extension is compiled now; the C++ sources are shipped in the package and "
              "compiled on first use, against the torch that runs them")
        return [], {"build_py": BuildPy}
    os.environ["PATH"] = B.tool_path()  # the ninja wheel, also in a venv used without activation
    cuda_home = B.find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_home:  # read once at import by torch, which may have happened before us
        cpp_extension.CUDA_HOME = cuda_home

    class BuildExt(BuildExtension):
        """Writes a build record next to each compiled module; never keeps a module that was
        compiled for another torch (setuptools would skip it as up to date)."""

        def build_extension(self, ext):
            name = ext.name.rsplit(".", 1)[1]
            out_dir = Path(self.get_ext_fullpath(ext.name)).parent
            if B.mismatch(B.read_record(out_dir, name), B.fingerprint(torch, CSRC)):
                self.force = True
            t0 = time.monotonic()
            super().build_extension(ext)
            B.write_record(out_dir, name, torch, CSRC, "setup.py", time.monotonic() - t0)

        def copy_extensions_to_source(self):  # in-place (editable) builds: records too
            super().copy_extensions_to_source()
            package_dir = self.get_finalized_command("build_py").get_package_dir("fused_losses")
            for ext in self.extensions:
                name = ext.name.rsplit(".", 1)[1]
                shutil.copy2(B.record_path(Path(self.build_lib) / "fused_losses", name),
                             B.record_path(package_dir, name))

    exts = []
    if os.environ.get("FUSED_LOSSES_CPU_EXT", "1") != "0":
        args = B.compile_args("_C", torch)
        exts.append(CppExtension("fused_losses._C", _rel(B.extension_sources("_C", CSRC)),
                                 include_dirs=[str(CSRC)], extra_compile_args={"cxx": args["cxx"]},
                                 extra_link_args=args["ld"]))
    want_cuda = os.environ.get("FUSED_LOSSES_CUDA")
    has_cuda = torch.version.cuda is not None and cuda_home is not None
    if want_cuda == "1" or (want_cuda is None and has_cuda):
        os.environ["TORCH_CUDA_ARCH_LIST"] = B.cuda_arch_list()
        args = B.compile_args("_cuda", torch)
        exts.append(CUDAExtension("fused_losses._cuda", _rel(B.extension_sources("_cuda", CSRC)),
                                  include_dirs=[str(CSRC)],
                                  extra_compile_args={"cxx": args["cxx"], "nvcc": args["nvcc"]}))
    return exts, {"build_py": BuildPy, "build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["fused_losses", "fused_losses.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
