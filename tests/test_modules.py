"""nn.Module wrappers, autograd to learnable temperature/scale/bias, torch.compile and AMP."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel, randn, seeded

import fused_losses as FL


@pytest.mark.requires_op("info_nce", "siglip", "multi_similarity")
def test_modules_match_functional(backend, device):
    gen = seeded()
    a = randn(9, 6, gen=gen, device=device)
    b = randn(9, 6, gen=gen, device=device)
    lab = torch.randint(0, 3, (9,), generator=gen).to(device)
    assert_rel(FL.InfoNCELoss(0.2, backend=backend)(a, b),
               FL.info_nce(a, b, temperature=0.2, backend=backend), 1e-6, "InfoNCELoss")
    assert_rel(FL.ClipLoss(backend=backend)(a, b, 10.0),
               FL.clip_loss(a, b, 10.0, backend=backend), 1e-6, "ClipLoss")
    assert_rel(FL.NTXentLoss(backend=backend)(a, b), FL.nt_xent(a, b, backend=backend), 1e-6,
               "NTXentLoss")
    assert_rel(FL.SupConLoss(backend=backend)(a, lab), FL.sup_con(a, lab, backend=backend), 1e-6,
               "SupConLoss")
    assert_rel(FL.MultiSimilarityLoss(backend=backend)(a, lab),
               FL.multi_similarity(a, lab, backend=backend), 1e-6, "MultiSimilarityLoss")
    assert_rel(FL.SigLipLoss(backend=backend)(a, b),
               FL.siglip_loss(a, b, 10.0, -10.0, backend=backend), 1e-5, "SigLipLoss")


@pytest.mark.requires_op("info_nce", "siglip")
def test_learnable_parameters_get_gradients(backend, device):
    gen = seeded()
    a = randn(9, 6, gen=gen, device=device)
    b = randn(9, 6, gen=gen, device=device)
    for mod in (FL.InfoNCELoss(0.1, learnable_temperature=True, backend=backend),
                FL.ClipLoss(backend=backend), FL.SigLipLoss(backend=backend)):
        mod = mod.to(device)
        mod(a, b).backward()
        grads = [p.grad for p in mod.parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                             for g in grads), type(mod).__name__


def test_torch_compile_reference():
    """The reference path traces under torch.compile and gives the eager numbers."""
    gen = seeded()
    a = randn(16, 8, gen=gen, requires_grad=True)
    b = randn(16, 8, gen=gen, requires_grad=True)

    def step(a, b):
        return FL.clip_loss(a, b, 14.0, backend="reference")

    compiled = torch.compile(step)
    out_c = compiled(a, b)
    out_e = step(a, b)
    assert_rel(out_c, out_e, 1e-6, "compiled value")
    gc = torch.autograd.grad(out_c, [a, b])
    ge = torch.autograd.grad(out_e, [a, b])
    for x, y in zip(gc, ge):
        assert_rel(x, y, 1e-5, "compiled grad")


@pytest.mark.cpu_device
@pytest.mark.requires_op("info_nce")
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16])
def test_autocast_cpu(backend, device, amp_dtype):
    gen = seeded()
    lin = torch.nn.Linear(8, 8)
    a = randn(12, 8, gen=gen)
    b = randn(12, 8, gen=gen)
    with torch.autocast("cpu", dtype=amp_dtype):
        out = FL.clip_loss(lin(a), lin(b), 10.0, backend=backend)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(lin.weight.grad).all()


@pytest.mark.skipif("cpu" not in FL.available_backends(), reason="the cpu extension is not built")
def test_torch_compile_cpu_fullgraph():
    """The compiled kernels have fake implementations: the cpu backend's losses (their autograd
    Functions included) trace into one graph with the kernels as opaque ops, eager numbers."""
    gen = seeded()
    a = randn(40, 12, gen=gen, requires_grad=True)
    b = randn(40, 12, gen=gen, requires_grad=True)
    labels = torch.randint(0, 6, (40,), generator=gen)

    def step(a, b):
        return (FL.clip_loss(a, b, 14.0, backend="cpu")
                + FL.sup_con(a, labels, backend="cpu")
                + FL.multi_similarity(a, labels, backend="cpu")
                + FL.siglip_loss(a, b, 10.0, -10.0, backend="cpu"))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)  # a graph break would raise
    out_c = compiled(a, b)
    out_e = step(a, b)
    assert_rel(out_c, out_e, 1e-6, "compiled value")
    for x, y in zip(torch.autograd.grad(out_c, [a, b]), torch.autograd.grad(out_e, [a, b])):
        assert_rel(x, y, 1e-5, "compiled grad")
