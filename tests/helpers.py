"""Shared test helpers: tolerances (SPEC §7), float64 oracles, devices per backend."""

from __future__ import annotations

import contextlib
import json
import os
import re
import zlib

import pytest
import torch

import fused_losses
from fused_losses import _dispatch

HAS_CUDA = torch.cuda.is_available()

# SPEC §7: relative error ||out - ref|| / ||ref|| against the float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
TOL_TF32 = 3e-3


def device_for(backend: str) -> torch.device:
    """Where a backend is exercised: the GPU when there is one, else the CPU (the triton
    backend then runs under TRITON_INTERPRET=1)."""
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "cuda":
        return torch.device("cuda")
    return torch.device("cuda" if HAS_CUDA else "cpu")


def backends_under_test() -> list[str]:
    """Every registered backend that can run here. Backends that are not available are not
    silently dropped: tests/test_dispatch.py asserts why each one is missing."""
    names = []
    for name in _dispatch.registered_backends():
        b = _dispatch.get_backend(name)
        if b.availability() is None and device_for(name).type in b.devices:
            names.append(name)
    return names


def supports(backend: str, op: str) -> bool:
    return op in _dispatch.get_backend(backend).ops


def refuses_unsupported(backend: str, op: str, call) -> bool:
    """Where ``backend`` does not implement ``op`` (only the cuda backend lacks some ops), checks
    that ``call()`` (a valid call of the op on that backend) raises the dispatcher's error naming
    both and returns True; returns False where the backend implements it."""
    if supports(backend, op):
        return False
    refusal = rf"backend={re.escape(repr(backend))} cannot run .*does not implement"
    with pytest.raises(RuntimeError, match=refusal):
        call()
    return True


def tol_for(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and HAS_CUDA and torch.backends.cuda.matmul.allow_tf32:
        return TOL_TF32
    return TOL[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "NaN in output"
    # the same infinity on both sides is exact (an empty line's LSE is -inf by contract)
    same_inf = torch.isinf(ref) & (out == ref)
    out, ref = out.masked_fill(same_inf, 0.0), ref.masked_fill(same_inf, 0.0)
    num = torch.linalg.vector_norm(out - ref)
    den = torch.linalg.vector_norm(ref)
    if den == 0:
        return float(num)
    return float(num / den)


# Set by scripts/stress_tolerances.py to a file path: every bounded comparison is then appended
# to it as a JSON line {what, err, bound} instead of asserted, so the bounds can be audited over
# many seeds.
RECORD_BOUNDS = "FUSED_LOSSES_RECORD_BOUNDS"


def assert_within(err: float, bound: float, what: str, exempt: bool = False) -> None:
    """``err <= bound`` (or ``exempt``: an absolute-error escape the caller justified)."""
    if os.environ.get(RECORD_BOUNDS):
        with open(os.environ[RECORD_BOUNDS], "a") as f:
            exempt = bool(exempt and err > bound)  # passes only by the exemption
            f.write(json.dumps(dict(what=what, err=err, bound=bound, exempt=exempt)) + "\n")
        return
    hint = "" if "FUSED_LOSSES_TEST_SEED" in what else seed_hint()
    assert err <= bound or exempt, f"{what}: relative error {err:.3e} > {bound:.1e}{hint}"


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert_within(rel_err(out, ref), tol, what)


# Random inputs are reproducible by construction: every seed is a function of the running
# test's id (conftest sets TEST_ID per test), the number of seeds it drew before, and a base
# seed, FUSED_LOSSES_TEST_SEED (0 by default).  So CI draws the same inputs on every run, and
# scripts/stress_tolerances.py explores fresh inputs by setting a fresh base per run.
BASE_SEED_ENV = "FUSED_LOSSES_TEST_SEED"
TEST_ID: list[str] = [""]
_DRAWS: list[int] = [0]
# The last seed drawn by the running test (None before it draws one): failure messages name the
# base seed and the test, which reproduce it.
LAST_SEED: list[int | None] = [None]


def base_seed() -> int:
    return int(os.environ.get(BASE_SEED_ENV) or 0)


def start_test(test_id: str) -> int:
    """Called by conftest before each test: resets the draw counter and returns the test's own
    seed (for the global torch/random/numpy generators)."""
    TEST_ID[0] = test_id
    _DRAWS[0] = 0
    LAST_SEED[0] = None
    return zlib.crc32(f"{base_seed()}:{test_id}".encode()) & 0x7FFFFFFF


def seed_hint() -> str:
    if LAST_SEED[0] is None:
        return ""
    return f" ({BASE_SEED_ENV}={base_seed()} pytest '{TEST_ID[0]}' reproduces it)"


def seeded(seed: int | None = None) -> torch.Generator:
    """A CPU generator.  Without ``seed``: the next seed of this test, fixed by its id, its
    draw count and the base seed (see above)."""
    if seed is None:
        seed = zlib.crc32(f"{base_seed()}:{TEST_ID[0]}:{_DRAWS[0]}".encode()) & 0x7FFFFFFF
        _DRAWS[0] += 1
        LAST_SEED[0] = seed
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, device="cpu", gen=None, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    t = t.to(dtype=dtype, device=device)
    if requires_grad:
        t.requires_grad_(True)
    return t


def moved_by_an_ulp(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t`` with every entry moved by about one unit in the last place of its dtype (a random
    relative step of eps, rounded back to the dtype): an equally valid input whose rounding
    pattern differs.  Tests measure a dtype's noise floor by re-running eager code on these."""
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    moved = t.detach().double().cpu() * (1 + torch.finfo(t.dtype).eps * noise)
    return moved.to(device=t.device, dtype=t.dtype)


def leaf64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of ``t`` that is a fresh autograd leaf when ``t`` requires grad."""
    return t.detach().to(torch.float64).cpu().requires_grad_(t.requires_grad)


__all__ = ["fused_losses"]


# Awkward shapes (SPEC: N=1, 2, 17, 1000; D=1, 3, 100, 769; N != M).  (N, M, D)
SHAPES = [(1, 1, 1), (2, 2, 3), (17, 17, 100), (17, 40, 3), (2, 5, 769), (40, 17, 1)]
# Large shapes are skipped for the Triton interpreter (≈400× slower than eager; NOTES.md).
LARGE_SHAPES = [(1000, 1000, 100), (1000, 1037, 769)]


def shapes_for(backend: str, large: bool = True):
    interpreted = backend == "triton" and not HAS_CUDA
    return SHAPES + ([] if (interpreted or not large) else LARGE_SHAPES)


def dtypes_for(backend: str):
    """Input dtypes a backend is tested with here. bf16 Triton dots are wrong under the
    interpreter (NOTES.md, triton #11584), so bf16 runs for triton only on a GPU."""
    b = _dispatch.get_backend(backend)
    out = [
        d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64) if d in b.dtypes
    ]
    if backend == "triton" and not HAS_CUDA:
        out = [d for d in out if d != torch.bfloat16]
    return out


def lowp_tol(out_lowp_err: float) -> float:
    """bf16/fp16: ≤ 2e-2 and no worse than 2× the reference run in the same precision."""
    return max(2.0 * out_lowp_err, 1e-6)


def cases(backend: str):
    """(shape, dtype) pairs: every awkward small shape in every dtype; the large shapes in the
    dtypes that matter at size (fp32 and, on a GPU, bf16) to keep CPU runs short."""
    out = [(shape, dt) for shape in SHAPES for dt in dtypes_for(backend)]
    large_dtypes = [torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])
    for shape in shapes_for(backend):
        if shape not in SHAPES:
            out += [(shape, dt) for dt in large_dtypes if dt in dtypes_for(backend)]
    return out


LOW_PRECISION = (torch.float16, torch.bfloat16)


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with L2-normalized rows (same requires_grad)."""
    with torch.no_grad():
        u = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return u.detach().requires_grad_(t.requires_grad)


def kernel_inputs(dtype: torch.dtype, d: int, *tensors: torch.Tensor):
    """(normalize flag, tensors) for a kernel comparison.  In fp16/bf16 the features are
    normalized up front and passed with normalize=False: the oracle then sees exactly the rounded
    unit rows the kernel sees, so the check measures the kernel, not the rounding of normalized
    features (normalization itself is covered in fp32/fp64).  D=1 runs unnormalized (a
    normalized 1-D feature is ±1 and has a zero gradient)."""
    if dtype in LOW_PRECISION and d > 1:
        return False, tuple(unit_rows(t) for t in tensors)
    return d > 1, tensors


# --------------------------------------------------------------------------------------------
# multi-process runs on gloo (CPU)


def _gloo_entry(rank, world, init_file, out_dir, worker, args):
    import datetime
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        found = worker(rank, world, *args)
        # No rank tears gloo down while another still talks to it (an early exit can abort the
        # other rank: "terminate called without an active exception").
        dist.barrier()
    except Exception:
        found = {"error": traceback.format_exc(limit=8)}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(found, f)
        dist.destroy_process_group()


def run_on_gloo(worker, world: int, *args) -> list:
    """Run ``worker(rank, world, *args)`` in ``world`` spawned processes joined in a gloo group
    (the default group; file rendezvous) and return what each returned (JSON-serializable), in
    rank order.  An exception in a worker comes back as ``{"error": traceback}``.  ``worker``
    must be a module-level function (it is pickled by reference)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_entry, args=(world, os.path.join(tmp, "rendezvous"), tmp, worker, args),
                 nprocs=world, join=True)
        out = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                out.append(json.load(f))
    return out


# --------------------------------------------------------------------------------------------
# side-by-side comparison with another library (tests/test_integrations_*.py)


def logit_ulps(dtype: torch.dtype, max_logit: float) -> float:
    """A few ulps of a logit of size ``max_logit``: the absolute rounding error of a loss that
    is a difference of logits (``LSE − positive``): a loss of 1e-6 made of two logits of 20
    cannot be computed to a relative 1e-10 in fp64, nor one of 1e-4 to 1e-5 in fp32.  The
    ``value_atol`` of :func:`side_by_side` for such losses."""
    return 4 * torch.finfo(dtype).eps * max(float(max_logit), 1.0)


@contextlib.contextmanager
def auto_is_reference():
    """Within: ``backend="auto"`` runs the reference backend (the eager formulation of every
    op), so a drop-in's own formulation can be run eagerly in a given precision."""
    from fused_losses import _dispatch, distributed, functional, ot

    modules = (functional, ot, distributed)
    saved = [m.resolve for m in modules]

    def resolve(op, backend, tensors):
        return _dispatch.resolve(op, "reference" if backend == "auto" else backend, tensors)

    for m in modules:
        m.resolve = resolve
    try:
        yield
    finally:
        for m, r in zip(modules, saved):
            m.resolve = r


def _outputs_and_grads(fn, inputs: dict, as_dtype: torch.dtype, move_gen=None):
    """``fn(**inputs)`` on fresh leaves in ``as_dtype`` (moved by an ulp when ``move_gen``), and
    the gradients of its sum w.r.t. every floating input that requires grad (zeros if unused)."""
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            t = v.detach().to(as_dtype)
            if move_gen is not None:
                t = moved_by_an_ulp(t, move_gen)
            v = t.requires_grad_(v.requires_grad)
        leaves[k] = v
    out = fn(**leaves)
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = {}
    if names:
        got = torch.autograd.grad(out.sum(), [leaves[k] for k in names], allow_unused=True)
        grads = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, got)}
    return out, grads


def side_by_side(ours, theirs, inputs: dict, dtype: torch.dtype, what: str,
                 tol: float | None = None, floor: bool = True,
                 value_atol: float = 0.0) -> dict:
    """``ours(**inputs in dtype)`` against ``theirs(**inputs in float64)``, the library's answer:
    every floating tensor of ``inputs`` that requires grad becomes a fresh leaf on each side.
    Asserts the value and every gradient within ``tol`` (default SPEC §7's ``tol_for(dtype)``)
    of the library's float64 result, and at least the error that the precision leaves to any
    code, measured as the core tests measure it (SPEC §7's rule for low precision): twice the
    error of a plain run in ``dtype`` (below fp64), four times the worst of 8 runs on inputs
    moved by one ulp of ``dtype`` (one run alone can be luckily accurate), of the library and
    of this package's own formulation run eagerly (``auto_is_reference``).  So a quantity that
    the precision cannot give to the SPEC's tolerance (a loss of 1e-6 made of log(1 + tiny);
    the gradient p − 1 of a softmax whose positive has p ≈ 1, which a stored row log-sum-exp
    keeps only to an ulp of the largest logit) is held to what the precision allows.
    ``floor=False``: ``theirs`` has state (a memory queue) and runs once.  ``value_atol``: the
    value also passes within this absolute error, for losses that are a difference of two
    logits (:func:`logit_ulps`).  Returns the relative errors and bounds."""
    tol = tol_for(dtype) if tol is None else tol
    out, grads = _outputs_and_grads(ours, inputs, dtype)
    expected, want = _outputs_and_grads(theirs, inputs, torch.float64)
    errs = {"value": rel_err(out, expected)}
    errs.update({f"grad {k}": rel_err(grads[k], want[k]) for k in want})
    bounds = dict.fromkeys(errs, tol)

    def eager_ours(**kw):
        with auto_is_reference():
            return ours(**kw)

    gen = torch.Generator().manual_seed(len(what))
    runs = ([] if dtype == torch.float64 else [(None, 2.0)]) + [(gen, 4.0)] * 8
    formulations = [theirs, eager_ours]
    for fn in formulations if floor else ():
        for move, factor in runs:
            try:
                lib, lib_grads = _outputs_and_grads(fn, inputs, dtype, move)
            except (RuntimeError, TypeError):  # the library does not run in this dtype
                break
            floor_errs = {"value": rel_err(lib, expected)}
            floor_errs.update({f"grad {k}": rel_err(lib_grads[k], want[k]) for k in want})
            for k, v in floor_errs.items():
                bounds[k] = max(bounds[k], factor * v)
    value_ok = float((out.detach().double() - expected.detach().double()).abs().max()) \
        <= value_atol
    for k, err in errs.items():
        assert_within(err, bounds[k], f"{what} {k} ({dtype})", exempt=(k == "value" and value_ok))
    return {"errors": errs, "bounds": bounds}


def record_on_rank(found: dict, key: str, compare) -> None:
    """In a gloo worker: ``found[key] = compare()``, or ``{"error": message}`` when it fails, so
    that a failing comparison does not leave the other ranks waiting in a collective."""
    try:
        found[key] = compare()
    except AssertionError as exc:
        found[key] = {"error": str(exc)}


def assert_ranks_ok(per_rank: list) -> None:
    """Every rank ran (no exception) and every comparison it recorded passed."""
    for rank, found in enumerate(per_rank):
        assert "error" not in found, found.get("error")
        for case, result in found.items():
            assert "error" not in result, f"rank {rank} {case}: {result['error']}"
