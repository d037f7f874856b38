"""The synthetic quality study of docs/quality.md: accuracy vs number of ratings, and its plot.

    .venv/bin/python scripts/quality_study.py [--out docs/quality-ratings-study.png]

One world (2,400 synthetic photos with a hidden quality), the same simulated raters, and the
whole pipeline (pairwise model -> ELO over 2,000 images -> bins -> scorer) for each number of
ratings, with and without bigASP's synthetic (corrupted-copy) pairs; prints a Markdown table and
draws the plot. 10-15 minutes on a shared 2-core CPU.
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
    rows, plain = [], []
    no_synth = study.study_pairwise_config(args.seed).model_copy(update={"synthetic": False})
    print(
        "| ratings | classifier picks the truly better image | ELO vs hidden q | held-out score vs hidden q "
        "| held-out score vs q, without synthetic pairs |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in COUNTS:
        t = time.time()
        r = study.run(n, seed=args.seed, world_data=world, rounds=2048)
        p = study.run(n, seed=args.seed, world_data=world, rounds=2048, pairwise=no_synth)
        rows.append(r)
        plain.append(p)
        cells = [r.pair_accuracy_truth, r.elo_spearman, r.spearman_heldout, p.spearman_heldout]
        print(
            f"| {n} | " + " | ".join(f"{c:.3f}" for c in cells) + f" |  <!-- {time.time() - t:.0f} s -->",
            flush=True,
        )
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(
        COUNTS,
        [r.pair_accuracy_truth for r in rows],
        "o-",
        label="pairwise model: picks the truly better image",
    )
    ax.plot(COUNTS, [r.elo_spearman for r in rows], "s-", label="ELO rating vs hidden quality (Spearman)")
    ax.plot(COUNTS, [r.spearman_heldout for r in rows], "^-", label="score 0-9 of held-out images (Spearman)")
    ax.plot(COUNTS, [r.spearman_heldout for r in plain], "v--", label="same, trained without synthetic pairs")
    ax.axhline(0.8, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xticks(COUNTS, [str(c) for c in COUNTS])
    ax.set_xlabel("simulated human judgements")
    ax.set_ylim(0.0, 1.0)
    ax.set_title("Synthetic study: how many ratings the pipeline needs")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
