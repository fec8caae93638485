"""Large batches with bounded activation memory: a GradCache step (Gao et al., 2021).

A fused loss keeps the loss itself at O(N·D), but the encoders' activations for a batch of N
still grow with N.  :func:`grad_cache_step` splits that cost:

1. encode every input in chunks of ``chunk_size`` rows under ``torch.no_grad()`` (recording the
   RNG state before each chunk), and concatenate the embeddings (O(N·D));
2. evaluate ``loss_fn`` on those embeddings as detached leaves and backpropagate it, which
   yields the gradient of the loss with respect to every embedding row (and to the loss's own
   parameters, such as ``logit_scale``);
3. re-encode each chunk with autograd on, under the RNG state recorded for it (so dropout draws
   the same masks), and backpropagate the cached gradient of its rows,
   ``backward(embedding_chunk, cached_grad_chunk)``.

Peak activation memory is one chunk's; the parameter gradients equal those of one backward
through the whole batch encoded the same way (the same chunks and RNG stream).  Encoders without
randomness and without cross-row coupling (no BatchNorm in train mode) give the gradient of a
plain full-batch forward.  The cost is a second forward pass.

With a ``process_group``, ``loss_fn`` may be a collective fused loss (every rank calls the step
with its own rows; see ``fused_losses.distributed`` for the gradient convention).  Under
DistributedDataParallel, pass the DDP modules themselves as encoders: every chunk but the last
one of each module runs under ``module.no_sync()``, so each module all-reduces its gradients
once per step.  The ranks may hold different numbers of chunks, provided the DDP modules do not
synchronize buffers at each forward (no buffers, or ``broadcast_buffers=False``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["grad_cache_step", "average_gradients"]


def _split(batch: Any, chunk_size: int) -> list[Any]:
    """Split a tensor, a tuple/list of tensors or a dict of tensors along dim 0."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(chunk_size))
    if isinstance(batch, Mapping):
        keys = list(batch)
        parts = [_split(batch[k], chunk_size) for k in keys]
        _same_count(parts)
        return [dict(zip(keys, vals)) for vals in zip(*parts)]
    if isinstance(batch, (tuple, list)):
        parts = [_split(b, chunk_size) for b in batch]
        _same_count(parts)
        return [tuple(vals) for vals in zip(*parts)]
    raise TypeError(
        "each input must be a tensor, a tuple/list of tensors or a dict of tensors, got "
        f"{type(batch).__name__}"
    )


def _same_count(parts: list[list[Any]]) -> None:
    if len({len(p) for p in parts}) > 1:
        raise ValueError("the tensors of one input must all have the same number of rows")


def _call(encoder: Callable, chunk: Any) -> torch.Tensor:
    if isinstance(chunk, dict):
        out = encoder(**chunk)
    elif isinstance(chunk, tuple):
        out = encoder(*chunk)
    else:
        out = encoder(chunk)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"an encoder must return a tensor of embeddings, got {type(out).__name__}")
    return out


def _cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if _cuda_active() else None)


@contextlib.contextmanager
def _replay_rng(state):
    """Run the block from a recorded RNG state; the caller's RNG state is restored after."""
    cpu, cuda = state
    devices = list(range(len(cuda))) if cuda is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        yield


def grad_cache_step(
    encoders: Callable | Sequence[Callable],
    inputs: Sequence[Any],
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int,
    *,
    loss_params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One GradCache forward/backward; accumulates gradients into ``.grad`` like
    ``loss.backward()`` would, and returns the loss (detached).  The optimizer step is yours.

    encoders: one callable per input (or one for all of them, e.g. a shared SimCLR encoder);
        each maps a chunk to its embeddings (rows, D).  A chunk of a tensor input is passed
        as ``encoder(chunk)``, of a tuple/list input as ``encoder(*chunk)``, of a dict input as
        ``encoder(**chunk)``.
    inputs: the batches, each split along dim 0 into chunks of ``chunk_size`` rows.
    loss_fn: ``loss_fn(*embeddings)`` → scalar, the embeddings in ``inputs`` order (close over
        labels, ``logit_scale`` and the like), e.g.
        ``lambda a, b: clip_loss(a, b, model.logit_scale.exp(), process_group=pg)``.
    chunk_size: rows per encoder call.
    loss_params: leaf tensors that ``loss_fn`` uses directly (``logit_scale``, ``logit_bias``).
        When given, their gradient is computed in step 2 and delivered in the backward of the
        very last chunk, so a DDP module that owns them (the last input's encoder) averages it
        with the rest of its gradients.  When ``None``, step 2 is a plain ``loss.backward()``
        and every tensor the loss reaches gets its gradient there, outside any DDP backward
        (fine without DDP; under DDP average those yourself, e.g. with
        :func:`average_gradients`).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not isinstance(inputs, (tuple, list)) or len(inputs) == 0:
        raise TypeError("inputs must be a non-empty tuple or list of batches, one per encoder")
    if callable(encoders):
        encoders = [encoders] * len(inputs)
    encoders = list(encoders)
    if len(encoders) != len(inputs):
        raise ValueError(f"got {len(encoders)} encoders for {len(inputs)} inputs")
    params = list(loss_params) if loss_params is not None else None
    if params is not None:
        for p in params:
            if not (isinstance(p, torch.Tensor) and p.is_leaf and p.requires_grad):
                raise ValueError("loss_params must be leaf tensors that require grad")

    chunks = [_split(batch, chunk_size) for batch in inputs]

    # 1. embeddings without activations, recording the RNG state of every chunk
    embeddings, states = [], []
    with torch.no_grad():
        for encoder, parts in zip(encoders, chunks):
            outs, recorded = [], []
            for part in parts:
                recorded.append(_rng_state())
                outs.append(_call(encoder, part))
            embeddings.append(torch.cat(outs))
            states.append(recorded)

    # 2. the loss on detached embeddings: gradients per embedding row (and loss parameter)
    leaves = [e.detach().requires_grad_(True) for e in embeddings]
    loss = loss_fn(*leaves)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise ValueError("loss_fn must return a scalar tensor")
    if params is None:
        loss.backward()
        cached = [leaf.grad for leaf in leaves]
        param_grads: list[torch.Tensor | None] = []
    else:
        grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
        cached, param_grads = list(grads[: len(leaves)]), list(grads[len(leaves) :])
    cached = [torch.zeros_like(e) if g is None else g for e, g in zip(embeddings, cached)]

    # 3. re-encode each chunk with autograd and backpropagate its cached gradient
    last_use = {}
    for k, (encoder, parts) in enumerate(zip(encoders, chunks)):
        if parts:
            last_use[id(encoder)] = (k, len(parts) - 1)
    final = max(last_use.values())
    for k, (encoder, parts) in enumerate(zip(encoders, chunks)):
        start = 0
        for c, part in enumerate(parts):
            sync = last_use[id(encoder)] == (k, c)
            no_sync = getattr(encoder, "no_sync", None)
            ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
            with ctx:
                with _replay_rng(states[k][c]):
                    out = _call(encoder, part)
                rows = out.shape[0]
                roots, grads = [out], [cached[k][start : start + rows]]
                start += rows
                if (k, c) == final and params is not None:
                    for p, g in zip(params, param_grads):
                        if g is not None:
                            roots.append(p.view_as(p))
                            grads.append(g)
                torch.autograd.backward(roots, grads)
    return loss.detach()


def average_gradients(params, process_group=None) -> None:
    """Average ``.grad`` over the ranks of ``process_group`` the way DistributedDataParallel does
    (all-reduce SUM, divide by the world size), for parameters outside a DDP module.  Collective;
    a parameter without a gradient contributes zeros (and gets a gradient)."""
    world = dist.get_world_size(process_group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=process_group)
        p.grad.div_(world)
