"""``python -m fused_losses.bench``: time and peak memory of the losses per backend.

Default (``make bench``): CLIP loss forward+backward, fp32, D=256, N = 1024 … 16384, for the
reference (naive PyTorch: materializes N×N) and every fused backend available on this device.
Each (backend, N) runs in a fresh subprocess so its peak RSS is its own; a case whose estimated
memory does not fit in RAM is reported as "would not fit" instead of run.  A markdown table goes
to stdout; JSON rows (with machine, versions, date) under ``--out``.

``--device cuda``: CLIP and SigLIP, bf16, D=768, N = 4096 … 262144, in one process: the
measured matmul peak and copy bandwidth first, then each case timed with
``triton.testing.do_bench`` (median) and its memory beyond the inputs and their gradients taken
from the CUDA allocator's peak; out-of-memory is reported, not fatal.  JSON + markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

OPS = ("clip", "siglip", "supcon", "ms", "sinkhorn", "topk")


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


def _case_body(op: str, backend: str, n: int, d: int, dtype: str, repeats: int) -> dict:
    """Run in the child: build inputs, time fwd+bwd, report the peak memory growth."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dt).requires_grad_()
    y = torch.randn(n, d, generator=g).to(dt).requires_grad_()
    labels = torch.randint(0, max(2, n // 4), (n,), generator=g)

    step = _make_step(op, backend, x, y, labels)

    with PeakRSS() as mem:
        step()  # the first call also measures memory (warm-up for the timed calls)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0],
            "peak_extra_mb": mem.extra_bytes / 2**20}


def _estimate_bytes(op: str, backend: str, n: int, d: int) -> float:
    if backend in ("reference", "pml"):
        return 6.0 * n * n * 4  # logits, softmax, masks and their grads: several N×N fp32
    return 16.0 * n * d * 4 + 64e6


def _available_ram() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9


def _flops(op: str, n: int, d: int):
    """Fused fwd+bwd of the similarity losses: 4 passes of 2·N²·D (forward; the backward's
    recompute, dX and dY GEMMs).  None for Sinkhorn, whose pass count depends on the schedule."""
    if op == "topk":
        return 2.0 * n * n * d  # one similarity pass (the backward gathers k rows)
    return None if op == "sinkhorn" else 4 * 2.0 * n * n * d


def run_case(op, backend, n, d, dtype, repeats, timeout) -> dict:
    row = {"op": op, "backend": backend, "N": n, "D": d, "dtype": dtype}
    est = _estimate_bytes(op, backend, n, d)
    if est > 0.8 * _available_ram():
        row.update(status=f"would not fit (est. {est / 1e9:.1f} GB)")
        return row
    code = (f"import json; from fused_losses.bench import _case_body; "
            f"print(json.dumps(_case_body({op!r}, {backend!r}, {n}, {d}, {dtype!r}, {repeats})))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(status=f"timeout (> {timeout} s)")
        return row
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        row.update(status=f"failed: {last[:120]}")
        return row
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]), status="ok")
    flops = _flops(op, n, d)
    row["gflops"] = None if flops is None else flops / row["median_s"] / 1e9
    return row


# --------------------------------------------------------------------------------------------
# GPU: in-process, timed with triton.testing.do_bench (median), memory from the CUDA allocator


def _pml_multi_similarity():
    """pytorch-metric-learning's MultiSimilarityLoss with its miner (the peer; materializes N×N)."""
    from pytorch_metric_learning import losses, miners

    loss_fn = losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    miner = miners.MultiSimilarityMiner(0.1)
    return lambda x, labels: loss_fn(x, labels, miner(x, labels))


def _make_step(op, backend, x, y, labels):
    """One forward+backward of ``op`` on ``backend`` ("pml": the peer, for op "ms")."""
    import fused_losses as FL

    if backend == "pml" and op != "ms":
        raise ValueError("backend 'pml' (pytorch-metric-learning) is a peer for op 'ms' only")
    pml = _pml_multi_similarity() if backend == "pml" else None

    def step():
        if backend == "pml":
            loss = pml(torch.nn.functional.normalize(x, dim=-1), labels)
        elif op == "topk":  # k = 10 nearest keys per row; values backpropagated
            loss = FL.similarity_topk(x, y, 10, backend=backend)[0].sum()
        elif op == "clip":
            loss = FL.clip_loss(x, y, 14.0, backend=backend)
        elif op == "siglip":
            loss = FL.siglip_loss(x, y, 10.0, -10.0, backend=backend)
        elif op == "supcon":
            loss = FL.sup_con(x, labels, backend=backend)
        elif op == "ms":
            loss = FL.multi_similarity(x, labels, backend=backend)
        else:
            loss = FL.sinkhorn(x, y, blur=0.05, backend=backend)
        loss.backward()
        x.grad = y.grad = None
        return loss

    return step


def gpu_peaks() -> dict:
    """Measured ceilings of this GPU (METHOD: time the roofline, do not quote the datasheet):
    bf16 and fp32(tf32 off) matmul at 8192³ on random data, device-to-device copy bandwidth."""
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(8192, 8192, device="cuda", dtype=dt, generator=g)
        b = torch.randn(8192, 8192, device="cuda", dtype=dt, generator=g)
        ms = do_bench(lambda a=a, b=b: a @ b, return_mode="median")
        out[f"matmul_{name}_tflops"] = 2 * 8192**3 / ms / 1e9
        del a, b
    src = torch.randn(2**28, device="cuda", generator=g)
    dst = torch.empty_like(src)
    ms = do_bench(lambda s=src, t=dst: t.copy_(s), return_mode="median")
    out["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    torch.cuda.empty_cache()
    return out


def run_case_gpu(op, backend, n, d, dtype, peaks) -> dict:
    from triton.testing import do_bench

    row = {"op": op, "backend": backend, "N": n, "D": d, "dtype": dtype}
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    try:
        torch.cuda.empty_cache()
        x = torch.randn(n, d, device="cuda", generator=g).to(dt).requires_grad_()
        y = torch.randn(n, d, device="cuda", generator=g).to(dt).requires_grad_()
        labels = torch.randint(0, max(2, n // 4), (n,), device="cuda", generator=g)
        step = _make_step(op, backend, x, y, labels)
        # inputs + their gradients are the baseline; "extra" is what the loss adds on top
        base = torch.cuda.memory_allocated() + 2 * x.numel() * x.element_size()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        ms = do_bench(step, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        row.update(status="out of memory")
        torch.cuda.empty_cache()
        return row
    except Exception as exc:  # a backend that cannot run this case: say why, go on
        row.update(status=f"failed: {type(exc).__name__}: {str(exc)[:100]}")
        torch.cuda.empty_cache()
        return row
    row.update(status="ok", median_s=ms / 1e3, peak_extra_mb=max(0, peak - base) / 2**20)
    flops = _flops(op, n, d)
    row["gflops"] = None if flops is None else flops / row["median_s"] / 1e9
    key = "matmul_bf16_tflops" if dtype in ("bfloat16", "float16") else "matmul_fp32_tflops"
    if flops is not None and peaks.get(key):
        row["pct_of_matmul_peak"] = 100 * row["gflops"] / 1e3 / peaks[key]
    del x, y, labels
    return row


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
    return {"cpu": cpu, "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backends": fused_losses.available_backends()}


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def table(rows) -> str:
    pct = any("pct_of_matmul_peak" in r for r in rows)
    head = "| op | backend | N | D | dtype | median s | GFLOP/s |" + (
        " % matmul peak |" if pct else "") + " peak extra MB | status |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ok = r.get("status") == "ok"
        lead = f"| {r['op']} | {r['backend']} | {r['N']} | {r['D']} | {r['dtype']} | "
        if ok:
            mid = f"{r['median_s']:.4f} | {_fmt(r['gflops'])} | " + (
                f"{_fmt(r.get('pct_of_matmul_peak'))} | " if pct else "")
            out.append(lead + mid + f"{r['peak_extra_mb']:.0f} | ok |")
        else:
            out.append(lead + "– | – | " + ("– | " if pct else "") + f"– | {r['status']} |")
    return "\n".join(out)


def _default_backends(device: str) -> list[str]:
    """The reference plus every fused backend that runs on ``device`` (not interpreted Triton)."""
    import fused_losses

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return ["reference"] + [
        b for b in fused_losses.available_backends()
        if b != "reference" and device in fused_losses.get_backend(b).devices
        and not (b == "triton" and interpreted)]


def _sweep(args, backends, run_one) -> list[dict]:
    """ops × backends × sizes; once a size fails (timeout, OOM), the larger ones are skipped."""
    rows = []
    for op in args.ops:
        for backend in backends:
            stop = False
            for n in args.sizes:
                if stop:
                    rows.append({"op": op, "backend": backend, "N": n, "D": args.dim,
                                 "dtype": args.dtype, "status": "skipped (smaller N failed)"})
                    continue
                row = run_one(op, backend, n)
                rows.append(row)
                print(f"  {op} {backend} N={n}: {row.get('status')} "
                      f"{row.get('median_s', float('nan')) * 1e3:.2f} ms", file=sys.stderr,
                      flush=True)
                stop = row["status"] != "ok"
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", default=None, choices=OPS,
                    help="default: clip (cpu); clip siglip (cuda)")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="default: reference + every fused backend available on the device; "
                    "'pml' adds pytorch-metric-learning as a peer for --ops ms")
    ap.add_argument("--sizes", nargs="+", type=int, default=None,
                    help="default: 1024 … 16384 (cpu); 4096 … 262144 (cuda)")
    ap.add_argument("--dim", type=int, default=None, help="default: 256 (cpu); 768 (cuda)")
    ap.add_argument("--dtype", default=None, help="default: float32 (cpu); bfloat16 (cuda)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    if args.ops is None:
        args.ops = ["clip", "siglip"] if gpu else ["clip"]
    if args.sizes is None:
        args.sizes = ([4096, 8192, 16384, 32768, 65536, 131072, 262144] if gpu
                      else [1024, 2048, 4096, 8192, 16384])
    if args.dim is None:
        args.dim = 768 if gpu else 256
    if args.dtype is None:
        args.dtype = "bfloat16" if gpu else "float32"
    if args.device == "cuda":
        return main_gpu(args)

    backends = args.backends or _default_backends("cpu")
    info = machine_info()
    print(f"# fused-losses bench on {info['cpu']} ({info['threads']} threads), torch "
          f"{info['torch']}, {info['date']}")
    rows = _sweep(args, backends, lambda op, backend, n: run_case(
        op, backend, n, args.dim, args.dtype, args.repeats, args.timeout))
    print(table(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench-{args.device}.json")
    with open(path, "w") as fh:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, fh, indent=1)
    print(f"\nJSON: {path}")
    return 0


def main_gpu(args) -> int:
    """The GPU sweep: every available fused backend for CUDA plus the reference, in one process
    (memory from the allocator's peak), timed with do_bench; the measured matmul peak first."""
    if not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2

    backends = args.backends or _default_backends("cuda")
    info = machine_info()
    peaks = gpu_peaks()
    info["peaks"] = peaks
    print(f"# fused-losses bench on {info['gpu']}, torch {info['torch']}, {info['date']}")
    print(f"# measured: bf16 matmul {peaks['matmul_bf16_tflops']:.0f} TFLOP/s, fp32 matmul "
          f"{peaks['matmul_fp32_tflops']:.0f} TFLOP/s, copy {peaks['copy_gbps']:.0f} GB/s")
    print("# GFLOP/s counts 4·2·N²·D per fwd+bwd (one forward GEMM; the backward's recompute, "
          "dX and dY), whatever a backend really runs")
    rows = _sweep(args, backends, lambda op, backend, n: run_case_gpu(
        op, backend, n, args.dim, args.dtype, peaks))
    md = table(rows)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench-cuda-{'-'.join(args.ops)}-{args.dtype}-D{args.dim}")
    with open(stem + ".json", "w") as fh:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(f"{info['gpu']}, torch {info['torch']}, {info['date']}; measured bf16 matmul "
                 f"{peaks['matmul_bf16_tflops']:.0f} TFLOP/s\n\n{md}\n")
    print(f"\nJSON: {stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
