"""Keyed randomness: every random choice derives from (seed, what, item), never a global RNG."""

from __future__ import annotations

import hashlib

import numpy as np


def key64(seed: int, *parts: object) -> int:
    """A 63-bit integer key from the seed and any parts (strings, ints); stable across processes."""
    text = "\x1f".join([str(seed), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(key64(seed, *parts))


def torch_generator(seed: int, *parts: object):
    import torch

    return torch.Generator().manual_seed(key64(seed, *parts))
