"""TF32 in the Triton backend (SPEC §7): fp32 inputs take exact FMA dots unless PyTorch's own
switch ``torch.backends.cuda.matmul.allow_tf32`` is on, and then TF32 tensor cores, within
3e-3 of the float64 reference; 16-bit inputs always take TF32 for their fp32 products (dZ·B,
P·V), a 10-bit mantissa where a 16-bit dZ would keep 8 or 11.

The interpreter computes every dot in fp32, whatever its precision; ``emulated_tf32`` makes it
round like the tensor cores do: a TF32 dot of fp32 operands ignores their 13 low mantissa bits
(Triton passes the fp32 bits to the MMA unconverted: no cvt.rna in the PTX; truncation is also
the worse of the two roundings).  So the kernels' own TF32 paths are measured here, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import device_for, kernel_inputs, randn, rel_err, seeded
from test_losses import check_against_reference

import fused_losses as FL

pytestmark = pytest.mark.skipif("triton" not in FL.available_backends(),
                                reason="the triton backend is not available here")

DEVICE = device_for("triton")
TF32_TOL = 3e-3  # SPEC §7, README "Numerics"


def _launchers():
    from fused_losses.backends.triton import launchers

    return launchers


@pytest.fixture
def allow_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True  # conftest restores False after the test
    return True


@pytest.fixture
def emulated_tf32(monkeypatch):
    """The interpreter's dot with TF32 operand rounding (truncation to 10 mantissa bits) for
    TF32 dots; records, per TF32 dot, whether both operands were fp32.  On a GPU the tensor
    cores do this themselves: nothing to emulate, and None (no record)."""
    if DEVICE.type != "cpu":
        return None
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    orig = interpreter.InterpreterBuilder.create_dot
    calls = []

    def trunc(h):
        if h.data.dtype != np.float32:
            return h
        bits = np.ascontiguousarray(h.data).view(np.uint32) & np.uint32(0xFFFFE000)
        return interpreter.TensorHandle(bits.view(np.float32), h.dtype)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            calls.append(a.data.dtype == np.float32 and b.data.dtype == np.float32)
            a, b = trunc(a), trunc(b)
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return calls


def test_tf32_switch(monkeypatch):
    """ALLOW_TF32 of every launch: PyTorch's switch for fp32 inputs, always for 16-bit ones."""
    L = _launchers()
    seen = []

    class Spy:
        def __init__(self, tuner):
            self.tuner = tuner

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((args[0].dtype, kw["ALLOW_TF32"]))
                return self.tuner[grid](*args, **kw)
            return launch

    for name, tuner in list(L._K.items()):
        monkeypatch.setitem(L._K, name, Spy(tuner))
    gen = seeded()
    x = randn(9, 20, gen=gen, device=DEVICE)
    for dtype, flag, want in ((torch.float32, False, False), (torch.float32, True, True),
                              (torch.float16, False, True)):
        torch.backends.cuda.matmul.allow_tf32 = flag
        seen.clear()
        FL.clip_loss(x.to(dtype), x.to(dtype), 10.0, backend="triton")
        FL.similarity_topk(x.to(dtype), x.to(dtype), 3, backend="triton")
        assert seen and all(a == want for _, a in seen), (dtype, flag, seen)


def _cases(gen, d=48):
    """(label, fn, inputs) of the ops whose fp32 dots TF32 changes."""
    q = randn(40, d, gen=gen, requires_grad=True)
    k = randn(40, d, gen=gen, requires_grad=True)
    x = randn(33, d, gen=gen, requires_grad=True, scale=d ** -0.5)
    y = randn(37, d, gen=gen, requires_grad=True, scale=d ** -0.5)
    v = randn(37, 5, gen=gen, requires_grad=True)
    lab = torch.randint(0, 4, (40,), generator=gen)
    return [
        ("clip logit_scale 100", lambda b, q, k: FL.clip_loss(q, k, 100.0, backend=b), [q, k]),
        ("clip t=0.07", lambda b, q, k: FL.info_nce(q, k, temperature=0.07, symmetric=True,
                                                     backend=b), [q, k]),
        ("sup_con", lambda b, q: FL.sup_con(q, lab, backend=b), [q]),
        ("siglip", lambda b, q, k: FL.siglip_loss(q, k, 10.0, -10.0, backend=b), [q, k]),
        ("multi_similarity", lambda b, q: FL.multi_similarity(q, lab, backend=b), [q]),
        ("softmax_matmul", lambda b, x, y, v: FL.pairwise_softmax_matmul(x, y, v, scale=3.0,
                                                                         backend=b), [x, y, v]),
    ]


def test_tf32_fp32_inputs_within_spec(allow_tf32, emulated_tf32):
    """fp32 inputs with TF32 on: loss and every gradient within 3e-3 of float64, and measurably
    not fp32-exact (the TF32 dots did run)."""
    gen = seeded()
    worst = 0.0
    for label, fn, ins in _cases(gen):
        ins32 = [t.detach().to(DEVICE).requires_grad_() for t in ins]
        ins64 = [t.detach().double().requires_grad_() for t in ins]
        out = fn("triton", *ins32)
        ref = fn("reference", *ins64)
        g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
        grads = torch.autograd.grad(out, ins32, g.to(out.dtype).to(out.device))
        grads64 = torch.autograd.grad(ref, ins64, g)
        errs = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(grads, grads64)]
        print(f"tf32 emulated, {label}: loss {errs[0]:.1e}, grads "
              + " ".join(f"{e:.1e}" for e in errs[1:]))
        assert max(errs) <= TF32_TOL, (label, errs)
        worst = max(worst, max(errs))
    if emulated_tf32 is not None:
        assert emulated_tf32 and all(emulated_tf32), "no TF32 dot of fp32 operands ran"
    assert worst > 1e-5, f"TF32 rounding left no trace (worst {worst:.1e}): TF32 not used?"


def test_tf32_off_is_exact_fp32(emulated_tf32):
    """TF32 off (the default): no TF32 dot at all for fp32 inputs (checked under the
    interpreter; on a GPU this just runs them)."""
    gen = seeded()
    for _label, fn, ins in _cases(gen):
        ins32 = [t.detach().to(DEVICE).requires_grad_() for t in ins]
        out = fn("triton", *ins32)
        torch.autograd.grad(out.sum(), ins32)
    if emulated_tf32 is not None:
        assert not emulated_tf32


def test_fp16_products_in_tf32_within_spec(emulated_tf32):
    """16-bit inputs: the fp32 products run as TF32 dots; the usual low-precision bound holds."""
    gen = seeded()
    q = randn(40, 48, gen=gen, requires_grad=True)
    k = randn(40, 48, gen=gen, requires_grad=True)
    norm, (q, k) = kernel_inputs(torch.float16, 48, q, k)
    check_against_reference("triton", DEVICE, torch.float16,
                            lambda b, q, k: FL.info_nce(q, k, temperature=0.07, symmetric=True,
                                                        normalize=norm, backend=b),
                            [q, k], f"clip fp16 tf32 products seed={gen.initial_seed()}")
    if emulated_tf32 is not None:
        assert any(emulated_tf32), "no TF32 dot of fp32 operands ran"
