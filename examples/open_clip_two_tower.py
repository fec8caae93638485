"""An OpenCLIP-style two-tower training loop with the fused ``ClipLoss`` drop-in.

    pip install "fused-losses" scikit-learn       # OpenCLIP itself is optional here
    python examples/open_clip_two_tower.py         # ~1 min on 2 cores

The change from an OpenCLIP training script is one import::

    from fused_losses.integrations.open_clip import ClipLoss

Data: scikit-learn's handwritten digits (8×8 images, shipped with the package) paired with
captions built from a few templates ("a handwritten seven", "the digit 7", ...).  Image tower: a
small MLP; text tower: a bag of word embeddings and a projection.  Both outputs are normalized
and the model owns ``logit_scale`` (initialized to log(1/0.07), clamped at 100), as OpenCLIP's
models do; the loss is called exactly as OpenCLIP's ``ClipLoss``:
``loss(image_features, text_features, logit_scale.exp())``.

Prints the loss per epoch and zero-shot accuracy on the held-out images (each image classified
by its most similar class caption, averaged over the templates) before and after training.
With OpenCLIP installed it also checks, once, that OpenCLIP's ClipLoss gives the same value.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from fused_losses.integrations.open_clip import ClipLoss

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten {w}", "the digit {d}", "a scan of the number {w}",
             "a small picture of a {w}", "{d} written by hand", "an image of the digit {w}"]


def caption(label: int, template: int) -> str:
    return TEMPLATES[template].format(w=WORDS[label], d=label)


class Vocab:
    def __init__(self, texts):
        self.index = {w: i for i, w in enumerate(sorted({w for t in texts for w in t.split()}))}

    def encode(self, texts):
        ids = [torch.tensor([self.index[w] for w in t.split()]) for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return torch.cat(ids), offsets


class TwoTower(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 32):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, dim))
        self.words = nn.EmbeddingBag(vocab_size, 64, mode="mean")
        self.text = nn.Sequential(nn.GELU(), nn.Linear(64, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x):
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, ids, offsets):
        return F.normalize(self.text(self.words(ids, offsets)), dim=-1)

    def forward(self, x, ids, offsets):  # OpenCLIP's output: features and the scale
        return self.encode_image(x), self.encode_text(ids, offsets), \
            self.logit_scale.exp().clamp(max=100)


@torch.no_grad()
def zero_shot_accuracy(model, vocab, x, y) -> float:
    classes = []
    for label in range(10):
        ids, off = vocab.encode([caption(label, t) for t in range(len(TEMPLATES))])
        classes.append(F.normalize(model.encode_text(ids, off).mean(0), dim=-1))
    pred = (model.encode_image(x) @ torch.stack(classes).T).argmax(1)
    return float((pred == y).float().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in train_test_split(
        x.numpy(), y.numpy(), test_size=0.3, random_state=0, stratify=y.numpy()))
    vocab = Vocab([caption(d, t) for d in range(10) for t in range(len(TEMPLATES))])
    model = TwoTower(len(vocab.index))
    loss_fn = ClipLoss()  # OpenCLIP's signature: ClipLoss(local_loss, gather_with_grad, ...)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"{len(x_train)} training images, {len(x_test)} held out; zero-shot accuracy "
          f"before training: {zero_shot_accuracy(model, vocab, x_test, y_test):.3f}")

    checked = False
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_train))
        total = 0.0
        for start in range(0, len(perm), args.batch):
            idx = perm[start:start + args.batch]
            texts = [caption(int(label), int(torch.randint(len(TEMPLATES), ())))
                     for label in y_train[idx]]
            img, txt, scale = model(x_train[idx], *vocab.encode(texts))
            loss = loss_fn(img, txt, scale)
            if not checked:
                checked = True
                try:
                    from open_clip.loss import ClipLoss as OpenClipLoss
                except ImportError:
                    print("(OpenCLIP not importable here: no side-by-side check)")
                else:
                    ref = OpenClipLoss()(img, txt, scale)
                    print(f"first batch: fused {loss.item():.6f}, OpenCLIP {ref.item():.6f}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d}  loss {total / len(perm):.4f}  "
                  f"logit_scale {model.logit_scale.exp().item():6.2f}")
    acc = zero_shot_accuracy(model, vocab, x_test, y_test)
    print(f"{args.epochs} epochs in {time.time() - t0:.0f} s; zero-shot accuracy on held-out "
          f"digits: {acc:.3f}")


if __name__ == "__main__":
    main()
