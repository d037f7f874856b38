"""Object storage that cannot be used at all: an unreachable endpoint, missing credentials,
refused access or a missing bucket, each told apart in one line naming what failed and where.

Without this an object store's "not found" for every key of a missing bucket reads as "not a
bigasp dataset", and a refused connection or missing credentials end in a botocore traceback.
Errors are recognised by class name, so no storage client is imported here.
"""

from __future__ import annotations

import os

from bigasp.errors import DataError


def endpoint_of(fs) -> str:
    """Where an object-storage filesystem sends its requests, for messages."""
    url = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    url = url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return str(url) if url else "the provider's default endpoint"


_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                "ServerTimeoutError", "ConnectionRefusedError", "ReadTimeoutError")  # fmt: skip
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
_DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")


def storage_error(err: BaseException, fs, url: str) -> DataError | None:
    """One line for an object store that cannot be used at all (unreachable, no credentials,
    access denied), naming the endpoint and the dataset URL; None for anything else."""
    names = {c.__name__ for c in type(err).__mro__}
    detail = " ".join(str(err).split())[:200]
    where = endpoint_of(fs)
    if names & set(_UNREACHABLE) or (isinstance(err, OSError) and err.errno in (111, 113, 101, 110)):
        return DataError(
            f"{url}: cannot reach the object store at {where} ({detail}); check the endpoint "
            "(data.storage_options.endpoint_url or AWS_ENDPOINT_URL), the network, and that the server is up"
        )
    if names & set(_NO_CREDENTIALS):
        return DataError(
            f"{url}: no credentials for the object store at {where} ({detail}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or key and secret in data.storage_options; anon = true for a public bucket)"
        )
    if isinstance(err, PermissionError) or any(d in str(err) for d in _DENIED):
        return DataError(
            f"{url}: the object store at {where} refused access ({detail}); check the credentials and that "
            "they may read this bucket"
        )
    return None


def check_bucket(fs, root: str, url: str) -> None:
    """A missing bucket says so (an object store answers "not found" for every key in it)."""
    bucket = root.split("/", 1)[0]
    try:
        there = fs.exists(bucket)
    except Exception as err:
        failure = storage_error(err, fs, url)
        if failure is None:
            raise
        raise failure from None
    if not there:
        raise DataError(
            f"{url}: bucket {bucket!r} does not exist at {endpoint_of(fs)}; check the bucket name and the endpoint "
            "(data.storage_options.endpoint_url or AWS_ENDPOINT_URL)"
        )
