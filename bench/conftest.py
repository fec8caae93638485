"""pytest-benchmark suite over the CLI's cases (``fused_losses.bench``), small sizes by default.

    .venv/bin/python -m pytest bench/ --benchmark-only
    .venv/bin/python -m pytest bench/ --benchmark-only --bench-sizes 1024 4096 --bench-ops clip

Not part of the normal test run (pyproject's ``testpaths`` is ``tests``).  Each test is one
(op, backend or peer, N) case built by ``fused_losses.bench.make_case``; a peer that is not
installed, or a case whose memory estimate does not fit, is skipped with that reason.
"""

from __future__ import annotations

import pytest

from fused_losses import bench


def pytest_addoption(parser):
    group = parser.getgroup("fused-losses bench")
    group.addoption("--bench-ops", nargs="+", default=list(bench.OPS), choices=bench.OPS,
                    help="ops to benchmark (default: all)")
    group.addoption("--bench-sizes", nargs="+", type=int, default=[64, 256],
                    help="N values (default: 64 256)")
    group.addoption("--bench-dim", type=int, default=32, help="D (default: 32)")
    group.addoption("--bench-dtype", default="float32")
    group.addoption("--bench-pass", default="full", choices=bench.PASSES)
    group.addoption("--bench-rounds", type=int, default=3,
                    help="timed rounds per case, after one warm-up round (default: 3)")


def pytest_generate_tests(metafunc):
    """(op, backend) pairs as the CLI plans them: ours on every op, each peer on its op."""
    if "op_backend" not in metafunc.fixturenames:
        return
    opts = metafunc.config.option
    pairs = [(op, backend) for op in opts.bench_ops
             for backend in bench._default_backends("cpu") + bench.peer_names(op)]
    metafunc.parametrize("op_backend", pairs, ids=[f"{op}-{b}" for op, b in pairs])
    metafunc.parametrize("n", opts.bench_sizes, ids=[f"N{n}" for n in opts.bench_sizes])


@pytest.fixture
def bench_settings(request):
    opts = request.config.option
    return {"d": opts.bench_dim, "dtype": opts.bench_dtype, "pass_": opts.bench_pass,
            "rounds": opts.bench_rounds}
