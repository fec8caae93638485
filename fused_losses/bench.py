"""``python -m fused_losses.bench``: time and peak memory of the losses per backend.

Default (``make bench``): CLIP loss forward+backward, fp32, D=256, N = 1024 … 16384, for the
reference (naive PyTorch: materializes N×N) and every fused backend available on this device.
Each (backend, N) runs in a fresh subprocess so its peak RSS is its own; a case whose estimated
memory does not fit in RAM is reported as "would not fit" instead of run.  A markdown table goes
to stdout; JSON rows (with machine, versions, date) under ``--out``.
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

OPS = ("clip", "siglip", "supcon", "ms", "sinkhorn")


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
    import fused_losses as FL

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dt).requires_grad_()
    y = torch.randn(n, d, generator=g).to(dt).requires_grad_()
    labels = torch.randint(0, max(2, n // 4), (n,), generator=g)

    def step():
        if op == "clip":
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
    if backend == "reference":
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

    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backends": fused_losses.available_backends()}


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def table(rows) -> str:
    out = ["| op | backend | N | D | dtype | median s | GFLOP/s | peak extra MB | status |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        out.append(f"| {r['op']} | {r['backend']} | {r['N']} | {r['D']} | {r['dtype']} | "
                   f"{r['median_s']:.3f} | {_fmt(r['gflops'])} | {r['peak_extra_mb']:.0f} | ok |"
                   if ok else
                   f"| {r['op']} | {r['backend']} | {r['N']} | {r['D']} | {r['dtype']} | – | – "
                   f"| – | {r['status']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", default=["clip"], choices=OPS)
    ap.add_argument("--backends", nargs="+", default=None,
                    help="default: reference + every fused backend available on the device")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    args = ap.parse_args(argv)
    if args.device == "cuda":
        print("GPU sweeps are not implemented in this runner yet; see bench/README.md",
              file=sys.stderr)
        return 2
    import fused_losses

    backends = args.backends or ["reference"] + [
        b for b in fused_losses.available_backends()
        if b != "reference" and "cpu" in fused_losses.get_backend(b).devices
        and not (b == "triton" and os.environ.get("TRITON_INTERPRET") == "1")]
    info = machine_info()
    print(f"# fused-losses bench on {info['cpu']} ({info['threads']} threads), torch "
          f"{info['torch']}, {info['date']}")
    rows = []
    for op in args.ops:
        for backend in backends:
            stop = False
            for n in args.sizes:
                if stop:
                    rows.append({"op": op, "backend": backend, "N": n, "D": args.dim,
                                 "dtype": args.dtype, "status": "skipped (smaller N failed)"})
                    continue
                row = run_case(op, backend, n, args.dim, args.dtype, args.repeats, args.timeout)
                rows.append(row)
                print(f"  {op} {backend} N={n}: {row.get('status')} "
                      f"{row.get('median_s', float('nan')):.3f} s", file=sys.stderr, flush=True)
                stop = row["status"] != "ok"
    print(table(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench-{args.device}.json")
    with open(path, "w") as fh:
        json.dump({"machine": info, "args": vars(args), "rows": rows}, fh, indent=1)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
