"""Write a `Report` to a folder: CSVs, summary.json, PNG plots and one self-contained index.html.

The HTML embeds every plot as a data URI (the PNG files are also written next to it), so the
page opens from disk, can be mailed as one file, and needs no server or network.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from pathlib import Path

import numpy as np

from bigasp.fsutil import atomic_write_bytes
from bigasp.report.compute import Report

TABLE_ROWS = 50  # rows of each table shown in the page (the CSVs have everything)
NGRAM_ROWS = 20


# A spreadsheet opening a CSV runs a cell that starts with one of these as a formula (OWASP
# "CSV injection"); tags and caption n-grams come from scraped sidecars, so any of them may.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value):
    """`value`, with a text cell that a spreadsheet would run as a formula prefixed by a single
    quote (OWASP's advice), so Excel / LibreOffice / Sheets show it as text. A cell that already
    starts with a quote gets one too, so removing one leading quote always gives the stored text
    back. Numbers pass as is."""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, "'")):
        return "'" + value
    return value


def _csv(rows: list[list], header: list[str]) -> bytes:
    buf = io.StringIO()
    # text cells quoted: a bare CR inside a tag would otherwise end the row for every reader
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    w.writerow(header)
    w.writerows([csv_safe(v) for v in row] for row in rows)
    return buf.getvalue().encode()


def tag_rows(rep: Report, min_count: int = 1) -> list[list]:
    """[tag, count, canonical, folded_count] by count descending (ties by tag)."""
    rows = []
    for tag, c in sorted(rep.tags_raw.items(), key=lambda kv: (-kv[1], kv[0])):
        if c >= min_count:
            canon = rep.tag_canonical.get(tag, tag)
            rows.append([tag, c, canon, rep.tags_folded.get(canon, c)])
    return rows


def write_report(rep: Report, out: str | Path, *, min_tag_count: int = 1) -> Path:
    """Write everything into `out` (created); returns the path of index.html."""
    from bigasp.report import plots

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tags = tag_rows(rep, min_tag_count)
    atomic_write_bytes(out / "tags.csv", _csv(tags, ["tag", "count", "canonical", "folded_count"]))
    folded = sorted(rep.tags_folded.items(), key=lambda kv: (-kv[1], kv[0]))
    atomic_write_bytes(
        out / "tags-folded.csv", _csv([[t, c] for t, c in folded if c >= min_tag_count], ["tag", "count"])
    )
    ngram_rows = [
        [n, i + 1, g, c, u] for n, rows in sorted(rep.ngrams.items()) for i, (g, c, u) in enumerate(rows)
    ]
    atomic_write_bytes(
        out / "ngrams.csv", _csv(ngram_rows, ["n", "rank", "ngram", "count", "max_undercount"])
    )
    images = {}
    for name, title, fn in plots.PLOTS:
        fig = fn(rep)
        plots.save(fig, out / name)
        images[name] = (title, (out / name).read_bytes())
    rep.seconds["write"] = time.perf_counter() - t0
    atomic_write_bytes(out / "summary.json", (json.dumps(rep.to_json(), indent=1) + "\n").encode())
    page = out / "index.html"
    atomic_write_bytes(page, render_html(rep, images, tags).encode())
    return page


def _table(header: list[str] | None, rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header or [])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.1%}" if 0 <= v <= 1 else f"{v:,.2f}"
    return str(v)


def _share(n: int, total: int) -> str:
    return f"{n / total:.1%}" if total else "–"


def render_html(rep: Report, images: dict[str, tuple[str, bytes]], tags: list[list]) -> str:
    n = rep.rows
    tag_uses = sum(rep.tags_raw.values())
    summary = [
        ["images in the manifest", rep.rows_total],
        ["images analysed", f"{n:,}" + (" (uniform sample)" if rep.sampled else "")],
        ["latents stored", rep.latents],
        ["captions", rep.captions],
        ["distinct tags (raw / aliases folded)", f"{len(rep.tags_raw):,} / {len(rep.tags_folded):,}"],
        ["tags with ≥ 1,000 uses (raw)", sum(1 for c in rep.tags_raw.values() if c >= 1000)],
        ["tag uses", tag_uses],
        ["images without a size", rep.no_size],
        [
            "megapixels (min / 5% / 25% / median / 75% / 95% / max)",
            " / ".join(f"{v:.2f}" for v in rep.megapixels),
        ],
        ["alias table", rep.alias_source or "none"],
        ["n-gram tokens", rep.ngram_mode],
        ["quality tokens assumed by the chunk estimate", f"{rep.quality_tokens:.2f}"],
        [
            f"tokenised captions over {75 * rep.max_chunks} tokens (truncated in training)",
            _share(sum(v for k, v in rep.clip_chunks.items() if k > rep.max_chunks), rep.clip_tokenized),
        ],
    ]
    total_ch = sum(rep.chunk_estimate.values())
    chunk_rows = [
        [
            k,
            75 * k,
            rep.chunk_estimate.get(k, 0),
            _share(rep.chunk_estimate.get(k, 0), total_ch),
            rep.clip_chunks.get(k, 0),
            _share(rep.clip_chunks.get(k, 0), sum(rep.clip_chunks.values())),
        ]
        for k in sorted(set(rep.chunk_estimate) | set(rep.clip_chunks))
    ]
    wm_total = sum(rep.watermark.values())
    sections = [
        ("Summary", _table(None, summary, "kv")),
        (
            "Tags",
            _table(["tag", "count", "canonical", "folded count"], tags[:TABLE_ROWS])
            + f"<p>All {len(tags):,} tags: <a href='tags.csv'>tags.csv</a> (aliases folded: <a href='tags-folded.csv'>tags-folded.csv</a>).</p>",
        ),
        ("Caption n-grams", _ngram_tables(rep)),
        (
            "Chunk counts",
            _table(
                [
                    "chunks",
                    "tokens",
                    "images (sampler estimate)",
                    "share",
                    "captions (tokenised sample)",
                    "share",
                ],
                chunk_rows,
            ),
        ),
        ("Sources", _counter_table(rep.sources, n)),
        ("Caption types", _counter_table(rep.caption_types, n)),
        (
            "Watermark",
            _table(
                ["flag", "images", "share"], [[k, v, _share(v, wm_total)] for k, v in rep.watermark.items()]
            ),
        ),
        (
            "Annotation coverage",
            _table(
                ["stage", "model", "parts", "images", "share of manifest", "ids not in manifest"],
                [
                    [
                        a["stage"],
                        a["model"],
                        a["parts"],
                        a["images"],
                        _share(a["images"], rep.rows_total),
                        a["unknown_ids"],
                    ]
                    for a in rep.annotations
                ],
            )
            if rep.annotations
            else "<p>No annotations yet.</p>",
        ),
        ("Rejects", _counter_table(rep.rejects, None) if rep.rejects else "<p>No rejects.</p>"),
    ]
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(title)} (<a href='{name}'>{name}</a>)</figcaption></figure>"
        for name, (title, png) in images.items()
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>{c}" for h, c in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Dataset report: {html.escape(rep.dataset)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ddd; padding: 2px 8px; text-align: left; }}
td:not(:first-child) {{ font-variant-numeric: tabular-nums; }}
.ngrams {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
figure img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
<h1>Dataset report</h1>
<p><code>{html.escape(rep.dataset)}</code></p>
{body}
<h2>Plots</h2>
<div class="plots">{figures}</div>
</body></html>
"""


def _counter_table(counter, total: int | None) -> str:
    rows = counter.most_common(TABLE_ROWS)
    s = total if total is not None else sum(counter.values())
    return _table(["value", "count", "share"], [[k, v, _share(v, s)] for k, v in rows])


def _ngram_tables(rep: Report) -> str:
    if not rep.ngrams:
        return "<p>N-grams not computed (--no-ngrams).</p>"
    parts = []
    for n, rows in sorted(rep.ngrams.items()):
        parts.append(
            f"<div><h3>n = {n}</h3>"
            + _table(["n-gram", "count"], [[g, c] for g, c, _ in rows[:NGRAM_ROWS]])
            + "</div>"
        )
    return (
        '<div class="ngrams">' + "".join(parts) + "</div>"
        "<p>Top n-grams per n: <a href='ngrams.csv'>ngrams.csv</a> (max_undercount bounds the count lost to "
        "memory-bounded counting; it is 0 when everything fitted).</p>"
    )
