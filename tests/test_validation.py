"""SPEC §6: every bad input raises ValueError/TypeError naming the argument, before any kernel.

The checks run before dispatch, so they are exercised once per op (with ``backend="auto"``) and
once with every backend under test, to show no backend bypasses them."""

from __future__ import annotations

import math

import pytest
import torch

import fused_losses as FL

X = torch.randn(4, 3)
Y = torch.randn(5, 3)
L4 = torch.tensor([0, 1, 0, 1])

BAD_CALLS = [
    # (callable, exception type, message fragment)
    (lambda b: FL.info_nce(X[0], Y, backend=b), ValueError, "query"),
    (lambda b: FL.info_nce(X, Y[:, :2], backend=b), ValueError, "feature dimension"),
    (lambda b: FL.info_nce(X, Y.double(), backend=b), TypeError, "dtype"),
    (lambda b: FL.info_nce(X.int(), Y, backend=b), TypeError, "query"),
    (lambda b: FL.info_nce(X, Y[:3], backend=b), ValueError, "at least as many"),
    (lambda b: FL.info_nce(X, Y, temperature=0.0, backend=b), ValueError, "temperature"),
    (lambda b: FL.info_nce(X, Y, temperature=-1.0, backend=b), ValueError, "temperature"),
    (lambda b: FL.info_nce(X, Y, temperature=math.nan, backend=b), ValueError, "temperature"),
    (lambda b: FL.info_nce(X, Y, temperature=torch.tensor(math.inf), backend=b), ValueError,
     "temperature"),
    (lambda b: FL.info_nce(X, Y, logit_scale=math.inf, backend=b), ValueError, "logit_scale"),
    (lambda b: FL.info_nce(X, Y, logit_scale=torch.ones(2), backend=b), ValueError,
     "logit_scale"),
    (lambda b: FL.info_nce(X, X, labels=L4[:3], backend=b), ValueError, "labels"),
    (lambda b: FL.info_nce(X, X, labels=L4.float(), backend=b), TypeError, "labels"),
    (lambda b: FL.info_nce(X, X, labels=L4[None], backend=b), ValueError, "labels"),
    (lambda b: FL.info_nce(X, Y, labels=L4, backend=b), ValueError, "key_labels"),
    (lambda b: FL.info_nce(X, Y, labels=L4, key_labels=L4, backend=b), ValueError, "key_labels"),
    (lambda b: FL.info_nce(X, Y, key_labels=L4, backend=b), ValueError, "key_labels"),
    (lambda b: FL.info_nce(X, X, exclude_diagonal=True, backend=b), ValueError,
     "exclude_diagonal"),
    (lambda b: FL.info_nce(X, Y, extra_negatives=torch.randn(2, 4), backend=b), ValueError,
     "extra_negatives"),
    (lambda b: FL.info_nce(X, Y, symmetric=True, reduction="none", backend=b), ValueError,
     "symmetric"),
    (lambda b: FL.info_nce(X, Y, reduction="avg", backend=b), ValueError, "reduction"),
    (lambda b: FL.info_nce(X, Y, symmetric=1, backend=b), TypeError, "symmetric"),
    (lambda b: FL.clip_loss(X, Y, math.nan, backend=b), ValueError, "logit_scale"),
    (lambda b: FL.nt_xent(X, Y, backend=b), ValueError, "same number of rows"),
    (lambda b: FL.sup_con(X, L4[:2], backend=b), ValueError, "labels"),
    (lambda b: FL.siglip_loss(X, Y, 10.0, math.inf, backend=b), ValueError, "logit_bias"),
    (lambda b: FL.siglip_loss(X, Y, -1.0, 0.0, backend=b), ValueError, "logit_scale"),
    (lambda b: FL.multi_similarity(X, L4[:3], backend=b), ValueError, "labels"),
    (lambda b: FL.multi_similarity(X, L4, ref_embeddings=Y, backend=b), ValueError,
     "ref_labels"),
    (lambda b: FL.multi_similarity(X, L4, ref_embeddings=Y, ref_labels=L4, backend=b),
     ValueError, "ref_labels"),
    (lambda b: FL.multi_similarity(X, L4, alpha=0.0, backend=b), ValueError, "alpha"),
    (lambda b: FL.multi_similarity(X, L4, beta=math.inf, backend=b), ValueError, "beta"),
    (lambda b: FL.multi_similarity(X, L4, epsilon=-0.1, backend=b), ValueError, "epsilon"),
    (lambda b: FL.multi_similarity(X, L4, base=math.nan, backend=b), ValueError, "base"),
    (lambda b: FL.pairwise_logsumexp(X, Y, exclude_diagonal=True, backend=b), ValueError,
     "exclude_diagonal"),
    (lambda b: FL.pairwise_logsumexp(X, Y, bias=torch.randn(4), backend=b), ValueError, "bias"),
    (lambda b: FL.pairwise_logsumexp(X, Y, scale=math.nan, backend=b), ValueError, "scale"),
    (lambda b: FL.pairwise_logsumexp(X, Y, dim=2, backend=b), ValueError, "dim"),
    (lambda b: FL.pairwise_softmax_matmul(X, Y, torch.randn(4, 2), backend=b), ValueError, "v"),
    (lambda b: FL.similarity_topk(X, Y, 6, backend=b), ValueError, "k"),
    (lambda b: FL.similarity_topk(X, Y, 0, backend=b), ValueError, "k"),
    (lambda b: FL.similarity_topk(X, X, 4, exclude_diagonal=True, backend=b), ValueError, "k"),
    (lambda b: FL.similarity_topk(X, Y, 2.0, backend=b), TypeError, "k"),
]


@pytest.mark.parametrize("call", range(len(BAD_CALLS)))
def test_bad_input_raises_before_dispatch(backend, call):
    fn, exc, fragment = BAD_CALLS[call]
    with pytest.raises(exc, match=fragment):
        fn(backend)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        FL.info_nce(X, Y, backend="fastest")
    with pytest.raises(TypeError, match="backend"):
        FL.info_nce(X, Y, backend=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a second device")
def test_mixed_devices():
    with pytest.raises(ValueError, match="device"):
        FL.info_nce(X.cuda(), Y)
    with pytest.raises(ValueError, match="labels"):
        FL.sup_con(X.cuda(), L4)


def test_nan_features_propagate_as_nan(backend, device):
    """Non-finite values inside features are not an error: they give NaN, never a crash."""
    x = torch.randn(5, 4, device=device)
    x[2, 1] = float("nan")
    out = FL.info_nce(x, torch.randn(5, 4, device=device), backend=backend)
    assert torch.isnan(out)


def test_tensor_hyperparameters_unread_while_capturing(monkeypatch):
    """While a CUDA graph is captured, a tensor temperature/scale cannot be read (a host sync):
    its type and shape are still checked, its value is not; otherwise the value is checked."""
    from fused_losses import _validation as V

    bad = torch.tensor(float("inf"))
    with pytest.raises(ValueError, match="temperature must be finite"):
        V.check_positive_scalar("temperature", bad)
    monkeypatch.setattr(V, "_capturing", lambda t: True)
    V.check_positive_scalar("temperature", bad)
    V.check_finite_scalar("logit_bias", bad)
    with pytest.raises(ValueError, match="one element"):
        V.check_positive_scalar("temperature", torch.ones(2))
    with pytest.raises(ValueError, match="must be positive"):
        V.check_positive_scalar("temperature", -1.0)  # a Python number is always read
