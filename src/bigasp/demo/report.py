"""The demo's figures and pictures: adherence numbers, the labelled grid, the loss plot.

Drawn with Pillow only (no plotting dependency for one line chart).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bigasp.demo import metrics
from bigasp.fsutil import atomic_path


def measure(
    result: Any,
    images: Sequence[Sequence[Image.Image]],
    labels: Sequence[tuple[str, str, str]],
    negative: Sequence[Sequence[Image.Image]] | None = None,
) -> None:
    """Fill `result` (a DemoResult) from generated images[prompt][seed] and their (colour, shape, quality).

    Adherence counts every image of the grid (both score tags). `negative`: the low-score prompts'
    images generated again with the negative prompt, same seeds, compared with the low-score ones.
    """
    flat = [(im, lab) for row, lab in zip(images, labels, strict=True) for im in row]
    col = metrics.colour_adherence([im for im, _ in flat], [lab[0] for _, lab in flat])
    shp = metrics.shape_adherence([im for im, _ in flat], [lab[1] for _, lab in flat])
    gap = metrics.sharpness_gap(
        [im for im, lab in flat if lab[2] == "high"], [im for im, lab in flat if lab[2] == "low"]
    )
    result.colour_adherence, result.colour_chance = col.rate, col.chance
    result.shape_adherence, result.shape_chance = shp.rate, shp.chance
    result.sharpness_high, result.sharpness_low = gap.high, gap.low
    low = [im for im, lab in flat if lab[2] == "low"]
    contrast = metrics.contrast_gap([im for im, lab in flat if lab[2] == "high"], low)
    result.contrast_high, result.contrast_low = contrast.high, contrast.low
    if negative is not None:
        result.contrast_negative = metrics.contrast_gap([im for row in negative for im in row], low).high


def write_grid_image(
    path: Path,
    images: Sequence[Sequence[Image.Image]],
    labels: Sequence[tuple[str, str, str]],
    negative: Sequence[Sequence[Image.Image]] | None = None,
    scale: int = 1,
) -> Path:
    """Rows = colour x shape; columns = seeds with `score_9`, the same seeds with `score_1`, and
    (with `negative`) the `score_1` prompts again with the negative prompt "low quality"."""
    rows: dict[tuple[str, str], dict[str, Sequence[Image.Image]]] = {}
    for row, (colour, shape, quality) in zip(images, labels, strict=True):
        rows.setdefault((colour, shape), {})[quality] = row
    if negative is not None:
        low = [lab for lab in labels if lab[2] == "low"]
        for row, (colour, shape, _) in zip(negative, low, strict=True):
            rows[(colour, shape)]["negative"] = row
    cell = max(im.width for r in images for im in r) * scale
    per = max(len(r) for r in images)
    label_w, head_h, gap = 110, 18, 8
    columns = [("high", "score_9"), ("low", "score_1")]
    if negative is not None:
        columns.append(("negative", 'score_1, negative "low quality"'))
    width = label_w + len(columns) * (per * cell + gap)
    height = head_h + len(rows) * cell
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    starts = [label_w + k * (per * cell + gap) for k in range(len(columns))]
    for (_, title), x0 in zip(columns, starts, strict=True):
        draw.text((x0, 3), title, fill=(0, 0, 0))
    for r, ((colour, shape), by_q) in enumerate(rows.items()):
        y = head_h + r * cell
        draw.text((4, y + cell // 2 - 6), f"{colour} {shape}", fill=(0, 0, 0))
        for (q, _), x0 in zip(columns, starts, strict=True):
            for j, im in enumerate(by_q.get(q, ())):
                sheet.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x0 + j * cell, y))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    # A 256-colour palette (no dithering) keeps every cell readable at about a quarter of the
    # RGB file's size; the figures are measured on the generated PNGs, never on this sheet.
    sheet.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        tmp, optimize=True
    )
    tmp.replace(path)
    return path


def read_losses(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """`{'val': [(samples, loss)], 'stable': [...]}` from the trainer's metrics.jsonl."""
    out: dict[str, list[tuple[int, float]]] = {"val": [], "stable": []}
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        for name in out:
            if f"{name}/loss" in rec:
                out[name].append((int(rec["samples"]), float(rec[f"{name}/loss"])))
    for name in out:  # a resumed run may log the same point twice; keep the last, sorted
        out[name] = sorted(dict(out[name]).items())
    return out


def write_loss_plot(path: Path, metrics_file: Path, result: Any | None = None) -> Path:
    """A small line chart of validation and stable loss vs samples seen (PNG)."""
    series = read_losses(metrics_file)
    if not series["val"]:
        raise ValueError(f"{metrics_file} has no validation losses (val/loss)")
    if result is not None:
        result.val_loss_start, result.val_loss_end = series["val"][0][1], series["val"][-1][1]
        if series["stable"]:
            result.stable_loss_start, result.stable_loss_end = series["stable"][0][1], series["stable"][-1][1]
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=100)
    colours = {"val": "#c83c3c", "stable": "#285ac8"}
    for name, s in series.items():
        if s:
            xs, ys = zip(*s, strict=True)
            label = "validation" if name == "val" else "stable"
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, color=colours[name], label=label)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("flow loss (fixed noise and t)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()  # room for every label and the last tick
    path = Path(path)
    with atomic_path(path, durable=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def format_report(result: Any) -> str:
    """The lines `bigasp demo` prints at the end."""
    p = result.paths
    val_drop = 1 - result.val_loss_end / result.val_loss_start if result.val_loss_start else math.nan
    lines = [
        "",
        "bigasp demo finished"
        + (" (--quick)" if result.quick else "")
        + (" (--lora: an adapter on the frozen starting model)" if getattr(result, "lora", False) else "")
        + f" in {result.stage_seconds.get('total', 0):.0f} s",
        f"  colour adherence : {result.colour_adherence:.0%} (chance {result.colour_chance:.0%})"
        + _before(result, "base_colour_adherence"),
        f"  shape adherence  : {result.shape_adherence:.0%} (chance {result.shape_chance:.0%})"
        + _before(result, "base_shape_adherence"),
        f"  contrast gap     : score_9 {result.contrast_high:.1f} vs score_1 {result.contrast_low:.1f} "
        f"(RMS contrast, the low scores' washed-out look; ratio {result.contrast_ratio:.2f}x)",
        *(
            [
                f'  negative prompt  : score_1 with negative "low quality" {result.contrast_negative:.1f} vs '
                f"{result.contrast_low:.1f} without (ratio {result.negative_ratio:.2f}x)"
            ]
            if getattr(result, "contrast_negative", None) is not None
            else []
        ),
        *(
            [
                f"  quality scores   : Spearman {result.score_spearman:.3f} between the hidden quality and "
                f"bigasp's score; photos per score 0..9: {result.score_histogram}"
            ]
            if getattr(result, "score_spearman", None) is not None
            else []
        ),
        f"  validation loss  : {result.val_loss_start:.4f} -> {result.val_loss_end:.4f} ({val_drop:.0%} lower)",
    ]
    if getattr(result, "stream_waves", None) is not None:
        lines.append(
            f"  streaming start  : encode and train ran together; the first pass took in {result.stream_waves} wave(s) of shards"
        )
    if result.stable_loss_start is not None:
        lines.append(f"  stable train loss: {result.stable_loss_start:.4f} -> {result.stable_loss_end:.4f}")
    lines += [
        "",
        f"  photos           : {p['photos']}",
        f"  dataset          : {p['dataset']}  (rejects: {p['rejects']})",
        f"  dataset report   : {p['dataset_report']}",
        f"  training run     : {p['run']}  (metrics: {p['metrics']})",
        f"  final checkpoint : {p['final_checkpoint']}/model",
        *([f"  adapter (kohya)  : {p['adapter']}"] if "adapter" in p else []),
        f"  generated images : {p['generated']}",
        f"  grid             : {p['grid_image']}",
        *([f"  gallery (HTML)   : {p['gallery']}"] if "gallery" in p else []),
        f"  loss plot        : {p['loss_plot']}",
        f"  summary          : {p['summary']}",
    ]
    if getattr(result, "arena_command", ""):
        lines += [
            "",
            f"  rate the photos yourself (then re-run the quality commands): {result.arena_command}",
        ]
    if result.reused:
        lines.append(f"  reused finished stages: {', '.join(result.reused)}")
    return "\n".join(lines)


def _before(result: Any, field: str) -> str:
    """--lora: the starting model's figure beside the adapter's (same prompts and seeds)."""
    value = getattr(result, field, None)
    return "" if value is None else f"; the base alone: {value:.0%}"
