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


def measure(
    result: Any, images: Sequence[Sequence[Image.Image]], labels: Sequence[tuple[str, str, str]]
) -> None:
    """Fill `result` (a DemoResult) from generated images[prompt][seed] and their (colour, shape, quality)."""
    flat = [(im, lab) for row, lab in zip(images, labels, strict=True) for im in row]
    col = metrics.colour_adherence([im for im, _ in flat], [lab[0] for _, lab in flat])
    shp = metrics.shape_adherence([im for im, _ in flat], [lab[1] for _, lab in flat])
    gap = metrics.sharpness_gap(
        [im for im, lab in flat if lab[2] == "high"], [im for im, lab in flat if lab[2] == "low"]
    )
    result.colour_adherence, result.colour_chance = col.rate, col.chance
    result.shape_adherence, result.shape_chance = shp.rate, shp.chance
    result.sharpness_high, result.sharpness_low = gap.high, gap.low


def write_grid_image(
    path: Path,
    images: Sequence[Sequence[Image.Image]],
    labels: Sequence[tuple[str, str, str]],
    scale: int = 1,
) -> Path:
    """Rows = colour x shape; columns = seeds with `score_9`, then seeds with `score_1`."""
    rows: dict[tuple[str, str], dict[str, Sequence[Image.Image]]] = {}
    for row, (colour, shape, quality) in zip(images, labels, strict=True):
        rows.setdefault((colour, shape), {})[quality] = row
    cell = max(im.width for r in images for im in r) * scale
    per = max(len(r) for r in images)
    label_w, head_h, gap = 110, 18, 8
    width = label_w + 2 * per * cell + gap
    height = head_h + len(rows) * cell
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((label_w, 3), "score_9 (high quality)", fill=(0, 0, 0))
    draw.text((label_w + per * cell + gap, 3), "score_1 (low quality)", fill=(0, 0, 0))
    for r, ((colour, shape), by_q) in enumerate(rows.items()):
        y = head_h + r * cell
        draw.text((4, y + cell // 2 - 6), f"{colour} {shape}", fill=(0, 0, 0))
        for q, x0 in (("high", label_w), ("low", label_w + per * cell + gap)):
            for j, im in enumerate(by_q.get(q, ())):
                sheet.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x0 + j * cell, y))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    sheet.save(tmp)
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
    w, h, left, right, top, bottom = 480, 300, 56, 16, 28, 40
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    x_max = max(x for x, _ in pts) or 1
    y_lo = min(y for _, y in pts)
    y_hi = max(y for _, y in pts)
    pad = (y_hi - y_lo) * 0.08 or 0.05
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (w - left - right) * x / x_max, top + (h - top - bottom) * (y_hi - y) / (y_hi - y_lo))

    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for k in range(5):
        yv = y_lo + (y_hi - y_lo) * k / 4
        _, yy = xy(0, yv)
        d.line([left - 4, yy, left, yy], fill=(0, 0, 0))
        d.text((4, yy - 6), f"{yv:.3f}", fill=(0, 0, 0))
        xv = x_max * k / 4
        xx, _ = xy(xv, y_lo)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill=(0, 0, 0))
        d.text((xx - 14, h - bottom + 6), f"{xv:,.0f}", fill=(0, 0, 0))
    d.text((w // 2 - 40, h - 16), "samples seen", fill=(0, 0, 0))
    d.text((left, 8), "flow loss (fixed noise & t)", fill=(0, 0, 0))
    colours = {"val": (200, 40, 40), "stable": (40, 90, 200)}
    for k, (name, s) in enumerate(series.items()):
        if not s:
            continue
        line = [xy(x, y) for x, y in s]
        if len(line) > 1:
            d.line(line, fill=colours[name], width=2)
        for x, y in line:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[name])
        lx = w - right - 150 + 80 * k
        d.line([lx, 14, lx + 14, 14], fill=colours[name], width=2)
        d.text((lx + 18, 8), "validation" if name == "val" else "stable", fill=(0, 0, 0))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def format_report(result: Any) -> str:
    """The lines `bigasp demo` prints at the end."""
    p = result.paths
    val_drop = 1 - result.val_loss_end / result.val_loss_start if result.val_loss_start else math.nan
    lines = [
        "",
        "bigasp demo finished"
        + (" (--quick)" if result.quick else "")
        + f" in {result.stage_seconds.get('total', 0):.0f} s",
        f"  colour adherence : {result.colour_adherence:.0%} (chance {result.colour_chance:.0%})",
        f"  shape adherence  : {result.shape_adherence:.0%} (chance {result.shape_chance:.0%})",
        f"  sharpness gap    : score_9 {result.sharpness_high:.0f} vs score_1 {result.sharpness_low:.0f} "
        f"(Laplacian variance, ratio {result.sharpness_ratio:.2f}x)",
        f"  validation loss  : {result.val_loss_start:.4f} -> {result.val_loss_end:.4f} ({val_drop:.0%} lower)",
    ]
    if result.stable_loss_start is not None:
        lines.append(f"  stable train loss: {result.stable_loss_start:.4f} -> {result.stable_loss_end:.4f}")
    lines += [
        "",
        f"  photos           : {p['photos']}",
        f"  dataset          : {p['dataset']}  (rejects: {p['rejects']})",
        f"  dataset report   : {p['dataset_report']}",
        f"  training run     : {p['run']}  (metrics: {p['metrics']})",
        f"  final checkpoint : {p['final_checkpoint']}/model",
        f"  generated images : {p['generated']}",
        f"  grid             : {p['grid_image']}",
        f"  gallery (HTML)   : {p['gallery']}",
        f"  loss plot        : {p['loss_plot']}",
        f"  summary          : {p['summary']}",
    ]
    if result.reused:
        lines.append(f"  reused finished stages: {', '.join(result.reused)}")
    return "\n".join(lines)
