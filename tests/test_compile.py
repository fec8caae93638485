"""torch.compile with dynamic shapes, and activation checkpointing around a loss.

- ``torch.compile(dynamic=True, fullgraph=True)`` over batch sizes 1…8 recompiles once (size 1
  is specialized by dynamo; every size ≥ 2 shares one symbolic graph), not once per size, and
  gives the eager values and gradients at every size.  (Found: the cpu kernels' schema took the
  key count ``n_keys`` as an int, which specialized every graph to its batch size; it is a
  SymInt now.)  Counted with dynamo's
  ``CompileCounterWithBackend`` over ``aot_eager`` (AOTAutograd traces the autograd Functions
  and the fake kernels with symbolic sizes; no C++ compile of inductor).
- ``torch.utils.checkpoint`` around a loss (both implementations) recomputes it in the backward
  and gives the plain gradients, on every backend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel, randn, seeded
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import fused_losses as FL

SIZES = range(1, 9)


def _step(backend):
    def step(a, b, labels):
        return (FL.clip_loss(a, b, 14.0, backend=backend)
                + FL.sup_con(a, labels, backend=backend)
                + FL.siglip_loss(a, b, 10.0, -10.0, backend=backend))

    return step


@pytest.mark.cpu_device
@pytest.mark.large_shape  # not for the interpreted Triton backend: 8 sizes × 3 losses
def test_dynamic_shapes_do_not_recompile_per_batch_size(backend):
    gen = seeded()
    a = randn(max(SIZES), 12, gen=gen)
    b = randn(max(SIZES), 12, gen=gen)
    labels = torch.randint(0, 3, (max(SIZES),), generator=gen)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_step(backend), backend=counter, dynamic=True, fullgraph=True)
    frames = {}
    for n in SIZES:
        xs = [t[:n].detach().clone().requires_grad_() for t in (a, b)]
        ys = [t[:n].detach().clone().requires_grad_() for t in (a, b)]
        out_c = compiled(*xs, labels[:n])
        out_e = _step(backend)(*ys, labels[:n])
        assert_rel(out_c, out_e, 1e-6, f"N={n} compiled value")
        out_c.backward()
        out_e.backward()
        for x, y in zip(xs, ys):
            assert_rel(x.grad, y.grad, 1e-5, f"N={n} compiled grad")
        frames[n] = counter.frame_count
    # graphs compiled by the time each size ran: the first call, one recompile when size 1's
    # specialization fails at size 2, and none after
    assert frames[2] - frames[1] <= 1 and all(frames[n] == frames[2] for n in SIZES if n > 2), (
        f"graphs compiled by batch size: {frames}")
    torch._dynamo.reset()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_around_a_loss(backend, device, use_reentrant):
    gen = seeded()
    proj = torch.nn.Linear(6, 6).to(device)
    a = randn(7, 6, gen=gen, device=device)
    b = randn(7, 6, gen=gen, device=device)
    labels = torch.randint(0, 3, (7,), generator=gen).to(device)

    def loss(a, b):
        fa, fb = proj(a), proj(b)
        return (FL.clip_loss(fa, fb, 10.0, backend=backend)
                + FL.multi_similarity(fa, labels, beta=10.0, backend=backend)
                + FL.pairwise_logsumexp(fa, fb, backend=backend).sum())

    grads = []
    for wrapped in (False, True):
        proj.zero_grad()
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = checkpoint(loss, xa, xb, use_reentrant=use_reentrant) if wrapped else loss(xa, xb)
        out.backward()
        grads.append([xa.grad, xb.grad] + [p.grad.clone() for p in proj.parameters()])
    for k, (got, want) in enumerate(zip(*grads)):
        assert_rel(got, want, 1e-6, f"checkpointed grad {k}")
