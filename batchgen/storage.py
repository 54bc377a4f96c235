"""One storage layer for local paths, ``file://`` and ``s3://`` URIs.

``Location.parse(uri, cfg)`` gives an object with read/write/list/delete, a pyarrow filesystem for
Parquet I/O, and ``local_cache_copy`` (download a folder once per node into a content-keyed cache).
S3 goes through boto3 (objects) and ``pyarrow.fs.S3FileSystem`` (Parquet); the endpoint comes from
the config or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials come only from the standard
AWS chain and never appear in anything this module returns, raises or logs (an endpoint URL with
``user:password@`` is refused without repeating it). Every failure is a :class:`StorageError`
naming the URI and the cause.

Local locations normalize to absolute paths (``loc.uri`` is a plain path, not ``file://``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import StorageError

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 5
_READ_TIMEOUT_S = 60
_MAX_ATTEMPTS = 3
_DELETE_BATCH = 1000
_COMPLETE_MARKER = ".batchgen-complete"


ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""The environment variables naming the S3 endpoint, the most specific first (as botocore reads them)."""


class StorageConfig(BaseModel):
    """Where S3 lives. Holds no credentials: those come from the AWS chain (env, profile, role).

    A bad value raises a plain ``ValueError`` whose message names the setting and never repeats
    the credentials of a ``user:password@`` endpoint (pydantic's own message would)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True,
                              hide_input_in_errors=True)

    endpoint_url: str | None = None
    """S3-compatible endpoint (``http://127.0.0.1:9000`` for MinIO); None: ``AWS_ENDPOINT_URL_S3``, then
    ``AWS_ENDPOINT_URL``, else AWS."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ValueError(_config_errors(exc)) from None

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        check_endpoint_url(value, "endpoint_url")
        return value.rstrip("/")

    def resolved_endpoint(self) -> str | None:
        """The endpoint to use now: the configured one, else ``AWS_ENDPOINT_URL_S3``, else
        ``AWS_ENDPOINT_URL``, else None."""
        if self.endpoint_url:
            return self.endpoint_url
        for name in ENDPOINT_ENV:
            env = os.environ.get(name)
            if env:
                check_endpoint_url(env, name)
                return env.rstrip("/")
        return None

    def resolved(self) -> "StorageConfig":
        """This config with the endpoint pinned (resolve on the driver before shipping to workers,
        whose environment may lack ``AWS_ENDPOINT_URL``)."""
        return StorageConfig(endpoint_url=self.resolved_endpoint())


def _config_errors(exc: ValidationError) -> str:
    """A StorageConfig ValidationError in words, without the input values."""
    known = ", ".join(StorageConfig.model_fields)
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(storage config)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown storage setting {key!r} (extra settings are not allowed; known: {known})")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(msg if msg.startswith(key) else f"{key}: {msg}")
    return "; ".join(lines)


def check_endpoint_url(value: str, where: str) -> None:
    """Raise ``ValueError`` (naming ``where``, never the credentials) unless ``value`` is a plain
    ``http(s)://host[:port][/path]`` endpoint. Any '@' is refused: user-info in an endpoint would
    be written to job.json, logs and the job's environment (a secret key may contain '/', so the
    '@' need not be in what urlsplit calls the netloc)."""
    if "@" in value:
        raise ValueError(f"{where} must not contain user:password@ (got {_redact(value)!r}): credentials "
                         "come only from the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                         "profiles, instance roles), never from the endpoint URL")
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        ok = False
    else:
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    if not ok:
        raise ValueError(f"{where} must look like http(s)://host[:port], got {_redact(value)!r}")


def redact_userinfo(text: str) -> str:
    """``text`` (one URL or URI) with any ``user:password@`` replaced by ``***@``: everything
    between the scheme and the last '@' goes, so a password holding '/', ':' or '@' is hidden too."""
    at = text.rfind("@")
    if at < 0:
        return text
    scheme = text.find("://")
    keep = text[:scheme + 3] if 0 <= scheme < at else ""
    return f"{keep}***{text[at:]}"


_USERINFO_IN_TEXT = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"<>]*@")


def redact_text(text: str) -> str:
    """Free text (an error message, a YAML snippet) with the user-info of every URL in it
    replaced by ``***@``."""
    return _USERINFO_IN_TEXT.sub(r"\1***@", text)


def _redact(url: str | None) -> str:
    """The URL without any user:password@ part (for messages)."""
    if not url:
        return "AWS default endpoint"
    return redact_userinfo(url)


# boto3 clients: one per (process, endpoint, credential environment), created lazily; clients
# are thread-safe. Keying on a digest of the AWS_* credential variables means a changed
# environment (another profile, rotated keys) gets a fresh client instead of stale credentials.

_CLIENTS: dict[tuple[int, str | None, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def _s3_client(endpoint: str | None):
    env = "\0".join(os.environ.get(name, "") for name in _CREDENTIAL_ENV)
    key = (os.getpid(), endpoint, hashlib.sha256(env.encode()).hexdigest())
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=_CONNECT_TIMEOUT_S,
                read_timeout=_READ_TIMEOUT_S,
                retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
                s3={"addressing_style": "path"} if endpoint else None,
            )
            session = boto3.session.Session()
            region = session.region_name or "us-east-1"
            client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
            _CLIENTS[key] = client
    return client


def _translate(exc: BaseException, uri: str, bucket: str, endpoint: str | None, action: str) -> StorageError:
    """A botocore/OS exception as a StorageError that says what happened in words."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 is a dependency
        bx = None
    where = f"({uri})"
    if bx is not None:
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StorageError(f"bucket '{bucket}' does not exist {where}")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageError(f"no such object: {uri} (while trying to {action})")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                        "TokenRefreshRequired", "AuthorizationHeaderMalformed"):
                return StorageError(
                    f"S3 rejected the credentials ({code}) while trying to {action} {uri}: check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE for "
                    f"{_redact(endpoint)}"
                )
            if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
                return StorageError(
                    f"access denied while trying to {action} {uri}: the credentials in use may not "
                    f"{action} here, or are wrong (endpoint {_redact(endpoint)})"
                )
            message = err.get("Message") or ""
            return StorageError(
                f"S3 error {code or status} while trying to {action} {uri}: {message}".rstrip(": ")
            )
        if isinstance(exc, bx.NoCredentialsError):
            return StorageError(
                f"no AWS credentials found to {action} {uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role is available"
            )
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError,
                            bx.ReadTimeoutError, bx.ProxyConnectionError)):
            return StorageError(
                f"cannot reach S3 endpoint {_redact(endpoint)} to {action} {uri}: "
                f"{type(exc).__name__}; check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
            )
        if isinstance(exc, bx.BotoCoreError):
            return StorageError(f"S3 failure while trying to {action} {uri}: {type(exc).__name__}: {exc}")
    return StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Location:
    """A file or folder: local (``path``) or S3 (``bucket`` + ``key``, no leading/trailing '/')."""

    scheme: str  # "local" | "s3"
    path: str = ""  # absolute local path
    bucket: str = ""
    key: str = ""
    config: StorageConfig = field(default_factory=StorageConfig)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def parse(cls, uri: str | os.PathLike | "Location", cfg: StorageConfig | None = None) -> "Location":
        """A local path, ``file://...`` or ``s3://bucket/prefix`` as a Location."""
        cfg = cfg if cfg is not None else StorageConfig()
        if isinstance(uri, Location):
            return uri if cfg == uri.config else cls(uri.scheme, uri.path, uri.bucket, uri.key, cfg)
        if isinstance(uri, os.PathLike):
            uri = os.fspath(uri)
        if not isinstance(uri, str):
            raise ValueError(f"uri must be a str or path, got {type(uri).__name__}")
        if not uri.strip():
            raise StorageError("empty URI: give a local path, file:// or s3://bucket/prefix")
        if uri.startswith("s3://"):
            parts = urlsplit(uri)
            if parts.username or parts.password:
                raise StorageError("credentials inside an s3:// URI are not allowed: use the AWS chain")
            bucket = parts.netloc
            if not bucket:
                raise StorageError(f"no bucket in {uri!r}: expected s3://bucket/prefix")
            if parts.query or parts.fragment:
                raise StorageError(f"unexpected '?' or '#' in {uri!r}")
            return cls("s3", bucket=bucket, key=_clean_key(parts.path, uri), config=cfg)
        if uri.startswith("file:"):
            parts = urlsplit(uri)
            if parts.netloc not in ("", "localhost"):
                raise StorageError(f"file URI {uri!r} names a remote host; use file:///absolute/path")
            raw = unquote(parts.path)
            if not raw:
                raise StorageError(f"no path in {uri!r}")
            return cls("local", path=os.path.abspath(raw), config=cfg)
        scheme = urlsplit(uri).scheme
        if scheme and len(scheme) > 1 and "://" in uri:
            raise StorageError(
                f"unsupported URI scheme '{scheme}' in {uri!r}: use a local path, file:// or s3://"
            )
        return cls("local", path=os.path.abspath(os.path.expanduser(uri)), config=cfg)

    @property
    def uri(self) -> str:
        """Normalized URI: an absolute local path, or ``s3://bucket[/key]``."""
        if self.scheme == "local":
            return self.path
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    @property
    def name(self) -> str:
        """Last path component ('' for a bucket root)."""
        return os.path.basename(self.path) if self.scheme == "local" else self.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.uri

    def join(self, *parts: str) -> "Location":
        """A location below this one; parts may contain '/', never '..' or empty components."""
        pieces: list[str] = []
        for i, part in enumerate(parts):
            if not isinstance(part, str):
                raise ValueError(f"join part {i} must be a str, got {type(part).__name__}")
            for piece in part.split("/"):
                if piece in ("", "."):
                    continue
                if piece == "..":
                    raise ValueError(f"join part {i} ({part!r}) may not contain '..'")
                pieces.append(piece)
        if not pieces:
            return self
        if self.scheme == "local":
            return Location("local", path=os.path.join(self.path, *pieces), config=self.config)
        key = "/".join(([self.key] if self.key else []) + pieces)
        return Location("s3", bucket=self.bucket, key=key, config=self.config)

    # -- object operations -------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        """The whole file/object. Missing -> StorageError."""
        if self.scheme == "local":
            try:
                return Path(self.path).read_bytes()
            except FileNotFoundError:
                raise StorageError(f"no such file: {self.uri}") from None
            except IsADirectoryError:
                raise StorageError(f"{self.uri} is a folder, expected a file") from None
            except OSError as exc:
                raise StorageError(f"cannot read {self.uri}: {exc.strerror or exc}") from None
        self._need_key("read")
        try:
            resp = self._client().get_object(Bucket=self.bucket, Key=self.key)
            return resp["Body"].read()
        except Exception as exc:  # noqa: BLE001 - translated into words
            raise self._error(exc, "read") from None

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file/object atomically (see :meth:`open_atomic`)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"data must be bytes, got {type(data).__name__}")
        with self.open_atomic() as fh:
            fh.write(bytes(data))

    @contextlib.contextmanager
    def open_atomic(self):
        """A binary writer whose bytes appear at this location only when the block ends normally.

        Every batchgen writer goes through here, so no reader ever sees a partial file: a local
        file is written to a hidden temp file beside the target (``.NAME.tmp-XXXXXXXXXXXX``) and
        moved into place with ``os.replace``; an S3 object is sent as one PUT, or as a multipart
        upload that is completed only at the end. On an exception (``KeyboardInterrupt``
        included) the temp file is removed / the upload aborted; on SIGTERM too, when the main
        thread has no SIGTERM handler of its own (the default would kill the process before any
        clean-up ran: the temp files go, then the signal is delivered as before).
        """
        writer: _AtomicWriter = _LocalWriter(self) if self.scheme == "local" else _S3Writer(self)
        with _discard_on_sigterm(writer):
            try:
                yield writer
                writer.publish()
            except BaseException:
                writer.discard()
                raise

    def exists(self) -> bool:
        """True for an existing file/object or a folder-like location (bucket root: bucket exists)."""
        if self.scheme == "local":
            return os.path.exists(self.path)
        client = self._client()
        if not self.key:
            try:
                client.head_bucket(Bucket=self.bucket)
                return True
            except Exception as exc:  # noqa: BLE001
                if _is_not_found(exc):
                    return False
                raise self._error(exc, "check") from None
        try:
            client.head_object(Bucket=self.bucket, Key=self.key)
            return True
        except Exception as exc:  # noqa: BLE001
            if not _is_not_found(exc):
                raise self._error(exc, "check") from None
        return self.is_dir_like()

    def identity(self) -> dict[str, Any]:
        """What identifies this file's content cheaply: ``{"size", "sha256"}`` for a local file
        (the content hashed), ``{"size", "etag"}`` for an S3 object (no download)."""
        if self.scheme == "local":
            digest = hashlib.sha256()
            size = 0
            try:
                with open(self.path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                raise StorageError(f"no such file: {self.uri}") from None
            except OSError as exc:
                raise StorageError(f"cannot read {self.uri}: {exc.strerror or exc}") from None
            return {"size": size, "sha256": digest.hexdigest()}
        self._need_key("check")
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "check") from None
        return {"size": int(head.get("ContentLength", 0)), "etag": str(head.get("ETag", "")).strip('"')}

    def is_dir_like(self) -> bool:
        """A local folder, or an S3 prefix with at least one object under ``key/``."""
        if self.scheme == "local":
            return os.path.isdir(self.path)
        prefix = f"{self.key}/" if self.key else ""
        try:
            resp = self._client().list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "list") from None
        return bool(resp.get("KeyCount", len(resp.get("Contents", []))))

    def is_file(self) -> bool:
        """A local regular file or an existing S3 object at exactly this key."""
        if self.scheme == "local":
            return os.path.isfile(self.path)
        if not self.key:
            return False
        try:
            self._client().head_object(Bucket=self.bucket, Key=self.key)
            return True
        except Exception as exc:  # noqa: BLE001
            if _is_not_found(exc):
                self._check_bucket()
                return False
            raise self._error(exc, "check") from None

    def require_folder(self) -> None:
        """Fail unless this can be used as an output folder: not a file, no file on the way; on S3
        also checks that the bucket exists and the credentials and endpoint work."""
        if self.scheme == "local":
            probe = Path(self.path)
            for parent in [probe, *probe.parents]:
                if parent.exists() and not parent.is_dir():
                    raise StorageError(
                        f"output {self.uri} needs to be a folder but {parent} is a file: "
                        "choose another output or remove the file"
                    )
            return
        if self.is_file():
            raise StorageError(
                f"output {self.uri} needs to be a folder (prefix) but it is an object: "
                "choose another output or delete the object"
            )
        self._check_bucket()

    def delete(self) -> None:
        """Remove the file/object, or everything under a folder/prefix. Missing is not an error."""
        if self.scheme == "local":
            try:
                if os.path.isdir(self.path) and not os.path.islink(self.path):
                    shutil.rmtree(self.path)
                else:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot delete {self.uri}: {exc.strerror or exc}") from None
            return
        self._delete_keys([loc.key for loc in self.list(recursive=True)] + ([self.key] if self.key else []))

    def _delete_keys(self, keys: list[str]) -> None:
        """Delete these keys of this location's bucket, a thousand per request."""
        client = self._client()
        try:
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = [{"Key": k} for k in keys[start:start + _DELETE_BATCH]]
                resp = client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise StorageError(
                        f"cannot delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                        f"{first.get('Message', '')}".rstrip()
                    )
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "delete") from None

    def delete_files(self, names: list[str]) -> None:
        """Delete the files ``names`` directly in this folder (batched on S3); missing ones are fine."""
        if self.scheme == "s3":
            self._delete_keys([self.join(name).key for name in names])
            return
        for name in names:
            self.join(name).delete()

    def first_names(self, limit: int) -> list[str]:
        """Up to ``limit`` names below this folder, for messages: a local folder's entries
        (sorted), an S3 prefix's first keys (one short listing, however many there are)."""
        if self.scheme == "local":
            try:
                return sorted(os.listdir(self.path))[:limit]
            except (FileNotFoundError, NotADirectoryError):
                return []
            except OSError as exc:
                raise StorageError(f"cannot list {self.uri}: {exc.strerror or exc}") from None
        prefix = f"{self.key}/" if self.key else ""
        try:
            resp = self._client().list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=limit)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "list") from None
        return [e["Key"][len(prefix):] for e in resp.get("Contents", []) if e["Key"] != prefix]

    def file_sizes(self) -> dict[str, int]:
        """``{name: size}`` of the files directly in this folder, from one listing (no request per
        file); a missing folder gives {}."""
        if self.scheme == "local":
            try:
                with os.scandir(self.path) as entries:
                    return {e.name: e.stat(follow_symlinks=False).st_size for e in entries
                            if e.is_file(follow_symlinks=False) or e.is_symlink()}
            except (FileNotFoundError, NotADirectoryError):
                return {}
            except OSError as exc:
                raise StorageError(f"cannot list {self.uri}: {exc.strerror or exc}") from None
        prefix = f"{self.key}/" if self.key else ""
        return {e["Key"][len(prefix):]: int(e.get("Size", 0)) for e in self._list_objects(recursive=False)}

    def list(self, recursive: bool = True) -> list["Location"]:
        """Files/objects under this folder/prefix, sorted by uri (immediate children only when
        ``recursive`` is False). A missing local folder or empty prefix gives []."""
        if self.scheme == "local":
            root = Path(self.path)
            if not root.is_dir():
                if root.exists():
                    raise StorageError(f"cannot list {self.uri}: it is a file, not a folder")
                return []
            try:
                if recursive:
                    files = [p for p in root.rglob("*") if p.is_file()]
                else:
                    files = [p for p in root.iterdir() if p.is_file()]
            except OSError as exc:
                raise StorageError(f"cannot list {self.uri}: {exc.strerror or exc}") from None
            out = [Location("local", path=str(p), config=self.config) for p in files]
            return sorted(out, key=lambda loc: loc.uri)
        return sorted(
            (Location("s3", bucket=self.bucket, key=obj["Key"], config=self.config)
             for obj in self._list_objects(recursive)),
            key=lambda loc: loc.uri,
        )

    def _list_objects(self, recursive: bool = True) -> list[dict]:
        """Raw S3 listing entries (Key, ETag, Size) under ``key/``."""
        prefix = f"{self.key}/" if self.key else ""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if not recursive:
            kwargs["Delimiter"] = "/"
        entries: list[dict] = []
        try:
            paginator = self._client().get_paginator("list_objects_v2")
            for page in paginator.paginate(**kwargs):
                entries.extend(page.get("Contents", []))
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "list") from None
        return [e for e in entries if not e["Key"].endswith("/")]  # skip "folder marker" objects

    # -- pyarrow -----------------------------------------------------------------------------

    def pyarrow_fs(self):
        """``(pyarrow.fs.FileSystem, path)`` for pyarrow / Ray Data ``read_parquet`` and writers.

        The S3 filesystem gets the endpoint and region but no credentials: pyarrow resolves them
        through the same AWS chain on whichever node uses it (so it pickles without secrets).
        """
        import pyarrow.fs as pafs

        if self.scheme == "local":
            return pafs.LocalFileSystem(), self.path
        endpoint = self.config.resolved_endpoint()
        kwargs: dict[str, Any] = {
            "region": _region(),
            "connect_timeout": float(_CONNECT_TIMEOUT_S),
            "request_timeout": float(_READ_TIMEOUT_S),
            "allow_bucket_creation": False,
            "allow_bucket_deletion": False,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_MAX_ATTEMPTS),
        }
        if endpoint:
            parts = urlsplit(endpoint)
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            kwargs["endpoint_override"] = netloc + parts.path.rstrip("/")
            kwargs["scheme"] = parts.scheme
        try:
            fs = pafs.S3FileSystem(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot open pyarrow S3 filesystem for {self.uri}: {exc}") from None
        return fs, f"{self.bucket}/{self.key}" if self.key else self.bucket

    # -- model cache -------------------------------------------------------------------------

    def local_cache_copy(self, cache_root: str | os.PathLike | None = None) -> Path:
        """A local copy of this folder (or single object), downloaded once per node.

        Local locations return their own path. S3 content is cached under ``cache_root`` (default
        ``$BATCHGEN_CACHE/downloads``, else ``~/.cache/batchgen/downloads``) in a folder named by a
        sha256 over the sorted (key, etag, size) listing, so changed content gets a new folder.
        Downloads go to a temp folder renamed into place under a file lock: concurrent callers on
        one node (threads or processes) download once. A single object returns the file's path.
        """
        if self.scheme == "local":
            if not os.path.exists(self.path):
                raise StorageError(f"no such file or folder: {self.uri}")
            return Path(self.path)
        entries = self._list_objects(recursive=True)
        single = False
        if not entries:
            if self.key and self.is_file():
                try:
                    head = self._client().head_object(Bucket=self.bucket, Key=self.key)
                except Exception as exc:  # noqa: BLE001
                    raise self._error(exc, "download") from None
                entries = [{"Key": self.key, "ETag": head.get("ETag", ""), "Size": head.get("ContentLength", 0)}]
                single = True
            else:
                self._check_bucket()
                raise StorageError(f"nothing to download: no objects under {self.uri}/")
        base = f"{self.key}/" if self.key else ""
        listing = sorted((e["Key"].rsplit("/", 1)[-1] if single else e["Key"][len(base):],
                          e["Key"], str(e.get("ETag", "")), int(e.get("Size", 0))) for e in entries)
        digest = hashlib.sha256()
        for rel, _key, etag, size in listing:
            digest.update(f"{rel}\0{etag}\0{size}\n".encode())
        name = digest.hexdigest()[:40]
        root = Path(cache_root) if cache_root is not None else _default_cache_root()
        _make_local_dirs(root, str(root))
        final = root / name
        if not (final / _COMPLETE_MARKER).exists():
            with file_lock(root / f"{name}.lock"):
                if not (final / _COMPLETE_MARKER).exists():
                    self._download(listing, root, final)
        return final / listing[0][0] if single else final

    def _download(self, listing: list[tuple[str, str, str, int]], root: Path, final: Path) -> None:
        log.info("downloading %d objects (%d bytes) from %s into %s",
                 len(listing), sum(item[3] for item in listing), self.uri, final)
        tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        client = self._client()
        try:
            for rel, key, etag, _size in listing:
                dest = tmp.joinpath(*rel.split("/"))
                if any(part in ("", ".", "..") for part in rel.split("/")):
                    raise StorageError(f"refusing to download unsafe key s3://{self.bucket}/{key}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                kwargs = {"IfMatch": etag} if etag else {}
                try:
                    resp = client.get_object(Bucket=self.bucket, Key=key, **kwargs)
                    with open(dest, "wb") as fh:
                        for chunk in iter(lambda: resp["Body"].read(1 << 20), b""):
                            fh.write(chunk)
                except Exception as exc:  # noqa: BLE001
                    if _error_code(exc) in ("PreconditionFailed", "412"):
                        raise StorageError(
                            f"s3://{self.bucket}/{key} changed during the download of {self.uri}; retry"
                        ) from None
                    raise _translate(exc, f"s3://{self.bucket}/{key}", self.bucket,
                                     self.config.resolved_endpoint(), "download") from None
            (tmp / _COMPLETE_MARKER).write_text(self.uri + "\n")
            if final.exists():  # a partial copy left by a crashed older version: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as exc:
            raise StorageError(f"cannot write the cache copy of {self.uri} in {root}: {exc}") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------

    def _client(self):
        return _s3_client(self.config.resolved_endpoint())

    def _error(self, exc: BaseException, action: str) -> StorageError:
        return _translate(exc, self.uri, self.bucket, self.config.resolved_endpoint(), action)

    def _need_key(self, action: str) -> None:
        if not self.key:
            raise StorageError(f"cannot {action} {self.uri}: it is a bucket, not an object")

    def _check_bucket(self) -> None:
        try:
            self._client().head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001
            if _is_not_found(exc):
                raise StorageError(f"bucket '{self.bucket}' does not exist ({self.uri})") from None
            raise self._error(exc, "access") from None


# -- destination folders (export --to, compare --report) ----------------------------------------


def few_names(root: "Location", locs: list["Location"], limit: int = 3) -> str:
    """Up to ``limit`` of ``locs`` by their path below ``root``, then how many more: for messages."""
    prefix = root.uri.rstrip("/") + "/"
    names = [loc.uri[len(prefix):] if loc.uri.startswith(prefix) else loc.uri for loc in locs[:limit]]
    more = f" and {len(locs) - limit} more" if len(locs) > limit else ""
    return ", ".join(names) + more


def destination_files(dest: "Location", marker: str, is_ours, *, refuse: str, overwrite: bool = True,
                      not_empty: str = "") -> list["Location"]:
    """The files already at a destination folder that a writer may replace.

    A new or empty folder gives []. A folder whose ``marker`` file passes ``is_ours(location)`` is
    an earlier output of the same writer: its files are returned (with ``overwrite``; without it,
    :class:`InputError` ending in ``not_empty``). Any other non-empty folder, a job output or a
    folder of someone's own files, is refused with :class:`InputError` naming a few of the files
    and ending in ``refuse``: nothing is written over, or deleted from, what batchgen did not write.
    """
    from .errors import InputError

    dest.require_folder()
    existing = dest.list(recursive=True) if dest.is_dir_like() else []
    if not existing:
        return []
    listed = few_names(dest, existing)
    if not is_ours(dest.join(marker)):
        raise InputError(f"{dest.uri} holds {len(existing)} files ({listed}) but no batchgen {marker}: {refuse}")
    if not overwrite:
        raise InputError(f"{dest.uri} is not empty ({len(existing)} files: {listed}); {not_empty}")
    return existing


def remove_stale(dest: "Location", existing: list["Location"], written: set[str], ours) -> None:
    """After replacing an earlier output at ``dest``: delete the files of ``existing`` whose
    relative path matches ``ours`` (a compiled pattern of the writer's own names) and that this
    run did not write again. Other files stay."""
    prefix = dest.uri.rstrip("/") + "/"
    for loc in existing:
        rel = loc.uri[len(prefix):] if loc.uri.startswith(prefix) else None
        if rel and rel not in written and ours.match(rel):
            loc.delete()


# -- atomic writers (Location.open_atomic) ----------------------------------------------------

_MULTIPART_PART = 16 << 20  # bytes per S3 part (S3's minimum is 5 MiB, except for the last part)
_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


def is_temp_name(name: str) -> bool:
    """True for the name of a local temp file :meth:`Location.open_atomic` writes (one left by a
    process killed with SIGKILL is never read as data and may be deleted by its output's owner)."""
    return bool(_TEMP_NAME.match(name))


class _AtomicWriter:
    """The file-like object of :meth:`Location.open_atomic`: ``write``, ``tell``, ``flush``."""

    closed = False

    def __init__(self, loc: "Location"):
        self.loc = loc
        self.pos = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def close(self) -> None:  # pyarrow closes the sink it was given; publishing is the block's end
        pass

    def write(self, data) -> int:
        raise NotImplementedError

    def publish(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError


class _LocalWriter(_AtomicWriter):
    def __init__(self, loc: "Location"):
        super().__init__(loc)
        target = Path(loc.path)
        if target.is_dir():
            raise StorageError(f"cannot write {loc.uri}: it is an existing folder")
        _make_local_dirs(target.parent, loc.uri)
        self.target = target
        self.tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            self.fh = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        except OSError as exc:
            raise StorageError(f"cannot write {loc.uri}: {exc.strerror or exc}") from None

    def write(self, data) -> int:
        try:
            n = self.fh.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {self.loc.uri}: {exc.strerror or exc}") from None
        self.pos += n
        return n

    def publish(self) -> None:
        try:
            self.fh.close()
            os.replace(self.tmp, self.target)
        except OSError as exc:
            raise StorageError(f"cannot write {self.loc.uri}: {exc.strerror or exc}") from None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


class _S3Writer(_AtomicWriter):
    """One PUT when the whole object fits one part; else a multipart upload, completed last."""

    def __init__(self, loc: "Location"):
        super().__init__(loc)
        loc._need_key("write")
        self.client = loc._client()
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def write(self, data) -> int:
        data = bytes(data)
        self.buffer += data
        self.pos += len(data)
        while len(self.buffer) >= 2 * _MULTIPART_PART:  # keep one part back: the last may be short
            self._send(bytes(self.buffer[:_MULTIPART_PART]))
            del self.buffer[:_MULTIPART_PART]
        return len(data)

    def _send(self, chunk: bytes) -> None:
        bucket, key = self.loc.bucket, self.loc.key
        try:
            if self.upload_id is None:
                self.upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
            number = len(self.parts) + 1
            resp = self.client.upload_part(Bucket=bucket, Key=key, UploadId=self.upload_id, PartNumber=number,
                                           Body=chunk)
        except Exception as exc:  # noqa: BLE001
            raise self.loc._error(exc, "write") from None
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def publish(self) -> None:
        bucket, key = self.loc.bucket, self.loc.key
        try:
            if self.upload_id is None:
                self.client.put_object(Bucket=bucket, Key=key, Body=bytes(self.buffer))
                return
            self._send(bytes(self.buffer))
            self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=self.upload_id,
                                                  MultipartUpload={"Parts": self.parts})
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.loc._error(exc, "write") from None
        finally:
            self.buffer = bytearray()

    def discard(self) -> None:
        self.buffer = bytearray()
        if self.upload_id is not None:
            upload, self.upload_id = self.upload_id, None
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.loc.bucket, Key=self.loc.key, UploadId=upload)


_ACTIVE_WRITERS: list[_AtomicWriter] = []
_SIGTERM_SAVED: list = []


@contextlib.contextmanager
def _discard_on_sigterm(writer: _AtomicWriter):
    """While atomic writes run in the main thread of a process that leaves SIGTERM to the default
    action (the CLI), a SIGTERM first discards them, then terminates the process as before."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _ACTIVE_WRITERS:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            yield  # someone else handles SIGTERM (the job runner, Ray): it raises through the block
            return
        _SIGTERM_SAVED.append(signal.signal(signal.SIGTERM, _on_sigterm))
    _ACTIVE_WRITERS.append(writer)
    try:
        yield
    finally:
        _ACTIVE_WRITERS.remove(writer)
        if not _ACTIVE_WRITERS and _SIGTERM_SAVED:
            signal.signal(signal.SIGTERM, _SIGTERM_SAVED.pop())


def _on_sigterm(signum, frame) -> None:
    import signal

    for writer in list(_ACTIVE_WRITERS):
        writer.discard()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _clean_key(path: str, uri: str) -> str:
    pieces = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in pieces:
        raise StorageError(f"'..' is not allowed in {uri!r}")
    return "/".join(pieces)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _is_not_found(exc: BaseException) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def _region() -> str:
    """The AWS chain's region (env, then profile), else us-east-1."""
    import boto3

    return os.environ.get("AWS_REGION") or boto3.session.Session().region_name or "us-east-1"


def cache_root() -> Path:
    """batchgen's local cache: ``$BATCHGEN_CACHE``, else ``~/.cache/batchgen``."""
    return Path(os.environ.get("BATCHGEN_CACHE") or Path.home() / ".cache" / "batchgen")


def _default_cache_root() -> Path:
    return cache_root() / "downloads"


def _make_local_dirs(folder: Path, uri: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise StorageError(f"cannot write {uri}: {blocker} is a file where a folder is needed") from None
    except OSError as exc:
        raise StorageError(f"cannot create folder {folder} for {uri}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive ``flock`` on ``path``: serializes threads and processes of one node."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
