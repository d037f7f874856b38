"""kohya sd-scripts dataset habits read by ingest: `N_name` repeat folders and tag-list `.txt`.

kohya's DreamBooth-style layout puts images in `train_dir/10_cat/`, `train_dir/3_dog/`: the
number is how many times each image of the folder is repeated per epoch, the rest names the
concept. Ingest records the name as the image's `source` (unless a sidecar sets one) and the
number as `repeats` in the manifest's `extra`; the trainer's dataset mixing reads it.

kohya users also keep WD14-tagger output (`1girl, solo, long hair`) in `.txt` files, which bigasp
otherwise reads as a caption. `looks_like_tags` is the documented rule that tells them apart.
"""

from __future__ import annotations

import hashlib
import os
import re

REPEAT_DIR = re.compile(r"^([1-9][0-9]{0,5})_(.+)$")  # kohya: `<repeats>_<name>`, repeats >= 1
SENTENCE_END = re.compile(r"[.!?](\s|$)")
MIN_TAGS = 3
MAX_TAG_WORDS = 4
MAX_TAG_CHARS = 48

_layout_cache: dict[str, tuple[int, bool]] = {}


def looks_like_tags(text: str) -> bool:
    """A `.txt` is a tag list when it is one line of at least 3 comma-separated items, each at
    most 4 words and 48 characters, with no sentence ending (`.`, `!` or `?` before a space or
    at the end). `1girl, solo, long hair, smile` is tags; `A woman in a field, smiling, at
    sunset.` is a caption (it ends a sentence)."""
    text = text.strip()
    if not text or "\n" in text or SENTENCE_END.search(text):
        return False
    items = [t.strip() for t in text.split(",")]
    if len(items) < MIN_TAGS or any(not t for t in items[:-1]):
        return False
    return all(len(t) <= MAX_TAG_CHARS and len(t.split()) <= MAX_TAG_WORDS for t in items if t)


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def is_kohya_root(origin: str) -> bool:
    """A source folder is laid out as kohya's when it has at least one subfolder and every
    (non-hidden) subfolder is named `N_name`. Cached per folder and its modification time."""
    try:
        mtime = os.stat(origin).st_mtime_ns
    except OSError:
        return False
    hit = _layout_cache.get(origin)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        subdirs = [e.name for e in os.scandir(origin) if not e.name.startswith(".") and e.is_dir()]
    except OSError:
        subdirs = []
    result = bool(subdirs) and all(REPEAT_DIR.match(n) for n in subdirs)
    _layout_cache[origin] = (mtime, result)
    return result


def folder_repeats(path: str, origin: str, mode: str) -> tuple[str, int] | None:
    """(name, repeats) from the `N_name` folder directly under the source folder `origin` that
    holds `path`; None for tars and path lists, other folders, or `mode` off (auto = only for a
    source laid out as kohya's, see `is_kohya_root`)."""
    if mode == "off" or "::" in path or not origin:
        return None
    root = origin.rstrip(os.sep) + os.sep
    if not path.startswith(root):
        return None
    first = path[len(root) :].split(os.sep, 1)
    if len(first) < 2:
        return None  # directly in the source folder
    m = REPEAT_DIR.match(first[0])
    if m is None or (mode == "auto" and not is_kohya_root(origin)):
        return None
    return m.group(2), int(m.group(1))


def reading_key(change_key: str, txt_tags: str, repeats: tuple[str, int] | None) -> str:
    """The change key extended by how the sidecars and folder are read, so changing those
    settings re-reads the affected images; unchanged for the defaults (no re-read on upgrade)."""
    if txt_tags == "caption" and repeats is None:
        return change_key
    salt = repr((change_key, txt_tags, repeats)).encode()
    return hashlib.blake2b(salt, digest_size=12).hexdigest()
