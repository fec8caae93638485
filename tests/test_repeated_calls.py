"""Repeated and concurrent calls on the cpu backend: no leak, no shared state.

- 1,000 forward+backward calls at one shape (cycling through the fused ops) keep the RSS flat.
- Four Python threads calling at once get exactly the results of the same calls made serially.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import seeded

import fused_losses as FL

pytestmark = pytest.mark.skipif("cpu" not in FL.available_backends(),
                                reason="the cpu extension is not built")

N, D = 128, 32


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _inputs(gen):
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    y = torch.randn(N, D, generator=gen, requires_grad=True)
    v = torch.randn(N, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 16, (N,), generator=gen)
    return x, y, v, labels


OPS = [
    lambda x, y, v, lab: FL.clip_loss(x, y, 10.0, backend="cpu"),
    lambda x, y, v, lab: FL.sup_con(x, lab, backend="cpu"),
    lambda x, y, v, lab: FL.info_nce(x, y, labels=lab, key_labels=lab, decoupled=True,
                                     extra_negatives=v[:, :1].expand(N, D)[:8], backend="cpu"),
    lambda x, y, v, lab: FL.siglip_loss(x, y, 10.0, -10.0, backend="cpu"),
    lambda x, y, v, lab: FL.multi_similarity(x, lab, backend="cpu"),
    lambda x, y, v, lab: FL.pairwise_logsumexp(x, y, scale=5.0, backend="cpu").sum(),
    lambda x, y, v, lab: FL.pairwise_softmax_matmul(x, y, v, backend="cpu").square().sum(),
    lambda x, y, v, lab: FL.similarity_topk(x, y, 4, backend="cpu")[0].sum(),
    lambda x, y, v, lab: FL.sinkhorn(x[:64], y[:64], n_iters=3, backend="cpu"),
]


def _step(k, x, y, v, labels):
    """Forward and backward of op k; returns (loss, grads of x, y, v)."""
    for t in (x, y, v):
        t.grad = None
    loss = OPS[k % len(OPS)](x, y, v, labels)
    loss.backward()
    return loss.detach(), [None if t.grad is None else t.grad.clone() for t in (x, y, v)]


def test_thousand_calls_keep_rss_flat():
    """RSS after 1,000 more calls (past 200 warm-up calls) grows by less than 16 MiB; holding
    on to one call's saved inputs (2 × N×D fp32 = 32 KiB) per call would add 31 MiB."""
    x, y, v, labels = _inputs(seeded())
    for k in range(200):
        _step(k, x, y, v, labels)
    before = _rss_kib()
    for k in range(1000):
        _step(k, x, y, v, labels)
    grown = _rss_kib() - before
    assert grown < 16 * 1024, f"RSS grew by {grown / 1024:.1f} MiB over 1,000 calls"


def test_four_threads_get_the_serial_results():
    gen = seeded()
    work = [(k, _inputs(gen)) for k in range(4 * len(OPS))]
    serial = [_step(k, *ins) for k, ins in work]
    results: dict[int, tuple] = {}
    barrier = threading.Barrier(4)
    errors = []

    def worker(t):
        try:
            barrier.wait()
            for _ in range(3):  # every item three times, the threads interleaving
                for i in range(t, len(work), 4):
                    k, ins = work[i]
                    results[i] = _step(k, *ins)
                    assert torch.equal(results[i][0], serial[i][0]), f"op {k}: loss"
        except Exception as exc:  # reported below, with the thread
            errors.append((t, exc))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    for i, (loss, grads) in enumerate(serial):
        got_loss, got_grads = results[i]
        assert torch.equal(got_loss, loss), f"item {i}: loss"
        for j, (a, b) in enumerate(zip(got_grads, grads)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), \
                f"item {i} (op {work[i][0]}): grad {j}"
