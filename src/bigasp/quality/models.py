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


MAX_BINS = 127  # scores are stored as int8
MAX_EMBEDDING = 65536  # far above any CLIP width; keeps a damaged header from allocating gigabytes
REFIT = {
    "quality-classifier": "retrain it with `bigasp quality train DATASET`",
    "score-classifier": "refit it with `bigasp quality fit-scorer DATASET`",
}


def expected_shapes(kind: str, embedding_size: int, bins: int = 0) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a `kind` model (bigASP's layout), without building it."""
    d = embedding_size
    if kind == "quality-classifier":
        return {"ln.weight": (d,), "ln.bias": (d,), "seq.1.weight": (4 * d, 2 * d), "seq.1.bias": (4 * d,),
                "seq.4.weight": (2, 4 * d), "seq.4.bias": (2,)}  # fmt: skip
    return {"ln.weight": (d,), "ln.bias": (d,), "linear1.weight": (2 * d, d), "linear1.bias": (2 * d,),
            "linear2.weight": (bins, 2 * d), "linear2.bias": (bins,)}  # fmt: skip


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _whole(meta: dict[str, Any], key: str, low: int, high: int, path: Path, fix: str) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = "missing" if key not in meta else f"{value!r}"
        raise ModelLoadError(
            f"{path}: metadata {key} is {shown}, not a whole number from {low} to {high}; "
            f"the file is damaged: {fix}"
        )
    return value


def read_metadata(path: Path, kind: str) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The file's bigasp metadata and tensor shapes, checked against `kind` before any tensor is read."""
    from safetensors import safe_open

    fix = REFIT[kind]
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("bigasp")
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as err:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({_one_line(err)}): {fix}") from err
    if raw is None:
        raise ModelLoadError(
            f"{path} has no bigasp metadata, so it was not written by bigasp and its shape is unknown: {fix}"
        )
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ModelLoadError(f"{path}: its bigasp metadata is not valid JSON (damaged file): {fix}") from err
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: its bigasp metadata is not a JSON object (damaged file): {fix}")
    if meta.get("kind") != kind:
        raise ModelLoadError(f"{path} holds a {meta.get('kind') or 'unknown model'}, not a {kind}")
    _whole(meta, "embedding_size", 1, MAX_EMBEDDING, path, fix)
    if kind == "score-classifier":
        _whole(meta, "bins", 2, MAX_BINS, path, fix)
    return meta, shapes


def _check_tensors(path: Path, kind: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    fix = REFIT[kind]
    want = expected_shapes(kind, meta["embedding_size"], meta.get("bins", 0))
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing or extra:
        raise ModelLoadError(
            f"{path}: tensor names do not match a bigasp {kind} (missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(extra) or 'none'}): {fix}"
        )
    for name, shape in want.items():
        if shapes[name] != shape:
            raise ModelLoadError(
                f"{path}: tensor {name} has shape {list(shapes[name])}, but the metadata "
                f"(embedding_size {meta['embedding_size']}{', bins ' + str(meta['bins']) if 'bins' in meta else ''}) "
                f"needs {list(shape)}; the file is damaged: {fix}"
            )


def check_finite(path: str | Path, state: dict[str, torch.Tensor], fix: str) -> None:
    """Refuse NaN/Inf weights: such a model scores every image 0 (argmax of NaN) without a word."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelLoadError(
                f"{path}: tensor {name} holds {bad} NaN/Inf value(s), so every output would be "
                f"meaningless (damaged file or diverged training): {fix}"
            )


def load_model(path: str | Path, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode and its metadata; a wrong, damaged or non-finite file is a ModelLoadError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; train it first (see docs/quality.md)")
    meta, shapes = read_metadata(path, kind)
    _check_tensors(path, kind, meta, shapes)
    try:
        state = load_file(str(path))
    except Exception as err:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({_one_line(err)}): {REFIT[kind]}"
        ) from err
    check_finite(path, state, REFIT[kind])
    args: dict[str, Any] = {"embedding_size": meta["embedding_size"], "dropout": 0.0}
    if kind == "score-classifier":
        args["bins"] = meta["bins"]
    model = KINDS[kind](**args)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as err:  # e.g. a dtype torch cannot copy from
        raise ModelLoadError(f"{path}: the weights do not load ({_one_line(err)}): {REFIT[kind]}") from err
    return model.eval(), meta


def check_embedding_size(model: nn.Module, path: str | Path, vectors: Any, embed_key: str) -> None:
    """A model only reads embeddings as wide as the ones it was trained on; name both sizes."""
    width = int(vectors.shape[1]) if getattr(vectors, "ndim", 0) == 2 else None
    if width is not None and width != model.embedding_size:
        raise ModelLoadError(
            f"{path} was trained on {model.embedding_size}-value embeddings, but the dataset's "
            f"'{embed_key}' embeddings have {width} values: use a model trained on these embeddings, "
            "or pick the matching embeddings with --embed-key"
        )


def file_digest(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
