"""Sidecar metadata next to an image: `name.txt` (a caption, or a tag list), kohya's
`name.caption` (a caption) and `name.json`.

JSON keys we interpret (all optional): `caption` (string or list), `captions` (list), `tags`
(list or comma-separated string), `score` (integer 0..9), `source` (string), `watermark`
(bool). Every other key is kept in the manifest's `extra` JSON column, verbatim except that
numbers JSON cannot hold (NaN, Infinity, overflowing values such as 1e400 or 5000-digit
integers) become null there, so `extra` is always valid JSON.

Downloader provenance (`check_download`): a failed `status` rejects the image as
`download_failed`, a `sha256` that does not match its bytes as `checksum_mismatch`; both keys
stay in `extra` too. A Parquet row's other columns are read as this JSON object.

Any sidecar problem is a `bad_sidecar` reject naming the file and the key; nothing in a
sidecar (nesting thousands deep, lone surrogates, huge numbers) may raise anything else.
"""

from __future__ import annotations

import json
import math
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


MAX_DEPTH = 64  # nesting allowed in a sidecar; deeper is a bad_sidecar (and would overflow the stack)
_MAX_INT_DIGITS = 4000  # below Python's int-from-string limit (4300)


def _parse_int(text: str) -> int | float:
    return int(text) if len(text.lstrip("-")) <= _MAX_INT_DIGITS else float("inf")


def _depth(raw: str) -> int:
    """Deepest bracket nesting outside strings, without recursion (checked before json.loads)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in raw:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _finite(value: Any) -> Any:
    """`value` with non-finite floats replaced by None (JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _text(value: str, key: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(
            name, f"'{key}' holds an invalid Unicode escape (a lone surrogate such as \\ud800)"
        ) from None
    return value


def parse_sidecars(
    txt: bytes | None,
    js: bytes | None,
    *,
    txt_name: str = "",
    json_name: str = "",
    caption: bytes | None = None,
    caption_name: str = "",
    txt_tags: str = "caption",
) -> Annotations:
    """`txt_tags`: how `name.txt` is read: caption, tags (a comma-separated tag list) or auto
    (tags when `kohya.looks_like_tags`). kohya's `name.caption` is always a caption."""
    from bigasp.prep.kohya import looks_like_tags, split_tags

    out = Annotations()
    for raw_text, name, as_tags in ((txt, txt_name, txt_tags), (caption, caption_name, "caption")):
        if raw_text is None:
            continue
        try:
            text = raw_text.decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            raise _bad(name, f"not UTF-8 text ({err})") from None
        if not text:
            continue
        if as_tags == "tags" or (as_tags == "auto" and looks_like_tags(text)):
            out.tags = split_tags(text)
        else:
            out.captions.append(text)
    if js is None:
        return out
    try:
        raw = js.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _bad(json_name, f"not UTF-8 text ({err})") from None
    if raw.count("[") + raw.count("{") > MAX_DEPTH and _depth(raw) > MAX_DEPTH:
        raise _bad(json_name, f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(raw, parse_int=_parse_int)
    except (json.JSONDecodeError, ValueError, RecursionError) as err:
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
            shown = (
                repr(value)
                if isinstance(value, float) or (isinstance(value, int) and abs(value) < 10**30)
                else "a huge integer"
                if isinstance(value, int)
                else type(value).__name__
            )
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value != int(value)
            ):
                raise _bad(json_name, f"'score' must be an integer 0..9, got {shown}")
            if not 0 <= int(value) <= 9:
                raise _bad(json_name, f"'score' must be in 0..9, got {shown}")
            out.score = int(value)
        elif key == "source":
            if value is not None and not isinstance(value, str):
                raise _bad(json_name, f"'source' must be a string, got {type(value).__name__}")
            out.source = None if value is None else _text(value, key, json_name)
        elif key == "watermark":
            if value is not None and not isinstance(value, bool) and value not in (0, 1):
                raise _bad(json_name, f"'watermark' must be true/false, got {type(value).__name__}")
            out.watermark = None if value is None else bool(value)
        else:
            out.extra[_text(key, key, json_name)] = _finite(value)
    out.captions = [_text(c, "caption", json_name) for c in out.captions]
    out.tags = [_text(t, "tags", json_name) for t in out.tags]
    try:
        json.dumps(out.extra, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(
            json_name, "a value holds an invalid Unicode escape (a lone surrogate such as \\ud800)"
        ) from None
    seen: set[str] = set()
    out.captions = [c for c in out.captions if not (c in seen or seen.add(c))]
    return out


def img2dataset_record(extra: dict[str, Any]) -> bool:
    """A record img2dataset wrote (its `.json` sidecar or metadata row): it carries `status` and
    `original_width`/`original_height` next to the downloaded file's `sha256`."""
    return "status" in extra and ("original_width" in extra or "original_height" in extra)


def status_failed(extra: dict[str, Any], name: str) -> None:
    """A downloader's record saying the download failed rejects the image as `download_failed`,
    with its `error_message`: an img2dataset record whose `status` is not "success"
    (failed_to_download, failed_to_resize, ...), or any `status` starting with "fail". Other
    statuses of other sidecars ("draft", "published") mean something else and are kept in `extra`."""
    status = extra.get("status")
    if not isinstance(status, str) or status == "success":
        return
    if not (status.lower().startswith("fail") or img2dataset_record(extra)):
        return
    why = extra.get("error_message")
    raise Reject(
        "download_failed",
        f"{name}: status {status!r}"
        + (f" ({why})" if why else "")
        + ", so the downloader did not store this image as downloaded; download it again, or drop the sample",
    )


def check_download(extra: dict[str, Any], name: str, actual_sha256: str | None, checksums: str) -> None:
    """Downloader provenance in a sidecar: `status` must be success (see `status_failed`), and a
    `sha256` must match the image bytes' (`actual_sha256`) where `checksums` says to check it:
    verify = always; auto = unless it is img2dataset's record, whose sha256 is of the file as
    downloaded, before img2dataset resized or re-encoded it; off = never."""
    status_failed(extra, name)
    expected = extra.get("sha256")
    if expected is None or checksums == "off" or (checksums == "auto" and img2dataset_record(extra)):
        return
    if (
        not isinstance(expected, str)
        or len(expected) != 64
        or any(c not in "0123456789abcdefABCDEF" for c in expected)
    ):
        raise _bad(name, f"'sha256' must be 64 hex digits, got {str(expected)[:80]!r}")
    if actual_sha256 is not None and expected.lower() != actual_sha256:
        fix = "--checksums auto" if checksums == "verify" and img2dataset_record(extra) else "--checksums off"
        raise Reject(
            "checksum_mismatch",
            f"{name}: sha256 {expected.lower()} recorded, but the image bytes hash to {actual_sha256}: the image is "
            f"not the recorded file (damaged, replaced or re-encoded); restore or re-download it ({fix} keeps it)",
        )
