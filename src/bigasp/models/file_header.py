"""What a `.safetensors` file holds, read from its header alone: no torch, no tensor bytes.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (per tensor:
dtype, shape, byte offsets; plus `__metadata__`), then the raw tensor data. `bigasp model info`
on a 7 GB single-file SDXL needs only the JSON: shapes give parameter counts, the metadata
gives the model kind. Reading it takes milliseconds and a few hundred KB, whatever the file size
(the data section is never read: only its length is compared with what the header promises, so a
truncated download is called damaged rather than fine).

The single-file key layout and metadata names live here too, so that this view needs no torch;
`bigasp.models.single_file` (which does the loading and saving) uses the same constants.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigasp.errors import ModelLoadError
from bigasp.models.components import ModelKind

FORMAT_VERSION = 1
META_FORMAT = "bigasp.format_version"  # version of this layout + metadata convention
META_KIND = "bigasp.model_kind"  # JSON of ModelKind.to_json(): prediction, shift
META_COMPONENTS = "bigasp.components"  # comma-separated components the file holds

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}

# safetensors dtype codes -> torch names (as `bigasp model info` prints them for every source)
DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)  # [begin, end) bytes within the data section

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    header_bytes: int  # 8 + N: where the data section starts

    @property
    def data_end(self) -> int:
        """File size the header requires: the data section ends at the largest tensor end offset."""
        return self.header_bytes + max((e.offsets[1] for e in self.tensors.values()), default=0)


def read_header(path: str | os.PathLike) -> Header:
    """Parse the header of a safetensors file; reads 8 + N bytes and nothing else."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(
                    f"{path} is not a .safetensors file: shorter than its 8-byte header length"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER:
                raise ModelLoadError(
                    f"{path} is not a .safetensors file: header length {n} is implausible (limit {MAX_HEADER})"
                )
            raw = f.read(n)
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from None
    if len(raw) < n:
        raise ModelLoadError(f"{path} is truncated inside its header ({len(raw)} of {n} bytes)")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not a .safetensors file: its header is not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a .safetensors file: its header is not a JSON object")
    metadata = data.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in data.items():
        try:
            begin, end = (int(o) for o in entry["data_offsets"])
            tensors[name] = TensorEntry(
                str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), (begin, end)
            )
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(
                f"{path}: header entry {name!r} has no valid dtype/shape/data_offsets"
            ) from None
        if not 0 <= begin <= end:
            raise ModelLoadError(f"{path} is damaged: header entry {name!r} has data offsets {[begin, end]}")
    return Header(tensors=tensors, metadata=dict(metadata), header_bytes=8 + n)


def kind_from_metadata(metadata: Mapping[str, str] | None, source: str = "") -> ModelKind | None:
    """The model kind a file records in its metadata (bigasp writes it), or None."""
    if not metadata or META_KIND not in metadata:
        return None
    try:
        data = json.loads(metadata[META_KIND])
    except json.JSONDecodeError:
        raise ModelLoadError(f"{source}: metadata {META_KIND} is not JSON: {metadata[META_KIND]!r}") from None
    return ModelKind.from_json(data, f"{source} metadata {META_KIND}")


def _dtype_summary(codes: Counter[str]) -> str:
    """One dtype name, or the mix by parameter count (largest first) when the file mixes them."""
    names = [DTYPES.get(c, c.lower()) for c, _ in codes.most_common()]
    return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)


def single_file_info(path: str | os.PathLike) -> dict[str, Any]:
    """`bigasp model info` for a single .safetensors file, from its header only.

    `parameters` counts the elements of the floating-point tensors of each component (integer
    tensors such as CLIP's `position_ids` are buffers, not parameters); they equal the loaded
    modules' parameter counts. `kind` is what the file records, or eps (every SDXL file that
    predates bigasp) with `kind_recorded: false`.
    """
    header = read_header(path)
    size = Path(path).stat().st_size
    if size < header.data_end:
        raise ModelLoadError(
            f"{path} is damaged: its header places tensor data up to byte {header.data_end:,} but the "
            f"file has only {size:,} bytes (an interrupted download or copy?); download or export it again"
        )
    components: dict[str, dict[str, Any]] = {}
    other: Counter[str] = Counter()
    for comp, prefix in PREFIXES.items():
        entries = [e for k, e in header.tensors.items() if k.startswith(prefix)]
        floats = [e for e in entries if e.dtype in FLOAT_CODES]
        if not floats:
            continue
        codes: Counter[str] = Counter()
        for e in floats:
            codes[e.dtype] += e.numel
        components[comp] = {
            "parameters": sum(e.numel for e in floats),
            "dtype": _dtype_summary(codes),
            "tensors": len(entries),
        }
    for key in header.tensors:
        if not key.startswith(tuple(PREFIXES.values())):
            other[key.split(".")[0]] += 1
    recorded = kind_from_metadata(header.metadata, str(path))
    kind = recorded or ModelKind()
    return {
        "source": str(path),
        "format": "single-file safetensors",
        "kind": kind.to_json(),
        "kind_recorded": recorded is not None,
        "components": components,
        "other_tensors": dict(other),
        "tensors": len(header.tensors),
        "file_bytes": size,
        "metadata": header.metadata,
    }
