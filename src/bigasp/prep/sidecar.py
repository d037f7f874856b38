"""Sidecar metadata next to an image: `name.txt` (a caption) and `name.json`.

JSON keys we interpret (all optional): `caption` (string or list), `captions` (list), `tags`
(list or comma-separated string), `score` (integer 0..9), `source` (string), `watermark`
(bool). Every other key is kept verbatim in the manifest's `extra` JSON column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bigasp.prep.images import Reject


@dataclass
class Annotations:
    captions: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    score: int | None = None
    source: str | None = None
    watermark: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _bad(name: str, msg: str) -> Reject:
    return Reject("bad_sidecar", f"{name}: {msg}")


def _strings(value: Any, key: str, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _bad(name, f"'{key}' must be a string or a list of strings, got {type(value).__name__}")


def parse_sidecars(
    txt: bytes | None, js: bytes | None, *, txt_name: str = "", json_name: str = ""
) -> Annotations:
    out = Annotations()
    if txt is not None:
        try:
            text = txt.decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            raise _bad(txt_name, f"not UTF-8 text ({err})") from None
        if text:
            out.captions.append(text)
    if js is None:
        return out
    try:
        data = json.loads(js.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(json_name, f"invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise _bad(json_name, f"top level must be an object, got {type(data).__name__}")
    for key, value in data.items():
        if key in ("caption", "captions"):
            if value is not None:
                out.captions.extend(c.strip() for c in _strings(value, key, json_name) if c.strip())
        elif key == "tags":
            if isinstance(value, str):
                out.tags = [t.strip() for t in value.split(",") if t.strip()]
            elif value is not None:
                out.tags = [t.strip() for t in _strings(value, key, json_name) if t.strip()]
        elif key == "score":
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
                raise _bad(json_name, f"'score' must be an integer 0..9, got {value!r}")
            if not 0 <= int(value) <= 9:
                raise _bad(json_name, f"'score' must be in 0..9, got {value}")
            out.score = int(value)
        elif key == "source":
            if value is not None and not isinstance(value, str):
                raise _bad(json_name, f"'source' must be a string, got {value!r}")
            out.source = value
        elif key == "watermark":
            if value is not None and not isinstance(value, bool) and value not in (0, 1):
                raise _bad(json_name, f"'watermark' must be true/false, got {value!r}")
            out.watermark = None if value is None else bool(value)
        else:
            out.extra[key] = value
    seen: set[str] = set()
    out.captions = [c for c in out.captions if not (c in seen or seen.add(c))]
    return out
