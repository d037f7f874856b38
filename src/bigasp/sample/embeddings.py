"""Textual-inversion embeddings for ComfyUI's `embedding:NAME` prompt syntax.

An embedding is a `.safetensors` file in a folder (or any folder below it) holding one or
more vectors per text encoder; SDXL files keep them under `clip_l` (768 wide) and `clip_g`
(1280 wide). Lookup and key choice follow ComfyUI's `load_embed`: `NAME` as given, else
`NAME.safetensors`, never outside the folder; the encoder's key, else the first tensor in
the file. Pickled `.pt`/`.bin` embeddings are never loaded (a warning says so).

Each vector takes one token position; `bigasp.sample.prompts` chunks them like tokens and
places them into the token-embedding output of the text encoders.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bigasp.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "embedding:"
ENCODER_KEYS = ("clip_l", "clip_g")  # text_encoder, text_encoder_2
PICKLED = (".pt", ".bin")


@dataclass(frozen=True)
class EmbeddingVector:
    """One position of a prompt filled by row `row` of embedding `name` (not a vocabulary id)."""

    name: str
    row: int


class EmbeddingLibrary:
    """The embeddings of one folder, loaded on first use and cached."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and not self.folder.is_dir():
            raise ConfigError(
                f"embeddings folder {self.folder} does not exist; pass a folder of .safetensors files"
            )
        self._files: dict[str, dict[str, torch.Tensor] | None] = {}

    def _find(self, name: str) -> Path | None:
        if self.folder is None or not name:
            return None
        folders = [self.folder, *sorted(p for p in self.folder.rglob("*") if p.is_dir())]
        for folder in folders:
            root = folder.resolve()
            path = (root / name).resolve()
            try:
                if os.path.commonpath((root, path)) != str(root):
                    continue
            except ValueError:
                continue
            pickled = [p for p in (path, *(path.with_name(path.name + e) for e in PICKLED)) if p.is_file()]
            if path.is_file() and path.suffix not in PICKLED:
                return path
            if path.with_name(path.name + ".safetensors").is_file():
                return path.with_name(path.name + ".safetensors")
            if pickled:
                log.warning(
                    "embedding:%s is a pickled file; bigasp loads only .safetensors (convert it)", name
                )
                return None
        return None

    def _tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        if name not in self._files:
            path = self._find(name)
            tensors = None
            if path is not None:
                from safetensors.torch import load_file

                try:
                    tensors = load_file(str(path), device="cpu")
                except Exception as err:  # a damaged file is skipped as ComfyUI does, with the reason
                    log.warning("embedding:%s could not be read from %s (%s); ignoring it", name, path, err)
            self._files[name] = tensors or None
        return self._files[name]

    def vectors(self, name: str, key: str) -> torch.Tensor | None:
        """`[n, width]` float32 vectors of `name` for one encoder key, or None if there is no file."""
        tensors = self._tensors(name)
        if tensors is None:
            return None
        if key in tensors:
            v = tensors[key]
        else:
            bundled = [t for k, t in tensors.items() if k.startswith("bundle_emb.") and k.endswith(f".{key}")]
            v = torch.cat(bundled, dim=0) if bundled else next(iter(tensors.values()))
        v = v.float()
        return v.reshape(1, -1) if v.dim() == 1 else v.reshape(-1, v.shape[-1])

    def rows(self, name: str) -> int | None:
        """Token positions `name` takes (its clip_l vectors, as ComfyUI's first tokenizer counts)."""
        v = self.vectors(name, ENCODER_KEYS[0])
        return None if v is None else int(v.shape[0])


def resolve(word: str, library: EmbeddingLibrary) -> tuple[str | None, int, str]:
    """`word` starts with `embedding:`: (found name or None, rows, leftover text to tokenize).

    ComfyUI's `_try_get_embedding`: the name ends at whitespace, `<` or `[`; a name with
    trailing commas that does not exist is retried without them, the commas staying text.
    """
    name = word[len(PREFIX) :].strip("\n")
    parts = name.split()
    name, leftover = (parts[0], " ".join(parts[1:])) if parts else ("", "")
    cut = next((i for i, ch in enumerate(name) if ch in "<["), None)
    if cut is not None:
        leftover = name[cut:] + (" " + leftover if leftover else "")
        name = name[:cut]
    rows = library.rows(name)
    if rows is not None:
        return name, rows, leftover
    stripped = name.strip(",")
    if len(stripped) < len(name):
        rows = library.rows(stripped)
        leftover = f"{name[len(stripped) :]} {leftover}"
        if rows is not None:
            return stripped, rows, leftover
    hint = "" if library.folder is not None else " (no embeddings folder given: pass --embeddings DIR)"
    log.warning("embedding:%s does not exist%s, ignoring", name, hint)
    return None, 0, leftover
