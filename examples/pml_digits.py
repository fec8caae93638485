"""Metric learning on scikit-learn's digits with the fused pytorch-metric-learning drop-ins.

    pip install "fused-losses[pml]" scikit-learn
    python examples/pml_digits.py                        # ~1 min on 2 cores
    python examples/pml_digits.py --loss supcon          # or ntxent, ms (default)

The change from a pml script is one import::

    from fused_losses.integrations.pytorch_metric_learning import (
        MultiSimilarityLoss, MultiSimilarityMiner)

An MLP embeds the 8×8 digit images (64 → 128 → 32); each batch's loss is pml's
``loss(embeddings, labels, miner(embeddings, labels))`` (MultiSimilarityLoss with its miner,
fused into one op), or SupConLoss / NTXentLoss with labels.  Prints the loss per epoch and
Recall@1 on the held-out images (the nearest other held-out image, by cosine similarity, has
the same digit) before and after training.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_losses as fl
from fused_losses.integrations.pytorch_metric_learning import (
    MultiSimilarityLoss,
    MultiSimilarityMiner,
    NTXentLoss,
    SupConLoss,
)


@torch.no_grad()
def recall_at_1(model, x, y) -> float:
    emb = F.normalize(model(x), dim=-1)
    _, idx = fl.similarity_topk(emb, emb, 1, exclude_diagonal=True)
    return float((y[idx[:, 0]] == y).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loss", choices=["ms", "supcon", "ntxent"], default="ms")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    digits = load_digits()
    x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in train_test_split(
        digits.data / 16.0, digits.target, test_size=0.3, random_state=0,
        stratify=digits.target))
    x_train, x_test = x_train.float(), x_test.float()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    miner = MultiSimilarityMiner(epsilon=0.1) if args.loss == "ms" else None
    loss_fn = {"ms": MultiSimilarityLoss, "supcon": SupConLoss, "ntxent": NTXentLoss}[args.loss]()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"{type(loss_fn).__name__}{' + MultiSimilarityMiner' if miner else ''}: "
          f"{len(x_train)} training images, {len(x_test)} held out; Recall@1 before training "
          f"{recall_at_1(model, x_test, y_test):.3f}")

    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_train))
        total = 0.0
        for start in range(0, len(perm), args.batch):
            idx = perm[start:start + args.batch]
            emb, labels = model(x_train[idx]), y_train[idx]
            loss = loss_fn(emb, labels, miner(emb, labels)) if miner else loss_fn(emb, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d}  loss {total / len(perm):.4f}  "
                  f"held-out Recall@1 {recall_at_1(model, x_test, y_test):.3f}")
    print(f"{args.epochs} epochs in {time.time() - t0:.0f} s; held-out Recall@1 "
          f"{recall_at_1(model, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
