"""scripts/triton_check.py (``make triton-check``): its verdicts and its reading of PTX/TTGIR, on
synthetic inputs (the gate itself, with its enumeration and its check of the D/E/k classes, is
CI's ``make triton-check`` step).  It runs in a subprocess: the script must not see
TRITON_INTERPRET (the suite sets it on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "triton_check.py")

pytest.importorskip("triton")


def _run(code: str, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_verdicts_and_mma_parsing():
    code = textwrap.dedent(f"""
        import sys, runpy
        tc = runpy.run_path({SCRIPT!r}, run_name="triton_check")
        ptx = ("wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {{...}};\\n"
               "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {{...}};")
        ttgir = ("%a = tt.dot %x, %y, %z : tensor<32x32xf32, #ttg.dot_op<{{opIdx = 0}}>> * "
                 "tensor<32x64xf32, #ttg.dot_op<{{opIdx = 1}}>> -> tensor<32x64xf32, #blocked2>")
        kinds = tc["_mma_kinds"](ptx, ttgir)
        assert kinds == ["FMA.f32", "mma.sync.m16n8k8.tf32", "wgmma.m64n32k16.bf16"], kinds
        Spec = tc["Spec"]
        sig = {{"a_ptr": "*bf16", "d": "i32", "BLOCK_M": "constexpr"}}
        s = Spec("_k", "sm_80", sig, {{(2,): 64}}, {{}}, {{"num_warps": 8, "num_stages": 2}},
                 {{("op", "bf16", 16)}})
        ok = dict(registers=200, spill_stores=0, spill_loads=0, stack=0, shared=1024,
                  mma=kinds, error=None)
        assert tc["_row"](s, ok)["verdict"] == "ok"
        assert tc["_row"](s, dict(ok, spill_stores=4))["verdict"] == "SPILL"
        assert tc["_row"](s, dict(ok, stack=8))["verdict"] == "STACK"
        big = dict(ok, shared=164 * 1024)
        assert tc["_row"](s, big)["verdict"] == "SHARED>LIMIT"
        s90 = Spec("_k", "sm_90", sig, {{(2,): 64}}, {{}}, {{"num_warps": 8, "num_stages": 2}})
        assert tc["_row"](s90, big)["verdict"] == "ok"  # 227 KB on sm_90
        assert tc["_row"](s, dict(error="PTXASError: x"))["verdict"].startswith("COMPILE")
        # the similarity tile's instruction kind must agree across the kernels of one op
        r1, r2 = dict(tc["_row"](s, ok)), dict(tc["_row"](s, ok))
        r2["mma"] = "mma.sync.m16n8k16.bf16"
        assert tc["consistency_problems"]([(s, r1), (s, r2)])
        r2["mma"] = "wgmma.m64n64k16.bf16 FMA.f32"
        assert not tc["consistency_problems"]([(s, r1), (s, r2)])
        print("ok")
    """)
    res = _run(code)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
