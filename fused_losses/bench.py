"""``python -m fused_losses.bench``: time and peak memory of the losses, per backend and peer.

Default (``make bench``): CLIP loss forward+backward, fp32, D=256, N = 1024 … 32768, for the
reference (naive PyTorch: materializes N×N), every fused backend available on this device, and
the peers of the op.  Each (backend, N) runs in a fresh subprocess so its peak RSS is its own;
a case whose estimated memory does not fit in RAM is reported as "would not fit" instead of run,
and once a size times out or fails the larger ones are skipped.  A markdown table goes to
stdout; JSON and CSV rows (with machine, versions, date) and one PNG per op (time and memory vs
N, log-log) under ``--out``.

``--pass``: ``full`` (forward + backward per call), ``fwd`` (forward only, with the autograd
graph recorded as in training, then dropped) or ``bwd`` (backward only: the forward runs once
when the case is built and each timed call is ``loss.backward(retain_graph=True)``; its memory
is what the backward adds on top of the forward's saved state).  Timing the backward directly
rather than as full − fwd keeps it from being the difference of two noisy medians.

CPU timing: one warm-up call (which also measures the peak memory), then up to ``--repeats``
timed calls while the case's ``--budget`` seconds last; when the warm-up call alone takes longer
than the budget it is the one measurement (at those sizes one-time start-up costs are
negligible).  ``--device cuda``: in one process, the measured matmul peak and copy bandwidth
first, then each case timed with ``triton.testing.do_bench`` (median, 20 % and 80 % quantiles),
memory beyond the inputs (and their gradients) from the CUDA allocator's peak; out-of-memory is
reported, not fatal.

Peers (each only when importable, else reported "not installed"): OpenCLIP ``ClipLoss`` and
Inf-CL (clip), OpenCLIP ``SigLipLoss`` (siglip), pytorch-metric-learning ``NTXentLoss``
(nt_xent), ``SupConLoss`` (supcon), ``MultiSimilarityLoss`` + miner (ms), GeomLoss tensorized
and online, and POT (sinkhorn), ``torch.topk`` over row chunks (topk).  Every peer gets the same
hyperparameters as our op; where it still computes something slightly different,
``PEERS[...].note`` says so and the table's notes repeat it.

``--readme [PATH]``: print the README's results section generated from every JSON under
``--out`` (or rewrite the block between the markers in PATH).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

OPS = ("clip", "siglip", "nt_xent", "supcon", "ms", "sinkhorn", "topk", "info_nce", "hcl",
       "debiased", "anchor_tau", "mochi")
# The InfoNCE variants (issue 18), each beside plain one-directional "info_nce" with the same
# temperature: their fused forms add no N²D pass (compare the GFLOP/s columns).
VARIANT_OPS = ("info_nce", "hcl", "debiased", "anchor_tau", "mochi")
PASSES = ("full", "fwd", "bwd")
# Ops on one set of rows (keys are the rows themselves): --M does not apply.
ONE_SET_OPS = ("nt_xent", "supcon")

# One setting per op, shared by our op and every peer of it (the SPEC's conventions, §2–§4).
CLIP_LOGIT_SCALE = 14.0  # exponentiated, as OpenCLIP passes it (≈ 1/0.07)
SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS = 10.0, -10.0  # SigLIP's initialization
NT_XENT_TEMPERATURE = 0.5  # our nt_xent default (SimCLR); pml's own default is 0.07
SUPCON_TEMPERATURE = 0.1
MS_SETTINGS = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}
SINKHORN_SETTINGS = {"p": 2, "blur": 0.05, "scaling": 0.5, "debias": True}
TOPK_K = 10
VARIANT_TEMPERATURE = 0.5  # HCL's default
HCL_SETTINGS = {"beta": 1.0, "tau_plus": 0.1}  # the authors' defaults
MOCHI_SETTINGS = {"n_hard": 64, "n_mix": 32, "n_query_mix": 16}

OP_SETTINGS = {  # how the README and the tables describe each op's settings
    "clip": f"logit_scale={CLIP_LOGIT_SCALE}",
    "siglip": f"logit_scale={SIGLIP_LOGIT_SCALE}, logit_bias={SIGLIP_LOGIT_BIAS}",
    "nt_xent": f"temperature={NT_XENT_TEMPERATURE}; N pairs, 2N rows",
    "supcon": f"temperature={SUPCON_TEMPERATURE}",
    "ms": ", ".join(f"{k}={v}" for k, v in MS_SETTINGS.items()),
    "sinkhorn": ", ".join(f"{k}={v}" for k, v in SINKHORN_SETTINGS.items()),
    "topk": f"k={TOPK_K}",
    "info_nce": f"temperature={VARIANT_TEMPERATURE}, rows only",
    "hcl": f"temperature={VARIANT_TEMPERATURE}, " + ", ".join(
        f"{k}={v}" for k, v in HCL_SETTINGS.items()),
    "debiased": f"temperature={VARIANT_TEMPERATURE}, beta=0, tau_plus={HCL_SETTINGS['tau_plus']}",
    "anchor_tau": "temperature: one learnable value per anchor, around "
                  f"{VARIANT_TEMPERATURE}",
    "mochi": f"temperature={VARIANT_TEMPERATURE}, in-batch negatives, " + ", ".join(
        f"{k}={v}" for k, v in MOCHI_SETTINGS.items()),
}

# Nominal GEMM passes of 2·N·M·D FLOPs: the fused algorithm's forward, and its backward's
# recompute, dX and dY — whatever a given backend really runs.
GEMM_PASSES = {"fwd": 1, "bwd": 3, "full": 4}


# --------------------------------------------------------------------------------------------
# Memory measurement


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRSS:
    """Peak resident memory growth of this process over a region, in bytes.

    Not ``ru_maxrss``: Linux keeps that across ``exec``, so a child started from a large parent
    inherits the parent's peak and would report no growth.  ``VmHWM`` belongs to the address
    space (fresh after exec) and is reset to the current RSS through ``/proc/self/clear_refs``.
    """

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the high-water mark to the current RSS
        except OSError:
            pass
        self.start = _proc_status_kb("VmRSS")
        self.start_hwm = _proc_status_kb("VmHWM")
        return self

    def __exit__(self, *exc):
        peak = _proc_status_kb("VmHWM")
        # If the reset was refused, the growth is measured above the previous high-water mark.
        self.extra_bytes = max(0, peak - max(self.start, self.start_hwm)) * 1024
        return False


# --------------------------------------------------------------------------------------------
# Cases: inputs, the loss of a backend or peer, one timed unit of work per pass.  The CLI and
# the pytest-benchmark suite under bench/ both build their cases here.


@dataclass
class Inputs:
    x: torch.Tensor  # N×D queries / anchors / first view / source points
    y: torch.Tensor | None  # M×D keys / second view / reference embeddings / target points
    labels: torch.Tensor | None
    ref_labels: torch.Tensor | None  # labels of y, for ms with reference embeddings


def similarity_shape(op: str, n: int, m: int | None) -> tuple[int, int]:
    """Rows × columns of the pairwise matrix the op works on (nt_xent: both views, 2N × 2N)."""
    if op == "nt_xent":
        return 2 * n, 2 * n
    if op in ONE_SET_OPS:
        return n, n
    return n, n if m is None else m


def make_inputs(op: str, n: int, m: int | None, d: int, dtype: str, device: str = "cpu",
                seed: int = 0) -> Inputs:
    """Random rows (never zeros: timing on zeros flatters), ~4 rows per label."""
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(seed)

    def rows(k):
        return torch.randn(k, d, device=device, generator=g).to(dt).requires_grad_()

    def labels(k):
        return torch.randint(0, max(2, n // 4), (k,), device=device, generator=g)

    x = rows(n)
    if op in ("clip", "siglip", "sinkhorn", "topk") + VARIANT_OPS:
        return Inputs(x, rows(n if m is None else m), None, None)
    if op == "nt_xent":
        return Inputs(x, rows(n), None, None)
    if op == "ms" and m is not None:  # --M: reference embeddings with their own labels
        return Inputs(x, rows(m), labels(n), labels(m))
    return Inputs(x, None, labels(n), None)


@dataclass(frozen=True)
class Peer:
    """Another library's loss, run beside ours with the same hyperparameters."""

    module: str  # import name; the peer is "not installed" when it cannot be found
    distribution: str  # package name, for the version in the results
    build: Callable[[Inputs], Callable[[], torch.Tensor]]  # inputs -> forward closure
    bytes_estimate: Callable[[int, int, int], float]  # (rows, cols, D) -> peak fp32 bytes
    note: str  # what it computes compared with our op


def _dense_bytes(copies: float):
    """Peak of an implementation that holds ``copies`` fp32 rows×cols matrices at once."""
    return lambda rows, cols, d: copies * rows * cols * 4


def _streamed_bytes(rows: int, cols: int, d: int) -> float:
    """A fused/streamed implementation: O((rows + cols)·D) plus its tile buffers (measured:
    the cpu backend's top-k at 256 × 1,048,576, D=128, peaked at 1.0 copy of the keys beyond
    the inputs and their gradients; 4 copies leaves room)."""
    return 4.0 * (rows + cols) * d * 4 + 64e6


def _open_clip_loss():
    """OpenCLIP's loss module.  ``import open_clip`` imports torchvision, which does not import
    beside every torch build (e.g. the CPU torch 2.13 wheel); its loss.py alone needs only torch,
    so when the package is installed but does not import, that file is loaded by itself: the
    peer is still OpenCLIP's own code (``pip install --no-deps open_clip_torch`` suffices)."""
    try:
        return importlib.import_module("open_clip.loss")
    except ImportError:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
        loss_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
        module = importlib.util.module_from_spec(loss_spec)
        loss_spec.loader.exec_module(module)
        return module


def _open_clip_clip(inp: Inputs):
    loss_fn = _open_clip_loss().ClipLoss()
    return lambda: loss_fn(torch.nn.functional.normalize(inp.x, dim=-1),
                           torch.nn.functional.normalize(inp.y, dim=-1), CLIP_LOGIT_SCALE)


def _open_clip_siglip(inp: Inputs):
    loss_fn = _open_clip_loss().SigLipLoss()
    return lambda: loss_fn(torch.nn.functional.normalize(inp.x, dim=-1),
                           torch.nn.functional.normalize(inp.y, dim=-1),
                           SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS)


def _inf_cl_clip(inp: Inputs):
    from inf_cl import cal_inf_loss

    scale = torch.tensor(CLIP_LOGIT_SCALE, device=inp.x.device)
    d = inp.x.shape[1]

    def forward():
        x = torch.nn.functional.normalize(inp.x, dim=-1)
        y = torch.nn.functional.normalize(inp.y, dim=-1)
        # one direction per call: symmetric CLIP is the mean of image→text and text→image
        return (cal_inf_loss(x, y, scale=scale, head_dim=d)
                + cal_inf_loss(y, x, scale=scale, head_dim=d)) / 2

    return forward


def _pml_nt_xent(inp: Inputs):
    from pytorch_metric_learning import losses

    loss_fn = losses.NTXentLoss(temperature=NT_XENT_TEMPERATURE)
    n = inp.x.shape[0]
    pair_labels = torch.arange(n, device=inp.x.device).repeat(2)  # row i and row N+i: a pair
    return lambda: loss_fn(torch.cat([inp.x, inp.y]), pair_labels)


def _pml_supcon(inp: Inputs):
    from pytorch_metric_learning import losses

    loss_fn = losses.SupConLoss(temperature=SUPCON_TEMPERATURE)
    return lambda: loss_fn(inp.x, inp.labels)


def _pml_multi_similarity(inp: Inputs):
    from pytorch_metric_learning import losses, miners

    s = MS_SETTINGS
    loss_fn = losses.MultiSimilarityLoss(alpha=s["alpha"], beta=s["beta"], base=s["base"])
    miner = miners.MultiSimilarityMiner(s["epsilon"])
    if inp.y is None:  # pml drops self-pairs because ref_labels *is* labels, as ours does
        return lambda: loss_fn(inp.x, inp.labels, miner(inp.x, inp.labels))
    return lambda: loss_fn(inp.x, inp.labels, miner(inp.x, inp.labels, inp.y, inp.ref_labels),
                           inp.y, inp.ref_labels)


def _geomloss(backend: str):
    def build(inp: Inputs):
        from geomloss import SamplesLoss

        loss_fn = SamplesLoss("sinkhorn", backend=backend, **SINKHORN_SETTINGS)
        return lambda: loss_fn(inp.x, inp.y)

    return build


def _pot_sinkhorn(inp: Inputs):
    import ot

    eps = SINKHORN_SETTINGS["blur"] ** SINKHORN_SETTINGS["p"]

    def ot_eps(u, v):
        # ½‖u−v‖²: the SPEC's p=2 cost; KL-regularized value = OT_ε; envelope gradient as ours
        cost = ot.dist(u, v, metric="sqeuclidean") / 2
        return ot.solve(cost, reg=eps, reg_type="KL", grad="envelope").value

    return lambda: ot_eps(inp.x, inp.y) - (ot_eps(inp.x, inp.x) + ot_eps(inp.y, inp.y)) / 2


TOPK_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of fp32 scores per chunk of the chunked-torch peer


def _torch_chunked_topk(inp: Inputs):
    # What one writes without this package: torch.topk over row chunks of x @ yᵀ (each chunk's
    # scores are freed once its top-k is taken; autograd keeps only the indices).
    rows = max(1, TOPK_CHUNK_ELEMENTS // inp.y.shape[0])

    def forward():
        k = min(TOPK_K, inp.y.shape[0])
        vals = [torch.topk(xc @ inp.y.T, k, dim=1).values for xc in inp.x.split(rows)]
        return torch.cat(vals).sum()

    return forward


def _nt_xent_pml_bytes(rows: int, cols: int, d: int) -> float:
    # NTXentLoss builds a |positive pairs| × |negative pairs| = 2N × 2N(2N−2) tensor, a few
    # fp32 copies of it (masked, exp, saved for backward) and a bool mask: ~20 bytes/element.
    return 20.0 * rows * rows * (rows - 2) + 8.0 * rows * cols * 4


PEERS: dict[tuple[str, str], Peer] = {
    ("clip", "open_clip"): Peer(
        "open_clip", "open_clip_torch", _open_clip_clip, _dense_bytes(8),
        "OpenCLIP ClipLoss on L2-normalized features, logit_scale 14: the same quantity; "
        "materializes both N×M logit matrices"),
    ("clip", "inf_cl"): Peer(
        "inf_cl", "inf-cl", _inf_cl_clip, _streamed_bytes,
        "Inf-CL cal_inf_loss, one direction per call: the mean of the two directions on "
        "L2-normalized features, scale 14 — the same quantity; CUDA only, D a power of two "
        "≤ 256"),
    ("siglip", "open_clip"): Peer(
        "open_clip", "open_clip_torch", _open_clip_siglip, _dense_bytes(8),
        "OpenCLIP SigLipLoss on L2-normalized features, scale 10, bias −10: the same quantity"),
    ("nt_xent", "pml"): Peer(
        "pytorch_metric_learning", "pytorch-metric-learning", _pml_nt_xent, _nt_xent_pml_bytes,
        "pytorch-metric-learning NTXentLoss(temperature=0.5) on [z1; z2] with labels "
        "[0..N−1, 0..N−1]: the same quantity (it adds 1e-20 inside its log); builds a "
        "2N × 2N(2N−2) tensor"),
    ("supcon", "pml"): Peer(
        "pytorch_metric_learning", "pytorch-metric-learning", _pml_supcon, _dense_bytes(10),
        "pytorch-metric-learning SupConLoss(temperature=0.1): the same quantity (its mean "
        "skips anchors whose loss is exactly 0, ours anchors without a positive)"),
    ("ms", "pml"): Peer(
        "pytorch_metric_learning", "pytorch-metric-learning", _pml_multi_similarity,
        _dense_bytes(12),
        "pytorch-metric-learning MultiSimilarityLoss(2, 50, 0.5) + MultiSimilarityMiner(0.1): "
        "the same quantity"),
    ("sinkhorn", "geomloss"): Peer(
        "geomloss", "geomloss", _geomloss("tensorized"), _dense_bytes(12),
        "GeomLoss SamplesLoss('sinkhorn', p=2, blur=0.05, scaling=0.5, debias=True, "
        "backend='tensorized'): the same algorithm; N×M cost matrices"),
    ("sinkhorn", "geomloss_online"): Peer(
        "pykeops", "pykeops", _geomloss("online"), _streamed_bytes,
        "GeomLoss as above with backend='online' (KeOps, streamed; compiles on its first "
        "call, which is the untimed warm-up)"),
    ("topk", "torch_chunked"): Peer(
        "torch", "torch", _torch_chunked_topk,
        lambda rows, cols, d: 2.0 * min(rows * cols, TOPK_CHUNK_ELEMENTS) * 4,
        "torch.topk(x_c @ yᵀ, k) over row chunks of ≤ 2²⁶ scores (256 MiB fp32): the same "
        "values; ties may pick other indices"),
    ("sinkhorn", "pot"): Peer(
        "ot", "POT", _pot_sinkhorn, _dense_bytes(16),
        "POT ot.solve(½‖x−y‖², reg=blur²=ε, reg_type='KL', grad='envelope') — its log-domain "
        "Sinkhorn — on (x,y), (x,x), (y,y): S_ε = OT_xy − ½(OT_xx + OT_yy), the same quantity, "
        "but without ε-scaling: up to 1000 iterations at the final ε (its defaults, tol 1e-9), "
        "so it may stop unconverged and its value differ. (ot.sinkhorn2 is not used: it "
        "returns ⟨π, C⟩ without the entropic term and backpropagates through every "
        "iteration.)"),
}


def peer_names(op: str) -> list[str]:
    return [name for (peer_op, name) in PEERS if peer_op == op]


def _is_peer_name(name: str) -> bool:
    return any(name == peer_name for (_, peer_name) in PEERS)


def unavailable_reason(op: str, backend: str, device: str) -> str | None:
    """Why (op, backend) cannot run here at all ("not installed", …), or None."""
    if (op, backend) in PEERS:
        try:
            found = importlib.util.find_spec(PEERS[op, backend].module) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else "not installed"
    import fused_losses

    try:
        be = fused_losses.get_backend(backend)
    except (KeyError, ValueError) as exc:
        return f"unknown backend: {exc}"
    reason = be.availability()
    if reason is not None:
        return f"unavailable: {reason}"
    if device not in be.devices:
        return f"unavailable: does not run on {device}"
    return None


def make_forward(op: str, backend: str, inp: Inputs) -> Callable[[], torch.Tensor]:
    """The loss of ``op`` on ``backend`` (one of ours, or a peer named in ``PEERS``)."""
    if (op, backend) in PEERS:
        return PEERS[op, backend].build(inp)
    import fused_losses as FL

    x, y, labels = inp.x, inp.y, inp.labels
    if op == "clip":
        return lambda: FL.clip_loss(x, y, CLIP_LOGIT_SCALE, backend=backend)
    if op == "siglip":
        return lambda: FL.siglip_loss(x, y, SIGLIP_LOGIT_SCALE, SIGLIP_LOGIT_BIAS,
                                      backend=backend)
    if op == "nt_xent":
        return lambda: FL.nt_xent(x, y, temperature=NT_XENT_TEMPERATURE, backend=backend)
    if op == "supcon":
        return lambda: FL.sup_con(x, labels, temperature=SUPCON_TEMPERATURE, backend=backend)
    if op == "ms":
        refs = {} if y is None else {"ref_embeddings": y, "ref_labels": inp.ref_labels}
        return lambda: FL.multi_similarity(x, labels, **refs, **MS_SETTINGS, backend=backend)
    if op == "sinkhorn":
        return lambda: FL.sinkhorn(x, y, **SINKHORN_SETTINGS, backend=backend)
    if op == "topk":  # k nearest keys per row; their values backpropagated
        return lambda: FL.similarity_topk(x, y, TOPK_K, backend=backend)[0].sum()
    t = VARIANT_TEMPERATURE
    if op == "info_nce":
        return lambda: FL.info_nce(x, y, temperature=t, backend=backend)
    if op == "hcl":
        return lambda: FL.hard_negative_info_nce(x, y, temperature=t, **HCL_SETTINGS,
                                                 backend=backend)
    if op == "debiased":
        return lambda: FL.hard_negative_info_nce(x, y, temperature=t, beta=0.0,
                                                 tau_plus=HCL_SETTINGS["tau_plus"],
                                                 backend=backend)
    if op == "anchor_tau":
        taus = torch.full((x.shape[0],), t, device=x.device, requires_grad=True)
        return lambda: FL.info_nce(x, y, temperature=taus, backend=backend)
    if op == "mochi":
        gen = torch.Generator(device=x.device).manual_seed(0)
        kw = dict(MOCHI_SETTINGS, n_hard=min(MOCHI_SETTINGS["n_hard"], y.shape[0] - 1))
        return lambda: FL.mochi_info_nce(x, y, temperature=t, **kw, generator=gen,
                                         backend=backend)
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


@dataclass
class Case:
    inputs: Inputs
    forward: Callable[[], torch.Tensor]
    run: Callable[[], torch.Tensor]  # one timed unit of work; returns the loss

    def grad_leaves(self) -> list[torch.Tensor]:
        return _grad_leaves(self.inputs)


def _grad_leaves(inputs: Inputs) -> list[torch.Tensor]:
    return [t for t in (inputs.x, inputs.y) if t is not None]


def make_case(op: str, backend: str, n: int, m: int | None, d: int, dtype: str,
              device: str = "cpu", pass_: str = "full") -> Case:
    """Inputs, the loss and the unit of work of one benchmark case (see the module's doc for
    what each pass times)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    inputs = make_inputs(op, n, m, d, dtype, device)
    forward = make_forward(op, backend, inputs)
    def clear_grads():
        for t in _grad_leaves(inputs):
            t.grad = None

    if pass_ == "fwd":
        run = forward
    elif pass_ == "full":
        def run():
            loss = forward()
            loss.backward()
            clear_grads()
            return loss
    else:
        loss = forward()

        def run():
            loss.backward(retain_graph=True)
            clear_grads()
            return loss

    return Case(inputs, forward, run)


# --------------------------------------------------------------------------------------------
# Memory estimates ("would not fit")


# Allocator slack and library buffers beyond the formulas below: the reference CLIP case grew
# by ~14 fp32 N×N copies at N=2048 but ~7 at N=16384.
FIXED_OVERHEAD_BYTES = 256e6


def estimate_bytes(op: str, backend: str, n: int, m: int | None, d: int,
                   dtype: str = "float32") -> float:
    """Conservative peak memory of one case: the reference and the dense peers hold several
    rows×cols matrices (measured at N=16384: reference CLIP ≈ 7 fp32 N×N copies, GeomLoss
    tensorized ≈ 8.8), the fused backends O((rows+cols)·D); plus a fixed allowance for
    allocator and library buffers, which dominates at small N."""
    rows, cols = similarity_shape(op, n, m)
    scale = max(4, torch.empty((), dtype=getattr(torch, dtype)).element_size()) / 4
    inputs = 4.0 * (rows + cols) * d * 4  # inputs, normalized copies, gradients
    if (op, backend) in PEERS:
        est = PEERS[op, backend].bytes_estimate(rows, cols, d)
    elif backend == "reference":
        copies = {"sinkhorn": 6, "topk": 4}.get(op, 8)
        est = _dense_bytes(copies)(rows, cols, d)
    else:
        est = _streamed_bytes(rows, cols, d)
    return scale * (est + inputs) + FIXED_OVERHEAD_BYTES


def _available_ram() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9


def _available_memory(device: str) -> float:
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    return _available_ram()


def _would_not_fit(op, backend, n, m, d, dtype, device) -> str | None:
    est = estimate_bytes(op, backend, n, m, d, dtype)
    if est > 0.8 * _available_memory(device):
        return f"would not fit (est. {est / 1e9:.1f} GB)"
    return None


def flops(op: str, pass_: str, n: int, m: int | None, d: int) -> float | None:
    """Nominal FLOPs (see ``GEMM_PASSES``); None for Sinkhorn, whose pass count depends on the
    ε schedule, and for top-k's backward, which only gathers k rows."""
    rows, cols = similarity_shape(op, n, m)
    if op == "sinkhorn" or (op == "topk" and pass_ == "bwd"):
        return None
    passes = 1 if op == "topk" else GEMM_PASSES[pass_]
    return passes * 2.0 * rows * cols * d


def _add_rates(row: dict, peaks: dict) -> dict:
    f = flops(row["op"], row["pass"], row["N"], row.get("M_arg"), row["D"])
    row["gflops"] = None if f is None else f / row["median_s"] / 1e9
    peak = peaks.get(f"matmul_{row['dtype']}_gflops")
    if row["gflops"] is not None and peak:
        row["pct_of_matmul_peak"] = 100 * row["gflops"] / peak
    return row


# --------------------------------------------------------------------------------------------
# CPU: one subprocess per case (its peak RSS is its own), warm-up + repeat median timer

WARMUP_ROWS = 64  # rows of the tiny copy of each case run first in its subprocess


def _case_body(spec: dict) -> dict:
    """Run in the child: a tiny copy of the case first (loads libraries, starts thread pools,
    JIT-compiles KeOps/Triton — one-time costs kept out of both measurements), then the case:
    one warm-up call measuring the peak memory, then timed calls while the budget lasts."""
    make_case(spec["op"], spec["backend"], min(spec["N"], WARMUP_ROWS),
              None if spec["M_arg"] is None else min(spec["M_arg"], WARMUP_ROWS), spec["D"],
              spec["dtype"], "cpu", spec["pass"]).run()
    case = make_case(spec["op"], spec["backend"], spec["N"], spec["M_arg"], spec["D"],
                     spec["dtype"], "cpu", spec["pass"])
    with PeakRSS() as mem:
        start = time.perf_counter()
        loss = case.run()
        first_s = time.perf_counter() - start
        value = float(loss.detach().float())
        del loss  # a fwd loss holds its graph: not kept through the timed calls
    spent, times = first_s, []
    while len(times) < spec["repeats"] and spent < spec["budget_s"]:
        start = time.perf_counter()
        case.run()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    timed = sorted(times) or [first_s]  # the warm-up alone outlasted the budget: it is the time
    return {"median_s": timed[len(timed) // 2], "min_s": timed[0], "timed_calls": len(times),
            "peak_extra_mb": mem.extra_bytes / 2**20, "value": value}


def _row_head(op, backend, pass_, n, m, d, dtype) -> dict:
    """The case's identity; M is the key count used (None for one-set ops), M_arg the --M given
    (dropped from the saved rows)."""
    return {"op": op, "backend": backend, "pass": pass_, "N": n,
            "M": None if n is None or op in ONE_SET_OPS else (n if m is None else m),
            "M_arg": m, "D": d, "dtype": dtype}


def run_case(op, backend, n, m, d, dtype, pass_="full", repeats=3, budget_s=2.0,
             timeout=120.0, peaks=None) -> dict:
    row = _row_head(op, backend, pass_, n, m, d, dtype)
    unfit = _would_not_fit(op, backend, n, m, d, dtype, "cpu")
    if unfit:
        return row | {"status": unfit, "est_gb": estimate_bytes(op, backend, n, m, d, dtype) / 1e9}
    spec = {k: row[k] for k in ("op", "backend", "pass", "N", "M_arg", "D", "dtype")}
    spec.update(repeats=repeats, budget_s=budget_s)
    code = ("import json, sys; from fused_losses.bench import _case_body; "
            "print(json.dumps(_case_body(json.loads(sys.argv[1]))))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return row | {"status": f"timeout (> {timeout:g} s)"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        if proc.returncode == -signal.SIGKILL:  # what the kernel's OOM killer sends
            return row | {"status": "out of memory (killed)"}
        if any("MemoryError" in line or "DefaultCPUAllocator" in line for line in lines[-3:]):
            return row | {"status": "out of memory"}
        if proc.returncode < 0:
            return row | {"status": f"failed: {signal.Signals(-proc.returncode).name}"}
        return row | {"status": f"failed: {lines[-1][:120]}"}
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]), status="ok")
    return _add_rates(row, peaks or {})


def cpu_peaks(dtype: str = "float32") -> dict:
    """Measured matmul rate of this CPU in ``dtype`` (2048³, random data, median of 3 after a
    warm-up): the ceiling the GEMM-bound losses are compared with."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 2048, generator=g).to(dt)
    b = torch.randn(2048, 2048, generator=g).to(dt)
    a @ b
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return {f"matmul_{dtype}_gflops": 2 * 2048**3 / sorted(times)[1] / 1e9}


# --------------------------------------------------------------------------------------------
# GPU: in-process, timed with triton.testing.do_bench, memory from the CUDA allocator

DO_BENCH_QUANTILES = [0.5, 0.2, 0.8]


def _timing_fields(quantiles_ms) -> dict:
    """do_bench(..., quantiles=[0.5, 0.2, 0.8]) milliseconds -> the row's seconds."""
    median_ms, p20_ms, p80_ms = quantiles_ms
    return {"median_s": median_ms / 1e3, "p20_s": p20_ms / 1e3, "p80_s": p80_ms / 1e3}


def gpu_peaks() -> dict:
    """Measured ceilings of this GPU (METHOD: time the roofline, do not quote the datasheet):
    bf16 and fp32(tf32 off) matmul at 8192³ on random data, device-to-device copy bandwidth."""
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        a = torch.randn(8192, 8192, device="cuda", dtype=dt, generator=g)
        b = torch.randn(8192, 8192, device="cuda", dtype=dt, generator=g)
        ms = do_bench(lambda a=a, b=b: a @ b, return_mode="median")
        out[f"matmul_{name}_gflops"] = 2 * 8192**3 / ms / 1e6
        del a, b
    out["matmul_float16_gflops"] = out["matmul_bfloat16_gflops"]  # same tensor-core rate
    src = torch.randn(2**28, device="cuda", generator=g)
    dst = torch.empty_like(src)
    ms = do_bench(lambda s=src, t=dst: t.copy_(s), return_mode="median")
    out["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    torch.cuda.empty_cache()
    return out


def run_case_gpu(op, backend, n, m, d, dtype, pass_="full", peaks=None) -> dict:
    from triton.testing import do_bench

    row = _row_head(op, backend, pass_, n, m, d, dtype)
    unfit = _would_not_fit(op, backend, n, m, d, dtype, "cuda")
    if unfit:
        return row | {"status": unfit, "est_gb": estimate_bytes(op, backend, n, m, d, dtype) / 1e9}
    case = None
    try:
        torch.cuda.empty_cache()
        case = make_case(op, backend, n, m, d, dtype, "cuda", pass_)
        # the baseline: inputs (and, for bwd, the forward's saved state) plus the gradients
        # the pass writes; "extra" is what the pass adds on top
        grads = sum(t.numel() * t.element_size() for t in case.grad_leaves())
        base = torch.cuda.memory_allocated() + (0 if pass_ == "fwd" else grads)
        torch.cuda.reset_peak_memory_stats()
        loss = case.run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        value = float(loss.detach().float())
        del loss
        quantiles = do_bench(case.run, quantiles=DO_BENCH_QUANTILES)
    except torch.cuda.OutOfMemoryError:
        return row | {"status": "out of memory"}
    except Exception as exc:  # a backend or peer that cannot run this case: say why, go on
        return row | {"status": f"failed: {type(exc).__name__}: {str(exc)[:100]}"}
    finally:
        del case
        torch.cuda.empty_cache()
    row.update(_timing_fields(quantiles), status="ok", value=value,
               peak_extra_mb=max(0, peak - base) / 2**20)
    return _add_rates(row, peaks or {})


# --------------------------------------------------------------------------------------------
# Reporting: machine, table, CSV, plots, README section


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import fused_losses

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peer_versions = {}
    for peer in PEERS.values():
        try:
            peer_versions[peer.distribution] = importlib.metadata.version(peer.distribution)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backends": fused_losses.available_backends(), "peers": peer_versions}


def machine_label(info: dict, device: str = "cpu") -> str:
    if device == "cuda" and info.get("gpu"):
        return str(info["gpu"])
    return f"{info.get('cpu', '?')}, {info.get('threads', '?')} threads"


def _fmt(v, spec=".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(rows) -> str:
    pct = any("pct_of_matmul_peak" in r for r in rows)
    quant = any("p20_s" in r for r in rows)
    head = ("| op | backend | pass | N | M | D | dtype | median s |"
            + (" p20–p80 s |" if quant else "") + " GFLOP/s |"
            + (" % matmul peak |" if pct else "") + " peak extra MB | loss | status |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lead = (f"| {r['op']} | {r['backend']} | {r.get('pass', 'full')} | {_fmt(r['N'], 'd')} "
                f"| {_fmt(r.get('M'), 'd')} | {r['D']} | {r['dtype']} | ")
        if r.get("status") == "ok":
            mid = f"{r['median_s']:.4f} | " + (
                f"{_fmt(r.get('p20_s'), '.4f')}–{_fmt(r.get('p80_s'), '.4f')} | " if quant else "")
            mid += f"{_fmt(r.get('gflops'))} | " + (
                f"{_fmt(r.get('pct_of_matmul_peak'))} | " if pct else "")
            out.append(lead + mid + f"{r['peak_extra_mb']:.0f} | {_fmt(r.get('value'), '.5g')} "
                       "| ok |")
        else:
            blanks = 4 + quant + pct
            out.append(lead + "– | " * blanks + f"{r['status']} |")
    return "\n".join(out)


def notes(rows) -> list[str]:
    """What the table's columns mean, and how each peer present differs from our op."""
    passes = sorted({r.get("pass", "full") for r in rows})
    out = [
        "GFLOP/s: nominal " + ", ".join(f"{GEMM_PASSES[p]}·2·N·M·D ({p})" for p in passes)
        + " — the fused algorithm's GEMM passes, whatever a backend runs.",
        "peak extra MB: CPU, peak RSS growth of the case's subprocess during its first call; "
        "GPU, allocator peak beyond the inputs and their gradients.",
    ]
    if "bwd" in passes:
        out.append("bwd: loss.backward(retain_graph=True) on a graph built once; memory is what "
                   "the backward adds to the forward's saved state.")
    seen = []
    for r in rows:
        key = (r["op"], r["backend"])
        if key in PEERS and key not in seen:
            seen.append(key)
            out.append(f"{r['backend']} ({r['op']}): {PEERS[key].note}.")
    return out


CSV_FIELDS = ["op", "backend", "pass", "N", "M", "D", "dtype", "status", "median_s", "p20_s",
              "p80_s", "min_s", "timed_calls", "peak_extra_mb", "gflops", "pct_of_matmul_peak",
              "value", "est_gb", "machine", "torch", "date"]


def write_csv(path: str, rows, info: dict, device: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r | {"machine": machine_label(info, device), "torch": info["torch"],
                                 "date": info["date"]})


def write_plots(rows, out_dir: str, stem: str, title: str) -> list[dict]:
    """One PNG per (op, dtype, D): time and peak memory vs N, log-log, a line per backend/peer.
    Cases that did not run are absent from their line.  Returns {op, pass, dtype, D, file} per
    PNG written."""
    try:
        import matplotlib
    except ImportError:  # the bench extra is optional (the GPU image may lack it)
        print("matplotlib not installed: no plots (pip install 'fused-losses[bench]')",
              file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["op"], r["dtype"], r["D"], r.get("pass", "full")), []).append(r)
    written = []
    for (op, dtype, d, pass_), group in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        panels = (("median_s", "median time per call (s)"),
                  ("peak_extra_mb", "peak memory beyond inputs (MB)"))
        for ax, (field, label) in zip(axes, panels):
            plotted = False
            for backend in dict.fromkeys(r["backend"] for r in group):
                # a log axis cannot show 0 (a tiny case below the RSS resolution)
                pts = sorted((r["N"], r[field]) for r in group
                             if r["backend"] == backend and r[field] > 0)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=backend)
                    plotted = True
            ax.set_xlabel("N")
            ax.set_ylabel(label)
            if not plotted:
                ax.text(0.5, 0.5, "nothing measurable", ha="center", transform=ax.transAxes)
                continue
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{op} ({pass_}), {dtype}, D={d} — {title}")
        fig.tight_layout()
        name = f"{stem}-{op}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        written.append({"op": op, "pass": pass_, "dtype": dtype, "D": d, "file": name})
    return written


README_BEGIN = "<!-- bench-results:begin (generated: python -m fused_losses.bench --readme) -->"
README_END = "<!-- bench-results:end -->"


def _short_status(status: str) -> str:
    for prefix in ("would not fit", "timeout", "out of memory", "skipped", "not installed"):
        if status.startswith(prefix):
            return prefix
    return "failed"


def results_markdown(folder: str) -> str:
    """The README's results section: every run saved under ``folder`` (recursively), grouped by
    machine; per (op, pass, dtype, D, fixed --M) one table of N × backend (newest measurement
    wins)."""
    cells: dict[tuple, dict] = {}  # (machine, case, backend, N) -> newest row
    machines: dict[str, dict] = {}
    missing: dict[str, set] = {}
    plots: dict[tuple, tuple[str, str]] = {}  # (machine, case) -> (date, file) of the newest
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
        with open(path) as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError:
                continue
        if not isinstance(data, dict) or not {"machine", "rows"} <= data.keys():
            continue
        info = data["machine"]
        device = data.get("args", {}).get("device", "cpu")
        fixed_m = data.get("args", {}).get("M")  # None: M = N
        label = machine_label(info, device)
        m = machines.setdefault(label, {"device": device, "torch": set(), "dates": set(),
                                        "peaks": {}})
        m["torch"].add(info.get("torch", "?"))
        m["dates"].add(str(info.get("date", "?"))[:10])
        m["peaks"].update(info.get("peaks", {}))
        for plot in data.get("plots", []):
            key = (label, (plot["op"], plot["pass"], plot["dtype"], plot["D"], fixed_m))
            if key not in plots or str(info.get("date")) >= plots[key][0]:
                file = os.path.join(os.path.dirname(path), plot["file"]).replace(os.sep, "/")
                plots[key] = (str(info.get("date")), file)
        for r in data["rows"]:
            if r.get("N") is None:
                missing.setdefault(label, set()).add(f"{r['backend']} ({r['op']}: {r['status']})")
                continue
            case = (r["op"], r.get("pass", "full"), r["dtype"], r["D"], fixed_m)
            key = (label, case, r["backend"], r["N"])
            if key not in cells or str(info.get("date")) >= cells[key]["date"]:
                cells[key] = r | {"date": str(info.get("date"))}
    out = [f"Generated from `{folder}/` by `python -m fused_losses.bench --readme`. Cells: median "
           "time per call and peak memory beyond the inputs (CPU: peak RSS growth of the case's "
           "own subprocess; GPU: CUDA allocator peak beyond inputs and gradients)."]
    if not any(m["device"] == "cuda" for m in machines.values()):
        out.append("\nNo GPU run is saved yet.")
    for label, m in machines.items():
        kind = "GPU" if m["device"] == "cuda" else "CPU, no GPU"
        peaks = ", ".join(f"{k.split('_')[1]} matmul {v:,.0f} GFLOP/s"
                          for k, v in sorted(m["peaks"].items()) if k.endswith("_gflops"))
        out.append(f"\n### {label} ({kind})\n\ntorch {', '.join(sorted(m['torch']))}; measured "
                   f"{', '.join(sorted(m['dates']))}" + (f"; measured peak: {peaks}" if peaks
                                                         else "") + ".")
        cases = sorted({k[1] for k in cells if k[0] == label}, key=lambda c: (OPS.index(c[0])
                       if c[0] in OPS else 99, c[1:4], c[4] or 0))
        for case in cases:
            op, pass_, dtype, d, fixed_m = case
            keys = [k for k in cells if k[0] == label and k[1] == case]
            backends = list(dict.fromkeys(k[2] for k in keys))
            sizes = sorted({k[3] for k in keys})
            keys_m = "" if fixed_m is None else f", M={fixed_m:,} keys"
            out.append(f"\n**{op}** ({OP_SETTINGS.get(op, '')}), {pass_}, {dtype}, D={d}{keys_m}\n")
            out.append("| N | " + " | ".join(f"`{b}`" for b in backends) + " |")
            out.append("|---:|" + "---|" * len(backends))
            for n in sizes:
                line = []
                for b in backends:
                    r = cells.get((label, case, b, n))
                    if r is None:
                        line.append("")
                    elif r.get("status") == "ok":
                        line.append(f"{r['median_s']:.3g} s, {r['peak_extra_mb']:,.0f} MB")
                    else:
                        line.append(_short_status(r["status"]))
                out.append(f"| {n:,} | " + " | ".join(line) + " |")
            for b in backends:
                if (op, b) in PEERS:
                    out.append(f"\n`{b}`: {PEERS[op, b].note}.")
            if (label, case) in plots:
                out.append(f"\n![{op} {pass_} {dtype} D={d}{keys_m} on {label}]"
                           f"({plots[label, case][1]})")
        if missing.get(label):
            out.append("\nNot run on this machine: " + "; ".join(sorted(missing[label])) + ".")
    return "\n".join(out)


def update_readme(path: str, markdown: str) -> None:
    with open(path) as fh:
        text = fh.read()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: markers {README_BEGIN!r} … {README_END!r} not found")
    with open(path, "w") as fh:
        fh.write(text[:start + len(README_BEGIN)] + "\n" + markdown + "\n" + text[end:])


# --------------------------------------------------------------------------------------------
# Sweep and command line


def _default_backends(device: str) -> list[str]:
    """The reference plus every fused backend that runs on ``device`` (not interpreted Triton)."""
    import fused_losses

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return ["reference"] + [
        b for b in fused_losses.available_backends()
        if b != "reference" and device in fused_losses.get_backend(b).devices
        and not (b == "triton" and interpreted)]


def _plan(args) -> list[tuple[str, str]]:
    """(op, backend) pairs: ours on every op; a peer name only on the ops it is a peer of."""
    pairs = []
    for op in args.ops:
        names = args.backends or (_default_backends(args.device) + peer_names(op))
        for backend in names:
            if _is_peer_name(backend) and (op, backend) not in PEERS:
                continue  # e.g. "pml" with --ops clip ms: pml is a peer of ms only
            pairs.append((op, backend))
    return pairs


def _sweep(args, run_one) -> list[dict]:
    """ops × backends × sizes.  A backend or peer that cannot run here gets one row saying why;
    once a size times out or fails, the larger ones are skipped (an estimate that says "would
    not fit" is still given for each larger size)."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra is optional (the GPU image may lack it)
        tqdm = None
    plan = _plan(args)
    total = len(plan) * len(args.sizes)
    progress = tqdm(total=total, desc="bench", unit="case", file=sys.stderr) if tqdm else None

    def log(msg):
        if progress is not None:
            progress.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    rows = []
    for op, backend in plan:
        reason = unavailable_reason(op, backend, args.device)
        if reason is not None:
            rows.append(_row_head(op, backend, args.pass_, None, args.M, args.dim, args.dtype)
                        | {"status": reason})
            log(f"  {op} {backend}: {reason}")
            if progress is not None:
                progress.update(len(args.sizes))
            continue
        stopped_at = None
        for n in args.sizes:
            if progress is not None:
                progress.set_postfix_str(f"{op} {backend} N={n}")
            if stopped_at is not None:
                unfit = _would_not_fit(op, backend, n, args.M, args.dim, args.dtype, args.device)
                row = _row_head(op, backend, args.pass_, n, args.M, args.dim, args.dtype) | {
                    "status": unfit or f"skipped (N={stopped_at} did not run)"}
            else:
                row = run_one(op, backend, n)
                if row["status"] != "ok" and not row["status"].startswith("would not fit"):
                    stopped_at = n
            rows.append(row)
            log(f"  {op} {backend} N={n}: {row['status']}"
                + (f" {row['median_s'] * 1e3:.2f} ms" if row["status"] == "ok" else ""))
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    return rows


def _save(args, info: dict, rows: list[dict], title: str) -> str:
    """JSON, CSV, markdown and PNGs under --out; returns the common file stem."""
    os.makedirs(args.out, exist_ok=True)
    keys = "" if args.M is None else f"-M{args.M}"
    stem = (f"{args.device}-{'-'.join(args.ops)}-{args.pass_}-{args.dtype}-D{args.dim}{keys}-"
            f"{info['date'][:10]}")
    plot_stem = f"{args.device}-{args.pass_}-{args.dtype}-D{args.dim}{keys}-{info['date'][:10]}"
    plots = write_plots(rows, args.out, plot_stem, title)
    saved_args = {k: v for k, v in vars(args).items() if k not in ("pass_", "readme")}
    saved_args["pass"] = args.pass_
    clean_rows = [{k: v for k, v in r.items() if k != "M_arg"} for r in rows]
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump({"machine": info, "args": saved_args, "command": sys.argv, "plots": plots,
                   "notes": notes(rows), "rows": clean_rows}, fh, indent=1)
    write_csv(os.path.join(args.out, stem + ".csv"), clean_rows, info, args.device)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(f"{title}, torch {info['torch']}, {info['date']}\n\n{table(rows)}\n\n"
                 + "\n".join(f"- {n}" for n in notes(rows)) + "\n")
    print(f"\nJSON/CSV/markdown: {os.path.join(args.out, stem)}.{{json,csv,md}}")
    for plot in plots:
        print(f"plot: {os.path.join(args.out, plot['file'])}")
    return stem


def _print_table(rows):
    print(table(rows))
    print()
    for line in notes(rows):
        print(f"- {line}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", default=None, choices=OPS,
                    help="default: clip (cpu); clip siglip (cuda)")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="ours and/or peers (" + ", ".join(sorted({b for _, b in PEERS}))
                    + "); default: reference + every fused backend available on the device + "
                    "the op's peers")
    ap.add_argument("--sizes", nargs="+", type=int, default=None,
                    help="N, the query rows (nt_xent: pairs); default: 1024 … 32768 (cpu), "
                    "4096 … 262144 (cuda)")
    ap.add_argument("--M", type=int, default=None,
                    help="key rows (clip, siglip, topk, sinkhorn; ms: reference embeddings); "
                    "default: M = N")
    ap.add_argument("--dim", type=int, default=None, help="D; default: 256 (cpu), 768 (cuda)")
    ap.add_argument("--dtype", default=None, help="default: float32 (cpu); bfloat16 (cuda)")
    ap.add_argument("--pass", dest="pass_", default="full", choices=PASSES,
                    help="full = forward + backward; fwd; bwd = backward only (retain_graph)")
    ap.add_argument("--repeats", type=int, default=3, help="cpu: timed calls at most")
    ap.add_argument("--budget", type=float, default=2.0,
                    help="cpu: seconds per case after which no further timed call starts")
    ap.add_argument("--timeout", type=float, default=120.0, help="cpu: seconds per case")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    ap.add_argument("--readme", nargs="?", const="-", default=None, metavar="PATH",
                    help="print the results section generated from --out's JSON files (or "
                    "rewrite it between its markers in PATH) and exit")
    args = ap.parse_args(argv)
    if args.readme is not None:
        markdown = results_markdown(args.out)
        if args.readme == "-":
            print(markdown)
        else:
            update_readme(args.readme, markdown)
        return 0
    gpu = args.device == "cuda"
    if args.ops is None:
        args.ops = ["clip", "siglip"] if gpu else ["clip"]
    if args.sizes is None:
        args.sizes = ([4096, 8192, 16384, 32768, 65536, 131072, 262144] if gpu
                      else [1024, 2048, 4096, 8192, 16384, 32768])
    if args.dim is None:
        args.dim = 768 if gpu else 256
    if args.dtype is None:
        args.dtype = "bfloat16" if gpu else "float32"
    if args.M is not None and set(args.ops) & set(ONE_SET_OPS):
        ap.error(f"--M does not apply to {sorted(set(args.ops) & set(ONE_SET_OPS))} "
                 "(one set of rows)")
    if args.backends:
        import fused_losses

        unknown = [b for b in args.backends
                   if not _is_peer_name(b) and b not in fused_losses.registered_backends()]
        if unknown:
            ap.error(f"unknown backend(s) {unknown}")
    if gpu:
        return main_gpu(args)

    info = machine_info()
    info["peaks"] = cpu_peaks(args.dtype)
    title = machine_label(info, "cpu")
    print(f"# fused-losses bench on {title}, torch {info['torch']}, {info['date']}; measured "
          f"{args.dtype} matmul {info['peaks'][f'matmul_{args.dtype}_gflops']:.0f} GFLOP/s")
    rows = _sweep(args, lambda op, backend, n: run_case(
        op, backend, n, args.M, args.dim, args.dtype, args.pass_, args.repeats, args.budget,
        args.timeout, info["peaks"]))
    _print_table(rows)
    _save(args, info, rows, title)
    return 0


def main_gpu(args) -> int:
    """The GPU sweep: every available fused backend for CUDA plus the reference and the peers,
    in one process (memory from the allocator's peak), timed with do_bench; the measured matmul
    peak first."""
    if not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2

    info = machine_info()
    peaks = gpu_peaks()
    info["peaks"] = peaks
    title = machine_label(info, "cuda")
    print(f"# fused-losses bench on {title}, torch {info['torch']}, {info['date']}")
    print(f"# measured: bf16 matmul {peaks['matmul_bfloat16_gflops'] / 1e3:.0f} TFLOP/s, fp32 "
          f"matmul {peaks['matmul_float32_gflops'] / 1e3:.0f} TFLOP/s, copy "
          f"{peaks['copy_gbps']:.0f} GB/s")
    rows = _sweep(args, lambda op, backend, n: run_case_gpu(
        op, backend, n, args.M, args.dim, args.dtype, args.pass_, peaks))
    _print_table(rows)
    _save(args, info, rows, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
