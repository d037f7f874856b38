"""The synthetic quality study of docs/quality.md: accuracy vs number of ratings, and its plot.

    .venv/bin/python scripts/quality_study.py [--out docs/quality-ratings-study.png]

One world (2,400 synthetic photos with a hidden quality), the same simulated raters, and the
whole pipeline (pairwise model -> ELO over 2,000 images -> bins -> scorer) for each number of
ratings; prints a Markdown table and draws the plot. About 5 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from bigasp.quality import study

COUNTS = (100, 250, 500, 1000, 1500, 2000, 3000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/quality-ratings-study.png"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = study.world(2400, args.seed)
    rows = []
    print(
        "| ratings | classifier: truly better image picked | ELO vs hidden q | held-out score vs hidden q |"
    )
    print("| ---: | ---: | ---: | ---: |")
    for n in COUNTS:
        t = time.time()
        r = study.run(n, seed=args.seed, world_data=world, rounds=2048)
        rows.append(r)
        print(f"| {n} | {r.pair_accuracy_truth:.3f} | {r.elo_spearman:.3f} | {r.spearman_heldout:.3f} |"
              f"  <!-- {time.time() - t:.0f} s -->", flush=True)  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(
        COUNTS,
        [r.pair_accuracy_truth for r in rows],
        "o-",
        label="pairwise model: picks the truly better image",
    )
    ax.plot(COUNTS, [r.elo_spearman for r in rows], "s-", label="ELO rating vs hidden quality (Spearman)")
    ax.plot(COUNTS, [r.spearman_heldout for r in rows], "^-", label="score 0-9 of held-out images (Spearman)")
    ax.axhline(0.8, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xticks(COUNTS, [str(c) for c in COUNTS])
    ax.set_xlabel("simulated human judgements")
    ax.set_ylim(0.4, 1.0)
    ax.set_title("Synthetic study: how many ratings the pipeline needs")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
