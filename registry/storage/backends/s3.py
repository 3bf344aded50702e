"""S3-compatible backend (AWS S3, MinIO, GCS's S3 API...) through boto3.

A store ``s3://bucket/prefix`` keeps every key of the local layout as the object
``<prefix>/<key>``. Nothing is locked: correctness across machines comes from S3's
conditional writes, which the store uses for every change that could race --

* ``put_object(IfNoneMatch="*")`` for create-only keys (blobs, manifests, name bindings,
  audit entries): HTTP 412 means someone else created it first;
* ``put_object(IfMatch=<etag>)`` / ``delete_object(IfMatch=<etag>)`` for aliases and gate
  pointers: 412 (or 404: the object went away) means it moved since we read it.

Both map to :class:`registry.storage.backends.base.PreconditionFailed`; S3's 409
``ConditionalRequestConflict`` (two conditional writes in flight at once) does too, so
callers simply re-read and retry. A missing key maps to :class:`ObjectMissing`. The
service refusing or being unreachable (access denied, no credentials, connection or
timeout errors) is :class:`registry.errors.EnvironmentFailure`, exit 6.

Connection settings, most specific first: ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``,
then the JSON file ``$ADAPTERS_S3_CONFIG`` (default ``~/.config/adapterkit/s3.json``)::

    {"endpoint_url": "http://minio:9000", "region_name": "us-east-1",
     "addressing_style": "path", "connect_timeout": 10, "read_timeout": 20,
     "max_attempts": 5, "buckets": {"<bucket>": {...same keys, per bucket...}}}

The timeouts (seconds; a read timeout bounds each wait for bytes, not a whole transfer)
and attempts bound how long an endpoint that accepts connections but never answers
holds a command before exit 6: about ``max_attempts x read_timeout`` (boto3's defaults,
60 s and 5 attempts, made that six minutes).

then boto3's own defaults (``~/.aws/config``, ``$AWS_REGION``...). Credentials come
from boto3's usual chain (``$AWS_ACCESS_KEY_ID``..., profiles, instance roles).

Scratch files (blob uploads are first copied to a local temp file while hashed, so
the uploaded bytes are exactly the hashed ones) live in a per-store cache directory:
``$ADAPTERS_CACHE`` (default ``$XDG_CACHE_HOME/adapterkit`` or ``~/.cache/adapterkit``)
``/s3/<bucket>/<prefix>``. Single ``PutObject`` uploads limit one file to 5 GiB.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, BinaryIO

from registry.errors import AdapterkitError, BadInputError, EnvironmentFailure, NotFoundError
from registry.fsutil import unlink_quietly
from registry.storage.backends.base import ObjectInfo, ObjectMissing, PreconditionFailed
from registry.formats.strict_json import loads_json

_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def s3_settings(bucket: str) -> dict[str, Any]:
    """Connection settings for ``bucket`` (see the module docstring for the precedence).

    Raises:
        BadInputError: The config file is not valid JSON.
    """
    path = Path(os.environ.get("ADAPTERS_S3_CONFIG")
                or Path.home() / ".config" / "adapterkit" / "s3.json").expanduser()
    settings: dict[str, Any] = {}
    if path.is_file():
        try:
            data = loads_json(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise BadInputError(f"{path} is not valid JSON: {err}",
                                fix="fix or remove the S3 config file") from err
        if isinstance(data, dict):
            per_bucket = (data.get("buckets") or {}).get(bucket) or {}
            settings = {k: v for k, v in {**data, **per_bucket}.items() if k != "buckets"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        settings["endpoint_url"] = endpoint
    return settings


def cache_dir(bucket: str, prefix: str) -> Path:
    """The local scratch directory of an S3 store."""
    base = os.environ.get("ADAPTERS_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapterkit"
    return Path(base).expanduser() / "s3" / bucket / (prefix or "_root")


class S3Backend:
    """Objects under ``s3://bucket/prefix``.

    Args:
        bucket: Bucket name (must exist).
        prefix: Key prefix of the store inside the bucket ("" for the bucket root).

    Raises:
        BadInputError: Empty bucket name, or boto3 is not installed.
    """

    supports_locks = False

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not bucket:
            raise BadInputError("S3 store location needs a bucket",
                                fix="use s3://bucket/prefix")
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise BadInputError("S3 stores need boto3",
                                fix="pip install 'adapterkit[s3]'") from None
        settings = s3_settings(bucket)
        config = Config(s3={"addressing_style": settings.get("addressing_style", "auto")},
                        connect_timeout=float(settings.get("connect_timeout", 10)),
                        read_timeout=float(settings.get("read_timeout", 20)),
                        retries={"max_attempts": int(settings.get("max_attempts", 5)),
                                 "mode": "standard"})
        self.client = boto3.client("s3", endpoint_url=settings.get("endpoint_url"),
                                   region_name=settings.get("region_name"), config=config)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.local_root = cache_dir(bucket, self.prefix)

    # ---- plumbing ----------------------------------------------------------------

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, op: str, key: str, *, conditional: bool = False, **kwargs: Any) -> Any:
        """Run one S3 call and map its errors (see the module docstring)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        try:
            return getattr(self.client, op)(Bucket=self.bucket, **kwargs)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _CONFLICT_CODES or status in ("409", "412") or \
                    (conditional and (code in _MISSING_CODES or status == "404")):
                raise PreconditionFailed(f"{key} changed under us ({code or status})",
                                         fix="re-read it and retry") from None
            if code == "NoSuchBucket":
                raise NotFoundError(f"bucket {self.bucket!r} does not exist",
                                    fix="create it first (e.g. `aws s3 mb s3://BUCKET`)") from None
            if code in _MISSING_CODES or status == "404":
                raise ObjectMissing(f"{self.location}/{key} is missing",
                                    fix="run `adapters verify --all`") from None
            raise EnvironmentFailure(f"S3 {op} {self.location}/{key} failed: {code} {err}",
                                     fix="check credentials, bucket policy and endpoint") \
                from None
        except NoCredentialsError:
            raise EnvironmentFailure("no AWS credentials for the S3 store",
                                     fix="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a "
                                         "profile") from None
        except BotoCoreError as err:
            raise EnvironmentFailure(f"cannot reach S3 for {self.location}: {err}",
                                     fix="check the network, $AWS_ENDPOINT_URL or the "
                                         "adapterkit s3.json config") from None

    # ---- Backend protocol --------------------------------------------------------

    def get(self, key: str) -> tuple[bytes, str]:
        """``(data, etag)``. Raises ObjectMissing."""
        response = self._call("get_object", key, Key=self._key(key))
        with response["Body"] as body:
            return body.read(), response["ETag"]

    def open(self, key: str) -> BinaryIO:
        """A streaming body (``read(n)``, ``close``, context manager). Raises ObjectMissing."""
        return self._call("get_object", key, Key=self._key(key))["Body"]

    def put(self, key: str, data: bytes) -> str:
        """Unconditional write (S3 PUTs are atomic)."""
        return self._call("put_object", key, Key=self._key(key), Body=data)["ETag"]

    def put_if_absent(self, key: str, data: bytes) -> str:
        """``PutObject`` with ``If-None-Match: *``. Raises PreconditionFailed."""
        return self._call("put_object", key, conditional=False, Key=self._key(key), Body=data,
                          IfNoneMatch="*")["ETag"]

    def put_file_if_absent(self, key: str, path: Path) -> bool:
        """Upload a local file create-only (the file is deleted afterwards either way)."""
        try:
            if self.stat(key) is not None:  # skip re-uploading a blob we already have
                return False
            with open(path, "rb") as body:
                self._call("put_object", key, Key=self._key(key), Body=body, IfNoneMatch="*")
            return True
        except PreconditionFailed:
            return False
        finally:
            unlink_quietly(path)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str:
        """``PutObject`` with ``If-Match: etag``. Raises PreconditionFailed (also if gone)."""
        return self._call("put_object", key, conditional=True, Key=self._key(key), Body=data,
                          IfMatch=etag)["ETag"]

    def delete(self, key: str, etag: str | None = None) -> bool:
        """``DeleteObject`` (with ``If-Match`` when ``etag`` is given); False if it was absent.

        Raises:
            PreconditionFailed: ``etag`` is given and no longer matches (the object changed
                or was deleted by someone else).
        """
        if self.stat(key) is None:
            if etag is not None:
                raise PreconditionFailed(f"{key} was deleted", fix="re-read it and retry")
            return False
        extra = {"IfMatch": etag} if etag is not None else {}
        self._call("delete_object", key, conditional=etag is not None, Key=self._key(key),
                   **extra)
        return True

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (paginated ``ListObjectsV2``)."""
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        token: dict[str, Any] = {}  # ContinuationToken, after the first page
        while True:
            page = self._call("list_objects_v2", prefix, Prefix=full, **token)
            out += [item["Key"][strip:] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def stat(self, key: str) -> ObjectInfo | None:
        """``HeadObject``; None if absent."""
        try:
            head = self._call("head_object", key, Key=self._key(key))
        except ObjectMissing:
            return None
        return ObjectInfo(size=int(head["ContentLength"]),
                          mtime=head["LastModified"].timestamp(), etag=head["ETag"])

    def touch(self, key: str) -> None:
        """Copy the object onto itself so its LastModified moves (best effort)."""
        try:
            self._call("copy_object", key, Key=self._key(key), MetadataDirective="REPLACE",
                       CopySource={"Bucket": self.bucket, "Key": self._key(key)})
        except AdapterkitError:
            pass

    def local_path(self, key: str) -> Path:
        """S3 objects have no local path.

        Raises:
            BadInputError: Always.
        """
        raise BadInputError(f"{self.location} is an S3 store: {key} has no local file path",
                            fix="use Store.open_blob(digest) or Store.materialize(ref, dir)")

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """No lock: every racing write on S3 is conditional."""
        return nullcontext()
