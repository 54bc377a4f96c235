"""One run per output at a time: a lease file with a heartbeat.

``OUTPUT/.batchgen-lease.json`` is created atomically (a local exclusive create, ``O_CREAT|O_EXCL``;
on S3 a conditional put, ``If-None-Match: *``) before a run reads or writes anything else of the
output, and deleted when the run ends. While the run lives, a thread renews it every
``HEARTBEAT_S`` seconds (local: the file's mtime; S3: a conditional put ``If-Match`` the ETag we
wrote, so a run that lost its lease finds out instead of overwriting the new owner's).

A second run on the same output fails at once with a message naming the holder. A lease whose
holder is gone is taken over: on the same host when its process no longer exists, anywhere when
its heartbeat is older than ``STALE_S`` seconds (S3 measures the age with the server's clock).
Take-over is atomic too, so of two runs racing for a stale lease exactly one wins. S3: a put
``If-Match`` the stale ETag. Local: rename the stale file to a name of its own, check that the
file moved is still the one judged stale (same content, which holds the holder's run id, and the
same mtime), and only then delete it and create ours with an exclusive create. When another run
took the lease over in between, the rename moved that run's fresh lease instead: it is put back
(a hard link, which never replaces a newer lease) and this run reports the output busy.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from email.utils import parsedate_to_datetime
from typing import Any

from .errors import BatchgenError, StorageError

log = logging.getLogger(__name__)

LEASE_FILE = ".batchgen-lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0


class LeaseBusy(BatchgenError):
    """Another live run holds the output's lease."""


class LeaseLost(BatchgenError):
    """This run's lease was taken over (it stalled for longer than the stale limit)."""


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` (Linux /proc; None elsewhere): a pid that was reused has another one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _holder_is_dead(info: dict) -> bool:
    """True when the holder ran on this host and its process is gone."""
    if info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    started = info.get("process_start")
    return bool(started) and _process_start(pid) not in (None, started)


class Lease:
    """``with Lease(out_loc): ...`` holds the output's lease for the block (see the module doc)."""

    def __init__(self, out_loc, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        from .storage import Location

        self.out = out_loc if isinstance(out_loc, Location) else Location.parse(out_loc)
        self.loc = self.out.join(LEASE_FILE)
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.run_id = uuid.uuid4().hex
        self.info = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                     "process_start": _process_start(os.getpid()),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._etag: str | None = None
        self.took_over: dict | None = None

    # -- public ------------------------------------------------------------------------------

    def acquire(self) -> "Lease":
        if self.loc.scheme == "local":
            self._acquire_local()
        else:
            self._acquire_s3()
        self._thread = threading.Thread(target=self._beat, name="batchgen-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the heartbeat found that another run owns the output now."""
        if self.lost.is_set():
            raise LeaseLost(f"output {self.out.uri}: this run lost its lease ({self.loc.uri}) to another run "
                            f"(no heartbeat for more than {self.stale_s:.0f} s?); stopping without writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.lost.is_set():
            return
        try:
            if self.loc.scheme == "local":
                if self._read_local().get("run_id") == self.run_id:
                    os.unlink(self.loc.path)
            else:
                self._delete_s3()
        except (OSError, StorageError, ValueError) as exc:
            log.warning("could not remove the lease %s: %s", self.loc.uri, exc)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local -------------------------------------------------------------------------------

    def _read_local(self) -> dict:
        snap = self._snapshot(self.loc.path)
        return _parse(snap[0]) if snap is not None else {}

    def _create_local(self) -> bool:
        try:
            fd = os.open(self.loc.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self.info, sort_keys=True) + "\n")
        return True

    def _snapshot(self, path: str) -> tuple[bytes, int] | None:
        """(content, mtime in ns) of the lease file at ``path``, read through one open file; None
        when there is none."""
        try:
            with open(path, "rb") as fh:
                return fh.read(), os.fstat(fh.fileno()).st_mtime_ns
        except FileNotFoundError:
            return None

    def _acquire_local(self) -> None:
        os.makedirs(self.out.path, exist_ok=True)
        for _ in range(3):
            if self._create_local():
                return
            judged = self._snapshot(self.loc.path)
            if judged is None:
                continue  # released meanwhile: try again
            holder = _parse(judged[0])
            age = time.time() - judged[1] / 1e9
            if not (_holder_is_dead(holder) or age > self.stale_s or holder.get("unreadable") and age > 5):
                raise self._busy(holder, age)
            # Stale: move it away atomically (of several racing runs only one moves any given file),
            # then make sure the file moved is the one judged stale: another run may have taken the
            # lease over in between (its fresh lease is then the one moved), or the holder renewed
            # it (a paused process that resumed). Such a lease is put back and the output is busy.
            aside = f"{self.loc.path}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.loc.path, aside)
            except FileNotFoundError:
                continue
            moved = self._snapshot(aside)
            if moved != judged:
                self._put_back(aside)
                current = self._snapshot(self.loc.path) or moved or judged
                raise self._busy(_parse(current[0]), time.time() - current[1] / 1e9)
            os.unlink(aside)
            self.took_over = holder
            log.warning("output %s: took over the lease of a run that is gone (%s)", self.out.uri, _who(holder, age))
        raise LeaseBusy(f"output {self.out.uri}: could not take the lease {self.loc.uri}; another run is starting")

    def _put_back(self, aside: str) -> None:
        """Return a lease moved aside by mistake: a hard link is an exclusive create (it never
        replaces a lease a third run made meanwhile; that run keeps it, and the owner of the moved
        one finds out at its next heartbeat and stops)."""
        try:
            os.link(aside, self.loc.path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: replace only while the name is free
            if not os.path.exists(self.loc.path):
                os.rename(aside, self.loc.path)
                return
        try:
            os.unlink(aside)
        except FileNotFoundError:
            pass

    # -- S3 ----------------------------------------------------------------------------------

    def _client(self):
        return self.loc._client()

    def _body(self) -> bytes:
        return (json.dumps({**self.info, "heartbeat": time.time()}, sort_keys=True) + "\n").encode()

    def _acquire_s3(self) -> None:
        client = self._client()
        for _ in range(3):
            try:
                resp = client.put_object(Bucket=self.loc.bucket, Key=self.loc.key, Body=self._body(), IfNoneMatch="*")
                self._etag = resp.get("ETag")
                return
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise self.loc._error(exc, "create the lease") from None
            try:
                head = client.head_object(Bucket=self.loc.bucket, Key=self.loc.key)
                holder = json.loads(client.get_object(Bucket=self.loc.bucket, Key=self.loc.key)["Body"].read() or b"{}")
            except Exception as exc:  # noqa: BLE001
                if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                    continue  # released meanwhile
                if isinstance(exc, ValueError):
                    holder = {"unreadable": True}
                else:
                    raise self.loc._error(exc, "read the lease") from None
            age = _server_age(head)
            if not (_holder_is_dead(holder) or age > self.stale_s):
                raise self._busy(holder, age)
            try:
                resp = client.put_object(Bucket=self.loc.bucket, Key=self.loc.key, Body=self._body(),
                                         IfMatch=head["ETag"])
                self._etag = resp.get("ETag")
                self.took_over = holder
                log.warning("output %s: took over the lease of a run that is gone (%s)", self.out.uri,
                            _who(holder, age))
                return
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise self.loc._error(exc, "take over the lease") from None
        raise LeaseBusy(f"output {self.out.uri}: could not take the lease {self.loc.uri}; another run is starting")

    def _delete_s3(self) -> None:
        client = self._client()
        try:
            client.delete_object(Bucket=self.loc.bucket, Key=self.loc.key, IfMatch=self._etag)
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in ("PreconditionFailed", "412", "404", "NoSuchKey"):
                return  # not ours any more, or gone
            if _code(exc) in ("NotImplemented", "InvalidArgument"):  # stores without conditional deletes
                head = client.head_object(Bucket=self.loc.bucket, Key=self.loc.key)
                if head.get("ETag") == self._etag:
                    client.delete_object(Bucket=self.loc.bucket, Key=self.loc.key)
                return
            raise self.loc._error(exc, "delete the lease") from None

    # -- heartbeat ---------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self.loc.scheme == "local":
                    if self._read_local().get("run_id") != self.run_id:
                        self.lost.set()
                        return
                    os.utime(self.loc.path)
                else:
                    resp = self._client().put_object(Bucket=self.loc.bucket, Key=self.loc.key, Body=self._body(),
                                                     IfMatch=self._etag)
                    self._etag = resp.get("ETag")
            except Exception as exc:  # noqa: BLE001
                if _code(exc) in ("PreconditionFailed", "412", "404", "NoSuchKey") or isinstance(exc, FileNotFoundError):
                    self.lost.set()
                    return
                log.warning("lease heartbeat for %s failed (will retry): %s", self.loc.uri, exc)

    def _busy(self, holder: dict, age: float) -> LeaseBusy:
        return LeaseBusy(
            f"output {self.out.uri} is in use by another batchgen run ({_who(holder, age)}); wait for it to "
            f"finish. If that run died, its lease ({self.loc.uri}) is taken over automatically once its "
            f"heartbeat is {self.stale_s:.0f} s old (at once on the same host when its process is gone)")


def _parse(data: bytes) -> dict:
    """A lease file's content as a dict (``{"unreadable": True}`` when it is not JSON)."""
    try:
        value = json.loads(data.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {"unreadable": True}
    return value if isinstance(value, dict) else {"unreadable": True}


def _who(holder: dict, age: float) -> str:
    if holder.get("unreadable"):
        return f"unreadable lease, {age:.0f} s old"
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, "
            f"last heartbeat {age:.0f} s ago")


def _code(exc: BaseException) -> str:
    response: Any = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return str(err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _server_age(head: dict) -> float:
    """Seconds since the object was last written, by the server's clock when it sent a Date."""
    modified = head.get("LastModified")
    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError):
        now = time.time()
    return now - modified.timestamp() if modified is not None else float("inf")
