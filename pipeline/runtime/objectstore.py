"""Export destinations: a local folder (``file://``) or an S3 bucket (``s3://``, any S3 API server via
``PIPELINE_S3_ENDPOINT_URL``). The only module that imports ``boto3``.

Every S3 call has a deadline: ``PIPELINE_S3_CONNECT_TIMEOUT_S`` to connect, ``PIPELINE_S3_READ_TIMEOUT_S``
for an answer, at most ``PIPELINE_S3_MAX_ATTEMPTS`` attempts (botocore's standard retry mode). Credentials
come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile, an instance
role). A file is written to a temporary name in its folder and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:  # the adapter does not depend on the export rules at run time
    from pipeline.operations.export import Destination


class StoreError(RuntimeError):
    """A destination refused or did not answer (the message names the object and the cause)."""


class ObjectStore(Protocol):
    """Objects by key (``a/b/c``, relative to the destination's root and prefix)."""

    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def url(self, key: str) -> str: ...


class FileStore:
    """Objects as files under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.root / key
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {self.root / key}: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()
                      and not p.name.startswith("."))

    def url(self, key: str) -> str:
        return (self.root / key).as_uri()


class S3Store:
    """Objects in ``bucket`` under ``prefix``."""

    def __init__(self, bucket: str, prefix: str, settings: Any) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            config=Config(connect_timeout=settings.s3_connect_timeout_s, read_timeout=settings.s3_read_timeout_s,
                          retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
                          s3={"addressing_style": "path"}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"cannot write {self.url(key)}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"cannot read {self.url(key)}: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(o["Key"] for o in page.get("Contents", []))
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"cannot list s3://{self.bucket}/{full}: {exc}") from exc
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[cut:] for k in keys)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(dest: Destination, settings: Any) -> ObjectStore:
    """The store of a parsed destination (``settings``: the ``s3_*`` settings for S3)."""
    if dest.scheme == "file":
        return FileStore(dest.root)
    return S3Store(dest.root, dest.prefix, settings)
