"""The two MLPs (bigASP's layout), the pairwise examples, keyed training, Bradley–Terry via choix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigasp.quality import bradley_terry
from bigasp.quality.config import PairwiseConfig, ScorerConfig
from bigasp.quality.models import QualityClassifier, ScoreClassifier, load_model, save_model
from bigasp.quality.pairwise import build_examples, judge_fn, train_pairwise
from bigasp.quality.ratings import Rating, labels
from bigasp.quality.scorer import predict, train_scorer


def test_architectures_match_bigasp_state_dict_layout():
    q = QualityClassifier(768, 0.1)
    shapes = {k: tuple(v.shape) for k, v in q.state_dict().items()}
    assert shapes == {
        "ln.weight": (768,), "ln.bias": (768,),
        "seq.1.weight": (3072, 1536), "seq.1.bias": (3072,),
        "seq.4.weight": (2, 3072), "seq.4.bias": (2,),
    }  # fmt: skip
    assert [type(m).__name__ for m in q.seq] == ["Dropout", "Linear", "GELU", "Dropout", "Linear"]
    s = ScoreClassifier(768, 0.1, 10)
    shapes = {k: tuple(v.shape) for k, v in s.state_dict().items()}
    assert shapes == {
        "ln.weight": (768,), "ln.bias": (768,),
        "linear1.weight": (1536, 768), "linear1.bias": (1536,),
        "linear2.weight": (10, 1536), "linear2.bias": (10,),
    }  # fmt: skip


def test_tournament_judge_equals_the_full_forward():
    torch.manual_seed(0)
    m = QualityClassifier(16, 0.1).eval()
    x = torch.randn(20, 16)
    i, j = np.arange(20), np.roll(np.arange(20), 3)
    want = torch.softmax(m(x[i], x[j]), 1)[:, 0].detach().numpy()
    got = judge_fn(m, x.numpy(), batch_pairs=7)(i, j)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_save_load_roundtrip(tmp_path):
    m = ScoreClassifier(8, 0.1, 10).eval()
    save_model(m, tmp_path / "s.safetensors", {"note": "x"})
    back, meta = load_model(tmp_path / "s.safetensors", "score-classifier")
    assert meta["bins"] == 10 and meta["note"] == "x"
    x = torch.randn(3, 8)
    assert torch.equal(m(x), back(x))
    from bigasp.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not a quality-classifier"):
        load_model(tmp_path / "s.safetensors", "quality-classifier")


def test_examples_both_orderings_and_synthetic_copies_always_lose():
    r = [Rating(0, "b", "a", "left", "r", "human", ""), Rating(1, "a", "c", "tie", "r", "human", "")]
    vec = {k: np.full(4, v, np.float32) for k, v in (("a", 1), ("b", 2), ("c", 3))}
    deg = {"a": np.full(4, -1, np.float32)}
    ex = build_examples(labels(r), vec, deg)
    rows = {(float(a[0]), float(b[0])): tuple(y.tolist()) for a, b, y in zip(ex.a, ex.b, ex.y, strict=True)}
    assert rows == {
        (1, 2): (0.0, 1.0), (2, 1): (1.0, 0.0),  # b beat a, in both orders
        (1, 3): (0.5, 0.5), (3, 1): (0.5, 0.5),  # tie
        (1, -1): (1.0, 0.0), (-1, 1): (0.0, 1.0),  # original beats its degraded copy
    }  # fmt: skip
    assert ex.synthetic.tolist() == [False] * 4 + [True] * 2


def _toy(n=40, d=8, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(0, 1, (n, d)).astype(np.float32)
    quality = x[:, 0]
    ids = [f"i{k:03d}" for k in range(n)]
    ratings = []
    for k in range(300):
        i, j = g.choice(n, 2, replace=False)
        ratings.append(
            Rating(k, ids[i], ids[j], "left" if quality[i] > quality[j] else "right", "r", "human", "")
        )
    return ids, x, quality, ratings


def test_pairwise_training_learns_and_is_keyed():
    ids, x, _quality, ratings = _toy()
    ex = build_examples(labels(ratings), dict(zip(ids, x, strict=True)))
    cfg = PairwiseConfig(samples=6000, batch_size=64, lr=3e-3, weight_decay=0.1, seed=3)
    a, b = train_pairwise(ex, cfg), train_pairwise(ex, cfg)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.test["accuracy_human_decisive"] >= 0.8
    assert a.test["n_human_decisive"] == 2 * int(len(labels(ratings)) * 0.1)  # 10% of pairs, both orders
    c = train_pairwise(ex, cfg.model_copy(update={"seed": 4}))
    assert not torch.equal(a.model.seq[1].weight, c.model.seq[1].weight)


def test_scorer_learns_bins():
    ids, x, quality, _ = _toy(200)
    bins = np.clip(((quality + 2.5) / 5 * 10).astype(int), 0, 9)
    res = train_scorer(ids, x, bins, ScorerConfig(samples=8000, batch_size=64), 10)
    assert res.test["within_one"] >= 0.8
    score, probs = predict(res.model, x)
    assert score.dtype == np.int8 and probs.shape == (200, 10)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_bradley_terry_recovers_order_and_reads_ties_as_half_wins():
    ids, _x, quality, ratings = _toy(30)
    index = {k: i for i, k in enumerate(ids)}
    first = np.array([index[r.left_id] for r in ratings])
    second = np.array([index[r.right_id] for r in ratings])
    s = np.array([1.0 if r.outcome == "left" else 0.0 for r in ratings])
    from scipy.stats import spearmanr

    assert spearmanr(bradley_terry.fit(30, first, second, s), quality).statistic > 0.9
    # A tie only: equal strengths. One win and one loss between the same two: also equal.
    np.testing.assert_allclose(
        bradley_terry.fit(2, np.array([0]), np.array([1]), np.array([0.5])), [0, 0], atol=1e-6
    )
    both = bradley_terry.fit(2, np.array([0, 1]), np.array([1, 0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(both, [0, 0], atol=1e-6)
    # Ties count half a win each: 1 win + 2 ties for item 0 over item 1 == 2 wins of 3 -> a 2:1 MAP odds
    # ratio shrunk by the prior; with a negligible prior the strength gap is log 2.
    gap = bradley_terry.fit(
        2, np.array([0, 0, 0]), np.array([1, 1, 1]), np.array([1.0, 0.5, 0.5]), alpha=1e-9
    )
    assert gap[0] - gap[1] == pytest.approx(np.log(2), abs=1e-3)


@pytest.mark.gpu
def test_training_and_judging_on_cuda():
    """GPU twin of the CPU tests above: training picks CUDA when present; results come back on CPU."""
    ids, x, _quality, ratings = _toy()
    ex = build_examples(labels(ratings), dict(zip(ids, x, strict=True)))
    res = train_pairwise(ex, PairwiseConfig(samples=4096, batch_size=64, lr=3e-3, weight_decay=0.1))
    assert res.test["accuracy_human_decisive"] >= 0.8
    model = res.model.to("cuda").eval()
    i, j = np.arange(40), np.roll(np.arange(40), 5)
    got = judge_fn(model, x, batch_pairs=16)(i, j)
    want = torch.softmax(model(torch.from_numpy(x[i]).cuda(), torch.from_numpy(x[j]).cuda()), 1)[:, 0]
    np.testing.assert_allclose(got, want.detach().cpu().numpy(), atol=1e-5)
    bins = np.clip(((_quality + 2.5) / 5 * 10).astype(int), 0, 9)
    sc = train_scorer(ids, x, bins, ScorerConfig(samples=2048, batch_size=64), 10)
    assert predict(sc.model.to("cuda"), x)[0].shape == (40,)


def test_diverged_scorer_training_and_nan_embeddings_are_errors_not_scores():
    from bigasp.errors import DataError

    ids, x, _quality, _ = _toy(40)
    bins = np.arange(40) % 10
    with pytest.raises(DataError, match=r"diverged .*lower scorer.lr"):
        train_scorer(ids, x, bins, ScorerConfig(samples=256, batch_size=32, lr=1e30), 10)
    model = ScoreClassifier(8, 0.0, 10).eval()
    x = x.copy()
    x[33, 2] = np.nan
    with pytest.raises(
        DataError, match=r"NaN/Inf embeddings for 1 image\(s\) of the batch from row 32 .*i033"
    ):
        predict(model, x, batch=16, ids=ids)


def test_the_load_check_expects_the_modules_own_tensor_shapes():
    from bigasp.quality.models import expected_shapes

    for kind, model, bins in (
        ("quality-classifier", QualityClassifier(12), 0),
        ("score-classifier", ScoreClassifier(12, bins=7), 7),
    ):
        assert expected_shapes(kind, 12, bins) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
