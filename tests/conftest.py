"""Backend-parametrized harness.

Any test that takes a ``backend`` argument runs once per backend that is registered and available
on this machine (see ``helpers.backends_under_test``); a test that takes ``device`` gets the device
that backend runs on.  Adding a backend therefore adds its tests with no test edits.
"""

from __future__ import annotations

import os
import random
import sys

# The Triton backend runs on CPU tensors only under the interpreter; it must be set before
# triton is imported anywhere.
if os.environ.get("FUSED_LOSSES_NO_INTERPRET") is None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:  # pragma: no cover
        pass

sys.path.insert(0, os.path.dirname(__file__))

import helpers  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import backends_under_test, device_for, supports  # noqa: E402

from fused_losses import _dispatch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_op(*ops): run only for backends that implement these ops")
    config.addinivalue_line("markers", "cpu_device: run only for backends that run on the CPU")
    config.addinivalue_line(
        "markers", "large_shape: not for the interpreted Triton backend (≈400× slower than eager)")
    config.addinivalue_line(
        "markers", "requires_dtype(*dtypes): run only for backends that accept these dtypes")


def pytest_report_header(config):
    """Which backends the parametrized suite runs here, and why each other one does not (a
    backend that cannot run here gets no test cases: nothing of it is counted as passing)."""
    lines = [f"backends under test: {', '.join(backends_under_test())}"]
    for name in _dispatch.registered_backends():
        if name not in backends_under_test():
            why = _dispatch.get_backend(name).availability() or \
                f"does not serve the {device_for(name).type} device here"
            lines.append(f"backend {name!r} NOT under test: {why}")
    return lines


def pytest_generate_tests(metafunc):
    """``backend``: every available backend that implements the ops the test is marked with
    (a backend without the op gets no test case, rather than a skipped one)."""
    if "backend" not in metafunc.fixturenames:
        return
    names = backends_under_test()
    marker = metafunc.definition.get_closest_marker("requires_op")
    if marker is not None:
        names = [b for b in names if all(supports(b, op) for op in marker.args)]
    marker = metafunc.definition.get_closest_marker("requires_dtype")
    if marker is not None:
        names = [b for b in names
                 if all(d in _dispatch.get_backend(b).dtypes for d in marker.args)]
    if metafunc.definition.get_closest_marker("cpu_device") is not None:
        names = [b for b in names if device_for(b).type == "cpu"]
    if metafunc.definition.get_closest_marker("large_shape") is not None:
        names = [b for b in names if not (b == "triton" and device_for(b).type == "cpu")]
    metafunc.parametrize("backend", names)


@pytest.fixture
def device(backend):
    return device_for(backend)


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    # Every random input of a test is fixed by its id (and FUSED_LOSSES_TEST_SEED, 0 unless the
    # stress script sets a fresh one): the same inputs on every run, whatever ran before.
    seed = helpers.start_test(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(autouse=True)
def _no_tf32_by_default():
    # SPEC §7: fp32 tolerance 1e-5 holds when tf32 is off; tests that want tf32 turn it on.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
