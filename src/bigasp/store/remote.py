"""Photos at URLs (s3://, gs://, http(s)://, file://): ranged reads with retries, one-line errors.

Ingest, annotate and encode read the photos of a dataset whose images live in object storage
through this module, so each stage fetches only the bytes of the images it handles (a tar
member is one ranged GET of its byte range, never the whole shard) and every stage treats
object-storage failures alike:

- a transient failure (timeout, dropped connection, a 5xx or throttling reply) is retried with
  exponential backoff and counted (`stats()`; ingest logs the count);
- a missing object is a `FileNotFoundError` (the caller records a reject);
- bad credentials, a missing bucket, a denied permission or a store that failed every attempt
  (refused connection, timeouts) is a `RemoteAccessError`: one line naming the URL and what to
  check, because retrying further or rejecting every image cannot fix it.

fsspec options (an endpoint, keys) come from `configure()`: the CLI passes the config's
`storage_options`, as the latent store does; unset = the usual AWS_* / GOOGLE_* variables.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bigasp.errors import DataError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
ATTEMPTS = 6  # first try + 5 retries: 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s of backoff at most
BACKOFF_S = 0.1

_options: dict[str, Any] = {}
_fs_cache: dict[str, Any] = {}
_lock = threading.Lock()
_stats = {"requests": 0, "retries": 0, "bytes": 0}

T = TypeVar("T")


class RemoteAccessError(DataError):
    """Credentials, bucket or permission problem: no retry or per-image reject can fix it."""


def is_url(path: str) -> bool:
    """True for `scheme://...` (s3, gs, http(s), file ...); local paths are read with open()."""
    return bool(_URL.match(path))


def configure(storage_options: dict[str, Any] | None) -> None:
    """fsspec options for every URL read in this process (and in workers forked after it)."""
    global _options
    with _lock:
        if dict(storage_options or {}) != _options:
            _options = dict(storage_options or {})
            _fs_cache.clear()


def filesystem(url: str):
    """(fs, path) for `url`, one filesystem object per protocol and process."""
    import fsspec

    proto = url.split("://", 1)[0].lower()
    with _lock:
        fs = _fs_cache.get(proto)
        if fs is None:
            opts = dict(_options) if proto not in ("file", "local") else {}
            if proto in ("s3", "s3a") and "config_kwargs" not in opts:
                # this module retries (counted, with backoff); botocore's own silent retries would hide them
                opts["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
            try:
                fs = fsspec.filesystem(proto, **opts)
            except (ImportError, ValueError) as err:
                raise DataError(f"cannot read {url}: {err}") from None
            if proto in ("s3", "s3a"):
                fs.retries = 1  # s3fs's own retry loop, likewise
            _fs_cache[proto] = fs
    return fs, fs._strip_protocol(url)


def _after_fork() -> None:
    """A forked worker builds its own filesystem objects: the parent's event loop is not its."""
    global _lock
    _lock = threading.Lock()
    _fs_cache.clear()


os.register_at_fork(after_in_child=_after_fork)


def stats() -> dict[str, int]:
    """Requests, retried transient failures and bytes fetched by this process so far."""
    return dict(_stats)


def _count(key: str, n: int = 1) -> None:
    with _lock:
        _stats[key] += n


def _transient(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(err, TimeoutError | ConnectionError):
        return True
    name = type(err).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientPayloadError"):
        return True
    if name in ("ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "IncompleteRead"):
        return True
    if isinstance(err, OSError):
        if err.errno in (errno.EBUSY, errno.EAGAIN, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET):
            return True  # s3fs's codes for 503 SlowDown / ServiceUnavailable, InternalError, timeouts
        text = str(err)
        return any(
            s in text for s in ("SlowDown", "Service Unavailable", "ServiceUnavailable", "InternalError")
        )
    return False


def _access(err: BaseException) -> bool:
    name = type(err).__name__
    return isinstance(err, PermissionError) or name in (
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "InvalidAccessKeyId",
    )


def access_error(url: str, err: BaseException) -> RemoteAccessError:
    """The one line for a credentials / permission failure on `url`."""
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return RemoteAccessError(
        f"cannot read {url}: access denied ({detail}); check the credentials (AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY or storage_options key/secret), the endpoint and the bucket's permissions"
    )


def unreachable_error(url: str, err: BaseException) -> RemoteAccessError:
    """The one line for a store that failed every attempt (refused connection, timeouts, 5xx):
    the run stops, since every other image would fail alike (and would otherwise be rejected)."""
    from bigasp.store.reach import endpoint_of

    detail = " ".join(str(err).split())[:200] or type(err).__name__
    try:
        where = endpoint_of(filesystem(url)[0])
    except Exception:  # naming the endpoint must not hide the failure itself
        where = "its endpoint"
    return RemoteAccessError(
        f"cannot read {url}: the object store at {where} failed {ATTEMPTS} attempts ({detail}); check the "
        "endpoint (storage_options endpoint_url or AWS_ENDPOINT_URL), the network and that the server is up, "
        "then run the same command again: the work committed so far is kept"
    )


def call(url: str, fn: Callable[[], T]) -> T:
    """`fn()` with transient failures retried (backoff, counted) and access failures in one line."""
    for attempt in range(ATTEMPTS):
        _count("requests")
        try:
            return fn()
        except Exception as err:  # classified below; anything unknown propagates unchanged
            if _access(err):
                raise access_error(url, err) from None
            if not _transient(err):
                raise
            if attempt == ATTEMPTS - 1:
                raise unreachable_error(url, err) from None
            _count("retries")
            time.sleep(BACKOFF_S * (2**attempt))
    raise AssertionError("unreachable")


def read_range(url: str, start: int | None = None, size: int | None = None) -> bytes:
    """Bytes [start, start+size) of the object at `url` (the whole object when start is None)."""
    fs, path = filesystem(url)
    if start is None:
        data = call(url, lambda: fs.cat_file(path))
    else:
        data = call(url, lambda: fs.cat_file(path, start=start, end=start + (size or 0)))
    _count("bytes", len(data))
    if start is not None and len(data) > (size or 0):
        raise OSError(
            f"{url}: asked for {size} bytes at {start}, got {len(data)}: the server ignores ranged reads "
            "(HTTP Range); serve the files from one that supports them (any object store does)"
        )
    return data


def info(url: str) -> dict[str, Any]:
    """fsspec's info for `url` (size, type, ETag or mtime)."""
    fs, path = filesystem(url)
    return call(url, lambda: fs.info(path))


def version(meta: dict[str, Any]) -> str:
    """What changes when an object is rewritten: its ETag (object stores) or mtime (files)."""
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "created"):
        v = meta.get(key)
        if v is not None:
            return str(v).strip('"')
    return ""


def bucket_error(url: str, err: BaseException) -> DataError:
    """One line for a source root that cannot be listed (missing bucket or prefix)."""
    return DataError(
        f"ingest source {url} cannot be listed: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
        "check the bucket name, the prefix and the endpoint (storage_options endpoint_url)"
    )
