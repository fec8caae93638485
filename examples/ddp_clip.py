"""CLIP training across processes: DistributedDataParallel + a fused clip_loss + GradCache.

A tiny two-tower model on synthetic paired data, trained with DDP on CPU (gloo, processes
started by torch.multiprocessing.spawn, rendezvous through a temporary file).  Each step:

- every rank encodes its share of the global batch in chunks without autograd
  (``fused_losses.large_batch.grad_cache_step``),
- ``clip_loss(..., process_group=...)`` gathers the embeddings of all ranks and computes the
  loss of the whole global batch without the N×N logits (on a fused backend),
- every chunk is re-encoded with autograd and receives its cached embedding gradient; each
  tower is its own DDP module, so its gradients are averaged once per step (the loss's
  gradient convention makes that average the exact single-process gradient).

Prints the loss per step, the peak RSS of every rank, and what a naive implementation would
hold: the logits (OpenCLIP style: local×global per rank, or N×N in one process) and the
encoder activations of a whole local batch.

    python examples/ddp_clip.py                      # 2 processes, global batch 8192
    python examples/ddp_clip.py --global-batch 32768 --chunk 2048 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_losses as fl
from fused_losses.large_batch import grad_cache_step

IMAGE_IN, TEXT_IN, LATENT = 256, 64, 32
GiB = 2.0**30


class Tower(torch.nn.Module):
    def __init__(self, d_in, hidden, dim, with_logit_scale=False):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden),
            torch.nn.GELU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(hidden, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, dim),
        )
        if with_logit_scale:  # OpenCLIP's parametrization: logit_scale = exp(p), p0 = log(1/0.07)
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x):
        return self.net(x)


def local_rows(global_batch, world, rank):
    """This rank's share; the first ``global_batch % world`` ranks get one row more."""
    base, extra = divmod(global_batch, world)
    return base + (1 if rank < extra else 0)


def synthetic_pairs(n, gen, mix_image, mix_text):
    """Paired (image, text) inputs driven by a shared latent, plus noise."""
    z = torch.randn(n, LATENT, generator=gen)
    image = torch.tanh(z @ mix_image) + 0.3 * torch.randn(n, IMAGE_IN, generator=gen)
    text = torch.tanh(z @ mix_text) + 0.3 * torch.randn(n, TEXT_IN, generator=gen)
    return image, text


def peak_rss_bytes():
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def naive_estimates(args, n_local):
    n, f32 = args.global_batch, 4
    # logits, their softmax and its gradient, for both directions (image→text, text→image)
    logits_local = 2 * 3 * n_local * n * f32
    logits_single = 2 * 3 * n * n * f32
    # saved activations of both towers for the whole local batch (inputs, 2 hidden layers with
    # GELU in/out and a dropout mask, outputs), fp32
    per_row = (IMAGE_IN + TEXT_IN) + 2 * (5 * args.hidden) + 2 * args.dim
    activations = n_local * per_row * f32
    return logits_local, logits_single, activations


def worker(rank, args, init_file):
    world = args.world_size
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    torch.manual_seed(args.seed)  # identical initial weights (DDP also broadcasts rank 0's)
    image_tower = DDP(Tower(IMAGE_IN, args.hidden, args.dim))
    text_tower = DDP(Tower(TEXT_IN, args.hidden, args.dim, with_logit_scale=True))
    logit_scale = text_tower.module.logit_scale
    params = list(image_tower.parameters()) + list(text_tower.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    data_gen = torch.Generator().manual_seed(args.seed + 1)  # the data distribution
    mix_image = torch.randn(LATENT, IMAGE_IN, generator=data_gen) / LATENT**0.5
    mix_text = torch.randn(LATENT, TEXT_IN, generator=data_gen) / LATENT**0.5
    batch_gen = torch.Generator().manual_seed(args.seed + 1000 + rank)  # this rank's samples
    torch.manual_seed(args.seed + 2000 + rank)  # this rank's dropout stream
    n_local = local_rows(args.global_batch, world, rank)

    def loss_fn(image_emb, text_emb):
        return fl.clip_loss(image_emb, text_emb, logit_scale.exp(), backend=args.backend,
                            process_group=group)

    if rank == 0:
        probe = torch.zeros(2, args.dim)
        chosen = fl.get_backend(args.backend).name if args.backend != "auto" else next(
            b for b in fl.available_backends("info_nce")
            if fl.get_backend(b).unsupported_reason("info_nce", [probe]) is None)
        print(f"world size {world}, global batch {args.global_batch} "
              f"({n_local} rows on rank 0), chunk {args.chunk}, dim {args.dim}, "
              f"loss backend {chosen}"
              + (" (materializes local×global logits; build the C++ extension for the fused "
                 "cpu backend)" if chosen == "reference" else ""), flush=True)
    start = time.perf_counter()
    for step in range(args.steps):
        images, texts = synthetic_pairs(n_local, batch_gen, mix_image, mix_text)
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = grad_cache_step([image_tower, text_tower], [images, texts], loss_fn, args.chunk,
                               loss_params=[logit_scale])
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}  logit_scale "
                  f"{logit_scale.exp().item():.2f}  {time.perf_counter() - t0:.2f} s", flush=True)

    # The replicas must still agree after the optimizer steps.
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    drift = (spread - flat).abs().max()
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)

    rss = torch.tensor([float(peak_rss_bytes())])
    every = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(every, rss)
    if rank == 0:
        logits_local, logits_single, activations = naive_estimates(args, n_local)
        print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s; replicas differ by "
              f"at most {drift.item():.1e}")
        for r, v in enumerate(every):
            print(f"rank {r}: peak RSS {v.item() / GiB:.2f} GiB")
        print("a naive implementation would hold, on top of the weights and inputs:")
        print(f"  logits, OpenCLIP-style per rank (2 directions × logits/softmax/grad, fp32, "
              f"{n_local}×{args.global_batch}): {logits_local / GiB:.2f} GiB")
        print(f"  logits in one process ({args.global_batch}×{args.global_batch}): "
              f"{logits_single / GiB:.2f} GiB")
        print(f"  encoder activations of the whole local batch (no GradCache): "
              f"{activations / GiB:.2f} GiB (here: one chunk of {args.chunk} rows, "
              f"{activations * args.chunk / n_local / GiB:.3f} GiB)")
    # No rank tears gloo down while another still talks to it (an early exit can abort the
    # other rank: "terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world-size", type=int, default=2, help="processes (gloo, CPU)")
    p.add_argument("--global-batch", type=int, default=8192, help="rows over all processes")
    p.add_argument("--chunk", type=int, default=1024, help="rows per encoder call (GradCache)")
    p.add_argument("--dim", type=int, default=128, help="embedding size")
    p.add_argument("--hidden", type=int, default=512, help="hidden width of the towers")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backend", default="auto",
                   choices=["auto", "reference", "cpu", "triton", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.global_batch < args.world_size:
        p.error("--global-batch must be at least --world-size")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "rendezvous")),
                 nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
