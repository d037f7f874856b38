"""Summary numbers for `bigasp dataset info`: what is in a dataset and what it costs on disk."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from bigasp.store import layout
from bigasp.store.manifest import read_dataset_json, read_index, read_manifest, read_rejects


def dataset_info(root: str, storage_options: dict | None = None) -> dict[str, Any]:
    fs, path = layout.url_to_fs(root, storage_options)
    meta = read_dataset_json(fs, path)
    manifest = read_manifest(fs, path)
    rejects = read_rejects(fs, path)
    index = read_index(fs, path)
    ids = set(manifest.column("id").to_pylist())
    per_id = Counter(index.column("id").to_pylist())  # latent variants stored per image
    latent_ids = set(per_id)
    variant_bytes: Counter[int] = Counter()
    for v, n in zip(index.column("variant").to_pylist(), index.column("length").to_pylist(), strict=True):
        variant_bytes[v] += n
    ids_list = index.column("id").to_pylist()  # sorted by (id, variant): an image's first row is its own
    first = index.take(
        pa.array([k for k, x in enumerate(ids_list) if k == 0 or ids_list[k - 1] != x], pa.int64())
    )
    by_reason = Counter(
        f"{s}:{r}"
        for s, r in zip(
            rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist(), strict=True
        )
    )
    hist = Counter(
        f"{w}x{h}"
        for h, w in zip(
            first.column("bucket_height").to_pylist(), first.column("bucket_width").to_pylist(), strict=True
        )
    )
    sizes: Counter[str] = Counter()
    stale = 0
    for f, info in fs.find(path, detail=True).items():
        rel = f[len(path) + 1 :]
        size = int(info.get("size") or 0)
        if any(part.startswith(".") for part in rel.split("/")):
            stale += size
            continue
        key = rel.split("/")[1] if rel.startswith(layout.LATENTS_DIR + "/") else rel.split("/")[0]
        sizes[key] += size
    from bigasp.store.annotations import coverage

    annotations = coverage(path, ids) if layout.is_local(fs) else {}
    return {
        "root": root,
        "format_version": meta.get("format_version"),
        "images": len(manifest),
        "latents": len(latent_ids & ids),
        "not_encoded": len(ids - latent_ids),
        # variants per image -> images with that many; bytes of latent records per variant
        "variants": {str(k): n for k, n in sorted(Counter(per_id[i] for i in latent_ids & ids).items())},
        "latent_records": len(index),
        "variant_bytes": {str(v): n for v, n in sorted(variant_bytes.items())},
        "rejects": dict(sorted(by_reason.items())),
        "buckets": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
        "annotations": annotations,
        "bytes": {**dict(sorted(sizes.items())), "total": sum(sizes.values()), "stale_temp": stale},
    }
