"""The ``cuda`` backend: registration, its unavailability reason on a machine without the
extension or a GPU, and ``backend="auto"`` never picking it while no GPU run has measured it
faster (the speed table in fused_losses/backends/cuda.py is empty).

With the extension and a GPU, the backend-parametrized suite (test_losses.py etc.) runs it like
any other backend; the ``test_cuda_small_*`` cases below are a quick smoke selection, sized for
compute-sanitizer (scripts/gpu_check.sh).  Without a GPU they are SKIPPED (not passed): the CUDA
kernels are then only compiled (make cuda-check), never executed.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel, seeded

import fused_losses as FL
from fused_losses import _dispatch
from fused_losses.backends import cuda as cuda_backend

CUDA_WHY = _dispatch.get_backend("cuda").availability()
needs_cuda = pytest.mark.skipif(CUDA_WHY is not None, reason=f"cuda backend: {CUDA_WHY}")


def test_cuda_backend_is_registered_and_explains_itself():
    b = _dispatch.get_backend("cuda")
    assert set(cuda_backend.OPS) == set(b.ops)
    assert b.devices == frozenset({"cuda"})
    assert torch.float64 not in b.dtypes
    if not torch.cuda.is_available() or CUDA_WHY is not None:
        assert isinstance(CUDA_WHY, str)
        assert "fused_losses._cuda" in CUDA_WHY or "no CUDA device" in CUDA_WHY, CUDA_WHY
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run 'info_nce'"):
            FL.info_nce(torch.randn(3, 2), torch.randn(3, 2), backend="cuda")


def test_speed_table_is_empty_until_measured():
    """Nothing of the cuda backend has run on a GPU yet: no entry may claim it is faster."""
    assert cuda_backend.MEASURED_FASTER == {}
    x = torch.randn(4, 3)
    b = _dispatch.get_backend("cuda")
    for op in cuda_backend.OPS:
        assert b.priority_for(op, [x]) < _dispatch.get_backend("reference").priority
        assert b.priority_for(op, [x]) < _dispatch.get_backend("triton").priority


@pytest.fixture
def only_reference_and_cuda():
    """A registry of the reference and the real cuda backend object, made available and serving
    CPU tensors (so that the choice of auto can be observed on this machine), with its kernels
    replaced by markers."""
    saved = dict(_dispatch._BACKENDS)
    cuda = _dispatch.get_backend("cuda")
    saved_fields = (cuda.availability, cuda.devices, dict(cuda.ops))
    marker = {op: (lambda *a, _op=op, **k: ("cuda", _op)) for op in cuda.ops}
    try:
        _dispatch._BACKENDS.clear()
        _dispatch._BACKENDS.update(reference=saved["reference"], cuda=cuda)
        cuda.availability = lambda: None
        cuda.devices = frozenset({"cpu", "cuda"})
        cuda.ops.clear()
        cuda.ops.update(marker)
        yield marker
    finally:
        cuda.availability, cuda.devices = saved_fields[0], saved_fields[1]
        cuda.ops.clear()
        cuda.ops.update(saved_fields[2])
        _dispatch._BACKENDS.clear()
        _dispatch._BACKENDS.update(saved)


def test_auto_never_picks_cuda_while_unmeasured(only_reference_and_cuda):
    x = torch.randn(5, 3)
    for op in cuda_backend.OPS:
        impl = _dispatch.resolve(op, "auto", [x])
        assert impl is not only_reference_and_cuda[op], op
        assert impl is _dispatch.get_backend("reference").ops[op]
        # an explicit request still runs it
        assert _dispatch.resolve(op, "cuda", [x]) is only_reference_and_cuda[op]


def test_a_measured_entry_makes_auto_pick_cuda_for_that_op_and_family(
        only_reference_and_cuda, monkeypatch):
    monkeypatch.setattr(cuda_backend, "gpu_family", lambda tensors: "sm_90")
    monkeypatch.setitem(cuda_backend.MEASURED_FASTER, ("sm_90", "info_nce"), "cuda")
    monkeypatch.setitem(cuda_backend.MEASURED_FASTER, ("sm_80", "multi_similarity"), "cuda")
    x = torch.randn(5, 3)
    assert _dispatch.resolve("info_nce", "auto", [x]) is only_reference_and_cuda["info_nce"]
    # another family's entry, or another op, does not count
    assert _dispatch.resolve("multi_similarity", "auto", [x]) is not \
        only_reference_and_cuda["multi_similarity"]
    assert _dispatch.resolve("pairwise_logsumexp", "auto", [x]) is not \
        only_reference_and_cuda["pairwise_logsumexp"]


def test_gpu_family_needs_a_cuda_tensor():
    assert cuda_backend.gpu_family([torch.randn(2, 2)]) is None


# ---- GPU only: small smoke cases (also what compute-sanitizer runs), fp32 and bf16.

# (N, M, D): one partial tile with a feature tail whose rows are not 16-byte aligned (the
# synchronous load path), and several tiles with 16-byte aligned rows (the cp.async path).
SMALL = [(37, 45, 19), (70, 75, 64)]


def _inputs(dtype, shape):
    n, m, d = shape
    gen = seeded()
    x = torch.randn(n, d, generator=gen).to("cuda", dtype).requires_grad_()
    y = torch.randn(m, d, generator=gen).to("cuda", dtype).requires_grad_()
    return x, y


SMALL_CASES = pytest.mark.parametrize(
    "dtype,shape", [(dt, sh) for dt in (torch.float32, torch.bfloat16) for sh in SMALL])


def _compare(fn, tensors, dtype):
    out = fn("cuda", *tensors)
    ref64 = [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in tensors]
    ref = fn("reference", *ref64)
    # smoke bounds (the SPEC §7 bounds are test_losses.py's, run for cuda by the suite): fp32
    # exact to 1e-5; bf16 against the fp64 oracle of the rounded inputs, normalization included
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert_rel(out, ref, tol, "value")
    g = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, [t for t in tensors if t.requires_grad],
                                g.to(out.device, out.dtype), allow_unused=True)
    grads64 = torch.autograd.grad(ref, [t for t in ref64 if t.requires_grad], g,
                                  allow_unused=True)
    for k, (a, b) in enumerate(zip(grads, grads64)):
        if b is not None:
            assert_rel(a, b, tol, f"grad {k}")


@needs_cuda
@SMALL_CASES
@pytest.mark.parametrize("labelled", [False, True])
def test_cuda_small_info_nce(dtype, shape, labelled):
    x, y = _inputs(dtype, shape)
    n, m = shape[0], shape[1]
    if labelled:  # labels, extra negatives, decoupled
        labels, key_labels = torch.randint(0, 4, (n,)), torch.randint(0, 4, (m - 8,))
        _compare(lambda be, a, b: FL.info_nce(
            a, b[:m - 8], labels=labels.to(a.device), key_labels=key_labels.to(a.device),
            extra_negatives=b[m - 8:], decoupled=True, reduction="none", backend=be), (x, y),
            dtype)
    else:  # CLIP-style symmetric, learnable temperature
        t = torch.tensor(0.1, device="cuda", requires_grad=True)
        _compare(lambda be, a, b, tt: FL.info_nce(a, b[:n], temperature=tt, symmetric=True,
                                                  reduction="none", backend=be),
                 (x, y, t), dtype)


@needs_cuda
@SMALL_CASES
def test_cuda_small_pairwise_logsumexp(dtype, shape):
    x, y = _inputs(dtype, shape)
    _compare(lambda be, a, b: FL.pairwise_logsumexp(a, b, scale=3.0, backend=be), (x, y), dtype)


@needs_cuda
@SMALL_CASES
def test_cuda_small_multi_similarity(dtype, shape):
    x, _ = _inputs(dtype, shape)
    labels = torch.randint(0, 3, (shape[0],))
    _compare(lambda be, a: FL.multi_similarity(a, labels.to(a.device), reduction="none",
                                               backend=be), (x,), dtype)


@needs_cuda
@SMALL_CASES
def test_cuda_small_softmax_matmul(dtype, shape):
    x, y = _inputs(dtype, shape)
    v = torch.randn(shape[1], 7, device="cuda").to(dtype).requires_grad_()
    _compare(lambda be, a, b, c: FL.pairwise_softmax_matmul(a, b, c, scale=2.0, backend=be),
             (x, y, v), dtype)


# ---- The Python glue of CudaKernels, executed here: the CUDA ops share the CPU ops' schemas
# (csrc/bindings_cuda.cpp mirrors csrc/cpu_ops.cpp), so CudaKernels run over
# torch.ops.fused_losses_C on CPU tensors checks its argument order and output unpacking with
# the shared backend-parametrized cases (fp32).  The CUDA kernels themselves are not involved.

CPU = torch.device("cpu")


@pytest.fixture
def glue_backend(monkeypatch):
    from fused_losses._ext import load_cpu_ext
    from fused_losses.fused import make_fused_ops

    # The CPU extension's ops stand in for the CUDA ones; the test environment always builds it.
    assert load_cpu_ext() is not None, "the CPU extension fused_losses._C is not built"
    monkeypatch.setattr(cuda_backend, "_ops", lambda: torch.ops.fused_losses_C)
    saved = dict(_dispatch._BACKENDS)
    b = _dispatch.Backend("cpu", priority=-1, devices=frozenset({"cpu"}),
                          dtypes=frozenset({torch.float32}))
    b.ops.update(make_fused_ops(cuda_backend.CudaKernels(), cuda_backend.OPS))
    try:
        _dispatch._BACKENDS["cpu"] = b
        yield "cpu"
    finally:
        _dispatch._BACKENDS.clear()
        _dispatch._BACKENDS.update(saved)


@pytest.mark.parametrize("variant", [1, 3, 5, 8])
def test_glue_info_nce(glue_backend, variant):
    import test_losses as T

    T.test_info_nce(glue_backend, CPU, variant, "none")


@pytest.mark.parametrize("epsilon", [0.1, None])
def test_glue_multi_similarity(glue_backend, epsilon):
    import test_losses as T

    T.test_multi_similarity(glue_backend, CPU, epsilon)


def test_glue_primitives_and_sinkhorn(glue_backend):
    import test_losses as T
    import test_sinkhorn as TS

    T.test_pairwise_logsumexp(glue_backend, CPU, True, 1)
    T.test_pairwise_logsumexp(glue_backend, CPU, False, 0)
    T.test_pairwise_softmax_matmul(glue_backend, CPU)
    TS.test_fp32_within_spec_of_geomloss(glue_backend, CPU)


def test_fakes_give_fp32_outputs_for_low_precision_inputs():
    from fused_losses.backends.cpu import _FAKES

    x = torch.empty(5, 3, dtype=torch.bfloat16, device="meta")
    y = torch.empty(7, 3, dtype=torch.bfloat16, device="meta")
    s = torch.empty((), device="meta")
    out = cuda_backend._as_f32(_FAKES["contrastive_bwd"])(
        x, y, s, None, None, None, 7, 0, False, False, False, *(torch.empty(5, device="meta"),) * 3,
        None, None, None)
    assert [tuple(t.shape) for t in out] == [(5, 3), (7, 3), ()]
    assert all(t.dtype == torch.float32 for t in out)
