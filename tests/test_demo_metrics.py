"""Demo metrics on synthetic images whose colour, shape and blur are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bigasp.demo import metrics
from bigasp.demo.synthetic import BACKGROUNDS, COLOURS, SHAPES, draw_shape, photo_spec, render


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_colour_and_shape_of_clean_shapes(background):
    for colour in COLOURS:
        for shape in SHAPES:
            for w, h in ((64, 64), (48, 80), (80, 48)):
                img = draw_shape(w, h, shape, COLOURS[colour], BACKGROUNDS[background], size=0.6)
                assert metrics.dominant_colour(img) == colour, (colour, shape, background, w, h)
                assert metrics.classify_shape(img) == shape, (colour, shape, background, w, h)


def test_rendered_dataset_photos_are_classified():
    # The real training photos (jittered backgrounds, off-centre, some degraded): near-perfect.
    specs = [photo_spec(i, seed=3) for i in range(96)]
    imgs = [render(s, seed=3) for s in specs]
    col = metrics.colour_adherence(imgs, [s.colour for s in specs])
    shp = metrics.shape_adherence(imgs, [s.shape for s in specs])
    assert col.rate == 1.0, col
    assert shp.rate >= 0.95, shp
    assert col.chance == pytest.approx(1 / len(COLOURS))


def test_background_only_and_grey_noise_have_no_foreground():
    plain = Image.new("RGB", (64, 64), BACKGROUNDS["beige"])
    assert metrics.dominant_colour(plain) is None
    assert metrics.classify_shape(plain) is None
    rng = np.random.default_rng(0)
    grey = Image.fromarray(np.repeat(rng.integers(0, 256, (64, 64, 1), dtype=np.uint8), 3, axis=2))
    assert metrics.dominant_colour(grey) is None


def test_adherence_counts_wrong_answers():
    red = draw_shape(64, 64, "circle", COLOURS["red"], BACKGROUNDS["grey"])
    blue = draw_shape(64, 64, "square", COLOURS["blue"], BACKGROUNDS["grey"])
    res = metrics.colour_adherence([red, blue, blue], ["red", "red", "blue"])
    assert (res.correct, res.total) == (2, 3)
    assert metrics.shape_adherence([red, blue], ["square", "square"]).correct == 1
    with pytest.raises(ValueError):
        metrics.colour_adherence([red], ["red", "blue"])


def test_sharpness_orders_blur_levels():
    img = draw_shape(64, 64, "square", COLOURS["green"], BACKGROUNDS["white"])
    values = [metrics.sharpness(img.filter(ImageFilter.GaussianBlur(r))) for r in (0, 1, 2, 4)]
    assert values == sorted(values, reverse=True)
    assert values[0] > 4 * values[2]
    gap = metrics.sharpness_gap([img], [img.filter(ImageFilter.GaussianBlur(2))])
    assert gap.ratio > 4
    flat = Image.new("RGB", (32, 32), (10, 20, 30))
    assert metrics.sharpness(flat) == 0.0


def test_loss_plot_reads_resumed_metrics_and_draws_a_png(tmp_path):
    """The demo's loss curve: a resumed run's repeated point counts once, the figures start and
    end where the metrics do, and the PNG is a real image (drawn with matplotlib's labelled axes)."""
    import json
    from types import SimpleNamespace

    from bigasp.demo.report import read_losses, write_loss_plot

    rows = [{"samples": 0, "val/loss": 2.0, "stable/loss": 1.9}, {"samples": 100, "val/loss": 1.0},
            {"samples": 100, "val/loss": 0.9, "stable/loss": 0.8}, {"samples": 200, "val/loss": 0.5}]  # fmt: skip
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_losses(metrics_file)["val"] == [(0, 2.0), (100, 0.9), (200, 0.5)]
    result = SimpleNamespace(
        val_loss_start=None, val_loss_end=None, stable_loss_start=None, stable_loss_end=None
    )
    png = write_loss_plot(tmp_path / "loss.png", metrics_file, result)
    assert (result.val_loss_start, result.val_loss_end, result.stable_loss_end) == (2.0, 0.5, 0.8)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 250
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left
