"""Summary numbers for `bigasp dataset info`: what is in a dataset and what it costs on disk."""

from __future__ import annotations

from collections import Counter
from typing import Any

from bigasp.store import layout
from bigasp.store.manifest import read_dataset_json, read_index, read_manifest, read_rejects


def dataset_info(root: str, storage_options: dict | None = None) -> dict[str, Any]:
    fs, path = layout.url_to_fs(root, storage_options)
    meta = read_dataset_json(fs, path)
    manifest = read_manifest(fs, path)
    rejects = read_rejects(fs, path)
    index = read_index(fs, path)
    ids = set(manifest.column("id").to_pylist())
    latent_ids = set(index.column("id").to_pylist())
    by_reason = Counter(
        f"{s}:{r}"
        for s, r in zip(
            rejects.column("stage").to_pylist(), rejects.column("reason").to_pylist(), strict=True
        )
    )
    hist = Counter(
        f"{w}x{h}"
        for h, w in zip(
            index.column("bucket_height").to_pylist(), index.column("bucket_width").to_pylist(), strict=True
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
        "rejects": dict(sorted(by_reason.items())),
        "buckets": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
        "annotations": annotations,
        "bytes": {**dict(sorted(sizes.items())), "total": sum(sizes.values()), "stale_temp": stale},
    }
