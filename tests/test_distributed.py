"""SPEC §5: the losses over a process group equal the single-process loss on the concatenated
batch, value and gradients (after DDP-style averaging), with uneven per-rank batches.

One job is spawned per world size (gloo on CPU, ``init_method=file://``); every rank runs every
case for every backend and writes its findings to a JSON file, which the parametrized tests below
read.  Each rank compares against the float64 reference loss computed in one process on the
whole batch.  Gradient check: a rank's gradient of its own feature rows, divided by the world
size, must equal the single-process gradient of those rows (that is what DDP's averaging makes
of it for the encoder weights), and a replicated tensor (temperature, logit_scale/bias, a
MoCo queue, a shared projection ``P`` applied to every feature) must get, after an all-reduce
divided by the world size, the single-process gradient.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.distributed as dist
from helpers import TOL, backends_under_test, leaf64, run_on_gloo, seeded, supports

import fused_losses as fl
from fused_losses import _dispatch
from fused_losses.large_batch import average_gradients, grad_cache_step

# Per-rank row counts of the query side, and of the key side where it may differ.
# World size 3 has a rank without queries (and, where the sides share SIZES, without any row).
SIZES = {2: [5, 3], 3: [4, 0, 6]}
KEY_SIZES = {2: [6, 4], 3: [4, 1, 7]}
D = 6


def _offsets(sizes):
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


@dataclass
class Case:
    """``make(gen, world)`` → {name: (global tensor, per-rank sizes or None = replicated)};
    ``call(t, pg, backend, rank, world, reduction)`` → the loss.  Float tensors are leaves that
    require grad; ``none_side`` names the split whose rows ``reduction="none"`` returns."""

    name: str
    op: str
    make: Callable
    call: Callable
    reductions: tuple = ("mean",)
    none_side: str | None = None
    project: tuple = ()  # split features that go through the shared projection P
    extra: dict = field(default_factory=dict)


def _feat(gen, n):
    return torch.randn(n, D, generator=gen, dtype=torch.float64)


def _scalar(v):
    return torch.tensor(float(v), dtype=torch.float64)


def _labels(gen, n, k=3):
    return torch.randint(0, k, (n,), generator=gen)


def _pairs(gen, world, keys=False):
    s, ks = SIZES[world], (KEY_SIZES[world] if keys else SIZES[world])
    return {"a": (_feat(gen, sum(s)), s), "b": (_feat(gen, sum(ks)), ks)}


def _case_list():
    cases = []

    def clip_make(g, w):
        return {**_pairs(g, w), "scale": (_scalar(9.0), None)}

    cases.append(Case(
        "clip_loss", "info_nce", clip_make,
        lambda t, pg, b, r, w, red: fl.clip_loss(
            t["a"], t["b"], t["scale"], reduction=red, backend=b, process_group=pg),
        reductions=("mean", "sum", "none"), none_side="a", project=("a", "b")))

    def nce_make(g, w):
        return {**_pairs(g, w, keys=True), "t": (_scalar(0.3), None)}

    cases.append(Case(
        "info_nce_more_keys", "info_nce", nce_make,
        lambda t, pg, b, r, w, red: fl.info_nce(
            t["a"], t["b"], temperature=t["t"], reduction=red, backend=b, process_group=pg),
        reductions=("mean", "none"), none_side="a", project=("a", "b")))
    cases.append(Case(
        "info_nce_symmetric_more_keys", "info_nce", nce_make,
        lambda t, pg, b, r, w, red: fl.info_nce(
            t["a"], t["b"], temperature=t["t"], symmetric=True, reduction=red, backend=b,
            process_group=pg),
        reductions=("mean", "sum"), project=("a", "b")))

    def labelled_make(g, w):
        s, ks = SIZES[w], KEY_SIZES[w]
        return {**_pairs(g, w, keys=True), "t": (_scalar(0.2), None),
                "la": (_labels(g, sum(s)), s), "lb": (_labels(g, sum(ks)), ks)}

    cases.append(Case(
        "info_nce_labels_symmetric_decoupled", "info_nce", labelled_make,
        lambda t, pg, b, r, w, red: fl.info_nce(
            t["a"], t["b"], temperature=t["t"], labels=t["la"], key_labels=t["lb"],
            symmetric=True, decoupled=True, reduction=red, backend=b, process_group=pg),
        reductions=("mean", "sum"), project=("a", "b")))

    def queue_make(g, w):
        return {**_pairs(g, w), "t": (_scalar(0.25), None), "queue": (_feat(g, 4), None)}

    for decoupled in (False, True):
        cases.append(Case(
            f"info_nce_extra_negatives{'_decoupled' if decoupled else ''}", "info_nce",
            queue_make,
            lambda t, pg, b, r, w, red, dec=decoupled: fl.info_nce(
                t["a"], t["b"], temperature=t["t"], extra_negatives=t["queue"], decoupled=dec,
                reduction=red, backend=b, process_group=pg),
            reductions=("mean", "none"), none_side="a", project=("a", "b")))

    def supcon_make(g, w):
        s = SIZES[w]
        return {"a": (_feat(g, sum(s)), s), "la": (_labels(g, sum(s)), s),
                "t": (_scalar(0.1), None)}

    cases.append(Case(
        "sup_con", "info_nce", supcon_make,
        lambda t, pg, b, r, w, red: fl.sup_con(
            t["a"], t["la"], temperature=t["t"], reduction=red, backend=b, process_group=pg),
        reductions=("mean", "sum", "none"), none_side="a", project=("a",)))

    def ntx_make(g, w):
        return {**_pairs(g, w), "t": (_scalar(0.5), None)}

    def ntx_global_labels(t, pg, b, r, w, red):
        # nt_xent as info_nce with globally unique pair labels (pair i of rank r is global
        # pair off_r + i), which is what nt_xent means on the concatenated batch.
        if pg is None:
            return fl.nt_xent(t["a"], t["b"], temperature=t["t"], reduction=red, backend=b)
        n = t["a"].shape[0]
        idx = torch.arange(n) + _offsets(SIZES[w])[r]
        z = torch.cat([t["a"], t["b"]])
        return fl.info_nce(z, z, temperature=t["t"], labels=torch.cat([idx, idx]),
                           exclude_diagonal=True, reduction=red, backend=b, process_group=pg)

    cases.append(Case("nt_xent", "info_nce", ntx_make, ntx_global_labels, project=("a", "b")))
    cases.append(Case(
        "nt_xent_public_api", "info_nce", ntx_make,
        lambda t, pg, b, r, w, red: fl.nt_xent(
            t["a"], t["b"], temperature=t["t"], reduction=red, backend=b, process_group=pg),
        project=("a", "b")))

    def siglip_make(g, w):
        return {**_pairs(g, w), "scale": (_scalar(7.0), None), "bias": (_scalar(-3.0), None)}

    cases.append(Case(
        "siglip_loss", "siglip", siglip_make,
        lambda t, pg, b, r, w, red: fl.siglip_loss(
            t["a"], t["b"], t["scale"], t["bias"], reduction=red, backend=b, process_group=pg),
        reductions=("mean", "sum", "none"), none_side="a", project=("a", "b")))

    def ms_make(g, w):
        s = SIZES[w]
        return {"a": (_feat(g, sum(s)), s), "la": (_labels(g, sum(s)), s)}

    for eps in (0.1, None):
        cases.append(Case(
            f"multi_similarity_eps{eps}", "multi_similarity", ms_make,
            lambda t, pg, b, r, w, red, eps=eps: fl.multi_similarity(
                t["a"], t["la"], epsilon=eps, alpha=2.0, beta=10.0, reduction=red, backend=b,
                process_group=pg),
            reductions=("mean", "sum", "none"), none_side="a", project=("a",)))

    def ms_ref_make(g, w):
        spec = labelled_make(g, w)
        del spec["t"]
        return spec

    cases.append(Case(
        "multi_similarity_ref", "multi_similarity", ms_ref_make,
        lambda t, pg, b, r, w, red: fl.multi_similarity(
            t["a"], t["la"], ref_embeddings=t["b"], ref_labels=t["lb"], beta=10.0, reduction=red,
            backend=b, process_group=pg),
        reductions=("mean", "none"), none_side="a", project=("a", "b")))
    return cases


CASES = _case_list()
GRAD_CACHE_CASES = ["grad_cache_ddp_loss_params", "grad_cache_ddp_average_gradients"]
ERROR_CASES = ["empty_global_batch"]


def _dtype_for(backend):
    return torch.float64 if torch.float64 in _dispatch.get_backend(backend).dtypes else (
        torch.float32)


def _rel(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return float("inf")
    if torch.isnan(out).any():
        return float("inf")
    den = ref.norm()
    num = (out - ref).norm()
    return float(num if den == 0 else num / den)


def _run_case(case, backend, reduction, pg, rank, world, seed):
    """The largest relative error over the value and every gradient (or a message)."""
    dtype = _dtype_for(backend)
    gen = torch.Generator().manual_seed(seed)
    spec = case.make(gen, world)
    proj = torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(
        D, D, generator=gen, dtype=torch.float64)
    # Inputs rounded to the backend's dtype; the oracle sees the same values in float64.
    spec = {k: ((v.to(dtype) if v.is_floating_point() else v), s) for k, (v, s) in spec.items()}

    def build(local: bool, as_dtype):
        leaves, inputs = {}, {}
        p = proj.to(as_dtype).clone().requires_grad_(True)
        for k, (v, sizes) in spec.items():
            if local and sizes is not None:
                off = _offsets(sizes)[rank]
                v = v[off : off + sizes[rank]]
            if v.is_floating_point():
                leaf = v.detach().to(as_dtype).clone().requires_grad_(True)
                leaves[k] = leaf
                inputs[k] = leaf @ p if k in case.project else leaf
            else:
                inputs[k] = v
        return p, leaves, inputs

    p1, leaves1, in1 = build(False, torch.float64)
    ref = case.call(in1, None, "reference", rank, world, reduction)
    pd, leavesd, ind = build(True, dtype)
    out = case.call(ind, pg, backend, rank, world, reduction)
    errs = {}
    if reduction == "none":
        sizes = spec[case.none_side][1]
        off = _offsets(sizes)[rank]
        errs["value"] = _rel(out, ref[off : off + sizes[rank]])
        return errs
    errs["value"] = _rel(out, ref)
    ref.backward()
    out.backward()
    errs["grad P"] = _rel(_averaged(pd.grad, pg, world), p1.grad)
    for k, leaf in leavesd.items():
        sizes = spec[k][1]
        if sizes is None:  # replicated: DDP-style averaging
            g = _averaged(leaf.grad, pg, world)
            errs[f"grad {k}"] = _rel(g, leaves1[k].grad)
        else:  # own rows: this rank's graph stands for world_size × its share
            off = _offsets(sizes)[rank]
            errs[f"grad {k}"] = _rel(leaf.grad / world, leaves1[k].grad[off : off + sizes[rank]])
    return errs


def _averaged(grad, pg, world):
    g = grad.detach().clone()
    dist.all_reduce(g, group=pg)
    return g / world


# --------------------------------------------------------------------------------------------
# GradCache under DistributedDataParallel


class _Tower(torch.nn.Module):
    def __init__(self, d_in, with_scale=False):
        super().__init__()
        self.lin1 = torch.nn.Linear(d_in, 8)
        self.drop = torch.nn.Dropout(0.3)
        self.lin2 = torch.nn.Linear(8, D)
        if with_scale:
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.lin2(torch.tanh(self.drop(self.lin1(x))))


def _grad_cache_case(name, pg, rank, world, seed):
    from torch.nn.parallel import DistributedDataParallel as DDP

    inject = name == "grad_cache_ddp_loss_params"
    torch.manual_seed(seed)
    tower_a, tower_b = _Tower(5).double(), _Tower(3, with_scale=inject).double()
    scale = (tower_b.logit_scale if inject
             else torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64)))
    gen = torch.Generator().manual_seed(seed + 1)
    sizes = SIZES[world]
    xa = torch.randn(sum(sizes), 5, generator=gen, dtype=torch.float64)
    xb = torch.randn(sum(sizes), 3, generator=gen, dtype=torch.float64)
    chunk = 2

    # Oracle: one process, the whole batch, every rank's chunks encoded with that rank's RNG.
    ref_a, ref_b = _Tower(5).double(), _Tower(3, with_scale=inject).double()
    ref_a.load_state_dict(tower_a.state_dict())
    ref_b.load_state_dict(tower_b.state_dict())
    ref_scale = ref_b.logit_scale if inject else scale.detach().clone().requires_grad_(True)
    embs_a, embs_b = [], []
    for r, off in enumerate(_offsets(sizes)):
        torch.manual_seed(seed + 100 + r)
        embs_a += [ref_a(c) for c in xa[off : off + sizes[r]].split(chunk)]
        embs_b += [ref_b(c) for c in xb[off : off + sizes[r]].split(chunk)]
    ref_loss = fl.clip_loss(torch.cat(embs_a), torch.cat(embs_b), ref_scale.exp(),
                            backend="reference")
    ref_loss.backward()

    ddp_a, ddp_b = DDP(tower_a, process_group=pg), DDP(tower_b, process_group=pg)
    off = _offsets(sizes)[rank]
    torch.manual_seed(seed + 100 + rank)
    loss = grad_cache_step(
        [ddp_a, ddp_b], [xa[off : off + sizes[rank]], xb[off : off + sizes[rank]]],
        lambda a, b: fl.clip_loss(a, b, scale.exp(), backend="reference", process_group=pg),
        chunk, loss_params=[scale] if inject else None)
    if not inject:
        average_gradients([scale], pg)
    errs = {"value": _rel(loss, ref_loss)}
    for (n, p), (_, q) in zip(tower_a.named_parameters(), ref_a.named_parameters()):
        errs[f"tower_a.{n}"] = _rel(p.grad, q.grad)
    for (n, p), (_, q) in zip(tower_b.named_parameters(), ref_b.named_parameters()):
        errs[f"tower_b.{n}"] = _rel(p.grad, q.grad)
    errs["logit_scale"] = _rel(scale.grad, ref_scale.grad)
    return errs


def _second_order_clip(backend, pg, rank, world, seed):
    """Gradient penalty J = ||∂L/∂a||² + ||∂L/∂b||² of clip_loss over the group: a rank's
    first-order gradient of its rows is world × the single-process one (the convention), so it
    backpropagates its share of J, ||G/world||²; through the collectives' differentiable
    adjoints each rank must then get ∂J/∂(its rows), the single-process second-order gradient.
    (World size 2 only: a rank without rows has no graph to run the second backward with.)"""
    dtype = _dtype_for(backend)
    gen = torch.Generator().manual_seed(seed)
    sizes = SIZES[world]
    a, b = (_feat(gen, sum(sizes)).to(dtype) for _ in range(2))
    a64, b64 = (t.double().requires_grad_() for t in (a, b))
    loss = fl.clip_loss(a64, b64, 9.0, backend="reference")
    ga, gb = torch.autograd.grad(loss, (a64, b64), create_graph=True)
    ref = torch.autograd.grad(ga.pow(2).sum() + gb.pow(2).sum(), (a64, b64))
    off = _offsets(sizes)[rank]
    mine = [t[off : off + sizes[rank]].clone().requires_grad_() for t in (a, b)]
    loss = fl.clip_loss(*mine, 9.0, backend=backend, process_group=pg)
    ga, gb = torch.autograd.grad(loss, mine, create_graph=True)
    got = torch.autograd.grad((ga / world).pow(2).sum() + (gb / world).pow(2).sum(), mine)
    return {f"second-order grad {k}": _rel(g, r[off : off + sizes[rank]])
            for k, (g, r) in enumerate(zip(got, ref))}


def _empty_global_batch(pg):
    """No rank has a row: every rank must raise the same clear error (none left waiting)."""
    x = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    try:
        fl.clip_loss(x, x, 10.0, process_group=pg)
    except ValueError as exc:
        return {"value": 0.0 if "no rows on any rank" in str(exc) else float("inf")}
    return {"value": float("inf")}


# --------------------------------------------------------------------------------------------
# the spawned job


def _case_ids(backends):
    ids = []
    for backend in backends:
        for case in CASES:
            if supports(backend, case.op):
                ids += [f"{backend}/{case.name}/{red}" for red in case.reductions]
    ids += [f"{b}/second_order_clip/mean" for b in backends if supports(b, "info_nce")]
    return ids + [f"reference/{n}/mean" for n in GRAD_CACHE_CASES + ERROR_CASES]


def _worker(rank, world, backends, seed):
    pg = dist.new_group(list(range(world)))  # an explicit group, not only WORLD
    found = {}
    by_name = {c.name: c for c in CASES}
    for cid in _case_ids(backends):
        backend, name, red = cid.split("/")
        try:
            if name == "empty_global_batch":
                found[cid] = _empty_global_batch(pg)
            elif name == "second_order_clip":
                if world == 2:
                    found[cid] = _second_order_clip(backend, pg, rank, world, seed)
            elif name in GRAD_CACHE_CASES:
                found[cid] = _grad_cache_case(name, pg, rank, world, seed)
            else:
                found[cid] = _run_case(by_name[name], backend, red, pg, rank, world, seed)
        except Exception:
            found[cid] = {"error": traceback.format_exc(limit=6)}
    return found


BACKENDS = ["reference"] + [b for b in backends_under_test() if b != "reference"]
_RESULTS: dict[int, tuple[int, list[dict]]] = {}


def _results(world):
    if world not in _RESULTS:
        seed = seeded().initial_seed()
        _RESULTS[world] = (seed, run_on_gloo(_worker, world, BACKENDS, seed))
    return _RESULTS[world]


def _params():
    out = []
    for world in SIZES:
        for cid in _case_ids(BACKENDS):
            if "second_order" in cid and world != 2:
                continue
            out.append(pytest.param(world, cid, id=f"w{world}/{cid}"))
    return out


@pytest.mark.parametrize("world, cid", _params())
def test_matches_single_process(world, cid):
    seed, per_rank = _results(world)
    backend = cid.split("/")[0]
    tol = TOL[_dtype_for(backend)]
    for rank, found in enumerate(per_rank):
        errs = found.get(cid)
        assert errs is not None, f"rank {rank} did not run {cid}"
        assert "error" not in errs, f"rank {rank} (seed {seed}):\n{errs.get('error')}"
        bad = {k: v for k, v in errs.items() if not v <= tol}
        assert not bad, f"rank {rank} (seed {seed}), sizes {SIZES[world]}: {bad} > {tol:.0e}"


# --------------------------------------------------------------------------------------------
# cheap single-process checks of the argument handling


def test_process_group_without_init_raises():
    # The ranks run in spawned processes; this (pytest's) process never initializes a group.
    assert not dist.is_initialized()
    x = leaf64(torch.randn(3, 4))
    with pytest.raises(ValueError, match="process_group"):
        fl.clip_loss(x, x, 10.0, process_group=object())
