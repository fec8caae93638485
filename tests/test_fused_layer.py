"""The fused layer (``fused.py``) over the executable kernel spec (``TorchBlockKernels``).

This checks the losses' algebra and the kernel contract independently of any compiled or
Triton kernel: the same backend-parametrized cases as test_losses.py, run on a temporary
backend built from the spec kernels with a block size that forces several blocks."""

from __future__ import annotations

import pytest
import test_losses as T
import test_sinkhorn as TS
import torch

from fused_losses import _dispatch
from fused_losses.fused import make_fused_ops
from fused_losses.kernels import TorchBlockKernels

NAME = "cpu"  # borrowed slot in the registry, restored after each test
CPU = torch.device("cpu")


@pytest.fixture
def spec_backend():
    saved = dict(_dispatch._BACKENDS)
    b = _dispatch.Backend(NAME, priority=-1, devices=frozenset({"cpu"}),
                          dtypes=frozenset({torch.float32, torch.float16, torch.float64}))
    b.ops.update(make_fused_ops(TorchBlockKernels(block=7)))
    _dispatch.register_backend(b)
    yield NAME
    _dispatch._BACKENDS.clear()
    _dispatch._BACKENDS.update(saved)


@pytest.mark.parametrize("variant", range(len(T.INFO_NCE_VARIANTS)))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_info_nce(spec_backend, variant, reduction):
    T.test_info_nce(spec_backend, CPU, variant, reduction)


def test_other_losses(spec_backend):
    T.test_info_nce_extreme_temperature(spec_backend, CPU, 1e-3)
    T.test_info_nce_unnormalized_large_logits(spec_backend, CPU)
    T.test_info_nce_no_positives(spec_backend, CPU)
    T.test_nt_xent_sup_con_siglip(spec_backend, CPU)


@pytest.mark.parametrize("epsilon", [0.1, None])
def test_multi_similarity(spec_backend, epsilon):
    T.test_multi_similarity(spec_backend, CPU, epsilon)


def test_primitives(spec_backend):
    for ex in (False, True):
        for dim in (0, 1):
            T.test_pairwise_logsumexp(spec_backend, CPU, ex, dim)
        T.test_similarity_topk(spec_backend, CPU, ex)
    T.test_pairwise_softmax_matmul(spec_backend, CPU)


@pytest.mark.parametrize("case", range(len(TS.CASES)))
def test_sinkhorn(spec_backend, case):
    TS.test_matches_geomloss_value_and_gradients(spec_backend, CPU, case)


def test_sinkhorn_fp32(spec_backend):
    TS.test_fp32_within_spec_of_geomloss(spec_backend, CPU)
