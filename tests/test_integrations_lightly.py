"""fused_losses.integrations.lightly side by side with the installed lightly: NTXentLoss (in-batch
and with a memory bank over several steps), DCLLoss (with and without a weight function) and
DCLWLoss, values and gradients in fp64 and fp32, awkward shapes, and gather_distributed rank by
rank on gloo.  lightly imports torchvision: these tests run where it imports (`make
test-integrations`), and are skipped with the reason elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    TOL,
    assert_ranks_ok,
    logit_ulps,
    randn,
    record_on_rank,
    rel_err,
    run_on_gloo,
    seeded,
    side_by_side,
)

lightly_loss = pytest.importorskip(
    "lightly.loss", reason="lightly (with torchvision) does not import here (extra 'lightly'; "
                           "see `make test-integrations`)", exc_type=ImportError)

from fused_losses.integrations import lightly as ours  # noqa: E402

DTYPES = [torch.float64, torch.float32]
SHAPES = [(1, 3), (2, 5), (17, 8), (40, 100)]


def _views(n, d, gen):
    out0 = randn(n, d, dtype=torch.float64, gen=gen, requires_grad=True)
    out1 = (out0.detach() + 0.5 * randn(n, d, dtype=torch.float64, gen=gen)).requires_grad_()
    return {"out0": out0, "out1": out1}


def _cases():
    """(name, ours, lightly's); every temperature is name's first argument."""
    yield "NTXentLoss(0.5)", ours.NTXentLoss(0.5), lightly_loss.NTXentLoss(0.5)
    yield "NTXentLoss(0.1)", ours.NTXentLoss(0.1), lightly_loss.NTXentLoss(0.1)
    yield "DCLLoss(0.1)", ours.DCLLoss(0.1), lightly_loss.DCLLoss(0.1)
    yield "DCLLoss(0.5, weight_fn)", ours.DCLLoss(0.5, weight_fn=_weights), \
        lightly_loss.DCLLoss(0.5, weight_fn=_weights)
    yield "DCLWLoss(0.1, 0.5)", ours.DCLWLoss(0.1, 0.5), lightly_loss.DCLWLoss(0.1, 0.5)
    yield "DCLWLoss(0.3, 1.0)", ours.DCLWLoss(0.3, 1.0), lightly_loss.DCLWLoss(0.3, 1.0)


def _weights(out0, out1):
    """A weight function with a gradient (lightly's own DCLW weights are detached)."""
    return 1.0 + (out0 * out1).sum(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_lightly(shape, dtype):
    gen = seeded()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lightly's torch.tensor(tensor) warning
        for name, mine, theirs in _cases():
            if shape[0] == 1 and name.startswith("DCL"):
                continue  # one pair: DCL has no negative at all (lightly: LSE of nothing)
            side_by_side(mine, theirs, _views(*shape, gen), dtype, f"{name} {shape}",
                         value_atol=logit_ulps(dtype, 1.0 / mine.temperature))


@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_bank(dtype):
    """Same bank (lightly's MemoryBankModule, same seed), same values, gradients and bank over
    several steps; an evaluation step (no grad) does not update it."""
    gen = seeded()
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    torch.manual_seed(seed)
    mine = ours.NTXentLoss(0.2, memory_bank_size=(24, 6)).to(dtype)
    torch.manual_seed(seed)
    theirs = lightly_loss.NTXentLoss(0.2, memory_bank_size=(24, 6)).to(dtype)
    for step in range(4):
        views = _views(10, 6, gen)
        a, b = ([v.detach().to(dtype).requires_grad_() for v in views.values()] for _ in "ab")
        loss_a, loss_b = mine(*a), theirs(*b)
        tol = TOL[dtype]
        assert rel_err(loss_a, loss_b) <= tol, f"step {step}"
        for ga, gb in zip(torch.autograd.grad(loss_a, a), torch.autograd.grad(loss_b, b)):
            assert rel_err(ga, gb) <= tol, f"step {step} grad"
        assert torch.equal(mine.memory_bank.bank, theirs.memory_bank.bank)
    with torch.no_grad():
        before = mine.memory_bank.bank.clone()
        mine(*[v.detach().to(dtype) for v in views.values()])
        assert torch.equal(before, mine.memory_bank.bank)


def test_classes_and_checks():
    assert isinstance(ours.DCLWLoss(), lightly_loss.DCLWLoss)
    assert isinstance(ours.DCLWLoss(), lightly_loss.DCLLoss)
    assert isinstance(ours.NTXentLoss(), lightly_loss.NTXentLoss)
    with pytest.raises(ValueError, match="temperature"):
        ours.NTXentLoss(temperature=0.0)


# --------------------------------------------------------------------------------------------
# gather_distributed on gloo: per rank, ours and lightly's on the same local rows


def _dist_worker(rank, world, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 5
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for dtype in DTYPES:
            for name, mine, theirs in (
                    ("NTXentLoss", ours.NTXentLoss(0.3, gather_distributed=True),
                     lightly_loss.NTXentLoss(0.3, gather_distributed=True)),
                    ("DCLLoss", ours.DCLLoss(0.2, gather_distributed=True),
                     lightly_loss.DCLLoss(0.2, gather_distributed=True)),
                    ("DCLWLoss", ours.DCLWLoss(0.2, 0.5, gather_distributed=True),
                     lightly_loss.DCLWLoss(0.2, 0.5, gather_distributed=True))):
                full = _views(world * n, 6, gen)
                local = {k: v[rank * n:(rank + 1) * n].detach().requires_grad_()
                         for k, v in full.items()}
                record_on_rank(found, f"{name} {dtype}", lambda: side_by_side(
                    mine, theirs, local, dtype, f"rank {rank} {name}",
                    value_atol=logit_ulps(dtype, 1.0 / mine.temperature)))
    return found


def test_gather_distributed_rank_by_rank():
    assert_ranks_ok(run_on_gloo(_dist_worker, 2, seeded().initial_seed()))
