"""Sinkhorn optimal transport (SPEC §4): one backend-agnostic driver over three kernels.

The driver (ε-scaling schedule, symmetric averaged updates, debiasing, final extrapolation,
envelope-theorem gradients) is written once, here.  A backend supplies only the O(N·M) steps,
registered under these canonical names (batched: x (B, N, D), y (B, M, D), h (B, M)):

- ``ot_softmin(x, y, h, eps, cost) -> (B, N)``: ``f_i = −ε LSE_j(h_j − C(x_i, y_j)/ε)``;
- ``ot_grad(x, y, h, eps, cost) -> (B, N, D)``: ``Σ_j w_ij ∂C(x_i, y_j)/∂x_i`` with
  ``w_ij = softmax_j(h_j − C_ij/ε)`` (y held fixed);
- ``ot_plan_matmul(x, y, h, eps, cost, v) -> (B, N, E)``: ``Σ_j w_ij v_j``.

``cost`` is ``"p2"`` (½‖x−y‖², from the dot product as GeomLoss does), ``"p1"`` (‖x−y‖ =
``sqrt(clamp_min(sqdist, 1e-8))``, GeomLoss's convention) or ``"cosine"`` (1 − <x, y> on rows the
driver has normalized).  Kernels run without autograd; the driver computes gradients itself, so
no graph of the loop is ever built and the global grad mode is never touched (GeomLoss #57).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import _validation as V
from ._dispatch import check_backend_name, resolve
from .backends.reference import REFERENCE
from .fused import first_order_only, records_graph
from .kernels import acc_dtype

COSTS = ("sqeuclidean", "cosine")
_LOG_ZERO_WEIGHT = -100000.0  # GeomLoss's log of a zero weight


# ----------------------------------------------------------------------------- reference kernels


def _cost_matrix(x, y, cost):
    """Dense (B, N, M) cost, as GeomLoss computes it."""
    if cost == "cosine":
        return 1.0 - x @ y.transpose(1, 2)
    sq = (x * x).sum(-1)[:, :, None] - 2 * x @ y.transpose(1, 2) + (y * y).sum(-1)[:, None, :]
    if cost == "p2":
        return sq / 2
    return torch.sqrt(torch.clamp_min(sq, 1e-8))


def _weights(x, y, h, eps, cost):
    return torch.softmax(h[:, None, :] - _cost_matrix(x, y, cost) / eps, dim=2)


@REFERENCE.implements("ot_softmin")
def _ref_softmin(x, y, h, eps, cost):
    return -eps * torch.logsumexp(h[:, None, :] - _cost_matrix(x, y, cost) / eps, dim=2)


@REFERENCE.implements("ot_grad")
def _ref_grad(x, y, h, eps, cost):
    w = _weights(x, y, h, eps, cost)
    if cost == "p2":
        return x - w @ y
    if cost == "cosine":
        return -(w @ y)
    sq = (x * x).sum(-1)[:, :, None] - 2 * x @ y.transpose(1, 2) + (y * y).sum(-1)[:, None, :]
    # d/dx sqrt(clamp_min(sq, 1e-8)) = (x - y)/dist, and 0 where the clamp is active.
    inv = torch.where(sq > 1e-8, torch.rsqrt(torch.clamp_min(sq, 1e-8)), torch.zeros_like(sq))
    wi = w * inv
    return wi.sum(-1, keepdim=True) * x - wi @ y


@REFERENCE.implements("ot_plan_matmul")
def _ref_plan_matmul(x, y, h, eps, cost, v):
    return _weights(x, y, h, eps, cost) @ v


# ------------------------------------------------------------------------------------ the driver


def _log_weights(a):
    """log a, with GeomLoss's -100000 for zero weights (no -inf in the loop)."""
    tiny = torch.finfo(a.dtype).tiny
    return torch.where(a > 0, torch.log(a.clamp_min(tiny)), torch.full_like(a, _LOG_ZERO_WEIGHT))


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    """GeomLoss's ε-scaling list: diam^p, then geometric steps down to blur^p, then blur^p."""
    return ([diameter**p]
            + [float(np.exp(e)) for e in np.arange(p * np.log(diameter), p * np.log(blur),
                                                    p * np.log(scaling))]
            + [blur**p])


def _diameter(x, y) -> float:
    d = x.shape[-1]
    xf, yf = x.reshape(-1, d), y.reshape(-1, d)
    mins = torch.minimum(xf.min(0).values, yf.min(0).values)
    maxs = torch.maximum(xf.max(0).values, yf.max(0).values)
    return float((maxs - mins).norm())


class _Problem:
    """Everything the loop needs: kernels of one backend, cost, weights, schedule."""

    def __init__(self, x, y, a_log, b_log, eps_list, cost, debias, backend):
        self.x, self.y, self.a_log, self.b_log = x, y, a_log, b_log
        self.eps_list, self.cost, self.debias = eps_list, cost, debias
        self.softmin = resolve("ot_softmin", backend, (x, y))
        self.grad = resolve("ot_grad", backend, (x, y))

    def run(self):
        """The symmetric log-domain loop; returns the final extrapolation's potentials and the
        targets h they were computed with (the gradient needs exactly those)."""
        x, y, a_log, b_log, sm = self.x, self.y, self.a_log, self.b_log, self.softmin
        cost, eps = self.cost, self.eps_list[0]
        g_ab = sm(y, x, a_log, eps, cost)
        f_ba = sm(x, y, b_log, eps, cost)
        if self.debias:
            f_aa = sm(x, x, a_log, eps, cost)
            g_bb = sm(y, y, b_log, eps, cost)
        for eps in self.eps_list:
            ft_ba = sm(x, y, b_log + g_ab / eps, eps, cost)
            gt_ab = sm(y, x, a_log + f_ba / eps, eps, cost)
            if self.debias:
                ft_aa = sm(x, x, a_log + f_aa / eps, eps, cost)
                gt_bb = sm(y, y, b_log + g_bb / eps, eps, cost)
            f_ba, g_ab = 0.5 * (f_ba + ft_ba), 0.5 * (g_ab + gt_ab)
            if self.debias:
                f_aa, g_bb = 0.5 * (f_aa + ft_aa), 0.5 * (g_bb + gt_bb)
        # Last extrapolation at the final ε, all potentials updated in parallel.
        h = {"xy": b_log + g_ab / eps, "yx": a_log + f_ba / eps}
        if self.debias:
            h["xx"], h["yy"] = a_log + f_aa / eps, b_log + g_bb / eps
        f_ba, g_ab = sm(x, y, h["xy"], eps, cost), sm(y, x, h["yx"], eps, cost)
        f_aa = sm(x, x, h["xx"], eps, cost) if self.debias else None
        g_bb = sm(y, y, h["yy"], eps, cost) if self.debias else None
        return f_ba, g_ab, f_aa, g_bb, h, eps


class _SinkhornValue(torch.autograd.Function):
    """Value per batch item; backward by the envelope theorem (SPEC §4): ∂/∂x_i =
    a_i (G^{xy}_i − G^{xx}_i) with G from ``ot_grad`` at the final extrapolation's targets,
    ∂/∂a = f_ba − f_aa, and the same for (y, b)."""

    @staticmethod
    def forward(ctx, problem, x, y, a, b):
        f_ba, g_ab, f_aa, g_bb, h, eps = problem.run()
        f = f_ba - f_aa if problem.debias else f_ba
        g = g_ab - g_bb if problem.debias else g_ab
        ctx.problem, ctx.h, ctx.eps = problem, h, eps
        ctx.save_for_backward(a, b, f, g, x, y)
        return (a * f).sum(-1) + (b * g).sum(-1)

    @staticmethod
    def backward(ctx, grad_out):
        a, b, f, g, x, y = ctx.saved_tensors
        with torch.no_grad():
            grads = _SinkhornValue._grads(ctx, grad_out, a, b, f, g)
        if records_graph(x, y, a, b, grad_out):
            grads = first_order_only(
                "sinkhorn", "its gradient comes from the envelope theorem at the final "
                "potentials, not from differentiating the loop", grads, (x, y, a, b, grad_out))
        return (None, *grads)

    @staticmethod
    def _grads(ctx, grad_out, a, b, f, g):
        p, h, eps = ctx.problem, ctx.h, ctx.eps
        go = grad_out[:, None]
        dx = dy = None
        if ctx.needs_input_grad[1]:
            gx = p.grad(p.x, p.y, h["xy"], eps, p.cost)
            if p.debias:
                gx = gx - p.grad(p.x, p.x, h["xx"], eps, p.cost)
            dx = (go * a)[:, :, None] * gx
        if ctx.needs_input_grad[2]:
            gy = p.grad(p.y, p.x, h["yx"], eps, p.cost)
            if p.debias:
                gy = gy - p.grad(p.y, p.y, h["yy"], eps, p.cost)
            dy = (go * b)[:, :, None] * gy
        da = go * f if ctx.needs_input_grad[3] else None
        db = go * g if ctx.needs_input_grad[4] else None
        return dx, dy, da, db


# ------------------------------------------------------------------------------- validation


def _check_points(x, y):
    V.check_features("x", x, ndim=(2, 3))
    V.check_features("y", y, ndim=(2, 3))
    if x.dim() != y.dim():
        raise ValueError(f"x and y must both be 2-D (N, D) or both 3-D (B, N, D); got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"batch size mismatch: x has B={x.shape[0]}, y has B={y.shape[0]}")
    V.check_same_dim("x", x, "y", y)
    V.check_same_device(x=x, y=y)
    V.check_same_dtype(x=x, y=y)


def _check_weights(name, w, pts):
    """Weights (N,) or (B, N): finite, non-negative, positive total.  None means uniform."""
    if w is None:
        return None
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if pts.dim() == 3 and w.dim() == 1:
        w = w.expand(pts.shape[0], -1)
    V.check_weights(name, w, tuple(pts.shape[:-1]), pts)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must be finite")
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    if bool((w.sum(-1) <= 0).any()):
        raise ValueError(f"{name} must have a positive total weight")
    return w


def _check_common(p, blur, scaling, diameter, n_iters, debias, cost):
    for name, v in (("blur", blur), ("scaling", scaling), ("diameter", diameter)):
        if isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a Python number")
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    V.check_positive_scalar("blur", blur)
    V.check_positive_scalar("scaling", scaling)
    if not float(scaling) < 1:
        raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    if diameter is not None:
        V.check_positive_scalar("diameter", diameter)
    if n_iters is not None:
        V.check_int("n_iters", n_iters, 1)
    V.check_bool("debias", debias)
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")


def _kernel_cost(cost: str, p: int) -> str:
    return "cosine" if cost == "cosine" else ("p2" if p == 2 else "p1")


def _prepare_points(x, y, cost):
    """Points in the accumulation dtype; cosine rows normalized (autograd keeps that grad)."""
    acc = acc_dtype(x.dtype)
    if cost == "cosine":
        return F.normalize(x.to(acc), dim=-1), F.normalize(y.to(acc), dim=-1)
    return x.to(acc), y.to(acc)


def _uniform_or(w, pts):
    if w is None:
        bsz, n = pts.shape[0], pts.shape[1]
        return torch.full((bsz, n), 1.0 / n, dtype=pts.dtype, device=pts.device)
    return w.to(pts.dtype)


def _setup(x, y, a, b, blur, p, scaling, diameter, n_iters, debias, cost, backend):
    """Validated, batched, prepared inputs and the problem description."""
    _check_points(x, y)
    _check_common(p, blur, scaling, diameter, n_iters, debias, cost)
    a = _check_weights("a", a, x)
    b = _check_weights("b", b, y)
    batched = x.dim() == 3
    if not batched:
        x, y = x[None], y[None]
        a = None if a is None else a[None]
        b = None if b is None else b[None]
    x, y = _prepare_points(x, y, cost)
    a, b = _uniform_or(a, x), _uniform_or(b, y)
    if n_iters is not None:
        eps_list = [float(blur) ** p] * n_iters
    else:
        diam = float(diameter) if diameter is not None else _diameter(x.detach(), y.detach())
        # Identical clouds or a single point give diameter 0 and log(0) in the schedule
        # (GeomLoss #51/#74): a diameter below blur is raised to blur, so the schedule is then
        # just [blur^p, blur^p].
        eps_list = epsilon_schedule(p, max(diam, float(blur)), float(blur), float(scaling))
    problem = _Problem(x.detach(), y.detach(), _log_weights(a.detach()),
                       _log_weights(b.detach()), eps_list, _kernel_cost(cost, p), debias,
                       backend)
    return problem, x, y, a, b, batched


# ------------------------------------------------------------------------------- public API


@V.autocast_features("x", "y")
def sinkhorn(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    diameter: float | None = None,
    n_iters: int | None = None,
    debias: bool = True,
    cost: str = "sqeuclidean",
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Entropic OT between ``(a, x)`` and ``(b, y)``: the debiased Sinkhorn divergence
    ``S_ε`` (``debias=True``) or ``OT_ε``, by GeomLoss's ``SamplesLoss("sinkhorn")`` algorithm.

    x: (N, D) or (B, N, D); y: (M, D) or (B, M, D); a, b: weights (N,)/(B, N), default uniform.
    ``cost="sqeuclidean"`` is GeomLoss's power cost ``‖x − y‖^p / p`` (p=2: ½‖x−y‖²,
    p=1: ‖x−y‖); ``cost="cosine"``: ``1 − cos(x, y)``.  ``ε = blur^p``; ε-scaling from
    ``diameter^p`` (bounding-box estimate when None) down to ``blur^p`` by factors
    ``scaling^p``; ``n_iters=k`` instead runs k iterations at ε = blur^p.  Batched input gives B
    values reduced by ``reduction``; 2-D input gives a 0-dim value.  Gradients to x, y, a, b by
    the envelope theorem.  fp16/bf16 inputs are computed in fp32.
    """
    V.check_reduction(reduction)
    problem, x, y, a, b, batched = _setup(x, y, a, b, blur, p, scaling, diameter, n_iters,
                                          debias, cost, backend)
    values = _SinkhornValue.apply(problem, x, y, a, b)
    if not batched:
        return values[0]
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.mean()


@V.autocast_features("x", "y")
def sinkhorn_potentials(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    diameter: float | None = None,
    n_iters: int | None = None,
    debias: bool = True,
    cost: str = "sqeuclidean",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual potentials ``(f, g)``, shapes (N,), (M,) (or batched): ``(f_ba − f_aa,
    g_ab − g_bb)`` with ``debias``, else the OT potentials ``(f_ba, g_ab)`` (GeomLoss
    ``potentials=True``).  Returned without gradient."""
    problem, x, y, a, b, batched = _setup(x, y, a, b, blur, p, scaling, diameter, n_iters,
                                          debias, cost, backend)
    with torch.no_grad():
        f_ba, g_ab, f_aa, g_bb, _, _ = problem.run()
        f = f_ba - f_aa if debias else f_ba
        g = g_ab - g_bb if debias else g_ab
    return (f, g) if batched else (f[0], g[0])


@V.autocast_features("x", "y", "v")
def transport_apply(
    f: torch.Tensor,
    g: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    blur: float = 0.05,
    p: int = 2,
    cost: str = "sqeuclidean",
    backend: str = "auto",
) -> torch.Tensor:
    """``π v`` without forming π: ``(π v)_i = a_i Σ_j b_j exp((f_i + g_j − C_ij)/ε) v_j``.

    ``f``, ``g`` must be the OT potentials (``sinkhorn_potentials(..., debias=False)``): the
    debiased pair defines no plan.  v: (M, E) or (B, M, E).  Returns (N, E) or (B, N, E),
    without gradient."""
    _check_points(x, y)
    _check_common(p, blur, 0.5, None, None, False, cost)
    if not isinstance(v, torch.Tensor) or v.dim() != x.dim() or v.shape[-2] != y.shape[-2]:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"v must have shape (M, E) or (B, M, E) matching y, got {got}")
    if not isinstance(f, torch.Tensor) or not isinstance(g, torch.Tensor) or \
            tuple(f.shape) != tuple(x.shape[:-1]) or tuple(g.shape) != tuple(y.shape[:-1]):
        raise ValueError(f"f must have shape {tuple(x.shape[:-1])} and g "
                         f"{tuple(y.shape[:-1])}")
    V.check_same_device(x=x, v=v, f=f, g=g)
    a = _check_weights("a", a, x)
    b = _check_weights("b", b, y)
    batched = x.dim() == 3
    if not batched:
        x, y, v, f, g = x[None], y[None], v[None], f[None], g[None]
        a = None if a is None else a[None]
        b = None if b is None else b[None]
    with torch.no_grad():
        x, y = _prepare_points(x, y, cost)
        a, b = _uniform_or(a, x), _uniform_or(b, y)
        eps = float(blur) ** p
        kcost = _kernel_cost(cost, p)
        h = _log_weights(b) + g.to(x.dtype) / eps
        softmin = resolve("ot_softmin", backend, (x, y))(x, y, h, eps, kcost)
        plan = resolve("ot_plan_matmul", backend, (x, y))(x, y, h, eps, kcost, v.to(x.dtype))
        # Σ_j b_j e^{(g_j − C_ij)/ε} v_j = e^{−softmin_i/ε} · Σ_j w_ij v_j
        out = (a * torch.exp((f.to(x.dtype) - softmin) / eps))[:, :, None] * plan
    return out if batched else out[0]


@V.autocast_features("z", "prototypes")
def sinkhorn_knopp(
    scores: torch.Tensor | None = None,
    *,
    z: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
    epsilon: float = 0.05,
    n_iters: int = 3,
    backend: str = "auto",
) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp codes (N, K) whose rows sum to 1, computed in the log domain.

    Pass ``scores`` (N, K), or ``z`` (N, D) with ``prototypes`` (K, D) (scores = z·prototypesᵀ
    are then streamed: only the two potentials are held until the codes are written).  Equals
    SwAV's procedure: ``Q = exp(scores/ε)ᵀ / sum``, then ``n_iters`` times normalize prototype
    rows to 1/K and sample columns to 1/N; returns ``N·Qᵀ``.  No gradient (codes are targets).
    """
    V.check_positive_scalar("epsilon", epsilon)
    V.check_int("n_iters", n_iters, 0)
    check_backend_name(backend)  # the scores path runs no backend op, but a typo must not pass
    if scores is not None and (z is not None or prototypes is not None):
        raise ValueError("pass either scores, or z and prototypes, not both")
    if scores is None:
        if z is None or prototypes is None:
            raise ValueError("pass scores, or both z and prototypes")
        V.check_features("z", z)
        V.check_features("prototypes", prototypes)
        V.check_same_dim("z", z, "prototypes", prototypes)
        V.check_same_device(z=z, prototypes=prototypes)
        V.check_same_dtype(z=z, prototypes=prototypes)
    else:
        V.check_features("scores", scores)
    eps = float(epsilon)
    with torch.no_grad():
        # Q_nk = exp(s_nk/ε + u_k + v_n) with prototype potentials u (K) and sample ones v (N).
        if scores is not None:
            logq = scores.to(acc_dtype(scores.dtype)) / eps
            n, k = logq.shape
            u = logq.new_zeros(k)
            v = (-torch.logsumexp(logq.reshape(-1), 0)).expand(n).clone()
            for _ in range(n_iters):
                u = u - torch.logsumexp(logq + u[None, :] + v[:, None], dim=0) - math.log(k)
                v = v - torch.logsumexp(logq + u[None, :] + v[:, None], dim=1) - math.log(n)
            return torch.exp(logq + u[None, :] + v[:, None] + math.log(n))
        u, v, _ = knopp_potentials(z, prototypes, eps, n_iters, backend)
        acc = u.dtype
        n = z.shape[0]
        logq = (z.to(acc) @ prototypes.to(acc).T) / eps
        return torch.exp(logq + u[None, :] + v[:, None] + math.log(n))


def knopp_potentials(z, prototypes, eps: float, n_iters: int, backend: str):
    """Streamed Sinkhorn-Knopp potentials of the scores ``s = z·prototypesᵀ`` (never formed).

    Returns ``(u, v, row_lse)`` with ``log Q_nk = s_nk/ε + u_k + v_n + log N`` the codes of
    :func:`sinkhorn_knopp` (K prototype potentials u, N sample potentials v) and
    ``row_lse_n = LSE_k(s_nk/ε + u_k)`` at the final u, so the code rows sum to
    ``exp(v_n + log N + row_lse_n)`` (exactly 1 after at least one iteration).  No gradient.
    """
    lse = resolve("pairwise_logsumexp", backend, (z, prototypes))
    n, k = z.shape[0], prototypes.shape[0]
    with torch.no_grad():
        u = torch.zeros(k, dtype=acc_dtype(z.dtype), device=z.device)
        row_lse = lse(z, prototypes, 1.0 / eps, u, False)
        v = (-torch.logsumexp(row_lse, 0)).expand(n).clone()
        for _ in range(n_iters):  # u_k ← u_k − LSE_n(s/ε + u_k + v_n), u_k cancels
            u = -lse(prototypes, z, 1.0 / eps, v, False) - math.log(k)
            row_lse = lse(z, prototypes, 1.0 / eps, u, False)
            v = -row_lse - math.log(n)
    return u, v, row_lse
