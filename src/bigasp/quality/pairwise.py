"""Training bigASP's pairwise quality classifier (quality-arena/TrainClassifier.ipynb).

Examples: every rated unordered pair with its averaged soft label, in both orderings; and,
for every rated image, the image against its own blurred or JPEG copy, which always loses
(labels (1, 0) and (0, 1)). Soft-label cross-entropy; half of each batch rounded to fp16.

The one deliberate difference from the notebook: it shuffles single examples into the 10%
test set, so a pair's mirrored ordering can sit on the other side and the test figure is
optimistic. Here a pair (both orderings) or an image's synthetic pair is held out as a unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigasp.errors import DataError
from bigasp.quality.config import PairwiseConfig
from bigasp.quality.models import QualityClassifier
from bigasp.quality.ratings import PairLabels
from bigasp.quality.training import device, fit, held_out


@dataclass
class Examples:
    a: np.ndarray  # float32 [M, D]
    b: np.ndarray
    y: np.ndarray  # float32 [M, 2]: P(a better), P(b better)
    unit: list[str]  # hold-out unit of each example
    synthetic: np.ndarray  # bool [M]

    def take(self, mask: np.ndarray) -> Examples:
        return Examples(
            self.a[mask], self.b[mask], self.y[mask], [u for u, m in zip(self.unit, mask, strict=True) if m],
            self.synthetic[mask],
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.y)


def build_examples(
    pairs: PairLabels, vectors: dict[str, np.ndarray], degraded: dict[str, np.ndarray] | None = None
) -> Examples:
    """Both orderings of every pair, plus each degraded copy against its original."""
    a, b, y, unit, synth = [], [], [], [], []
    for first, second, p in zip(pairs.first, pairs.second, pairs.p, strict=True):
        u = f"pair:{first}|{second}"
        a += [vectors[first], vectors[second]]
        b += [vectors[second], vectors[first]]
        y += [(p, 1 - p), (1 - p, p)]
        unit += [u, u]
        synth += [False, False]
    for iid, vec in sorted((degraded or {}).items()):
        u = f"synthetic:{iid}"
        a += [vectors[iid], vec]
        b += [vec, vectors[iid]]
        y += [(1.0, 0.0), (0.0, 1.0)]
        unit += [u, u]
        synth += [True, True]
    if not y:
        raise DataError("no ratings to train on; rate some pairs with `bigasp quality arena` first")
    f32 = np.float32
    return Examples(np.asarray(a, f32), np.asarray(b, f32), np.asarray(y, f32), unit, np.asarray(synth, bool))


@torch.no_grad()
def evaluate(model: QualityClassifier, ex: Examples) -> dict[str, Any]:
    """Loss, and accuracy on decisive examples (label < 0.05 or > 0.95), as the notebook's test."""
    if len(ex) == 0:
        return {"examples": 0}
    dev = next(model.parameters()).device
    logits = model(torch.from_numpy(ex.a).to(dev), torch.from_numpy(ex.b).to(dev)).float().cpu()
    y = torch.from_numpy(ex.y)
    loss = float(F.cross_entropy(logits, y))
    decisive = ((y[:, 0] > 0.95) | (y[:, 0] < 0.05)).numpy()
    correct = (logits.argmax(1) == (y[:, 1] > 0.5).long()).numpy()
    out: dict[str, Any] = {"examples": len(ex), "loss": loss}
    for name, mask in (
        ("accuracy_decisive", decisive),
        ("accuracy_human_decisive", decisive & ~ex.synthetic),
        ("accuracy_synthetic", decisive & ex.synthetic),
    ):
        out[name] = float(correct[mask].mean()) if mask.any() else None
        out[name.replace("accuracy", "n")] = int(mask.sum())
    return out


@dataclass
class PairwiseResult:
    model: QualityClassifier
    train: dict[str, Any]
    test: dict[str, Any]
    losses: list[float] = field(repr=False, default_factory=list)


def train_pairwise(ex: Examples, cfg: PairwiseConfig) -> PairwiseResult:
    test_units = held_out(sorted(set(ex.unit)), cfg.test_fraction, cfg.seed, "pairwise")
    is_test = np.array([u in test_units for u in ex.unit])
    tr, te = ex.take(~is_test), ex.take(is_test)
    if len(tr) == 0:
        raise DataError("every rated pair was held out; rate more pairs or lower pairwise.test_fraction")
    dev = device()
    a, b, y = (torch.from_numpy(t).to(dev) for t in (tr.a, tr.b, tr.y))

    def step_loss(model, idx):
        i = torch.from_numpy(idx).to(dev)
        xa, xb = a[i].clone(), b[i].clone()
        h = int(len(idx) * cfg.fp16_fraction)
        xa[:h] = xa[:h].half().float()
        xb[:h] = xb[:h].half().float()
        return F.cross_entropy(model(xa, xb), y[i])

    model, losses = fit(
        lambda: QualityClassifier(ex.a.shape[1], cfg.dropout), step_loss, n=len(tr), lr=cfg.lr,
        weight_decay=cfg.weight_decay, samples=cfg.samples, batch_size=cfg.batch_size, seed=cfg.seed,
        name="pairwise",
    )  # fmt: skip
    return PairwiseResult(model.cpu(), evaluate(model, tr), evaluate(model, te), losses)


def judge_fn(
    model: QualityClassifier,
    vectors: np.ndarray,
    batch_pairs: int = 65536,
    *,
    source: str = "the classifier",
    strict: bool = True,
):
    """`judge(first_idx, second_idx) -> P(first better)` over rows of `vectors` (eval, no dropout).

    NaN/Inf probabilities are a DataError: the tournament compares p > 0.5, so NaN would make
    every first image lose without a word. `strict=False` (the arena, which only orders the
    pairs it shows) returns them as NaN for the caller to leave aside.
    """
    model = model.eval()
    dev = next(model.parameters()).device
    first_h, second_h = model.halves(torch.from_numpy(np.asarray(vectors, np.float32)).to(dev))

    def judge(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, len(first), batch_pairs):
            i = torch.from_numpy(np.asarray(first[s : s + batch_pairs])).to(dev)
            j = torch.from_numpy(np.asarray(second[s : s + batch_pairs])).to(dev)
            p = model.judge(first_h[i], second_h[j]).float().cpu().numpy()
            if strict and not np.all(np.isfinite(p)):
                raise DataError(
                    f"{source} gives NaN/Inf probabilities for {int(np.sum(~np.isfinite(p)))} pair(s) (damaged "
                    "model or NaN/Inf embeddings); nothing was written: retrain it with `bigasp quality train DATASET`"
                )
            out.append(p)
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    return judge
