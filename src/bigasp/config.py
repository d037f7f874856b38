"""Typed configuration: TOML files validated into pydantic models, plus CLI overrides.

Every stage's config is a `Section` subclass: unknown keys are errors (typos never pass
silently), values are validated, and the error names the file, the dotted key and the
allowed values. Overrides use `dotted.key=value` with the value parsed as TOML, so
`train.lr=2e-4` and `train.precision="bf16"` both work.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bigasp.errors import ConfigError

T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """Base for every config block: strict keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (['a','b','c'], parsed VALUE). Bare words are taken as strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. train.lr=2e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as bf16 or a path
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted override applied."""
    out = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a table")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def override_origins(overrides: Iterable[str]) -> dict[str, str]:
    """Dotted key -> the `--set key=value` text that set it (later overrides win)."""
    out: dict[str, str] = {}
    for item in overrides:
        path, _ = parse_override(item)
        out[".".join(path)] = f"--set {item}"
    return out


def _origin(key: str, origins: Mapping[str, str]) -> str | None:
    """The override that set `key` or one of its parent tables, if any."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        hit = origins.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    return None


def format_validation_error(
    err: ValidationError, source: str, origins: Mapping[str, str] | None = None
) -> str:
    """One line naming every bad key, its value and where the value came from: the file, or the
    command-line override / flag that set it (`origins`: dotted key -> how it was given)."""
    origins = origins or {}
    items, from_file = [], False
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see docs/ for the allowed keys)"
        elif "ctx" in e and "expected" in e["ctx"]:
            msg = f"{msg} (allowed: {e['ctx']['expected']})"
        origin = _origin(key, origins)
        from_file = from_file or origin is None
        where = f", from {origin}" if origin else ""
        items.append(f"{key}: {msg} (got {e.get('input')!r}{where})")
    head = f"invalid config in {source}" if from_file else "invalid command-line override"
    return f"{head}: " + "; ".join(items)


def validate(
    model: type[T],
    data: Mapping[str, Any],
    source: str = "<config>",
    origins: Mapping[str, str] | None = None,
) -> T:
    """Validate plain data into `model`, turning pydantic errors into a readable ConfigError.

    `origins` names the keys that came from the command line (dotted key -> `--set ...` / flag),
    so an error in one of them blames the override, not the file."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, origins)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); TOML files must be "
            "UTF-8: re-save it as UTF-8 in your editor"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None


def load_config(model: type[T], path: str | Path | None, overrides: Iterable[str] = ()) -> T:
    """Read TOML (or start from defaults when `path` is None), apply overrides, validate."""
    overrides = list(overrides)
    data = read_toml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate(model, data, str(path) if path is not None else "<defaults>", override_origins(overrides))


def load_stage_config(
    model: type[T],
    section: str,
    path: str | Path | None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> T:
    """A stage's config (ingest, encode, annotate ...): the file's `[section]` table (or the whole
    file when it has none), then `--set` overrides, then the command's own flags (dotted keys;
    None or [] = not given). An invalid value blames the flag or override that set it.
    `flag_names` spells a flag whose name is not the key's (default `--embed-model` for
    `embed.model`)."""
    overrides = list(overrides)
    data = read_toml(path) if path else {}
    data = data.get(section, data) if isinstance(data.get(section), dict) else data
    data = apply_overrides(data, overrides)
    origins = override_origins(overrides)
    for key, value in (flags or {}).items():
        if value is None or value == []:
            continue
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        name = (flag_names or {}).get(key) or "--" + key.replace(".", "-").replace("_", "-")
        origins[key] = f"{name} {value}"
    return validate(model, data, str(path) if path else "command-line flags", origins)


def dump_toml(data: Mapping[str, Any]) -> str:
    """Serialise plain config data to TOML with tomli-w; `None` (TOML has no null) is dropped.

    `read_toml(dump_toml(d))` validates to the same config: the resolved config saved beside
    every checkpoint reproduces the run.
    """
    import tomli_w

    return tomli_w.dumps(_without_none(data))


def _without_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_none(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
