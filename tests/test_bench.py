"""The benchmark runner's plumbing (not its figures): a tiny CPU sweep writes a JSON row per case
with the measured fields, and the markdown table carries the GPU columns when present."""

from __future__ import annotations

import json

import pytest
import torch

from fused_losses import bench


def test_cpu_sweep_writes_json(tmp_path):
    rc = bench.main(["--ops", "clip", "--backends", "reference", "--sizes", "32", "--dim", "8",
                     "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench-cpu.json").read_text())
    (row,) = data["rows"]
    assert row["status"] == "ok", row
    assert row["median_s"] > 0 and row["gflops"] > 0 and row["peak_extra_mb"] >= 0
    assert data["machine"]["torch"] == torch.__version__


def test_table_with_gpu_columns():
    rows = [
        {"op": "clip", "backend": "triton", "N": 4096, "D": 768, "dtype": "bfloat16",
         "status": "ok", "median_s": 0.002, "gflops": 1.0e5, "pct_of_matmul_peak": 12.5,
         "peak_extra_mb": 3.0},
        {"op": "clip", "backend": "reference", "N": 262144, "D": 768, "dtype": "bfloat16",
         "status": "out of memory"},
    ]
    lines = bench.table(rows).splitlines()
    assert "% matmul peak" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| 12.5 |" in lines[2] and "out of memory" in lines[3]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a GPU is present; the GPU sweep itself runs in scripts/gpu_check.sh")
def test_cuda_without_gpu_says_so():
    assert bench.main(["--device", "cuda"]) == 2
