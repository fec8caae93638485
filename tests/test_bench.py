"""The benchmark runner's plumbing (not its figures): tiny CPU sweeps write JSON, CSV and PNG
with the measured fields; each pass times what it says; peers that are missing, and cases that
would not fit, are reported rather than dropped; peers compute our ops' quantities; the README
section is generated from saved runs."""

from __future__ import annotations

import csv
import glob
import json
import os
import sys

import pytest
import torch

from fused_losses import bench

TINY = ["--dim", "8", "--repeats", "1", "--budget", "0.5"]


def _saved(out_dir, suffix):
    (path,) = glob.glob(os.path.join(str(out_dir), f"*.{suffix}"))
    return path


def test_cpu_sweep_writes_json_csv_and_plot(tmp_path):
    rc = bench.main(["--ops", "clip", "--backends", "reference", "--sizes", "256", "512",
                     "--out", str(tmp_path), *TINY])
    assert rc == 0
    data = json.loads(open(_saved(tmp_path, "json")).read())
    assert data["machine"]["torch"] == torch.__version__
    assert data["machine"]["peaks"]["matmul_float32_gflops"] > 0
    rows = data["rows"]
    assert [r["N"] for r in rows] == [256, 512]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["pass"] == "full" and r["M"] == r["N"]
        assert r["median_s"] > 0 and r["timed_calls"] >= 0
        expected = bench.GEMM_PASSES["full"] * 2.0 * r["N"] ** 2 * 8 / r["median_s"] / 1e9
        assert r["gflops"] == pytest.approx(expected)
        assert torch.isfinite(torch.tensor(r["value"]))
        # the estimate that decides "would not fit" must not be below what the case used
        est = bench.estimate_bytes("clip", "reference", r["N"], None, 8)
        assert est >= r["peak_extra_mb"] * 2**20

    with open(_saved(tmp_path, "csv"), newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [int(r["N"]) for r in csv_rows] == [256, 512]
    assert [float(r["median_s"]) for r in csv_rows] == [r["median_s"] for r in rows]
    assert all(r["machine"] and r["date"] == data["machine"]["date"] for r in csv_rows)

    (plot,) = data["plots"]
    assert plot["op"] == "clip" and plot["D"] == 8
    png = tmp_path / plot["file"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(str(png)).shape[:2]
    assert height > 100 and width > 100


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
def test_pass_option_times_that_pass(tmp_path, pass_):
    rc = bench.main(["--ops", "clip", "--backends", "cpu", "--sizes", "64", "--pass", pass_,
                     "--out", str(tmp_path), *TINY])
    assert rc == 0
    (row,) = json.loads(open(_saved(tmp_path, "json")).read())["rows"]
    assert row["status"] == "ok" and row["pass"] == pass_, row
    expected = bench.GEMM_PASSES[pass_] * 2.0 * 64 * 64 * 8 / row["median_s"] / 1e9
    assert row["gflops"] == pytest.approx(expected)
    full_value = bench.make_case("clip", "cpu", 64, None, 8, "float32").run()
    assert row["value"] == pytest.approx(float(full_value.detach()), rel=1e-6)


@pytest.mark.parametrize("pass_, forwards, backwards", [
    ("full", 3, 3), ("fwd", 3, 0), ("bwd", 1, 3)])
def test_make_case_passes(monkeypatch, pass_, forwards, backwards):
    """Three calls: fwd runs only forwards, bwd only backwards (on a graph built once, inside
    make_case), full both; gradients are cleared after each call."""
    counts = {"forward": 0, "backward": 0}
    real_make_forward = bench.make_forward

    def counting_make_forward(op, backend, inputs):
        forward = real_make_forward(op, backend, inputs)
        inputs.x.register_hook(lambda grad: counts.update(backward=counts["backward"] + 1))

        def counted():
            counts["forward"] += 1
            return forward()

        return counted

    monkeypatch.setattr(bench, "make_forward", counting_make_forward)
    case = bench.make_case("supcon", "reference", 32, None, 8, "float32", pass_=pass_)
    losses = [float(case.run().detach()) for _ in range(3)]
    assert counts == {"forward": forwards, "backward": backwards}
    assert losses[0] == losses[1] == losses[2]
    assert all(t.grad is None for t in case.grad_leaves())


def test_missing_peer_is_reported_not_dropped(tmp_path, monkeypatch, capsys):
    missing = bench.PEERS["clip", "open_clip"]
    monkeypatch.setitem(bench.PEERS, ("clip", "open_clip"),
                        bench.Peer("fused_losses_no_such_peer", missing.distribution,
                                   missing.build, missing.bytes_estimate, missing.note))
    rc = bench.main(["--ops", "clip", "--backends", "open_clip", "--sizes", "64", "128",
                     "--out", str(tmp_path), *TINY])
    assert rc == 0
    (row,) = json.loads(open(_saved(tmp_path, "json")).read())["rows"]
    assert row["backend"] == "open_clip" and row["status"] == "not installed"
    table_lines = [line for line in capsys.readouterr().out.splitlines() if "open_clip" in line]
    assert any("not installed" in line and line.startswith("| clip |") for line in table_lines)
    with open(_saved(tmp_path, "csv"), newline="") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["not installed"]


def test_default_plan_includes_each_ops_peers():
    class Args:
        ops = ["clip", "sinkhorn", "ms"]
        backends = None
        device = "cpu"

    plan = bench._plan(Args)
    for op, peer in bench.PEERS:
        if op in Args.ops:
            assert (op, peer) in plan
    assert ("clip", "pml") not in plan and ("ms", "pml") in plan
    Args.backends = ["reference", "pml"]  # a peer name applies to the ops it is a peer of
    assert bench._plan(Args) == [("clip", "reference"), ("sinkhorn", "reference"),
                                 ("ms", "reference"), ("ms", "pml")]


def test_would_not_fit_is_estimated_not_run(tmp_path, monkeypatch):
    n = 2048
    ref = bench.estimate_bytes("clip", "reference", n, None, 8)
    fused = bench.estimate_bytes("clip", "cpu", n, None, 8)
    assert ref > fused
    # RAM such that the reference does not fit and the fused backend does
    monkeypatch.setattr(bench, "_available_ram", lambda: (ref + fused) / 2 / 0.8)
    rc = bench.main(["--ops", "clip", "--backends", "reference", "cpu", "--sizes", str(n),
                     "--out", str(tmp_path), *TINY])
    assert rc == 0
    data = json.loads(open(_saved(tmp_path, "json")).read())
    by_backend = {r["backend"]: r for r in data["rows"]}
    assert by_backend["reference"]["status"].startswith("would not fit")
    assert by_backend["reference"]["est_gb"] == pytest.approx(ref / 1e9)
    assert "median_s" not in by_backend["reference"]
    assert by_backend["cpu"]["status"] == "ok" and by_backend["cpu"]["median_s"] > 0


def test_estimates_grow_like_the_matrices_they_hold():
    def growth(op, backend):
        """Ratio of successive increments as N doubles: 2 for O(N), 4 for O(N²), 8 for O(N³)."""
        est = [bench.estimate_bytes(op, backend, n, None, 64) for n in (2**13, 2**14, 2**15)]
        return (est[2] - est[1]) / (est[1] - est[0])

    assert growth("clip", "reference") == pytest.approx(4, rel=0.01)
    assert growth("clip", "cpu") == pytest.approx(2, rel=0.01)
    assert growth("nt_xent", "pml") == pytest.approx(8, rel=0.01)  # |pos| × |neg| pairs
    assert growth("sinkhorn", "geomloss") == pytest.approx(4, rel=0.01)


def _value_and_grads(forward, inputs):
    loss = forward()
    leaves = [t for t in (inputs.x, inputs.y) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


# GeomLoss online is the same algorithm as tensorized, through KeOps, which compiles each new
# formula for ~11 s: it is exercised by the bench suite, not here.
AGREEMENT_PEERS = [key for key in bench.PEERS if key != ("sinkhorn", "geomloss_online")]


def _peer_param(op, peer):
    why = "Inf-CL runs on CUDA only" if peer == "inf_cl" else (
        f"{peer} not installed" if bench.unavailable_reason(op, peer, "cpu") else None)
    return pytest.param(op, peer, id=f"{op}-{peer}",
                        marks=pytest.mark.skipif(why is not None, reason=why or ""))


@pytest.mark.parametrize("op, peer", [_peer_param(o, p) for o, p in AGREEMENT_PEERS])
def test_peer_computes_our_quantity(op, peer):
    """Each peer, with the bench's settings, gives our reference's value and gradients."""
    inputs = bench.make_inputs(op, 48, None, 8, "float64")
    if op == "sinkhorn":
        # Small clouds (cost/ε ≈ 0.1): POT's un-scaled iterations converge there, as ours do.
        inputs.x = (inputs.x.detach() * 0.005).requires_grad_()
        inputs.y = (inputs.y.detach() * 0.005 + 0.005).requires_grad_()
    ours, our_grads = _value_and_grads(bench.make_forward(op, "reference", inputs), inputs)
    theirs, their_grads = _value_and_grads(bench.make_forward(op, peer, inputs), inputs)
    grad_tol = 1e-3 if peer == "pot" else 1e-6  # POT stops at its tol 1e-9 on the marginals
    assert float(theirs) == pytest.approx(float(ours), rel=1e-5)
    for mine, other in zip(our_grads, their_grads):
        assert float((other - mine).norm() / mine.norm()) < grad_tol


def _stand_in_modules():
    """OpenCLIP's and Inf-CL's loss formulas (their loss.py / cal_inf_loss on one device),
    reproduced: neither runs on this CPU (OpenCLIP's torchvision does not import beside the CPU
    torch wheel; Inf-CL is CUDA-only), but the bench's wiring of them can be checked."""
    import types

    import torch.nn.functional as F

    class ClipLoss:
        def __call__(self, image_features, text_features, logit_scale):
            labels = torch.arange(image_features.shape[0])
            logits = logit_scale * image_features @ text_features.T
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    class SigLipLoss:
        def __call__(self, image_features, text_features, logit_scale, logit_bias):
            logits = logit_scale * image_features @ text_features.T + logit_bias
            signs = 2 * torch.eye(logits.shape[0], dtype=logits.dtype) - 1
            return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]

    def cal_inf_loss(q, k, labels=None, scale=None, head_dim=256):
        labels = torch.arange(q.shape[0]) if labels is None else labels
        return F.cross_entropy((scale * q) @ k.T, labels)

    open_clip = types.ModuleType("open_clip")
    open_clip.loss = types.ModuleType("open_clip.loss")
    open_clip.loss.ClipLoss, open_clip.loss.SigLipLoss = ClipLoss, SigLipLoss
    inf_cl = types.ModuleType("inf_cl")
    inf_cl.cal_inf_loss = cal_inf_loss
    return {"open_clip": open_clip, "open_clip.loss": open_clip.loss, "inf_cl": inf_cl}


@pytest.mark.parametrize("op, peer", [("clip", "open_clip"), ("clip", "inf_cl"),
                                      ("siglip", "open_clip")])
def test_gpu_only_peer_wiring(monkeypatch, op, peer):
    """Normalization, argument order and scales as the bench passes them give our quantity."""
    for name, module in _stand_in_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    inputs = bench.make_inputs(op, 40, None, 16, "float64")
    ours, our_grads = _value_and_grads(bench.make_forward(op, "reference", inputs), inputs)
    theirs, their_grads = _value_and_grads(bench.make_forward(op, peer, inputs), inputs)
    assert float(theirs) == pytest.approx(float(ours), rel=1e-9)
    for mine, other in zip(our_grads, their_grads):
        assert float((other - mine).norm() / mine.norm()) < 1e-9


def _write_run(folder, name, device, machine, rows, args_extra=None):
    args = {"device": device, "ops": sorted({r["op"] for r in rows})} | (args_extra or {})
    with open(os.path.join(folder, name), "w") as fh:
        json.dump({"machine": machine, "args": args, "rows": rows, "plots": [
            {"op": "clip", "pass": "full", "dtype": "float32", "D": 256, "file": "p.png"}]}, fh)


def test_readme_section_from_saved_runs(tmp_path, capsys):
    cpu = {"cpu": "Test CPU", "threads": 2, "torch": "2.13.0+cpu"}
    head = {"op": "clip", "pass": "full", "dtype": "float32", "D": 256}
    _write_run(tmp_path, "old.json", "cpu", cpu | {"date": "2026-11-01T00:00:00+00:00"}, [
        head | {"backend": "reference", "N": 1024, "status": "ok", "median_s": 9.0,
                "peak_extra_mb": 99.0}])
    _write_run(tmp_path, "new.json", "cpu", cpu | {"date": "2026-11-20T00:00:00+00:00"}, [
        head | {"backend": "reference", "N": 1024, "status": "ok", "median_s": 0.5,
                "peak_extra_mb": 77.0},
        head | {"backend": "reference", "N": 32768, "status": "would not fit (est. 34.4 GB)"},
        head | {"backend": "cpu", "N": 1024, "status": "ok", "median_s": 0.25,
                "peak_extra_mb": 30.0},
        head | {"backend": "open_clip", "N": None, "status": "not installed"}])
    assert bench.main(["--readme", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "### Test CPU, 2 threads (CPU, no GPU)" in text
    assert "No GPU run is saved yet." in text
    assert "| 1,024 | 0.5 s, 77 MB | 0.25 s, 30 MB |" in text  # the newer run wins
    assert "9 s" not in text
    assert "| 32,768 | would not fit |  |" in text
    assert "open_clip (clip: not installed)" in text
    assert f"({tmp_path.as_posix()}/p.png)" in text

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n{bench.README_BEGIN}\nstale\n{bench.README_END}\n"
                      "\n## Layout\n")
    assert bench.main(["--readme", str(readme), "--out", str(tmp_path)]) == 0
    updated = readme.read_text()
    assert "stale" not in updated and "| 1,024 | 0.5 s, 77 MB |" in updated
    assert updated.startswith("# Title\n\n## Results\n") and updated.endswith("\n## Layout\n")


def test_table_with_gpu_columns():
    rows = [
        {"op": "clip", "backend": "triton", "pass": "full", "N": 4096, "M": 4096, "D": 768,
         "dtype": "bfloat16", "status": "ok", "median_s": 0.002, "p20_s": 0.0019,
         "p80_s": 0.0021, "gflops": 1.0e5, "pct_of_matmul_peak": 12.5, "peak_extra_mb": 3.0,
         "value": 8.3},
        {"op": "clip", "backend": "reference", "pass": "full", "N": 262144, "M": 262144,
         "D": 768, "dtype": "bfloat16", "status": "out of memory"},
    ]
    lines = bench.table(rows).splitlines()
    assert "% matmul peak" in lines[0] and "p20–p80 s" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| 0.0019–0.0021 |" in lines[2] and "| 12.5 |" in lines[2]
    assert "out of memory" in lines[3]


def test_do_bench_quantiles_become_seconds():
    testing = pytest.importorskip("triton.testing")
    import inspect

    assert "quantiles" in inspect.signature(testing.do_bench).parameters
    fields = bench._timing_fields([2.0, 1.5, 3.0])  # ms, in DO_BENCH_QUANTILES' order
    assert bench.DO_BENCH_QUANTILES == [0.5, 0.2, 0.8]
    assert fields == {"median_s": 0.002, "p20_s": 0.0015, "p80_s": 0.003}


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a GPU is present; the GPU sweep itself runs in scripts/gpu_check.sh")
def test_cuda_without_gpu_says_so():
    assert bench.main(["--device", "cuda"]) == 2
