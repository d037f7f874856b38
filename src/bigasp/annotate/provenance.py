"""Provenance of every annotation: which model (name and file hashes), which settings, which bigasp.

It is stored in each part file's Parquet metadata (`bigasp.store.annotations`) and copied
into dataset.json by `bigasp annotate merge`, so any tag, caption or flag in the manifest can
be traced to the exact model files and thresholds that made it, and stages can be re-run
selectively when a model changes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from bigasp import __version__

HASHED_SUFFIXES = (".safetensors", ".bin", ".onnx", ".pt", ".json", ".txt", ".csv", ".model", ".jinja")


def file_hash(path: Path) -> str:
    """blake2b-128 of the whole file (the weights themselves, not their name)."""
    with open(path, "rb") as f:
        return "blake2b-128:" + hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def folder_hashes(path: Path) -> dict[str, str]:
    """Hashes of the model folder's weight, config and vocabulary files (top level)."""
    return {
        p.name: file_hash(p)
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix in HASHED_SUFFIXES and not p.name.startswith(".")
    }


def model_provenance(path: Path, *, stage: str, model_key: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "stage": stage,
        "model": path.name,
        "model_path": str(path.resolve()),
        "model_key": model_key,
        "files": folder_hashes(path),
        "settings": settings,
        "bigasp_version": __version__,
    }
