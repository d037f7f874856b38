"""A local working copy of a dataset that lives at a URL (s3://bucket/ds, any fsspec URL).

Ingest and annotate write their tables with rename-based atomicity, keep crash-safe parts
and take a file lock, none of which object storage offers; so for a dataset at a URL they
run in a working copy on this machine's disk and exchange only finished files with the URL:

- `pull` copies the dataset's tables (and, where asked, annotation parts) from the URL;
- the command runs on the working copy exactly as on a local dataset (a killed run keeps its
  parts there, and the re-run folds them);
- `push` writes the finished files to the URL, one PUT each (an object is absent or whole),
  the manifest last: it is the commit point encode and training read.

The working copy is `~/.cache/bigasp/datasets/<hash of the URL>` (or `$BIGASP_WORK_DIR/<hash>`,
or the `--work` folder). After each pull or push it records the ETag of the manifest it
matches, so a run killed after folding but before pushing keeps its newer local tables on the
re-run instead of pulling the older ones back.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from bigasp.errors import DataError
from bigasp.fsutil import atomic_path, atomic_write_bytes
from bigasp.store import layout, remote

DEFAULT_WORK_DIR = "~/.cache/bigasp/datasets"
SOURCES = "sources.parquet"
URL_SHARDS = "url_shards.parquet"
# the ingest tables; the manifest last: a reader of the URL sees it only once the rest is there
TABLES = (SOURCES, layout.REJECTS, URL_SHARDS, layout.DATASET_JSON, layout.MANIFEST)
ANNOTATIONS = "annotations"
_MARK = ".pulled-manifest"  # the URL manifest's version this working copy matches


def work_dir(url: str, work: str | os.PathLike | None = None) -> Path:
    """The working copy of the dataset at `url`: `work` itself when given, else a cache folder."""
    if work:
        return Path(work).expanduser()
    base = Path(os.environ.get("BIGASP_WORK_DIR") or DEFAULT_WORK_DIR).expanduser()
    return base / hashlib.blake2b(url.rstrip("/").encode(), digest_size=8).hexdigest()


def _fs(url: str, storage_options):
    remote.configure(storage_options)
    return remote.filesystem(url.rstrip("/"))


def _check(url: str, fn):
    """`fn()` with access / missing-bucket failures said in one line naming the dataset URL."""
    try:
        return remote.call(url, fn)
    except remote.RemoteAccessError:
        raise
    except FileNotFoundError as err:
        raise DataError(
            f"dataset {url} cannot be reached: {str(err).splitlines()[0] if str(err) else 'not found'}; "
            "check the bucket name, the prefix and the endpoint (storage_options endpoint_url)"
        ) from None
    except OSError as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"dataset {url} cannot be reached: {detail}; check the bucket name, the credentials and the endpoint "
            "(storage_options endpoint_url)"
        ) from None


def _version(fs, path: str) -> str:
    try:
        return remote.version(fs.info(path))
    except FileNotFoundError:
        return ""


def pull(
    url: str, local: Path, storage_options=None, *, annotations: Iterable[str] = (), tables=TABLES
) -> None:
    """Bring the working copy up to the dataset at `url`: its tables (skipped when the URL's
    manifest is the one this copy last matched) and the annotation parts of `annotations`
    stages not here yet (parts never change once written)."""
    fs, root = _fs(url, storage_options)
    local.mkdir(parents=True, exist_ok=True)
    bucket = root.split("/", 1)[0]
    if bucket and not _check(url, lambda: fs.exists(bucket)):  # one cheap request (S3: HeadBucket)
        raise DataError(
            f"dataset {url} cannot be reached: there is no bucket {bucket!r}; check the bucket name and the "
            "endpoint (storage_options endpoint_url), or create the bucket"
        )
    fs.invalidate_cache(root)  # a listing cached earlier in this process may predate another machine's push
    mark = local / _MARK
    seen = _check(url, lambda: _version(fs, f"{root}/{layout.MANIFEST}"))
    if not (seen and mark.exists() and mark.read_text() == seen):
        for name in tables:
            src = f"{root}/{name}"
            if _check(url, lambda src=src: fs.exists(src)):
                with atomic_path(local / name) as tmp:
                    _check(url, lambda src=src, tmp=tmp: fs.get_file(src, str(tmp)))
        atomic_write_bytes(mark, seen.encode())
    for stage in annotations:
        base = f"{root}/{ANNOTATIONS}/{stage}"
        if not _check(url, lambda base=base: fs.exists(base)):
            continue
        for src in _check(url, lambda base=base: fs.find(base)):
            rel = src[len(root) + 1 :]
            dst = local / rel
            if layout.visible(rel) and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(dst) as tmp:
                    _check(url, lambda src=src, tmp=tmp: fs.get_file(src, str(tmp)))
    snap = f"{root}/{ANNOTATIONS}/sidecar-values.parquet"
    if _check(url, lambda: fs.exists(snap)):
        (local / ANNOTATIONS).mkdir(exist_ok=True)
        with atomic_path(local / ANNOTATIONS / "sidecar-values.parquet") as tmp:
            _check(url, lambda: fs.get_file(snap, str(tmp)))


def pull_file(url: str, local: Path, name: str, storage_options=None) -> Path | None:
    """The dataset's file `name` (e.g. quality/scorer.safetensors) copied into the working copy,
    fresh each time; None when the URL has no such file."""
    fs, root = _fs(url, storage_options)
    src = f"{root}/{name}"
    fs.invalidate_cache(src.rsplit("/", 1)[0])
    if not _check(url, lambda: fs.exists(src)):
        return None
    dst = local / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        _check(url, lambda: fs.get_file(src, str(tmp)))
    return dst


def push(url: str, local: Path, storage_options=None, *, tables=TABLES, annotations: bool = False) -> None:
    """Write the working copy's finished files to `url`: new annotation parts (and the
    sidecar snapshot) first, then the tables, the manifest last. Never `parts/` or locks."""
    fs, root = _fs(url, storage_options)
    if annotations and (local / ANNOTATIONS).is_dir():
        base = f"{root}/{ANNOTATIONS}"
        fs.invalidate_cache(base)
        there = set(_check(url, lambda: fs.find(base))) if _check(url, lambda: fs.exists(base)) else set()
        for p in sorted((local / ANNOTATIONS).rglob("*.parquet")):
            rel = p.relative_to(local).as_posix()
            if not all(layout.visible(s) for s in rel.split("/")):
                continue
            dst = f"{root}/{rel}"
            if p.name == "sidecar-values.parquet" or dst not in there:  # parts never change once written
                _check(url, lambda p=p, dst=dst: fs.put_file(str(p), dst))
    pushed = False
    for name in tables:
        if (local / name).exists():
            _check(url, lambda name=name: fs.put_file(str(local / name), f"{root}/{name}"))
            pushed |= name == layout.MANIFEST
    if pushed:
        fs.invalidate_cache(root)
        atomic_write_bytes(
            local / _MARK, _check(url, lambda: _version(fs, f"{root}/{layout.MANIFEST}")).encode()
        )
