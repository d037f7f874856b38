"""`[pairwise]`, `[rank]`, `[scorer]`, `[score]` and `[arena]` config sections of `bigasp quality`.

Defaults are bigASP's published recipe (quality-arena/TrainClassifier.ipynb,
TrainRanker.ipynb and manual_scoring.py of fpgaminer/bigasp-training); docs/quality.md
cites each number.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from bigasp.config import Section


class PairwiseConfig(Section):
    """Training of the pairwise classifier (`bigasp quality train`)."""

    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before each Linear (bigASP 0.1).")
    lr: float = Field(2e-4, gt=0, description="AdamW peak learning rate of the OneCycle schedule.")
    weight_decay: float = Field(2.0, ge=0, description="AdamW weight decay (bigASP 2.0).")
    samples: int = Field(100_000, gt=0, description="Training samples seen; steps = samples // batch_size.")
    batch_size: int = Field(512, gt=0, description="Examples per step.")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Share of pairs held out for the test.")
    fp16_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of each batch rounded to fp16 (works on fp16-stored embeddings)."
    )
    synthetic: bool = Field(
        True,
        description="Add each rated image against its own blurred or JPEG copy, which always loses "
        "(needs --clip to embed the copies).",
    )
    blur_radius: tuple[int, int] = Field((3, 16), description="Gaussian blur radius range (inclusive).")
    jpeg_quality: tuple[int, int] = Field((20, 70), description="JPEG quality range (inclusive).")
    sources: list[str] = Field(
        default_factory=list, description="Rating sources to train on (empty = all, e.g. human, gpt4v2)."
    )
    seed: int = Field(0, description="Keys the split, degradations, batch order, init and dropout.")


class RankConfig(Section):
    """The ELO tournament (or Bradley–Terry fit) and the bins (`bigasp quality rank`)."""

    method: Literal["elo", "bradley-terry"] = Field(
        "elo",
        description="elo: the pairwise model plays a tournament (bigASP); bradley-terry: fit strengths "
        "straight from the rating votes (only rated images get a rank).",
    )
    images: int = Field(8192, gt=1, description="Images in the tournament (all when fewer have embeddings).")
    rounds: int = Field(8192, gt=0, description="Tournament rounds; each image plays once per round.")
    k: float = Field(10.0, gt=0, description="ELO K factor.")
    start: float = Field(1500.0, description="Starting ELO of every image.")
    bins: int = Field(
        10,
        ge=2,
        le=127,
        description="Equal-width bins over the rating range (scores 0..bins-1, stored as int8).",
    )
    bt_alpha: float = Field(0.01, ge=0, description="Bradley–Terry: Gaussian prior strength (choix alpha).")
    batch_pairs: int = Field(65536, gt=0, description="Pairs judged per model call (memory bound).")
    seed: int = Field(0, description="Keys the image sample and each round's derangement.")


class ScorerConfig(Section):
    """Training of the score classifier (`bigasp quality fit-scorer`)."""

    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before each Linear (bigASP 0.1).")
    lr: float = Field(1e-2, gt=0, description="AdamW peak learning rate of the OneCycle schedule.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (bigASP 0.1).")
    samples: int = Field(80_000, gt=0, description="Training samples seen; steps = samples // batch_size.")
    batch_size: int = Field(512, gt=0, description="Examples per step.")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Share of ranked images held out.")
    seed: int = Field(0, description="Keys the split, batch order, init and dropout.")


class ScoreConfig(Section):
    """Where `bigasp quality score` finds a dataset that lives at a URL (s3://bucket/ds)."""

    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a dataset at a URL, e.g. {endpoint_url = ..., key = ..., secret = ...}; "
        "empty = the usual AWS_* / GOOGLE_* variables. Never written anywhere.",
    )
    work_dir: str = Field(
        "",
        description="For a dataset at a URL: this machine's working copy (--work; empty = "
        "~/.cache/bigasp/datasets/<hash of the URL>, or $BIGASP_WORK_DIR/<hash>).",
    )


class ArenaConfig(Section):
    """The rating web app (`bigasp quality arena`)."""

    pool: int = Field(4000, ge=2, description="Images in the rating pool (rated images + random top-up).")
    seed: int = Field(0, description="Keys the pool top-up and the pair draws.")
    uncertain_candidates: int = Field(
        256, gt=0, description="uncertain mode: unrated pairs scored per draw; the closest to 50/50 wins."
    )
    flagged_confidence: float = Field(
        0.9,
        gt=0.5,
        lt=1,
        description="flagged mode: skip pairs the model already says the flagged image "
        "loses with at least this probability.",
    )
    max_side: int = Field(1024, ge=64, description="Served images are downscaled to this longest side.")
    threads: int = Field(8, gt=0, description="Server worker threads.")


class QualityConfig(Section):
    """One TOML file may hold all five sections."""

    pairwise: PairwiseConfig = Field(default_factory=PairwiseConfig)
    rank: RankConfig = Field(default_factory=RankConfig)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    arena: ArenaConfig = Field(default_factory=ArenaConfig)
