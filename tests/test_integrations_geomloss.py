"""fused_losses.integrations.geomloss.SamplesLoss side by side with the installed GeomLoss:
the call forms (x, y), (a, x, b, y), batched clouds, weights shaped (N, 1), potentials, options,
values and gradients in fp64 and fp32, and the options it refuses."""

from __future__ import annotations

import pytest
import torch
from helpers import randn, rel_err, seeded, side_by_side

geomloss = pytest.importorskip("geomloss", reason="GeomLoss not installed (extra 'geomloss')")

from fused_losses.integrations.geomloss import SamplesLoss  # noqa: E402

OPTIONS = [
    dict(),
    dict(p=1, blur=0.1),
    dict(p=2, blur=0.5, debias=False),
    dict(p=2, blur=0.05, scaling=0.8, diameter=6.0),
]


def _theirs(**kw):
    return geomloss.SamplesLoss("sinkhorn", backend="tensorized", **kw)


def _cloud(shape, gen, shift=0.0):
    return (randn(*shape, dtype=torch.float64, gen=gen) + shift).requires_grad_()


def _weights(shape, gen, column=False):
    w = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    w = w / w.sum(-1, keepdim=True)
    return (w[..., None] if column else w).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
                         or "defaults")
def test_matches_geomloss(kw, dtype):
    gen = seeded()
    tol = 1e-10 if dtype == torch.float64 else 1e-4  # SPEC §4: 1e-4 against GeomLoss in fp32
    ours, theirs = SamplesLoss(**kw), _theirs(**kw)
    for n, m, d in ((17, 23, 3), (1, 5, 2), (30, 30, 1)):
        xy = {"x": _cloud((n, d), gen), "y": _cloud((m, d), gen, 0.4)}
        side_by_side(lambda x, y: ours(x, y), lambda x, y: theirs(x, y), xy, dtype,
                     f"SamplesLoss (x, y) {kw} {n, m, d}", tol)
        weighted = {"a": _weights(n, gen, column=(n == 17)), "x": xy["x"],
                    "b": _weights(m, gen, column=(n == 17)), "y": xy["y"]}
        side_by_side(lambda a, x, b, y: ours(a, x, b, y), lambda a, x, b, y: theirs(a, x, b, y),
                     weighted, dtype, f"SamplesLoss (a, x, b, y) {kw} {n, m, d}", tol)
    batched = {"a": _weights((3, 8), gen), "x": _cloud((3, 8, 2), gen),
               "b": _weights((3, 11), gen), "y": _cloud((3, 11, 2), gen, 0.2)}
    side_by_side(lambda a, x, b, y: ours(a, x, b, y), lambda a, x, b, y: theirs(a, x, b, y),
                 batched, dtype, f"SamplesLoss batched {kw}", tol)
    side_by_side(lambda x, y: ours(x, y), lambda x, y: theirs(x, y),
                 {"x": batched["x"], "y": batched["y"]}, dtype,
                 f"SamplesLoss batched (x, y) {kw}", tol)


def test_shapes_and_potentials():
    gen = seeded()
    x, y = _cloud((12, 3), gen), _cloud((9, 3), gen, 0.5)
    assert SamplesLoss()(x, y).shape == _theirs()(x, y).shape == torch.Size([])
    xb, yb = _cloud((4, 12, 3), gen), _cloud((4, 9, 3), gen)
    assert SamplesLoss()(xb, yb).shape == _theirs()(xb, yb).shape == torch.Size([4])
    for args in ((x, y), (_weights(12, gen), x, _weights(9, gen), y), (xb, yb)):
        for debias in (True, False):
            f, g = SamplesLoss(potentials=True, debias=debias)(*args)
            f_ref, g_ref = _theirs(potentials=True, debias=debias)(*args)
            assert f.shape == f_ref.shape and g.shape == g_ref.shape
            assert rel_err(f, f_ref) <= 1e-10 and rel_err(g, g_ref) <= 1e-10


def test_refuses_what_it_does_not_implement():
    x = torch.randn(5, 2)
    for kw, match in ((dict(loss="energy"), "loss='energy'"), (dict(reach=0.5), "reach"),
                      (dict(cost="SqDist(X,Y)"), "custom cost")):
        with pytest.raises(ValueError, match=match):
            SamplesLoss(**kw)(x, x)
    labels = torch.zeros(5, dtype=torch.long)
    w = torch.full((5,), 0.2)
    with pytest.raises(ValueError, match="cluster labels"):
        SamplesLoss()(labels, w, x, labels, w, x)
    with pytest.raises(ValueError):  # GeomLoss's own shape checks still apply
        SamplesLoss()(x, torch.randn(5, 3))
    assert isinstance(SamplesLoss(), geomloss.SamplesLoss)


def test_degenerate_inputs_are_defined():
    """Identical clouds and a single point (diameter 0): GeomLoss takes log(0) there."""
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    val = SamplesLoss()(x, x.detach().clone())
    assert torch.isfinite(val) and abs(float(val.detach())) < 1e-8
    p = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.isfinite(SamplesLoss()(p, p.detach() + 1.0))
