"""bigASP's two quality MLPs, with bigASP's module layout so state dicts carry the same keys.

`QualityClassifier` (quality-arena/models.py): shared LayerNorm on each embedding, concat,
Dropout -> Linear(2D -> 4D) -> GELU -> Dropout -> Linear(4D -> 2); softmax[0] is the
probability that the *first* image is better. `ScoreClassifier`: LayerNorm -> Dropout ->
Linear(D -> 2D) -> GELU -> Dropout -> Linear(2D -> bins). D = 768 for CLIP ViT-B/32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigasp.errors import ModelLoadError
from bigasp.fsutil import atomic_path


class QualityClassifier(nn.Module):
    def __init__(self, embedding_size: int = 768, dropout: float = 0.1):
        super().__init__()
        self.embedding_size = embedding_size
        self.ln = nn.LayerNorm(embedding_size)
        self.seq = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(embedding_size * 2, embedding_size * 4),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(embedding_size * 4, 2),
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.seq(torch.cat([self.ln(a), self.ln(b)], dim=1))

    @torch.no_grad()
    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image contributions to the first Linear as the first and as the second image.

        Linear(cat(a, b)) = W[:, :D] a + W[:, D:] b + bias, so a tournament over N images needs
        only 2N projections instead of one per pair; `judge` finishes the pair (eval mode).
        """
        lin = self.seq[1]
        d = self.embedding_size
        h = self.ln(x)
        return h @ lin.weight[:, :d].T + lin.bias, h @ lin.weight[:, d:].T

    @torch.no_grad()
    def judge(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """P(first image better) from `halves` rows (the same as softmax(forward)[:, 0] in eval)."""
        logits = self.seq[4](self.seq[2](first + second))
        return torch.softmax(logits, dim=1)[:, 0]


class ScoreClassifier(nn.Module):
    def __init__(self, embedding_size: int = 768, dropout: float = 0.1, bins: int = 10):
        super().__init__()
        self.embedding_size = embedding_size
        self.bins = bins
        self.ln = nn.LayerNorm(embedding_size)
        self.dropout1 = nn.Dropout(dropout)
        self.linear1 = nn.Linear(embedding_size, embedding_size * 2)
        self.act_fn = nn.GELU()
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(embedding_size * 2, bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear1(self.dropout1(self.ln(x)))
        return self.linear2(self.dropout2(self.act_fn(x)))


KINDS = {"quality-classifier": QualityClassifier, "score-classifier": ScoreClassifier}


def save_model(model: nn.Module, path: str | Path, info: dict[str, Any]) -> Path:
    """safetensors weights; the shape and training record go in the file's metadata."""
    from safetensors.torch import save_file

    kind = next(k for k, cls in KINDS.items() if isinstance(model, cls))
    meta = {"kind": kind, "embedding_size": model.embedding_size, **info}
    if isinstance(model, ScoreClassifier):
        meta["bins"] = model.bins
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"bigasp": json.dumps(meta, sort_keys=True)})
    return Path(path)


def load_model(path: str | Path, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode and its metadata; a wrong or missing file is a ModelLoadError."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; train it first (see docs/quality.md)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("bigasp", "{}"))
        state = load_file(str(path))
    except Exception as err:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({err})") from err
    if meta.get("kind") != kind:
        raise ModelLoadError(f"{path} holds a {meta.get('kind') or 'unknown model'}, not a {kind}")
    args: dict[str, Any] = {"embedding_size": int(meta["embedding_size"]), "dropout": 0.0}
    if kind == "score-classifier":
        args["bins"] = int(meta["bins"])
    model = KINDS[kind](**args)
    model.load_state_dict(state)
    return model.eval(), meta


def file_digest(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
