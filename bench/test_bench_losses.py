"""One benchmark per (op, backend or peer, N): the same cases as ``python -m fused_losses.bench``
(built by ``fused_losses.bench.make_case``), timed by pytest-benchmark in this process."""

from __future__ import annotations

import pytest
import torch

from fused_losses import bench


def test_loss(benchmark, op_backend, n, bench_settings):
    op, backend = op_backend
    d, dtype, pass_ = bench_settings["d"], bench_settings["dtype"], bench_settings["pass_"]
    reason = bench.unavailable_reason(op, backend, "cpu") or bench._would_not_fit(
        op, backend, n, None, d, dtype, "cpu")
    if reason:
        pytest.skip(f"{op} {backend} N={n}: {reason}")
    case = bench.make_case(op, backend, n, None, d, dtype, "cpu", pass_)
    benchmark.group = f"{op} {pass_} N={n} D={d} {dtype}"
    benchmark.extra_info.update(op=op, backend=backend, N=n, D=d, dtype=dtype, pass_=pass_)
    loss = benchmark.pedantic(case.run, rounds=bench_settings["rounds"], warmup_rounds=1,
                              iterations=1)
    assert torch.isfinite(loss).all(), f"{op} {backend}: non-finite loss {loss}"
