"""fused_losses.integrations.pytorch_metric_learning side by side with the installed
pytorch-metric-learning: values and gradients (fp64 and fp32 against pml in fp64), awkward
shapes, reference embeddings, reducers, miners, wrappers, fall-backs, DistributedLossWrapper on
gloo, and the memory the fused path does not take."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    assert_ranks_ok,
    logit_ulps,
    randn,
    record_on_rank,
    rel_err,
    run_on_gloo,
    seeded,
    side_by_side,
)

pml = pytest.importorskip("pytorch_metric_learning",
                          reason="pytorch-metric-learning not installed (extra 'pml')")
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers  # noqa: E402

from fused_losses.integrations import pytorch_metric_learning as ours  # noqa: E402

DTYPES = [torch.float64, torch.float32]
# (N, D, number of classes); 1 class: no negative pair (zero loss), N=2 / 3 classes: hardly any
# pair.  D=1 runs unnormalized (test_dot_product): normalized 1-D features are ±1, gradient 0.
SHAPES = [(2, 3, 2), (17, 5, 4), (40, 2, 3), (33, 100, 6), (9, 7, 1)]
LOSSES = {
    "NTXentLoss": (dict(temperature=0.07), dict(temperature=0.5)),
    "SupConLoss": (dict(temperature=0.1), dict(temperature=0.5)),
    "MultiSimilarityLoss": (dict(), dict(alpha=1.0, beta=10.0, base=0.3)),
}


def _atol(dtype, kw):
    """NT-Xent/SupCon losses are LSE − positive logit (logits up to 1/temperature)."""
    return logit_ulps(dtype, 1.0 / kw["temperature"]) if "temperature" in kw else 0.0


def _pair(name, kw, **extra):
    return getattr(ours, name)(**kw, **extra), getattr(losses, name)(**kw, **extra)


def _inputs(n, d, classes, gen, m=None):
    inp = {"embeddings": randn(n, d, dtype=torch.float64, gen=gen, requires_grad=True),
           "labels": torch.randint(0, classes, (n,), generator=gen)}
    if m is not None:
        inp["ref_emb"] = randn(m, d, dtype=torch.float64, gen=gen, requires_grad=True)
        inp["ref_labels"] = torch.randint(0, classes, (m,), generator=gen)
    return inp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_matches_pml(name, shape, dtype):
    gen = seeded()
    for kw in LOSSES[name]:
        ours_fn, theirs_fn = _pair(name, kw)
        side_by_side(ours_fn, theirs_fn, _inputs(*shape, gen), dtype, f"{name}{kw} {shape}",
                     value_atol=_atol(dtype, kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_dot_product(name, dtype):
    """DotProductSimilarity without normalization is fused too (here with D=1)."""
    gen = seeded()
    dist = dict(distance=distances.DotProductSimilarity(normalize_embeddings=False))
    kw = dict(LOSSES[name][1])
    ours_fn, theirs_fn = _pair(name, kw, **dist)
    for shape in ((23, 1, 3), (17, 4, 4)):
        inp = _inputs(*shape, gen)
        inp["embeddings"] = (0.3 * inp["embeddings"]).detach().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # fused, no fall-back
            side_by_side(ours_fn, theirs_fn, inp, dtype, f"{name} dot {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_ref_emb(name, dtype):
    """References of their own (no self-pairs dropped), N != M; and SelfSupervisedLoss."""
    gen = seeded()
    ours_fn, theirs_fn = _pair(name, LOSSES[name][0])
    side_by_side(ours_fn, theirs_fn, _inputs(13, 6, 3, gen, m=29), dtype, f"{name} ref_emb")
    for symmetric in (True, False):
        inp = {"embeddings": randn(11, 6, dtype=torch.float64, gen=gen, requires_grad=True),
               "ref_emb": randn(11, 6, dtype=torch.float64, gen=gen, requires_grad=True)}
        side_by_side(losses.SelfSupervisedLoss(ours_fn, symmetric=symmetric),
                     losses.SelfSupervisedLoss(theirs_fn, symmetric=symmetric), inp, dtype,
                     f"SelfSupervisedLoss({name}, symmetric={symmetric})")


REDUCERS = {
    "MeanReducer": reducers.MeanReducer, "SumReducer": reducers.SumReducer,
    "AvgNonZeroReducer": reducers.AvgNonZeroReducer,
    "ThresholdReducer": lambda: reducers.ThresholdReducer(low=0.5),
    "PerAnchorReducer": reducers.PerAnchorReducer,
}


@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_reducer(name, reducer):
    """Per-element losses with their indices, so pml's reducers (and an embedding regularizer)
    see what pml's own losses give them."""
    gen = seeded()
    kw = dict(LOSSES[name][0], reducer=REDUCERS[reducer]())
    reg = dict(embedding_regularizer=regularizers.LpRegularizer())
    ours_fn, theirs_fn = _pair(name, kw, **reg)
    side_by_side(ours_fn, theirs_fn, _inputs(24, 8, 4, gen), torch.float64,
                 f"{name} {reducer}")


def _pairs(t):
    return [set(zip(t[0].tolist(), t[1].tolist())), set(zip(t[2].tolist(), t[3].tolist()))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_multi_similarity_miner(epsilon, dtype):
    """The same pairs as pml's miner; MultiSimilarityLoss on our miner's pairs runs fused and
    equals pml's loss on pml's pairs; our pairs work in pml's losses, pml's in ours."""
    gen = seeded()
    for m in (None, 31):
        inp = _inputs(40, 5, 4, gen, m=m)
        x, lab = inp["embeddings"].to(dtype), inp["labels"]
        ref = () if m is None else (inp["ref_emb"].to(dtype), inp["ref_labels"])
        mined, pml_mined = ours.MultiSimilarityMiner(epsilon)(x, lab, *ref), \
            miners.MultiSimilarityMiner(epsilon)(x, lab, *ref)
        assert _pairs(mined) == _pairs(pml_mined)
        assert sum(len(t) for t in mined) > 0

        def fused(embeddings, labels, ref_emb=None, ref_labels=None):
            args = () if ref_emb is None else (ref_emb, ref_labels)
            return ours.MultiSimilarityLoss()(
                embeddings, labels, ours.MultiSimilarityMiner(epsilon)(embeddings, labels, *args),
                *args)

        def theirs(embeddings, labels, ref_emb=None, ref_labels=None):
            args = () if ref_emb is None else (ref_emb, ref_labels)
            return losses.MultiSimilarityLoss()(
                embeddings, labels, miners.MultiSimilarityMiner(epsilon)(
                    embeddings, labels, *args), *args)

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the mined loss must not fall back
            side_by_side(fused, theirs, inp, dtype, f"MS loss + miner eps={epsilon} m={m}")
    # Mined pairs crossing libraries: our pairs in pml's NTXent, pml's pairs in our MS loss.
    x, lab = inp["embeddings"].detach(), inp["labels"]
    for loss_ours, loss_pml in ((losses.NTXentLoss(), losses.NTXentLoss()),
                                (ours.MultiSimilarityLoss(), losses.MultiSimilarityLoss())):
        a = loss_ours(x, lab, tuple(ours.MultiSimilarityMiner(epsilon)(x, lab)))
        b = loss_pml(x, lab, miners.MultiSimilarityMiner(epsilon)(x, lab))
        assert rel_err(a, b) <= 1e-10


def test_fallbacks_warn_and_match():
    """A distance that is not fused, and explicit pairs, run pml's code with one warning."""
    gen = seeded()
    inp = _inputs(20, 4, 3, gen)
    for name in LOSSES:
        kw = dict(LOSSES[name][0], distance=distances.LpDistance())
        ours_fn, theirs_fn = _pair(name, kw)
        with pytest.warns(UserWarning, match="runs the original library's code"):
            side_by_side(ours_fn, theirs_fn, inp, torch.float64, f"{name} LpDistance")
    triplets = miners.TripletMarginMiner(margin=0.5)(inp["embeddings"], inp["labels"])
    for name in LOSSES:
        ours_fn, theirs_fn = _pair(name, LOSSES[name][0])
        with pytest.warns(UserWarning, match="indices_tuple"):
            a = ours_fn(inp["embeddings"], inp["labels"], triplets)
        assert rel_err(a, theirs_fn(inp["embeddings"], inp["labels"], triplets)) <= 1e-10


@pytest.mark.parametrize("name", list(LOSSES))
def test_cross_batch_memory(name):
    """CrossBatchMemory accepts the classes by name and gives pml's values and gradients over
    several steps (it passes pair lists: pml's code runs inside)."""
    gen = seeded()
    kw = LOSSES[name][0]
    ours_fn, theirs_fn = _pair(name, kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = [losses.CrossBatchMemory(f, embedding_size=6, memory_size=24)
                   for f in (ours_fn, theirs_fn)]
        for step in range(3):
            inp = _inputs(10, 6, 3, gen)
            side_by_side(wrapped[0], wrapped[1], inp, torch.float64, f"CBM {name} step {step}",
                         floor=False)


def test_docstring_claims_and_names():
    assert ours.NTXentLoss.__name__ == "NTXentLoss"
    assert isinstance(ours.SupConLoss(), losses.BaseMetricLossFunction)
    assert isinstance(ours.MultiSimilarityMiner(), miners.BaseMiner)
    losses.CrossBatchMemory.check_loss_support(type(ours.MultiSimilarityLoss()).__name__)


# --------------------------------------------------------------------------------------------
# DistributedLossWrapper on gloo: per rank, ours and pml's give the same value and gradients


def _dist_worker(rank, world, seed):
    from pytorch_metric_learning.utils import distributed as pml_dist

    gen = torch.Generator().manual_seed(seed)
    sizes = [9, 9]
    found = {}
    for name, kws in LOSSES.items():
        full = _inputs(sum(sizes), 5, 3, gen)
        off = sum(sizes[:rank])
        local = {"embeddings": full["embeddings"][off:off + sizes[rank]].detach()
                 .requires_grad_(), "labels": full["labels"][off:off + sizes[rank]]}
        for efficient in (False, True):
            ours_fn, theirs_fn = _pair(name, kws[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                record_on_rank(found, f"{name} efficient={efficient}", lambda: side_by_side(
                    pml_dist.DistributedLossWrapper(ours_fn, efficient),
                    pml_dist.DistributedLossWrapper(theirs_fn, efficient), local,
                    torch.float64, f"{name} efficient={efficient}"))
    return found


def test_distributed_loss_wrapper():
    assert_ranks_ok(run_on_gloo(_dist_worker, 2, seeded().initial_seed()))


# --------------------------------------------------------------------------------------------
# memory: the fused path never holds an N×M matrix (pml's holds several)


def test_fused_path_takes_no_nxn_memory():
    import subprocess
    import sys

    child = (
        "import json, torch\n"
        "from fused_losses.bench import PeakRSS\n"
        "from fused_losses.integrations.pytorch_metric_learning import SupConLoss, NTXentLoss\n"
        "torch.manual_seed(0); n = 8192\n"
        "x = torch.randn(n, 32, requires_grad=True); lab = torch.arange(n) // 2\n"
        "SupConLoss()(x[:64], lab[:64]).backward(); NTXentLoss()(x[:64], lab[:64]).backward()\n"
        "out = {}\n"
        "for f in (SupConLoss(), NTXentLoss()):\n"
        "    with PeakRSS() as mem:\n"
        "        f(x, lab).backward()\n"
        "    out[type(f).__name__] = mem.extra_bytes\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    nn_bytes = 8192 * 8192 * 4
    for name, extra in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert extra < nn_bytes / 8, f"{name}: peak grew by {extra / 2**20:.0f} MiB"
