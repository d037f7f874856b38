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
        f"  sharpness gap    : score_9 {result.sharpness_high:.0f} vs score_1 {result.sharpness_low:.0f} "
        f"(Laplacian variance, ratio {result.sharpness_ratio:.2f}x)",
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
    if result.reused:
        lines.append(f"  reused finished stages: {', '.join(result.reused)}")
    return "\n".join(lines)


def _before(result: Any, field: str) -> str:
    """--lora: the starting model's figure beside the adapter's (same prompts and seeds)."""
    value = getattr(result, field, None)
    return "" if value is None else f"; the base alone: {value:.0%}"
