"""The CUDA kernels' own code, EXECUTED ON THE CPU through a host emulation (no GPU here).

csrc/cuda/*.cu are compiled with the host compiler and -DFL_HOST_EMULATION
(csrc/cuda/host_emulation.h: one std::thread per CUDA thread, barriers, warp shuffles, cp.async as
memcpy with zero fill, mma.m16n8k16 emulated with the PTX ISA fragment layout) into a shared
library loaded with ctypes.  A kernel class that mirrors csrc/bindings_cuda.cpp then serves as a
temporary fused backend, and the shared backend-parametrized cases of test_losses.py run on it
(small shapes, fp32 and fp16: fp16 goes through the tensor-core tile path).

This checks the tile loop, masks, epilogues, reductions and products of the real kernel source.
Emulation is slow (256 OS threads per CTA, ~1.5 min for this file on 2 cores): a selection of the
shared cases, chosen to reach every kernel and both load paths.
It does not check what only a GPU shows: the memory model, real tensor-core rounding, cp.async
timing, performance (scripts/gpu_check.sh covers those on a GPU).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from fused_losses import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
SOURCES = ["csrc/cuda/contrastive.cu", "csrc/cuda/multi_similarity.cu",
           "csrc/cuda/softmax_matmul.cu"]


def _cuda_include() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    for line in out.splitlines():
        if "INCLUDES=" in line:
            return line.split('INCLUDES="', 1)[1].split('"', 1)[0].strip().removeprefix("-I")
    return None


_CXX = shutil.which(os.environ.get("CXX", "g++"))
_CUDA_INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(
    _CXX is None or _CUDA_INCLUDE is None,
    reason="needs a host C++20 compiler and the CUDA toolkit's headers (nvcc)")


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    cxx, inc = _CXX, _CUDA_INCLUDE
    out = tmp_path_factory.mktemp("cuda_emulation") / "libfl_cuda_emulation.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DFL_HOST_EMULATION",
           "-Icsrc", "-isystem", inc, "-x", "c++", *SOURCES, "-x", "none",
           "csrc/cuda/tests/emulation_api.cpp", "-o", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return ctypes.CDLL(str(out))


def _p(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class EmulatedCudaKernels:
    """The kernel contract over the emulated kernels; the same steps as bindings_cuda.cpp."""

    def __init__(self, lib):
        self.lib = lib
        lib.fl_pass_blocks.restype = ctypes.c_int64

    @staticmethod
    def _f32(t):
        return None if t is None else t.detach().float().contiguous()

    def _mask(self, mask):
        lab = None if mask.labels is None else mask.labels.contiguous()
        klab = None if mask.key_labels is None else mask.key_labels.contiguous()
        return [lab, klab, mask.n_keys, mask.offset, mask.exclude_diagonal, mask.decoupled,
                mask.no_positives]

    def _xy(self, x, y):
        x, y = x.detach().contiguous(), y.detach().contiguous()
        return x, y, _DT[x.dtype], x.shape[0], y.shape[0], x.shape[1]

    def _dt_int(self, dt):  # DType is an int enum: passed as a C int, not int64
        return ctypes.c_int(dt)

    def contrastive_fwd(self, x, y, scale, bias, mask, want_cols):
        x, y, dt, n, m, d = self._xy(x, y)
        sc, b = self._f32(scale).reshape(1), self._f32(bias)
        rows = [torch.empty(n) for _ in range(3)]
        self.lib.fl_contrastive_lse(self._dt_int(dt), *self._conv(
            x, y, n, m, d, sc, b, *self._mask(mask), False, *rows))
        if not want_cols:
            return (*rows, None, None, None)
        cols = [torch.empty(mask.n_keys) for _ in range(3)]
        self.lib.fl_contrastive_lse(self._dt_int(dt), *self._conv(
            x, y, n, m, d, sc, None, *self._mask(mask), True, *cols))
        return (*rows, *cols)

    def contrastive_bwd(self, x, y, scale, bias, mask, row_lse, g_row, g_rowpos, col_lse, g_col,
                        g_colpos):
        x, y, dt, n, m, d = self._xy(x, y)
        sc, b = self._f32(scale).reshape(1), self._f32(bias)
        vecs = [self._f32(t) for t in (row_lse, g_row, g_rowpos, col_lse, g_col, g_colpos)]
        dx, dy = torch.zeros(n, d), torch.zeros(m, d)
        parts = torch.zeros(self.lib.fl_pass_blocks(ctypes.c_int64(n)), dtype=torch.float64)
        dbias = torch.zeros(m) if b is not None else None
        for cols, grad in ((False, dx), (True, dy)):
            self.lib.fl_contrastive_grad(self._dt_int(dt), *self._conv(
                x, y, n, m, d, sc, b, *self._mask(mask), cols, *vecs, grad,
                None if cols else parts, dbias if cols else None))
        return dx, dy, parts.sum().float(), dbias

    def _ms(self, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon):
        return [labels.contiguous(), ref_labels.contiguous(), offset, exclude_self, float(alpha),
                float(beta), float(base), 0.0 if epsilon is None else float(epsilon),
                epsilon is not None]

    def ms_mine(self, x, y, labels, ref_labels, offset, exclude_self):
        x, y, dt, n, m, d = self._xy(x, y)
        lo, hi = torch.empty(n), torch.empty(n)
        self.lib.fl_ms_mine(self._dt_int(dt), *self._conv(
            x, y, n, m, d, labels.contiguous(), ref_labels.contiguous(), offset, exclude_self,
            lo, hi))
        return lo, hi

    def ms_fwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg):
        x, y, dt, n, m, d = self._xy(x, y)
        pl, nl = torch.empty(n), torch.empty(n)
        self.lib.fl_ms_fwd(self._dt_int(dt), *self._conv(
            x, y, n, m, d, *self._ms(labels, ref_labels, offset, exclude_self, alpha, beta, base,
                                     epsilon), self._f32(min_pos), self._f32(max_neg), pl, nl))
        return pl, nl

    def ms_bwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg, pos_lse, neg_lse, g):
        x, y, dt, n, m, d = self._xy(x, y)
        dx, dy = torch.zeros(n, d), torch.zeros(m, d)
        for cols, grad in ((False, dx), (True, dy)):
            self.lib.fl_ms_grad(self._dt_int(dt), *self._conv(
                x, y, n, m, d, *self._ms(labels, ref_labels, offset, exclude_self, alpha, beta,
                                         base, epsilon), self._f32(min_pos), self._f32(max_neg),
                self._f32(pos_lse), self._f32(neg_lse), self._f32(g), cols, grad))
        return dx, dy

    def softmax_matmul_fwd(self, x, y, v, scale, bias):
        from fused_losses.kernels import PairMask

        x, y, dt, n, m, d = self._xy(x, y)
        v = v.detach().to(x.dtype).contiguous()
        lse = self.contrastive_fwd(x, y, scale, bias, PairMask(n_keys=m, no_positives=True),
                                   False)[0]
        out = torch.zeros(n, v.shape[1])
        if v.shape[1] > 0:
            self.lib.fl_smm_out(self._dt_int(dt), *self._conv(
                x, y, v, n, m, d, v.shape[1], self._f32(scale).reshape(1), self._f32(bias), lse,
                out))
        return out, lse

    def softmax_matmul_bwd(self, x, y, v, scale, bias, out, lse, g_out):
        x, y, dt, n, m, d = self._xy(x, y)
        e = v.shape[1]
        g, vf = self._f32(g_out), self._f32(v)
        delta = (g * out.detach().float()).sum(1).contiguous()
        dx, dy, dv = torch.zeros(n, d), torch.zeros(m, d), torch.zeros(m, e)
        parts = torch.zeros(self.lib.fl_pass_blocks(ctypes.c_int64(n)), dtype=torch.float64)
        b = self._f32(bias)
        dbias = torch.zeros(m) if b is not None else None
        for cols, grad in ((False, dx), (True, dy)):
            self.lib.fl_smm_grad(self._dt_int(dt), *self._conv(
                x, y, n, m, d, e, self._f32(scale).reshape(1), b, self._f32(lse), delta, g, vf,
                cols, grad, None if cols else parts, dv if cols else None,
                dbias if cols else None))
        return dx, dy, dv, parts.sum().float(), dbias

    @staticmethod
    def _conv(*args):
        conv = []
        for a in args:
            if isinstance(a, torch.Tensor) or a is None:
                conv.append(_p(a))
            elif isinstance(a, bool):
                conv.append(ctypes.c_int(int(a)))
            elif isinstance(a, int):
                conv.append(ctypes.c_int64(a))
            elif isinstance(a, float):
                conv.append(ctypes.c_double(a))
            else:
                raise TypeError(type(a))
        return conv


@pytest.fixture
def emu_backend(emu_lib):
    """A temporary fused backend over the emulated kernels, in the triton slot (so that the
    shared cases use the interpreter-sized shapes, and fp32/fp16)."""
    from fused_losses.backends.cuda import OPS
    from fused_losses.fused import make_fused_ops

    saved = dict(_dispatch._BACKENDS)
    b = _dispatch.Backend("triton", priority=-1, devices=frozenset({"cpu"}),
                          dtypes=frozenset({torch.float32, torch.float16}))
    b.ops.update(make_fused_ops(EmulatedCudaKernels(emu_lib), OPS))
    try:
        _dispatch._BACKENDS["triton"] = b
        yield "triton"
    finally:
        _dispatch._BACKENDS.clear()
        _dispatch._BACKENDS.update(saved)


@pytest.mark.parametrize("variant", [1, 5, 8])
def test_emulated_info_nce(emu_backend, variant):
    import test_losses as T

    T.test_info_nce(emu_backend, CPU, variant, "none")


def test_emulated_multi_similarity(emu_backend):  # with mining (epsilon=None: a subset)
    import test_losses as T

    T.test_multi_similarity(emu_backend, CPU, 0.1)


def test_emulated_mining_threshold(emu_backend):
    import test_losses as T

    T.test_multi_similarity_pairs_planted_at_the_mining_threshold(emu_backend, CPU, True)


def test_emulated_primitives(emu_backend):
    import test_losses as T

    T.test_pairwise_logsumexp(emu_backend, CPU, True, 1)  # row pass with a bias-free mask
    T.test_pairwise_softmax_matmul(emu_backend, CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_emulated_several_tiles(emu_backend, dtype):
    """Shapes past one 64×64 tile in both directions (the shared cases stay within one): row
    and column passes streaming over several tiles with a partial last one, two feature chunks
    (double buffering) on 16-byte aligned rows (the cp.async path), a value width past one
    64-wide product chunk."""
    import test_losses as T
    from helpers import randn, seeded

    import fused_losses as FL

    gen = seeded()
    x = randn(70, 40, gen=gen, requires_grad=True)
    y = randn(130, 40, gen=gen, requires_grad=True)
    labels = torch.randint(0, 5, (70,), generator=gen)
    key_labels = torch.randint(0, 5, (100,), generator=gen)
    what = f"several tiles {dtype} seed={gen.initial_seed()}"
    T.check_against_reference(
        emu_backend, CPU, dtype,
        lambda be, a, b: FL.info_nce(a, b[:100], labels=labels, key_labels=key_labels,
                                     extra_negatives=b[100:], symmetric=True, reduction="mean",
                                     backend=be),
        [x, y], "info_nce " + what)
    ref_labels = torch.randint(0, 5, (130,), generator=gen)
    T.check_against_reference(
        emu_backend, CPU, dtype,
        lambda be, a, b: FL.multi_similarity(a, labels, ref_embeddings=b, ref_labels=ref_labels,
                                             reduction="none", backend=be),
        [x, y], "multi_similarity " + what)
    v = randn(130, 70, gen=gen, requires_grad=True)
    bias = randn(130, gen=gen, requires_grad=True)
    T.check_against_reference(
        emu_backend, CPU, dtype,
        lambda be, a, b, c, bb: FL.pairwise_softmax_matmul(a, b, c, scale=3.0, bias=bb,
                                                           backend=be),
        [x, y, v, bias], "softmax_matmul " + what,
        alternatives=[lambda a, b, c, bb: T._FlashSoftmaxMatmul.apply(a, b, c, bb, 3.0)])
