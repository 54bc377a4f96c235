"""Quiet runs: the job's own progress, warnings and errors, not the libraries' chatter (``-v`` shows it).

- :func:`quiet_libraries` raises the level of the loggers that print on every run: botocore's
  ``Found credentials`` line, Ray's start-up and token-auth notices, Ray Data's execution plan,
  progress blocks and "progress bars disabled" notice, transformers' tokenizer warnings. Ray Data
  configures its loggers when it is first imported, so the runner calls this again after that.
- :class:`StderrFilter` drops known harmless lines that Ray's C++ core worker writes straight to
  the process's stderr (no Python logger to configure), such as the ``core_worker.cc`` error about
  actor constructor arguments in the object store that every Ray Data actor pool triggers. It
  swaps file descriptor 2 for a pipe only while the job streams, after Ray has started (so no
  Ray process inherits the pipe) and forwards every other byte unchanged.
- :class:`RayMessageFilter` drops the raylet's messages ("(raylet) Task ... submit failed. There
  are infinite retries remaining, so the task will be retried", "(raylet) A worker died ..."):
  Ray's driver prints them with ``print()`` to ``sys.stdout`` from a thread of its own, whatever
  ``log_to_driver`` says, each time an actor restarts and again after Ctrl-C. Ray retries by
  itself; what it cannot recover from ends the stream with an error the runner reports, and
  ``-v`` shows every message.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

QUIET_LOGGERS = {
    "botocore": logging.WARNING, "boto3": logging.WARNING, "urllib3": logging.WARNING,
    "s3transfer": logging.WARNING, "filelock": logging.WARNING, "ray": logging.WARNING,
    "ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR,
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "transformers": logging.ERROR,
}

# Substrings of stderr lines from Ray's C++ code that say nothing the user can act on.
HARMLESS_STDERR = (
    b"has constructor arguments in the object store and max_restarts > 0",
)


def quiet_libraries() -> None:
    """Raise the level of the noisy third-party loggers (the job's own progress stays)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


class StderrFilter:
    """``with StderrFilter(): ...`` drops :data:`HARMLESS_STDERR` lines written to fd 2 meanwhile.

    ``console`` (a text stream on the original stderr) is for output that must not wait for a
    newline, such as a progress bar."""

    def __init__(self, drop: tuple[bytes, ...] = HARMLESS_STDERR):
        self.drop = drop
        self.saved: int | None = None
        self.thread: threading.Thread | None = None
        self.console = sys.stderr

    def __enter__(self) -> "StderrFilter":
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            read_end, write_end = os.pipe()
            os.dup2(write_end, 2)
            os.close(write_end)
        except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. captured by a test harness)
            self.saved = None
            return self
        self.console = os.fdopen(os.dup(self.saved), "w", buffering=1)
        self.thread = threading.Thread(target=self._pump, args=(read_end,), name="batchgen-stderr", daemon=True)
        self.thread.start()
        return self

    def _pump(self, read_end: int) -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = b"".join(line + b"\n" for line in lines if not any(d in line for d in self.drop))
                if out:
                    os.write(self.saved, out)
        if pending:
            os.write(self.saved, pending)

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)  # closes the pipe's last write end: the pump sees EOF and drains
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.console is not sys.stderr:
            self.console.close()
        os.close(self.saved)
        self.saved = None


class RayMessageFilter:
    """``with RayMessageFilter(): ...`` drops the raylet's messages from ``sys.stdout`` meanwhile.

    Ray prints each message with ``print(text, file=sys.stdout)``: one ``write`` of the whole
    (possibly multi-line) message, then one of the line end, which is dropped with it."""

    def __init__(self):
        self.saved = None
        self.dropping = False

    def __enter__(self) -> "RayMessageFilter":
        self.saved, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc) -> None:
        if sys.stdout is self:
            sys.stdout = self.saved

    def write(self, text: str) -> int:
        if self.dropping and text == "\n":
            self.dropping = False
            return len(text)
        self.dropping = text.startswith(("(raylet)", "(raylet,"))
        return len(text) if self.dropping else self.saved.write(text)

    def __getattr__(self, name: str):
        return getattr(self.saved, name)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
