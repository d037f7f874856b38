"""bigASP's score classifier (TrainRanker.ipynb): embedding -> ELO bin, cross-entropy on hard
labels, 10% of the ranked images held out; inference is argmax of the softmax (score-images.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigasp.errors import DataError
from bigasp.quality.config import ScorerConfig
from bigasp.quality.models import ScoreClassifier
from bigasp.quality.training import device, fit, held_out


@dataclass
class ScorerResult:
    model: ScoreClassifier
    train: dict[str, Any]
    test: dict[str, Any]
    test_ids: list[str] = field(repr=False, default_factory=list)
    losses: list[float] = field(repr=False, default_factory=list)


@torch.no_grad()
def predict(
    model: ScoreClassifier, vectors: np.ndarray, batch: int = 8192, *, ids=None, source: str = "the scorer"
) -> tuple[np.ndarray, np.ndarray]:
    """(score int8 [N], probabilities float32 [N, bins]) for fp16/fp32 embeddings.

    Every batch is checked: NaN/Inf embeddings or outputs are a DataError, never a score (the
    argmax of NaN is bin 0, and score 0 is left out of training).
    """
    model = model.eval()
    dev = next(model.parameters()).device
    probs = []
    for s in range(0, len(vectors), batch):
        x = torch.from_numpy(np.asarray(vectors[s : s + batch], np.float32)).to(dev)
        _refuse_non_finite(x, s, ids, "embeddings", "re-embed them with `bigasp annotate --stage embed`")
        p = torch.softmax(model(x).float(), dim=1)
        _refuse_non_finite(p, s, ids, f"outputs of {source}", "the model is damaged; refit it with "
                           "`bigasp quality fit-scorer DATASET`")  # fmt: skip
        probs.append(p.cpu().numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, model.bins), np.float32)
    return p.argmax(1).astype(np.int8), p


def _refuse_non_finite(t: torch.Tensor, start: int, ids, what: str, fix: str) -> None:
    rows = ~torch.isfinite(t).all(dim=1)
    if bool(rows.any()):
        first = start + int(torch.nonzero(rows)[0, 0])
        name = f"image {ids[first]}" if ids is not None else f"row {first}"
        raise DataError(
            f"NaN/Inf {what} for {int(rows.sum())} image(s) of the batch from row {start} (first: {name}); "
            f"nothing of this run was written: {fix}"
        )


def _metrics(model: ScoreClassifier, x: np.ndarray, bins: np.ndarray) -> dict[str, Any]:
    if len(x) == 0:
        return {"images": 0}
    score, p = predict(model, x)
    loss = float(F.cross_entropy(torch.from_numpy(np.log(np.clip(p, 1e-12, 1))), torch.from_numpy(bins)))
    return {
        "images": len(x),
        "loss": loss,
        "accuracy": float(np.mean(score == bins)),
        "within_one": float(np.mean(np.abs(score.astype(int) - bins) <= 1)),
    }


def train_scorer(
    ids: list[str], vectors: np.ndarray, bins: np.ndarray, cfg: ScorerConfig, n_bins: int
) -> ScorerResult:
    if len(ids) < 2:
        raise DataError("need at least 2 ranked images to fit the scorer; run `bigasp quality rank` first")
    test = held_out(list(ids), cfg.test_fraction, cfg.seed, "scorer")
    is_test = np.array([i in test for i in ids])
    x = np.asarray(vectors, np.float32)
    bins = np.asarray(bins, np.int64)
    dev = device()
    xt, yt = torch.from_numpy(x[~is_test]).to(dev), torch.from_numpy(bins[~is_test]).to(dev)

    def step_loss(model, idx):
        i = torch.from_numpy(idx).to(dev)
        return F.cross_entropy(model(xt[i]), yt[i])

    model, losses = fit(
        lambda: ScoreClassifier(x.shape[1], cfg.dropout, n_bins), step_loss, n=int((~is_test).sum()),
        lr=cfg.lr, weight_decay=cfg.weight_decay, samples=cfg.samples, batch_size=cfg.batch_size,
        seed=cfg.seed, name="scorer",
    )  # fmt: skip
    model = model.cpu()
    if not all(bool(torch.isfinite(v).all()) for v in model.state_dict().values()):
        raise DataError(
            "scorer training diverged (NaN/Inf weights); nothing was written: "
            f"lower scorer.lr (now {cfg.lr}, e.g. --set lr={cfg.lr / 10:g}) and fit again"
        )
    return ScorerResult(
        model,
        _metrics(model, x[~is_test], bins[~is_test]),
        _metrics(model, x[is_test], bins[is_test]),
        [i for i, t in zip(ids, is_test, strict=True) if t],
        losses,
    )
