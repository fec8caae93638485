"""The ``cuda`` backend: ahead-of-time compiled CUDA kernels of ``fused_losses._cuda``
(csrc/cuda/*.cu, bindings in csrc/bindings_cuda.cpp), registered as
``torch.ops.fused_losses_cuda.*`` for the CUDA dispatch key.

Implements the kernel contract of ``kernels.py`` for ``contrastive_fwd/bwd``, ``ms_mine``,
``ms_fwd``, ``ms_bwd`` and ``softmax_matmul_fwd/bwd``; ``fused.py`` builds the ops on top
(InfoNCE family, pairwise_logsumexp, multi-similarity, pairwise_softmax_matmul and Sinkhorn's
c-transform / gradient / transport application).  SigLIP and top-k have no CUDA kernel yet.

Status: these kernels have been compiled (sm_80, sm_90a, zero spills, CI-gated) and their source
has run on the CPU under a host emulation (tests/test_cuda_emulation.py), but they have NOT YET
BEEN EXECUTED ON A GPU.  Hence ``backend="auto"`` never picks ``cuda`` until a GPU benchmark has
shown it faster than ``triton`` for an op on a GPU family (``MEASURED_FASTER`` below);
explicitly, ``backend="cuda"`` runs it.

fp32 inputs are computed in exact fp32 (FMA, never TF32, whatever
``torch.backends.cuda.matmul.allow_tf32`` says); bf16/fp16 similarity tiles use tensor cores with
fp32 accumulation; every output is fp32.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..fused import register_fused_backend

OPS = ["info_nce", "pairwise_logsumexp", "multi_similarity", "pairwise_softmax_matmul",
       "ot_softmin", "ot_grad", "ot_plan_matmul"]

# Which backend measured faster, per (GPU family, op), from bench/results GPU runs
# (python -m fused_losses.bench --device cuda --backends reference triton cuda).  NOTHING HAS
# BEEN MEASURED YET (no GPU run of the cuda backend exists), so the table is empty and
# backend="auto" picks triton for every op; add e.g. ("sm_90", "info_nce"): "cuda" only from a
# recorded run where cuda beat triton on that family.
MEASURED_FASTER: dict[tuple[str, str], str] = {}

# Priorities under backend="auto" (larger wins; triton is 20, reference 0): an op listed above
# as measured faster on this GPU family outranks triton; otherwise the cuda backend ranks below
# the reference, so auto never runs kernels that no GPU has validated.
PRIORITY_MEASURED = 25
PRIORITY_UNMEASURED = -10


def _ops():
    return torch.ops.fused_losses_cuda


def gpu_family(tensors) -> str | None:
    """``"sm_XY"`` of the first CUDA tensor's device (None without one)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(t.device)
            return f"sm_{major}{minor}"
    return None


def _op_priority(op: str, tensors) -> int:
    family = gpu_family(tensors)
    if family is not None and MEASURED_FASTER.get((family, op)) == "cuda":
        return PRIORITY_MEASURED
    return PRIORITY_UNMEASURED


def _availability() -> str | None:
    reasons = []
    why = _ext.cuda_ext_unavailable_reason()  # loads (or, with a GPU, compiles) it, once
    if why is not None:
        reasons.append(why)
    elif not _fakes_registered:
        _register_fakes()
    if not torch.cuda.is_available():
        reasons.append("no CUDA device")
    return "; ".join(reasons) if reasons else None


def _mask_args(mask):
    return (mask.labels, mask.key_labels, mask.n_keys, mask.offset, mask.exclude_diagonal,
            mask.decoupled, mask.no_positives)


def _c(t, dtype=torch.float32):
    return None if t is None else t.to(dtype).contiguous()


def _scale(scale):
    return scale.float().reshape(())


class CudaKernels:
    """Kernel contract over torch.ops.fused_losses_cuda.* (fp32/fp16/bf16 inputs, fp32 out)."""

    def contrastive_fwd(self, x, y, scale, bias, mask, want_cols):
        out = _ops().contrastive_fwd(x.contiguous(), y.contiguous(), _scale(scale), _c(bias),
                                     *_mask_args(mask), want_cols)
        if want_cols:
            return tuple(out)
        return (*out, None, None, None)

    def contrastive_bwd(self, x, y, scale, bias, mask, row_lse, g_row, g_rowpos, col_lse, g_col,
                        g_colpos):
        out = _ops().contrastive_bwd(x.contiguous(), y.contiguous(), _scale(scale), _c(bias),
                                     *_mask_args(mask), _c(row_lse), _c(g_row), _c(g_rowpos),
                                     _c(col_lse), _c(g_col), _c(g_colpos))
        return out[0], out[1], out[2], (out[3] if bias is not None else None)

    def ms_mine(self, x, y, labels, ref_labels, offset, exclude_self):
        return tuple(_ops().ms_mine(x.contiguous(), y.contiguous(), labels.contiguous(),
                                    ref_labels.contiguous(), offset, exclude_self))

    def ms_fwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg):
        return tuple(_ops().ms_fwd(x.contiguous(), y.contiguous(), labels.contiguous(),
                                   ref_labels.contiguous(), offset, exclude_self, alpha, beta,
                                   base, epsilon, _c(min_pos), _c(max_neg)))

    def ms_bwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg, pos_lse, neg_lse, g):
        return tuple(_ops().ms_bwd(x.contiguous(), y.contiguous(), labels.contiguous(),
                                   ref_labels.contiguous(), offset, exclude_self, alpha, beta,
                                   base, epsilon, _c(min_pos), _c(max_neg), _c(pos_lse),
                                   _c(neg_lse), _c(g)))

    def softmax_matmul_fwd(self, x, y, v, scale, bias):
        return tuple(_ops().softmax_matmul_fwd(x.contiguous(), y.contiguous(),
                                               v.to(x.dtype).contiguous(), _scale(scale),
                                               _c(bias)))

    def softmax_matmul_bwd(self, x, y, v, scale, bias, out, lse, g_out):
        res = _ops().softmax_matmul_bwd(x.contiguous(), y.contiguous(),
                                        v.to(x.dtype).contiguous(), _scale(scale), _c(bias),
                                        out.contiguous(), _c(lse), g_out.contiguous())
        return res[0], res[1], res[2], res[3], (res[4] if bias is not None else None)


# The ops share the CPU ops' schemas, hence their fake (meta) implementations: output shapes
# and dtypes only (fp32 outputs here), so torch.compile traces fused.py with these ops opaque.
_FAKE_OPS = ("contrastive_fwd", "contrastive_bwd", "ms_mine", "ms_fwd", "ms_bwd",
             "softmax_matmul_fwd", "softmax_matmul_bwd")


def _as_f32(fake):
    def f32(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.new_empty(a.shape, dtype=torch.float32)
        return a

    def wrapped(*args):
        return fake(*(f32(a) for a in args))

    return wrapped


_fakes_registered = False


@torch.compiler.disable
def _register_fakes():  # once the extension is loaded (its ops exist)
    global _fakes_registered
    _fakes_registered = True
    from .cpu import _FAKES

    for name in _FAKE_OPS:
        torch.library.register_fake(f"fused_losses_cuda::{name}", _as_f32(_FAKES[name]))


if _ext.preload("_cuda") is not None:  # already built for this torch: its ops exist from import on
    _register_fakes()


CUDA = register_fused_backend(
    "cuda",
    priority=PRIORITY_UNMEASURED,
    devices={"cuda"},
    dtypes={torch.float32, torch.float16, torch.bfloat16},
    kernels=CudaKernels(),
    availability=_availability,
    ops=OPS,
)
CUDA.op_priority = _op_priority
