#!/usr/bin/env python3
"""``make triton-check``: compile every Triton kernel specialization the package can launch on
sm_80 and sm_90a, ahead of time and with no GPU, and fail on register spills.

1. Enumerate.  For each arch, ``tiles.FORCED_ARCH`` selects that arch's tile table and autotune
   configs, and ``launchers._K`` (the autotuned kernels) is replaced by recorders.  Then the
   backend's kernel contract (``TritonKernels``, i.e. the custom ops and their launchers, the
   very code a GPU runs) is called on small CPU tensors over its whole input space: every op,
   every flag of the contract (labels, bias, transposed/column passes, extra negatives,
   exclusions, no-positives, epsilon, …), fused and deterministic contrastive paths, the
   CUDA-graph capture path, fp32 (TF32 off and on), bf16, fp16, and one feature width D per
   class of 1…4096 (``d_classes``: the widths the tile tables and Triton's argument
   specialization cannot tell apart share a class).  A recorder does not launch: it binds the
   arguments exactly as ``JITFunction.run`` does (Triton's own binder, with the arch's backend)
   for every autotune config the arch offers (``Autotuner.prune_configs``, the configs the
   autotuner would benchmark), and keeps the compile key: kernel, signature, constexprs,
   divisibility attributes, options.  Identical keys are compiled once.
2. Compile.  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`` in a pool
   of worker processes (no ``TRITON_INTERPRET``; Triton's on-disk cache makes a rerun cheap),
   then Triton's bundled ``ptxas -v`` on the PTX for registers, spill stores/loads and stack,
   ``kernel.metadata.shared`` for shared memory, and the MMA instructions from the PTX
   (wgmma / mma.sync; a ``tt.dot`` left in a blocked layout in the TTGIR is an FMA dot).
3. Check.  Fail on any compile error, any spill (stores or loads), any stack frame, shared
   memory above the arch's per-block limit (sm_80 163 KB, sm_90 227 KB), or a similarity tile
   whose MMA instruction kind differs between the kernels of one op (bit-identical s_ij
   across passes).

Usage: ``python scripts/triton_check.py [--archs sm_80 sm_90] [--jobs 2] [--md FILE]
[--csv FILE] [--list]``.  Exit code 0 only when every specialization passes."""

from __future__ import annotations

import os
import sys

# The interpreter turns @triton.jit functions into interpreter objects: never here (the workers
# inherit this environment).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import torch  # noqa: E402

CAPABILITY = {"sm_80": 80, "sm_90": 90}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # bytes per block (opt-in maximum)
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
MAX_D = 4096
TOPK_M = 4096  # top-k: k from 1 to this many keys
OP_GROUPS = ("contrastive", "siglip", "ms", "smm", "topk")


# ------------------------------------------------------------------------------ enumeration

def _tb():
    from fused_losses.backends import triton as tb
    from fused_losses.backends.triton import launchers, tiles

    return tb, launchers, tiles


def size_classes(values, class_of):
    """One representative (the smallest) per class of ``values``."""
    reps = {}
    for v in values:
        reps.setdefault(class_of(v), v)
    return sorted(reps.values())


def _width_classes(tile_of):
    """Widths 1…MAX_D, one per class: the launchers pad a width to a multiple of 16 (W16) and
    use it only through the tile tables (``tile_of(W16, dtype, arch)``) and the (then always
    16-divisible) strides, so a class is (padded or not, those tiles for every arch and
    dtype)."""
    _, launchers, tiles = _tb()

    def cls(w):
        w16 = launchers._w16(w)
        return (w16 == w, tuple(tile_of(tiles)(w16, dt, a) for a in tiles.ARCHS
                                for dt in (torch.float32, torch.bfloat16)))

    return size_classes(range(1, MAX_D + 1), cls)


def d_classes():
    """Feature widths D: through the op tiles (similarity tile, output chunks)."""
    return _width_classes(lambda tiles: tiles.tiles)


def e_classes():
    """Value widths E of the softmax-weighted matmul: through BLOCK_E."""
    return _width_classes(lambda tiles: tiles.block_e)


def k_classes(m, d):
    """top-k widths 1…m at feature width d, one per class of the top-k tiles (None: the
    blocked torch path, no kernel)."""
    _, launchers, tiles = _tb()
    w = launchers._w16(d)
    return size_classes(range(1, m + 1), lambda k: tuple(
        tiles.topk_tiles(k, w, dt, a) for a in tiles.ARCHS
        for dt in (torch.float32, torch.bfloat16)))


@dataclass
class Spec:
    """One compile: what ``JITFunction.run`` would hand to ``triton.compile``."""
    kernel: str
    arch: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    origins: set = field(default_factory=set)  # (op, dtype label, D) that produce it

    def key(self):
        return (self.kernel, self.arch, json.dumps(self.signature, sort_keys=True),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                json.dumps(self.options, sort_keys=True, default=str))

    def consts(self):
        """The constexprs by parameter name (tiles, flags)."""
        names = list(self.signature)
        return {names[p[0]]: v for p, v in self.constexprs.items() if len(p) == 1}


class Recorder:
    """Stands in for one ``triton.autotune`` kernel of ``launchers._K``: records the compile keys
    of a launch for every config the arch offers, launches nothing."""

    def __init__(self, name, autotuner, arch, out, origin):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.name, self.tuner, self.arch, self.out, self.origin = name, autotuner, arch, out, origin
        self.jit = autotuner.fn
        self.backend = make_backend(GPUTarget("cuda", CAPABILITY[arch], 32))
        self.binder = create_function_from_signature(self.jit.signature, self.jit.params,
                                                     self.backend)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tuner.nargs = dict(zip(self.tuner.arg_names, args))
            try:
                configs = self.tuner.prune_configs(kwargs)
            finally:
                self.tuner.nargs = None
            for cfg in configs:
                kw = {**kwargs, **cfg.all_kwargs()}
                kw.setdefault("debug", False)
                bound, spec, opts = self.binder(*args, **kw)
                options, signature, constexprs, attrs = self.jit._pack_args(
                    self.backend, kw, bound, spec, opts)
                s = Spec(self.jit.__name__, self.arch, signature, constexprs, attrs,
                         dict(options.__dict__))
                prev = self.out.setdefault(s.key(), s)
                prev.origins.add(self.origin[0])
        return launch


def _contract_calls(kern, x, y, extra, at, groups=OP_GROUPS, first=True):
    """Every call of the kernel contract (fused_losses/kernels.py) the fused layer can make,
    over its flags, on inputs x (N, D), y (M, D) (y[:n_keys] keys, the rest extra negatives).
    ``at(op)`` names the op before each call.  ``first``: also the ops that do not depend on
    the contrastive path switches (deterministic, capturing)."""
    from fused_losses.kernels import PairMask

    n, m = x.shape[0], y.shape[0]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    scale = torch.tensor(2.0, **f32)

    def vec(k):
        return torch.rand(k, **f32)

    lab = torch.randint(0, 3, (n,), device=dev)
    for n_keys in (m, m - extra) if "contrastive" in groups else ():
        for labels, excl, dec, nopos, want_cols, has_bias in itertools.product(
                (False, True), repeat=6):
            if (nopos and (labels or dec)) or (want_cols and has_bias) or \
                    ((excl or labels) and n_keys > n):
                continue
            mask = PairMask(n_keys=n_keys, labels=lab if labels else None,
                            key_labels=torch.randint(0, 3, (n_keys,), device=dev) if labels
                            else None, exclude_diagonal=excl, decoupled=dec,
                            no_positives=nopos)
            bias = vec(m) if has_bias else None
            at("contrastive_fwd")
            kern.contrastive_fwd(x, y, scale, bias, mask, want_cols)
            cols = (vec(n_keys), vec(n_keys), vec(n_keys)) if want_cols else (None,) * 3
            at("contrastive_bwd")
            kern.contrastive_bwd(x, y, scale, bias, mask, vec(n), vec(n), vec(n), *cols)
            if not (want_cols or has_bias):  # the second row LSE (hard-negative reweighting)
                at("contrastive_fwd")
                kern.contrastive_fwd(x, y, scale, None, mask, False, ratio=0.5)
                at("contrastive_bwd")
                kern.contrastive_bwd(x, y, scale, None, mask, vec(n), vec(n), vec(n), *cols,
                                     ratio=0.5, row_lse2=vec(n), g_row2=vec(n))
    if not first:
        return
    nn = min(n, m)
    xs, ys = x[:nn].contiguous(), y[:nn].contiguous()
    b0 = torch.tensor(-1.0, **f32)
    if "siglip" in groups:
        at("siglip_fwd")
        kern.siglip_fwd(xs, ys, scale, b0, 0)
        at("siglip_bwd")
        kern.siglip_bwd(xs, ys, scale, b0, 0, vec(nn))
    rl = torch.randint(0, 3, (m,), device=dev)
    for excl_self, eps in itertools.product((False, True), (None, 0.1)) if "ms" in groups else ():
        yy, rr = (x, lab) if excl_self else (y, rl)
        at("ms_mine")
        kern.ms_mine(x, yy, lab, rr, 0, excl_self)
        mp, mn = (vec(n), vec(n)) if eps is not None else (None, None)
        at("ms_fwd")
        kern.ms_fwd(x, yy, lab, rr, 0, excl_self, 2.0, 50.0, 0.5, eps, mp, mn)
        at("ms_bwd")
        kern.ms_bwd(x, yy, lab, rr, 0, excl_self, 2.0, 50.0, 0.5, eps, mp, mn, vec(n), vec(n),
                    vec(n))


def _sample_calls(kern, x, y, at):
    """CLIP (symmetric, no labels), SupCon (labels, self excluded), SigLIP, multi-similarity
    (self references, mining): forward and backward."""
    from fused_losses.kernels import PairMask

    n = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    scale = torch.tensor(2.0, **f32)
    y = y[:n].contiguous()
    lab = torch.randint(0, 3, (n,), device=x.device)

    def vec(k):
        return torch.rand(k, **f32)

    for mask, want_cols, yy in ((PairMask(n_keys=n), True, y),
                                (PairMask(n_keys=n, labels=lab, key_labels=lab,
                                          exclude_diagonal=True), False, x)):
        at("contrastive_fwd")
        kern.contrastive_fwd(x, yy, scale, None, mask, want_cols)
        cols = (vec(n), vec(n), vec(n)) if want_cols else (None,) * 3
        at("contrastive_bwd")
        kern.contrastive_bwd(x, yy, scale, None, mask, vec(n), vec(n), vec(n), *cols)
    b0 = torch.tensor(-1.0, **f32)
    at("siglip_fwd")
    kern.siglip_fwd(x, y, scale, b0, 0)
    at("siglip_bwd")
    kern.siglip_bwd(x, y, scale, b0, 0, vec(n))
    mp, mn = vec(n), vec(n)
    at("ms_mine")
    kern.ms_mine(x, x, lab, lab, 0, True)
    at("ms_fwd")
    kern.ms_fwd(x, x, lab, lab, 0, True, 2.0, 50.0, 0.5, 0.1, mp, mn)
    at("ms_bwd")
    kern.ms_bwd(x, x, lab, lab, 0, True, 2.0, 50.0, 0.5, 0.1, mp, mn, vec(n), vec(n), vec(n))


def enumerate_specs(archs, dtypes, verbose=True, ds=None, sample=False, groups=OP_GROUPS,
                    es=None, ks=None):
    """Run the contract over its input space with recorders in place of the kernels.
    ``ds``: these feature widths instead of the D classes; ``sample``: only the calls of a few
    common losses (CLIP, SupCon, SigLIP, multi-similarity, softmax-matmul with E = D, top-10)
    instead of the whole input space (for quick looks; the gate never samples)."""
    tb, launchers, tiles = _tb()
    kern = tb.TritonKernels()
    specs = {}
    ds = ds or d_classes()
    es = es or e_classes()
    n, m, extra = 5, 7, 2
    if verbose:
        print(f"D classes ({len(ds)}): {ds}")
        print(f"E classes ({len(es)}): {es}")
    origin = [None]
    saved = dict(launchers._K), launchers.DETERMINISTIC, tiles.FORCED_ARCH
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    saved_capture = launchers.capturing
    try:
        for arch in archs:
            tiles.FORCED_ARCH = arch
            for name, tuner in saved[0].items():
                launchers._K[name] = Recorder(name, tuner, arch, specs, origin)
            for label in dtypes:
                dt = DTYPES[label]
                torch.backends.cuda.matmul.allow_tf32 = label == "tf32"
                for d in ds:
                    def at(op, label=label, d=d):
                        origin[0] = (op, label, d)

                    x = torch.randn(n, d).to(dt)
                    y = torch.randn(m + extra, d).to(dt)
                    for det, capture in ((False, False), (True, False), (False, True)):
                        launchers.DETERMINISTIC = det
                        launchers.capturing = (lambda c: lambda: c)(capture)
                        if sample:
                            _sample_calls(kern, x, y, at)
                        else:
                            _contract_calls(kern, x, y, extra, at, groups, first=not det and
                                            not capture)
                    launchers.DETERMINISTIC = None
                    launchers.capturing = saved_capture
                    # softmax-weighted matmul: every value width class at this D
                    for e in (es if not sample else (d,)) if "smm" in groups else ():
                        v = torch.randn(m, e).to(dt)
                        for has_bias in (False, True):
                            b = torch.randn(m) if has_bias else None
                            sc = torch.tensor(1.5)
                            origin[0] = ("softmax_matmul_fwd", label, d)
                            kern.softmax_matmul_fwd(x, y[:m], v, sc, b)
                            origin[0] = ("softmax_matmul_bwd", label, d)
                            kern.softmax_matmul_bwd(x, y[:m], v, sc, b, torch.randn(n, e),
                                                    torch.randn(n), torch.randn(n, e))
                    yt = torch.randn(TOPK_M, d).to(dt)
                    ks_d = ks or (k_classes(TOPK_M, d) if not sample else (10,))
                    for k in ks_d if "topk" in groups else ():
                        for excl in (False, True):
                            origin[0] = ("topk", label, d)
                            kern.topk(x if not excl else yt[:n], yt, k, excl)
    finally:
        launchers._K.update(saved[0])
        launchers.DETERMINISTIC, tiles.FORCED_ARCH = saved[1], saved[2]
        launchers.capturing = saved_capture
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return specs


#: Widths outside the classes' representatives: the gate enumerates these too and fails if they
#: produce a specialization the classes do not (the classes would then miss one).
SAMPLE_D = (3, 100, 257, 768, 1000, 4096)
SAMPLE_E = (3, 130, 768)
SAMPLE_K = (1, 5, 17, 64, 65, 300)


def verify_classes(specs, archs, dtypes):
    """The specializations of the sample widths that the classes' representatives miss."""
    extra = enumerate_specs(archs, dtypes, verbose=False, ds=list(SAMPLE_D),
                            es=list(SAMPLE_E), ks=list(SAMPLE_K))
    return [s for k, s in extra.items() if k not in specs]


# ------------------------------------------------------------------------------ compiling

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _mma_kinds(ptx, ttgir):
    """The dot instructions of a kernel: PTX MMA instructions (shape and operand types), plus
    one ``FMA.<type>`` per ``tt.dot`` that stays in a blocked layout (no tensor cores)."""
    kinds = set()
    for ins in re.findall(r"\b(wgmma\.mma_async\.sync\.aligned\.\w+\.\w+\.(\w+)\.\w+|"
                          r"mma\.sync\.aligned\.\w+\.row\.col\.\w+\.(\w+)\.\w+\.\w+)", ptx):
        full = ins[0]
        shape = re.search(r"\.(m\d+n\d+k\d+)\.", full).group(1)
        kinds.add(f"{'wgmma' if full.startswith('wgmma') else 'mma.sync'}.{shape}."
                  f"{ins[1] or ins[2]}")
    for ln in ttgir.split("\n"):
        mt = re.search(r"= tt\.dot .*: tensor<\w+x(\w+?), .*-> tensor<[^,]+, #blocked", ln)
        if mt:
            kinds.add(f"FMA.{mt.group(1)}")
    return sorted(kinds)


def _result_cache_dir():
    from triton import knobs

    path = os.path.join(knobs.cache.dir, "fused_losses_triton_check")
    os.makedirs(path, exist_ok=True)
    return path


def compile_one(job):
    """Worker: compile one Spec, run ptxas -v on its PTX; returns a result dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    from fused_losses.backends.triton import kernels

    kernel, arch, signature, constexprs, attrs, options = job
    cap = CAPABILITY[arch]
    res = {"error": None}
    t0 = time.time()
    try:
        fn = getattr(kernels, kernel)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", cap, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - reported in the table, fails the gate
        res["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        res["seconds"] = time.time() - t0
        return res
    cached = os.path.join(_result_cache_dir(), compiled.hash + ".json")
    if os.path.exists(cached):
        with open(cached) as fh:
            res.update(json.load(fh))
        res["seconds"] = time.time() - t0
        return res
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cap)}", ptx, "-o",
               os.path.join(tmp, "k.cubin")]
        if not options.get("enable_fp_fusion", True):
            cmd.insert(2, "--fmad=false")
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    info = {k: sum(int(v) for v in r.findall(log)) for k, r in _PTXAS_RE.items()}
    info["registers"] = max((int(v) for v in _PTXAS_RE["registers"].findall(log)), default=0)
    info["shared"] = int(compiled.metadata.shared)
    info["mma"] = _mma_kinds(compiled.asm["ptx"], compiled.asm["ttgir"])
    with open(cached, "w") as fh:
        json.dump(info, fh)
    res.update(info)
    res["seconds"] = time.time() - t0
    return res


# ------------------------------------------------------------------------------ report

COLUMNS = ["kernel", "arch", "dtype", "tiles", "flags", "warps", "stages", "maxnreg", "registers",
           "spill_st", "spill_ld", "stack", "shared_kb", "mma", "ops", "verdict"]

_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "BLOCK_DO", "BLOCK_DY", "BLOCK_E")


def _row(spec, res):
    c = spec.consts()
    tiles = "x".join(f"{k[6:]}{c[k]}" for k in _TILE_KEYS if k in c)
    flags = ",".join(k for k, v in c.items() if k not in _TILE_KEYS and v is True)
    dts = sorted({o[1] for o in spec.origins})
    ops = sorted({o[0] for o in spec.origins})
    ptr = next(v for v in spec.signature.values() if v.startswith("*"))
    # TF32 matters for fp32 inputs only (16-bit inputs always set it: their fp32 products)
    tf32 = c.get("ALLOW_TF32") and ptr == "*fp32"
    row = dict(kernel=spec.kernel, arch=spec.arch, dtype=ptr[1:] + ("+tf32" if tf32 else ""),
               tiles=tiles, flags=",".join(f for f in flags.split(",") if f != "ALLOW_TF32")
               or "-", warps=spec.options["num_warps"], stages=spec.options["num_stages"],
               maxnreg=spec.options.get("maxnreg") or "-", ops=" ".join(ops),
               dtypes=" ".join(dts))
    if res.get("error"):
        row.update(registers="-", spill_st="-", spill_ld="-", stack="-", shared_kb="-",
                   mma="-", verdict="COMPILE ERROR: " + res["error"])
        return row
    problems = []
    if res["spill_stores"] or res["spill_loads"]:
        problems.append("SPILL")
    if res["stack"]:
        problems.append("STACK")
    if res["shared"] > SHARED_LIMIT[spec.arch]:
        problems.append("SHARED>LIMIT")
    row.update(registers=res["registers"], spill_st=res["spill_stores"],
               spill_ld=res["spill_loads"], stack=res["stack"],
               shared_kb=f"{res['shared'] / 1024:.1f}", mma=" ".join(res["mma"]) or "-",
               verdict=" ".join(problems) or "ok")
    return row


def _sim_mma(row):
    """The MMA kind of the similarity tile (the dot whose operands have the input dtype)."""
    dt = row["dtype"].split("+")[0]
    kinds = [k for k in row["mma"].split() if k.endswith("." + dt)]
    return sorted({k.split(".")[0] + "." + k.split(".")[-1] for k in kinds}) or ["FMA"]


def consistency_problems(rows):
    """Every kernel of an op must compute s with the same kind of instruction (bit-identical
    s_ij across passes): group by (arch, input dtype, op, D)."""
    groups = {}
    for spec, row in rows:
        if row["verdict"].startswith("COMPILE"):
            continue
        for op, _dtype, d in spec.origins:
            groups.setdefault((row["arch"], row["dtype"], op, d), set()).add(
                tuple(_sim_mma(row)))
    return [f"{k}: {sorted(v)}" for k, v in groups.items() if len(v) > 1]


def print_table(rows, out=sys.stdout):
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS), file=out)
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS), file=out)


def write_md(rows, path, header):
    with open(path, "w") as fh:
        fh.write(header + "\n\n")
        fh.write("| " + " | ".join(COLUMNS) + " |\n")
        fh.write("|" + "---|" * len(COLUMNS) + "\n")
        for r in rows:
            fh.write("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["sm_80", "sm_90"], choices=list(CAPABILITY))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--kernels", nargs="*", help="only these kernels (default: all)")
    ap.add_argument("--list", action="store_true", help="enumerate only, compile nothing")
    ap.add_argument("--d", nargs="+", type=int, help="these D instead of the D classes (a look, "
                    "not the gate)")
    ap.add_argument("--sample", action="store_true", help="only a few common losses' calls "
                    "(a look, not the gate)")
    ap.add_argument("--configs", nargs="+", help="only these WARPSxSTAGES configs, e.g. 4x3")
    ap.add_argument("--ops", nargs="+", choices=OP_GROUPS, default=list(OP_GROUPS),
                    help="only these groups of ops (a look, not the gate)")
    ap.add_argument("--md", help="also write the table as Markdown to this file")
    ap.add_argument("--csv", help="also write the table as CSV to this file")
    args = ap.parse_args(argv)
    t0 = time.time()
    found = enumerate_specs(args.archs, args.dtypes, ds=args.d, sample=args.sample,
                            groups=args.ops)
    missed = [] if (args.d or args.sample or args.ops != list(OP_GROUPS)) else \
        verify_classes(found, args.archs, args.dtypes)
    for s in missed:
        print(f"CLASSES MISS: {s.kernel} {s.arch} {s.consts()} from {sorted(s.origins)[:3]}")
    specs = list(found.values())
    if args.kernels:
        specs = [s for s in specs if s.kernel in args.kernels]
    if args.configs:
        specs = [s for s in specs
                 if f"{s.options['num_warps']}x{s.options['num_stages']}" in args.configs]
    specs.sort(key=lambda s: (s.kernel, s.arch, s.signature.get("a_ptr", ""),
                              repr(sorted(s.consts().items())), s.options["num_warps"],
                              s.options["num_stages"]))
    t_enum = time.time() - t0
    per = {}
    for s in specs:
        per[(s.kernel, s.arch)] = per.get((s.kernel, s.arch), 0) + 1
    print(f"{len(specs)} distinct specializations ({t_enum:.1f} s to enumerate):")
    for (kname, arch), cnt in sorted(per.items()):
        print(f"  {kname:18s} {arch}: {cnt}")
    if args.list:
        return 1 if missed else 0
    jobs = [(s.kernel, s.arch, s.signature, s.constexprs, s.attrs, s.options) for s in specs]
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        results = list(pool.map(compile_one, jobs, chunksize=1))
    rows = [(s, _row(s, r)) for s, r in zip(specs, results)]
    table = [r for _, r in rows]
    print_table(table)
    bad = [r for r in table if r["verdict"] != "ok"]
    incons = consistency_problems(rows)
    wall = time.time() - t0
    summary = (f"triton-check: {len(table)} specializations, archs {' '.join(args.archs)}, "
               f"{len(bad)} failing, {len(incons)} MMA inconsistencies, {len(missed)} missed by "
               f"the D/E/k classes; {wall:.0f} s wall "
               f"({sum(r.get('seconds', 0) for r in results):.0f} s compile in {args.jobs} "
               f"processes), triton {__import__('triton').__version__}")
    header = f"# Triton ahead-of-time compile check\n\n{summary}"
    if args.md:
        write_md(table, args.md, header)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS + ["dtypes"], extrasaction="ignore")
            w.writeheader()
            w.writerows(table)
    for line in incons:
        print("MMA INCONSISTENT:", line)
    print(summary)
    return 1 if bad or incons or missed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
