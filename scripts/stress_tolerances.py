"""Audit the test suite's numerical bounds over many fresh seeds.

Every comparison made by ``tests/test_losses.py::check_against_reference`` is recorded (error
and bound, not asserted) while the selected tests run once per seed, in one process; the worst
error/bound ratios are printed.  A bound that a correct kernel can exceed shows up here as a
ratio near or above 1 long before it flakes in CI.

    .venv/bin/python scripts/stress_tolerances.py --seeds 50 tests/test_losses.py -k cpu
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import pytest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20,
                    help="runs, each with a fresh base seed (FUSED_LOSSES_TEST_SEED)")
    ap.add_argument("--top", type=int, default=15, help="worst ratios to print")
    ap.add_argument("--small", action="store_true",
                    help="only the small awkward shapes (helpers.SHAPES), not the large ones")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="tests to run (pytest syntax)")
    args = ap.parse_args()
    if args.small:
        # importing helpers imports triton: the interpreter must be chosen first (as conftest does)
        import torch

        if not torch.cuda.is_available() and not os.environ.get("FUSED_LOSSES_NO_INTERPRET"):
            os.environ.setdefault("TRITON_INTERPRET", "1")
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        import helpers  # the module the tests import: the conftest puts tests/ on sys.path

        helpers.LARGE_SHAPES.clear()
    record = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    os.environ["FUSED_LOSSES_RECORD_BOUNDS"] = record
    failures = 0
    for _ in range(args.seeds):
        os.environ["FUSED_LOSSES_TEST_SEED"] = str(random.getrandbits(31))
        failures += pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-x",
                                 *args.pytest_args]) not in (0, 5)
    with open(record) as f:
        rows = [json.loads(line) for line in f]
    os.unlink(record)
    exempt = sum(bool(r.get("exempt")) for r in rows)
    rows = [r for r in rows if not r.get("exempt")]
    rows.sort(key=lambda r: r["err"] / r["bound"], reverse=True)
    print(f"\n{len(rows)} comparisons over {args.seeds} seeds; worst error/bound:")
    for r in rows[:args.top]:
        ratio = r["err"] / r["bound"]
        print(f"{ratio:6.3f}  err {r['err']:.2e}  bound {r['bound']:.1e}  {r['what']}")
    over = sum(r["err"] > r["bound"] for r in rows)
    print(f"over the bound: {over} (and {exempt} within the absolute-error exemption); "
          f"pytest runs that failed otherwise: {failures}")
    if not rows:
        print("no comparison was made: the selected tests did not run (skipped or deselected)")
    return int(over > 0 or failures > 0 or not rows)


if __name__ == "__main__":
    sys.exit(main())
