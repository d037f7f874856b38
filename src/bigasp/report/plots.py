"""PNG figures of a `Report` (matplotlib, Agg backend: no display needed).

Each function draws one figure and returns it; `PLOTS` lists them with file name and title.
Empty data still gives a figure (with a "no data" note) so the page never shows a broken image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bigasp.report.compute import RES_EDGES, Report

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fig(w: float = 8.0, h: float = 4.0, ncols: int = 1):
    plt = _plt()
    fig, axes = plt.subplots(1, ncols, figsize=(w, h), dpi=DPI, squeeze=False)
    return fig, list(axes[0])


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _thousands(ax, axis: str = "y") -> None:
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def _hist_bars(ax, counts: np.ndarray, xlabel: str, what: str, vlines: tuple[int, ...] = ()) -> None:
    if counts.sum() == 0:
        _empty(ax, what)
        return
    last = int(np.flatnonzero(counts)[-1])
    x = np.arange(last + 1)
    ax.bar(x, counts[: last + 1], width=1.0, color="#4c72b0")
    for v in vlines:
        if v <= last + 1:
            ax.axvline(v + 0.5, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_xlim(-0.5, last + 0.5)
    ax.set_xlabel(xlabel + (f" (last bin = {last}+)" if last == len(counts) - 1 else ""))
    ax.set_ylabel(what)
    _thousands(ax)


def _barh(ax, labels: list[str], values: list[int], xlabel: str, what: str) -> None:
    if not values:
        _empty(ax, what)
        return
    y = np.arange(len(values))[::-1]
    ax.barh(y, values, color="#4c72b0")
    ax.set_yticks(y)
    ax.set_yticklabels([lb if len(lb) <= 40 else lb[:38] + "…" for lb in labels], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.6, len(values) - 0.4)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    _thousands(ax, "x")
    ax.margins(x=0.02)


def score(rep: Report):
    fig, (ax,) = _fig(7, 3.5)
    labels = ["none", *map(str, range(10))]
    if rep.score.sum() == 0:
        _empty(ax, "images")
    else:
        ax.bar(range(11), rep.score, color=["#999999"] + ["#4c72b0"] * 10)
        ax.set_xticks(range(11))
        ax.set_xticklabels(labels)
        ax.set_xlabel("score (none = unscored)")
        ax.set_ylabel("images")
        _thousands(ax)
    ax.set_title("Score")
    return fig


def buckets(rep: Report, top: int = 30):
    order = [i for i in np.argsort(-rep.bucket_counts, kind="stable")[:top] if rep.bucket_counts[i] > 0]
    fig, (ax,) = _fig(7, 0.6 + 0.22 * max(len(order), 4))
    _barh(
        ax,
        [rep.bucket_names[i] for i in order],
        [int(rep.bucket_counts[i]) for i in order],
        "images",
        "images",
    )
    ax.set_title(f"Aspect bucket (WxH), top {len(order)} of {int((rep.bucket_counts > 0).sum())} used")
    return fig


def score_by_bucket(rep: Report, top: int = 20):
    order = [i for i in np.argsort(-rep.bucket_counts, kind="stable")[:top] if rep.bucket_counts[i] > 0]
    fig, (ax,) = _fig(7, 1.2 + 0.25 * max(len(order), 6))
    if not order:
        _empty(ax, "images")
    else:
        m = rep.score_by_bucket[order].astype(float)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
        ax.set_xticks(range(11))
        ax.set_xticklabels(["none", *map(str, range(10))])
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([rep.bucket_names[i] for i in order], fontsize=8)
        ax.set_xlabel("score")
        fig.colorbar(im, ax=ax, label="share of bucket")
    ax.set_title("Score by aspect bucket (rows: most used buckets)")
    return fig


def resolution(rep: Report):
    fig, (ax,) = _fig(6, 5)
    if rep.resolution.sum() == 0:
        _empty(ax, "image sizes")
    else:
        from matplotlib.colors import LogNorm

        data = np.ma.masked_equal(rep.resolution.T, 0)
        mesh = ax.pcolormesh(RES_EDGES, RES_EDGES, data, cmap="viridis", norm=LogNorm())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ticks = [64, 256, 1024, 4096, 16384]
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(_fixed(ticks))
            axis.set_major_formatter(_fmt_int())
            axis.set_minor_locator(_fixed([]))
        ax.set_xlabel("original width (px)")
        ax.set_ylabel("original height (px)")
        fig.colorbar(mesh, ax=ax, label="images")
    ax.set_title("Original resolution")
    return fig


def _fixed(ticks):
    from matplotlib.ticker import FixedLocator

    return FixedLocator(ticks)


def _fmt_int():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:.0f}")


def top_tags(rep: Report, top: int = 40):
    folded = rep.tags_folded.most_common(top)
    fig, (ax,) = _fig(7, 0.6 + 0.2 * max(len(folded), 4))
    _barh(ax, [t for t, _ in folded], [c for _, c in folded], "images", "tags")
    what = "aliases folded" if rep.alias_source else "no alias table"
    ax.set_title(f"Top {len(folded)} tags ({what})")
    return fig


def tags_per_image(rep: Report):
    fig, (ax,) = _fig(7, 3.2)
    _hist_bars(ax, rep.tags_per_image, "tags per image", "images")
    ax.set_title("Tags per image")
    return fig


def cooccurrence(rep: Report):
    k = len(rep.cooc_tags)
    fig, (ax,) = _fig(7.5, 6.5)
    if k == 0:
        _empty(ax, "tags")
    else:
        diag = np.maximum(np.diag(rep.cooc).astype(float), 1)
        cond = rep.cooc / diag[:, None]  # P(column tag | row tag)
        im = ax.imshow(cond, cmap="magma", vmin=0, vmax=1)
        ax.set_xticks(range(k))
        ax.set_xticklabels(rep.cooc_tags, rotation=90, fontsize=7)
        ax.set_yticks(range(k))
        ax.set_yticklabels(rep.cooc_tags, fontsize=7)
        fig.colorbar(im, ax=ax, label="P(column tag | row tag)")
    ax.set_title(f"Co-occurrence of the top {k} tags")
    return fig


def caption_lengths(rep: Report):
    fig, (a, b) = _fig(11, 3.5, ncols=2)
    _hist_bars(a, rep.words_per_caption, "words per caption", "captions")
    a.set_title("Caption length in words")
    _hist_bars(b, rep.clip_tokens, "CLIP tokens per caption", "captions", vlines=(75, 150, 225))
    b.set_title(f"Caption length in CLIP tokens ({rep.clip_tokenized:,} captions tokenised)")
    return fig


def chunks(rep: Report):
    fig, (a, b) = _fig(11, 3.5, ncols=2)
    _hist_bars(
        a, rep.token_estimate, "estimated prompt tokens (sampler's estimate)", "images", (75, 150, 225)
    )
    a.set_title("Sampler's token estimate per image")
    if not rep.chunk_estimate:
        _empty(b, "images")
    else:
        ks = list(range(1, rep.max_chunks + 1))
        est = np.array([rep.chunk_estimate.get(k, 0) for k in ks], float)
        clip = np.array([rep.clip_chunks.get(k, 0) for k in ks], float)
        clip[-1] += sum(v for k, v in rep.clip_chunks.items() if k > rep.max_chunks)
        x = np.arange(len(ks))
        b.bar(x - 0.2, est / max(est.sum(), 1), 0.4, label="sampler estimate (caption + quality tags)")
        if clip.sum():
            b.bar(x + 0.2, clip / clip.sum(), 0.4, label="tokenised captions (sample)")
        b.set_xticks(x)
        b.set_xticklabels([f"{k} ({75 * k} tok)" for k in ks])
        b.set_xlabel("75-token chunks")
        b.set_ylabel("share")
        b.set_ylim(0, 1.3 * max(est.max() / max(est.sum(), 1), clip.max() / max(clip.sum(), 1)))
        b.legend(fontsize=8, loc="upper right")
    b.set_title("Chunk count")
    return fig


def categories(rep: Report):
    fig, axes = _fig(12, 3.6, ncols=3)
    cpi = rep.captions_per_image
    last = int(np.flatnonzero(cpi)[-1]) if cpi.sum() else 0
    if cpi.sum():
        axes[0].bar(range(last + 1), cpi[: last + 1], color="#4c72b0")
        axes[0].set_xticks(range(last + 1))
        axes[0].set_xlabel("captions per image")
        axes[0].set_ylabel("images")
        _thousands(axes[0])
    else:
        _empty(axes[0], "images")
    axes[0].set_title("Captions per image")
    src = rep.sources.most_common(12)
    _barh(axes[1], [s for s, _ in src], [c for _, c in src], "images", "sources")
    axes[1].set_title("Source")
    ct = rep.caption_types.most_common(12)
    _barh(axes[2], [s for s, _ in ct], [c for _, c in ct], "images", "caption types")
    axes[2].set_title("Caption type")
    return fig


def watermark_rejects(rep: Report):
    fig, (a, b) = _fig(11, 3.4, ncols=2)
    wm = rep.watermark
    if sum(wm.values()):
        a.bar(range(len(wm)), list(wm.values()), color=["#c44e52", "#4c72b0", "#999999"])
        a.set_xticks(range(len(wm)))
        a.set_xticklabels(list(wm))
        a.set_ylabel("images")
        _thousands(a)
    else:
        _empty(a, "images")
    a.set_title("Watermark flag")
    rj = rep.rejects.most_common(12)
    _barh(b, [r for r, _ in rj], [c for _, c in rj], "files", "rejects")
    b.set_title("Rejects by stage:reason")
    return fig


PLOTS: list[tuple[str, str, Callable[[Report], object]]] = [
    ("score.png", "Score", score),
    ("score-by-bucket.png", "Score by aspect bucket", score_by_bucket),
    ("buckets.png", "Aspect buckets", buckets),
    ("resolution.png", "Original resolution", resolution),
    ("tags-top.png", "Top tags", top_tags),
    ("tags-per-image.png", "Tags per image", tags_per_image),
    ("tags-cooccurrence.png", "Tag co-occurrence", cooccurrence),
    ("caption-length.png", "Caption length", caption_lengths),
    ("chunks.png", "Tokens and chunks", chunks),
    ("categories.png", "Captions, sources, caption types", categories),
    ("watermark-rejects.png", "Watermark and rejects", watermark_rejects),
]


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
