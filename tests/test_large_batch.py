"""GradCache (fused_losses.large_batch): parameter gradients equal the plain computation.

Without randomness the reference is one forward/backward through the whole batch; with
dropout it is the same chunked encoding done with autograd on (same RNG stream), since a
full-batch forward draws its dropout masks differently.  float64, tolerance 1e-10.  The
distributed/DDP use is tested in test_distributed.py (``grad_cache_ddp_*``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, rel_err, seeded

import fused_losses as fl
from fused_losses.large_batch import grad_cache_step

TOL64 = TOL[torch.float64]


class Tower(torch.nn.Module):
    def __init__(self, d_in, d_out=6, dropout=0.0):
        super().__init__()
        self.lin1 = torch.nn.Linear(d_in, 16)
        self.drop = torch.nn.Dropout(dropout)
        self.lin2 = torch.nn.Linear(16, d_out)

    def forward(self, x):
        return self.lin2(torch.tanh(self.drop(self.lin1(x))))


class Clip(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.image = Tower(5, dropout=dropout)
        self.text = Tower(3, dropout=dropout)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))


def _models(dropout, seed):
    torch.manual_seed(seed)
    a = Clip(dropout).double()
    b = Clip(dropout).double()
    b.load_state_dict(a.state_dict())
    return a, b


def _batch(gen, n):
    return (torch.randn(n, 5, generator=gen, dtype=torch.float64),
            torch.randn(n, 3, generator=gen, dtype=torch.float64))


def _assert_same_grads(m1, m2, what=""):
    for (name, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert p.grad is not None, f"{what}{name}: no gradient"
        err = rel_err(p.grad, q.grad)
        assert err <= TOL64, f"{what}{name}: relative error {err:.2e}"


def _clip(model):
    return lambda a, b: fl.clip_loss(a, b, model.logit_scale.exp(), backend="reference")


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("declare_params", [False, True])
def test_equals_full_batch(chunk, declare_params):
    gen = seeded()
    ref, cached = _models(0.0, gen.initial_seed())
    xa, xb = _batch(gen, 11)
    loss_ref = _clip(ref)(ref.image(xa), ref.text(xb))
    loss_ref.backward()
    loss = grad_cache_step(
        [cached.image, cached.text], [xa, xb], _clip(cached), chunk,
        loss_params=[cached.logit_scale] if declare_params else None)
    assert not loss.requires_grad
    assert rel_err(loss, loss_ref) <= TOL64
    _assert_same_grads(cached, ref, f"seed {gen.initial_seed()}: ")


def test_dropout_replays_rng():
    gen = seeded()
    ref, cached = _models(0.4, gen.initial_seed())
    xa, xb = _batch(gen, 10)
    chunk = 3
    torch.manual_seed(123)
    ea = torch.cat([ref.image(c) for c in xa.split(chunk)])
    eb = torch.cat([ref.text(c) for c in xb.split(chunk)])
    _clip(ref)(ea, eb).backward()
    after_ref = torch.get_rng_state()

    torch.manual_seed(123)
    grad_cache_step([cached.image, cached.text], [xa, xb], _clip(cached), chunk)
    _assert_same_grads(cached, ref, f"seed {gen.initial_seed()}: ")
    # The RNG stream moves on as in the plain run (the replays are forked).
    assert torch.equal(torch.get_rng_state(), after_ref)
    # And the masks did matter: a run without the replay differs.
    torch.manual_seed(123)
    ea2 = torch.cat([ref.image(c) for c in xa.split(chunk)])
    torch.manual_seed(7)
    assert not torch.allclose(ea2, torch.cat([ref.image(c) for c in xa.split(chunk)]))


def test_shared_encoder_and_structured_inputs():
    """One encoder for two views (SimCLR), inputs as dicts and tuples, accumulation on top of
    existing gradients."""
    gen = seeded()
    torch.manual_seed(gen.initial_seed())
    enc_ref = Tower(4).double()
    enc = Tower(4).double()
    enc.load_state_dict(enc_ref.state_dict())
    v1 = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    v2 = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    for m in (enc_ref, enc):  # pre-existing gradients are accumulated onto
        for p in m.parameters():
            p.grad = torch.ones_like(p)

    def loss_fn(a, b):
        return fl.nt_xent(a, b, temperature=0.3, backend="reference")

    loss_fn(enc_ref(v1), enc_ref(v2)).backward()

    def call(x=None, scale=None):
        return enc(x * scale)

    grad_cache_step(
        [call, lambda x, s: enc(x * s)],
        [{"x": v1, "scale": torch.ones(9, 1, dtype=torch.float64)},
         (v2, torch.ones(9, 1, dtype=torch.float64))],
        loss_fn, 4)
    _assert_same_grads(enc, enc_ref)


def test_sup_con_single_input():
    gen = seeded()
    torch.manual_seed(gen.initial_seed())
    enc_ref = Tower(5).double()
    enc = Tower(5).double()
    enc.load_state_dict(enc_ref.state_dict())
    x = torch.randn(13, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (13,), generator=gen)

    def loss_fn(e):
        return fl.sup_con(e, labels, backend="reference")

    loss_fn(enc_ref(x)).backward()
    grad_cache_step(enc, [x], loss_fn, 5)
    _assert_same_grads(enc, enc_ref)


def test_bad_arguments():
    enc = Tower(5).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_step(enc, [x], lambda e: e.sum(), 0)
    with pytest.raises(ValueError, match="encoders"):
        grad_cache_step([enc, enc], [x], lambda e: e.sum(), 2)
    with pytest.raises(ValueError, match="scalar"):
        grad_cache_step(enc, [x], lambda e: e, 2)
    with pytest.raises(ValueError, match="loss_params"):
        grad_cache_step(enc, [x], lambda e: e.sum(), 2, loss_params=[torch.ones(())])
    with pytest.raises(TypeError, match="inputs"):
        grad_cache_step(enc, x, lambda e: e.sum(), 2)


def test_ddp_example_runs():
    """examples/ddp_clip.py (DDP + GradCache + distributed clip_loss, 2 gloo processes) trains
    at a small size: the loss falls and the replicas stay identical."""
    import os
    import re
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "ddp_clip.py")
    out = subprocess.run(
        [sys.executable, script, "--global-batch", "96", "--chunk", "16", "--dim", "16",
         "--hidden", "32", "--steps", "6", "--lr", "1e-2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 6, out.stdout
    assert losses[-1] < losses[0], out.stdout
    drift = float(re.search(r"replicas differ by at most ([0-9.e+-]+)", out.stdout).group(1))
    assert drift == 0.0, out.stdout
