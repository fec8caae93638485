"""fused_losses.integrations.open_clip side by side with the installed OpenCLIP (open_clip_torch):
ClipLoss and SigLipLoss values and gradients (features, logit_scale, logit_bias) in fp64 and
fp32, awkward shapes, output_dict, the dense helpers subclasses use, and every distributed mode
rank by rank on gloo (OpenCLIP's own gradient semantics).  OpenCLIP imports torchvision: these
tests run where it imports (the torch 2.14.1 + torchvision environment, `make
test-integrations`), and are skipped with the reason elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_ranks_ok,
    randn,
    record_on_rank,
    rel_err,
    run_on_gloo,
    seeded,
    side_by_side,
)

open_clip_loss = pytest.importorskip(
    "open_clip.loss", reason="OpenCLIP (open_clip_torch, with torchvision) does not import here "
                             "(extra 'open_clip'; see `make test-integrations`)",
    exc_type=ImportError)

from fused_losses.integrations import open_clip as ours  # noqa: E402

DTYPES = [torch.float64, torch.float32]
# No D=1, and no extreme scale with N <= 2: a softmax (sigmoid) saturated over one or two
# columns makes the scale (bias) gradient a sum of terms that cancel to ~1e-40, which no order of
# summation computes to any relative precision.
SHAPES = [(1, 3), (2, 2), (17, 8), (40, 100)]


def _moderate(n, settings):
    return settings[:2] if n <= 2 else settings


def _features(n, d, gen):
    """Unit rows, as OpenCLIP's models hand them to the loss (D=1: ±1)."""
    img = F.normalize(randn(n, d, dtype=torch.float64, gen=gen), dim=-1).requires_grad_()
    txt = F.normalize(randn(n, d, dtype=torch.float64, gen=gen), dim=-1).requires_grad_()
    return img, txt


def _scalar(v):
    return torch.tensor(float(v), dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_clip_loss_matches(shape, dtype):
    gen = seeded()
    for scale in _moderate(shape[0], (1.0, 14.3, 100.0)):
        img, txt = _features(*shape, gen)
        inp = dict(image_features=img, text_features=txt, logit_scale=_scalar(scale))
        side_by_side(ours.ClipLoss(), open_clip_loss.ClipLoss(), inp, dtype,
                     f"ClipLoss {shape} scale={scale}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_siglip_loss_matches(shape, dtype):
    gen = seeded()
    for scale, bias in _moderate(shape[0], ((1.0, 0.0), (10.0, -10.0), (30.0, -3.0))):
        img, txt = _features(*shape, gen)
        inp = dict(image_features=img, text_features=txt, logit_scale=_scalar(scale),
                   logit_bias=_scalar(bias))
        side_by_side(ours.SigLipLoss(), open_clip_loss.SigLipLoss(), inp, dtype,
                     f"SigLipLoss {shape} scale={scale} bias={bias}")


def test_clip_bias_output_dict_and_helpers():
    """A scalar logit_bias: no effect on the value, gradient exactly 0 (OpenCLIP: rounding
    noise); a per-column bias runs the dense formula; output_dict; the helpers subclasses call
    (DistillClipLoss's forward runs on our ClipLoss unchanged)."""
    gen = seeded()
    img, txt = _features(9, 6, gen)
    scale, bias = _scalar(12.0), _scalar(-4.0)
    mine = ours.ClipLoss()(img, txt, scale, bias, output_dict=True)
    theirs = open_clip_loss.ClipLoss()(img, txt, scale, bias, output_dict=True)
    assert set(mine) == {"contrastive_loss"}
    assert rel_err(mine["contrastive_loss"], theirs["contrastive_loss"]) <= 1e-12
    g_mine = torch.autograd.grad(mine["contrastive_loss"], bias)[0]
    g_theirs = torch.autograd.grad(theirs["contrastive_loss"], bias)[0]
    assert float(g_mine) == 0.0 and abs(float(g_theirs)) < 1e-12
    column_bias = randn(9, dtype=torch.float64, gen=gen, requires_grad=True)
    with pytest.warns(UserWarning, match="non-scalar logit_bias"):
        side_by_side(ours.ClipLoss(), open_clip_loss.ClipLoss(),
                     dict(image_features=img, text_features=txt, logit_scale=scale,
                          logit_bias=column_bias), torch.float64, "ClipLoss column bias")
    for a, b in zip(ours.ClipLoss().get_logits(img, txt, scale, bias),
                    open_clip_loss.ClipLoss().get_logits(img, txt, scale, bias)):
        assert torch.equal(a, b)
    assert torch.equal(ours.ClipLoss(cache_labels=True).get_ground_truth("cpu", 7),
                       open_clip_loss.ClipLoss(cache_labels=True).get_ground_truth("cpu", 7))
    distill = open_clip_loss.DistillClipLoss
    our_distill = type("DistillOnOurs", (ours.ClipLoss,),
                       {"forward": distill.forward, "dist_loss": distill.dist_loss})()
    t_img, t_txt = _features(9, 6, gen)
    args = (img, txt, scale, t_img, t_txt, _scalar(20.0))
    for a, b in zip(our_distill(*args), distill()(*args)):
        assert rel_err(a, b) <= 1e-12
    sig = ours.SigLipLoss()
    assert torch.equal(sig.get_ground_truth("cpu", torch.float64, 5, negative_only=True),
                       open_clip_loss.SigLipLoss().get_ground_truth("cpu", torch.float64, 5,
                                                                    negative_only=True))
    assert set(sig(img, txt, scale, bias, output_dict=True)) == {"contrastive_loss"}
    with pytest.raises(ValueError, match="dist_impl"):
        ours.SigLipLoss(dist_impl="ring")


# --------------------------------------------------------------------------------------------
# distributed: per rank, ours and OpenCLIP's on the same local rows, every mode

CLIP_MODES = [dict(), dict(gather_with_grad=True), dict(local_loss=True),
              dict(local_loss=True, gather_with_grad=True)]
SIGLIP_MODES = ["bidir", "shift", "reduce", "gather"]


def _dist_worker(rank, world, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 4
    found = {}
    for dtype in DTYPES:
        for mode in CLIP_MODES:
            img, txt = _features(world * n, 6, gen)
            local = dict(image_features=img[rank * n:(rank + 1) * n],
                         text_features=txt[rank * n:(rank + 1) * n], logit_scale=_scalar(9.0))
            local = {k: v.detach().requires_grad_() for k, v in local.items()}
            kw = dict(mode, rank=rank, world_size=world)
            record_on_rank(found, f"ClipLoss {mode} {dtype}", lambda: side_by_side(
                ours.ClipLoss(**kw), open_clip_loss.ClipLoss(**kw), local, dtype,
                f"rank {rank} ClipLoss {mode}"))
        for impl in SIGLIP_MODES:
            img, txt = _features(world * n, 6, gen)
            local = dict(image_features=img[rank * n:(rank + 1) * n],
                         text_features=txt[rank * n:(rank + 1) * n], logit_scale=_scalar(7.0),
                         logit_bias=_scalar(-2.0))
            local = {k: v.detach().requires_grad_() for k, v in local.items()}
            kw = dict(rank=rank, world_size=world, dist_impl=impl)
            record_on_rank(found, f"SigLipLoss {impl} {dtype}", lambda: side_by_side(
                ours.SigLipLoss(**kw), open_clip_loss.SigLipLoss(**kw), local, dtype,
                f"rank {rank} SigLipLoss {impl}"))
    return found


def test_distributed_modes_match_rank_by_rank():
    per_rank = run_on_gloo(_dist_worker, 2, seeded().initial_seed())
    assert_ranks_ok(per_rank)
    assert all(len(found) == 2 * (len(CLIP_MODES) + len(SIGLIP_MODES)) for found in per_rank)
