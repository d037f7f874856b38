"""The demo's photos with a hidden quality, its simulated raters, and the figures it takes from them."""

from __future__ import annotations

import numpy as np
import pytest

from bigasp.demo import curation, metrics, synthetic


def test_rated_photos_are_washed_out_by_their_hidden_quality():
    specs = synthetic.rated_specs(48, seed=5)
    qs = [s.quality for s in specs]
    assert min(qs) < 0.2 and max(qs) > 0.8  # q ~ U(0, 1)
    for spec in specs[:12]:
        img = synthetic.render_rated(spec, seed=5)
        clean = synthetic.render_rated(synthetic.RatedPhotoSpec(**{**spec.__dict__, "quality": 1.0}), seed=5)
        # Washing out by k multiplies the RMS contrast (numpy's std per channel) by k, up to rounding.
        want = spec.contrast * np.asarray(clean, np.float64).reshape(-1, 3).std(axis=0).mean()
        assert metrics.rms_contrast(img) == pytest.approx(want, abs=0.6)
        side = synthetic.rated_sidecar(spec)
        assert "score" not in side and "quality" not in str(side["demo"])
        assert ("low_quality" in side["tags"]) == (spec.quality < synthetic.LOW_QUALITY_BELOW)
        assert not any("quality" in c for c in side["captions"])


def test_metrics_read_colour_and_shape_of_washed_out_photos():
    specs = synthetic.rated_specs(96, seed=3)
    imgs = [synthetic.render_rated(s, seed=3) for s in specs]
    assert metrics.colour_adherence(imgs, [s.colour for s in specs]).rate == 1.0
    assert metrics.shape_adherence(imgs, [s.shape for s in specs]).rate >= 0.95
    faint = [(im, s) for im, s in zip(imgs, specs, strict=True) if s.quality < 0.2]
    assert faint and all(metrics.dominant_colour(im) == s.colour for im, s in faint)


def test_simulated_raters_prefer_the_better_photo_and_fill_the_ratings_store(tmp_path):
    from bigasp.quality.ratings import RatingStore, labels

    rng = np.random.default_rng(0)
    ids = [f"id{i:03d}" for i in range(60)]
    q = rng.random(60)
    table = curation.simulate_ratings(ids, q, 600, seed=1)
    assert table.equals(curation.simulate_ratings(ids, q, 600, seed=1))  # a pure function of the seed
    d = table.to_pydict()
    index = {i: k for k, i in enumerate(ids)}
    dq = np.array([q[index[a]] - q[index[b]] for a, b in zip(d["left_id"], d["right_id"], strict=True)])
    out = np.array(d["outcome"])
    clear = (np.abs(dq) > 0.2) & (out != "tie")
    right = (out[clear] == "left") == (dq[clear] > 0)
    assert right.mean() > 0.9  # a clear difference is judged right almost always
    close = (np.abs(dq) < 0.02) & (out != "tie")
    assert 0.2 < ((out[close] == "left") == (dq[close] > 0)).mean() < 0.8  # a close one is a coin toss
    assert 0 < (out == "tie").sum() < 0.25 * len(out)
    store = RatingStore(tmp_path / "ratings.sqlite")
    assert store.import_table(table) == 600
    assert {r.source for r in store.all()} == {"simulated"} and len(labels(store.all())) > 500


def test_score_spearman_is_the_rank_correlation_and_skips_unscored():
    q = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2]
    s = [1, 6, 2, 9, None, 4]
    got = curation.score_spearman(q, s)
    keep = [k for k, v in enumerate(s) if v is not None]
    ranks = [np.argsort(np.argsort([x[k] for k in keep])) for x in (q, s)]  # no ties: ranks are exact
    assert got == pytest.approx(np.corrcoef(*ranks)[0, 1])
    with pytest.raises(ValueError):
        curation.score_spearman([0.1, 0.2], [1, 2])
