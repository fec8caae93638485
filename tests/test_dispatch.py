"""Backend registry and dispatch: auto picks the best available, explicit names explain."""

from __future__ import annotations

import pytest
import torch

import fused_losses as FL
from fused_losses import _dispatch


def test_reference_is_always_available():
    assert "reference" in FL.available_backends("info_nce")
    for op in ("pairwise_logsumexp", "pairwise_softmax_matmul", "similarity_topk", "info_nce",
               "siglip", "multi_similarity", "ot_softmin", "ot_grad"):
        assert op in _dispatch.get_backend("reference").ops, op


def test_every_known_backend_is_registered_or_explained():
    """A backend that is not usable here must say why (so a missing extension is visible)."""
    for name in _dispatch.registered_backends():
        b = _dispatch.get_backend(name)
        why = b.availability()
        assert why is None or (isinstance(why, str) and len(why) > 10), (name, why)


def test_auto_prefers_higher_priority_and_falls_back():
    calls = []
    fake = _dispatch.Backend("cuda", priority=100, devices=frozenset({"cpu"}),
                             dtypes=frozenset({torch.float32}))
    fake.implements("info_nce")(lambda *a: calls.append("fake") or
                                _dispatch.get_backend("reference").ops["info_nce"](*a))
    saved = dict(_dispatch._BACKENDS)
    try:
        _dispatch.register_backend(fake)
        FL.info_nce(torch.randn(3, 2), torch.randn(3, 2))
        assert calls == ["fake"]
        # fp64 is not declared by the fake backend: auto falls back to the reference.
        FL.info_nce(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
        assert calls == ["fake"]
        with pytest.raises(RuntimeError, match="does not accept torch.float64"):
            FL.info_nce(torch.randn(3, 2, dtype=torch.float64),
                        torch.randn(3, 2, dtype=torch.float64), backend="cuda")
        with pytest.raises(RuntimeError, match="does not implement 'siglip'"):
            FL.siglip_loss(torch.randn(3, 2), torch.randn(3, 2), 1.0, 0.0, backend="cuda")
    finally:
        _dispatch._BACKENDS.clear()
        _dispatch._BACKENDS.update(saved)


def test_unregistered_backend_error_names_it():
    saved = dict(_dispatch._BACKENDS)
    try:
        _dispatch._BACKENDS.pop("cuda", None)
        with pytest.raises(RuntimeError, match="'cuda' is not available"):
            FL.info_nce(torch.randn(3, 2), torch.randn(3, 2), backend="cuda")
    finally:
        _dispatch._BACKENDS.clear()
        _dispatch._BACKENDS.update(saved)


def test_unavailable_backend_reason_is_raised():
    fake = _dispatch.Backend("cuda", priority=100, devices=frozenset({"cpu"}),
                             dtypes=frozenset({torch.float32}),
                             availability=lambda: "the extension fused_losses._cuda is not built")
    fake.implements("info_nce")(lambda *a: None)
    saved = dict(_dispatch._BACKENDS)
    try:
        _dispatch.register_backend(fake)
        with pytest.raises(RuntimeError, match="not built"):
            FL.info_nce(torch.randn(3, 2), torch.randn(3, 2), backend="cuda")
        FL.info_nce(torch.randn(3, 2), torch.randn(3, 2))  # auto skips it
    finally:
        _dispatch._BACKENDS.clear()
        _dispatch._BACKENDS.update(saved)
