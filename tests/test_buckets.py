"""Bucket rule vs the bigASP v2 model card, and fit/crop geometry invariants."""

from __future__ import annotations

import math
import random

import pytest

from bigasp.buckets import SDXL_BUCKETS, Bucket, BucketConfig, BucketSet, place, resized_size
from bigasp.errors import ConfigError

# "Supported resolutions" of the bigASP v2 model card (WxH), in the card's order.
CARD = """832x1216 1216x832 832x1152 1152x896 896x1152 1344x768 768x1344 1024x1024 1152x832 1280x768
768x1280 896x1088 1344x704 704x1344 704x1472 960x1088 1088x896 1472x704 960x1024 1088x960 1536x640
1024x960 704x1408 1408x704 1600x640 1728x576 1664x576 640x1536 640x1600 576x1664 576x1728"""


def test_default_rule_equals_model_card():
    card = {tuple(int(v) for v in r.split("x")) for r in CARD.split()}
    assert len(card) == 31
    assert {(b.width, b.height) for b in SDXL_BUCKETS} == card
    assert len(SDXL_BUCKETS) == 31
    for b in SDXL_BUCKETS:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 946_176 <= b.width * b.height <= 1_048_576
        assert b.latent_shape == (4, b.height // 8, b.width // 8)


def test_rule_is_parametric():
    # bigASP's older encode-vaes.py kept aspect 0.5..3, which gives 26 buckets
    assert len(BucketConfig(min_aspect=0.5, max_aspect=3.0).buckets()) == 26
    tiny = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64).buckets()
    assert Bucket(64, 64) in tiny and Bucket(48, 64) in tiny and Bucket(64, 48) in tiny
    assert all(b.height % 16 == 0 and b.width % 16 == 0 for b in tiny)
    with pytest.raises(ValueError, match="multiple of 8"):
        BucketConfig(step=12)
    with pytest.raises(ConfigError, match="no buckets"):
        BucketConfig(step=64, min_area=100, max_area=200).buckets()


def test_nearest_bucket_in_log_space():
    bs = BucketSet(SDXL_BUCKETS)
    assert bs.nearest(4000, 6000) == Bucket(832, 1216)  # 3:2 landscape
    assert bs.nearest(6000, 4000) == Bucket(1216, 832)  # 2:3 portrait
    assert bs.nearest(3000, 3000) == Bucket(1024, 1024)
    assert bs.nearest(1000, 2000) == Bucket(704, 1408)  # exactly 2:1
    assert bs.nearest(100, 10_000) == Bucket(576, 1728)  # beyond 3:1 clamps to the widest
    # symmetric: transposing the image transposes the bucket
    rng = random.Random(1)
    for _ in range(200):
        h, w = rng.randint(200, 9000), rng.randint(200, 9000)
        a, b = bs.nearest(h, w), bs.nearest(w, h)
        assert (a.height, a.width) == (b.width, b.height)
        # no other bucket is nearer in log aspect
        d = abs(math.log(a.aspect) - math.log(w / h))
        assert all(abs(math.log(o.aspect) - math.log(w / h)) >= d - 1e-12 for o in SDXL_BUCKETS)


def test_bigasp_rounding_of_resize():
    # scale = max(bw/w, bh/h); size = int(x * scale + 0.5)
    assert resized_size(4000, 6000, Bucket(832, 1216)) == (832, 1248)
    assert resized_size(1000, 2000, Bucket(704, 1408)) == (704, 1408)


@pytest.mark.parametrize("cfg", [BucketConfig(), BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)])
def test_placement_invariants(cfg):
    bs = BucketSet(cfg.buckets())
    rng = random.Random(0)
    for n in range(500):
        h, w = rng.randint(16, 8000), rng.randint(16, 8000)
        p = place(h, w, bs, seed=7, image_id=f"img{n}")
        b = p.bucket
        assert p.resized_height >= b.height and p.resized_width >= b.width  # covers the bucket
        assert min(p.resized_height - b.height, p.resized_width - b.width) <= 1  # tight in one side
        assert 0 <= p.crop_top <= p.resized_height - b.height  # crop inside the resized image
        assert 0 <= p.crop_left <= p.resized_width - b.width
        assert (p.original_height, p.original_width) == (h, w)
        # aspect preserved up to rounding of one pixel
        assert abs(p.resized_width / p.resized_height - w / h) <= w / h * (
            2 / min(p.resized_height, p.resized_width)
        )
        assert p.upscaled == (h < b.height or w < b.width)


def test_crop_is_keyed_by_seed_and_id_not_global_rng():
    bs = BucketSet(SDXL_BUCKETS)
    a = place(3000, 7000, bs, seed=1, image_id="abc")
    random.seed(123)  # global RNG state must not matter
    assert place(3000, 7000, bs, seed=1, image_id="abc") == a
    assert (a.crop_top, a.crop_left) != (0, 0) or a.resized_height == a.bucket.height
    tops = {place(3000, 7000, bs, seed=s, image_id="abc").crop_top for s in range(20)}
    assert len(tops) > 5  # the seed changes the crop
    ids = {place(3000, 7000, bs, seed=1, image_id=f"i{k}").crop_top for k in range(20)}
    assert len(ids) > 5  # and so does the image


def test_vectorised_nearest_matches_scalar():
    import numpy as np

    bs = BucketSet(SDXL_BUCKETS)
    rng = np.random.default_rng(3)
    h = rng.integers(16, 9000, 3000)
    w = rng.integers(16, 9000, 3000)
    h[:31] = [b.height for b in SDXL_BUCKETS]  # exact bucket aspects, incl. the square
    w[:31] = [b.width for b in SDXL_BUCKETS]
    got = bs.nearest_indices(h, w, chunk=700)
    assert [bs.buckets[i] for i in got] == [bs.nearest(int(a), int(b)) for a, b in zip(h, w, strict=True)]


@pytest.mark.parametrize(
    "bad",
    [{"max_area": 10**12, "min_area": 1}, {"min_aspect": 1e-9}, {"max_aspect": float("inf")},
     {"max_aspect": float("nan")}, {"step": -56}],
)  # fmt: skip
def test_absurd_bucket_rules_fail_fast_naming_the_field(bad):
    import time

    from bigasp.config import validate
    from bigasp.prep.config import IngestConfig

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="buckets") as err:
        validate(IngestConfig, {"buckets": bad}, "command-line flags")
    assert time.perf_counter() - t0 < 1 and "buckets" in str(err.value)
