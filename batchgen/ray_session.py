"""Joining or starting Ray for a job: a private local Ray unless an address is given.

Low in the package (errors, quiet) so that both the job driver (:mod:`batchgen.job.run`) and
consolidation (:mod:`batchgen.manifest`, which sorts large manifests with Ray Data) can start it.
Without an address it always starts a private local Ray (never one found through ``/tmp/ray``);
with one, an unreachable address fails at once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from .errors import BatchgenError
from .quiet import _isatty

_PRIVATE_RAY = False  # True while Ray is a local instance ensure_ray started (no autoscaler)


def private_ray() -> bool:
    """True while Ray is a private local instance :func:`ensure_ray` started (no autoscaler:
    what it has now is all it will ever have)."""
    return _PRIVATE_RAY


class RayUnreachable(BatchgenError):
    """``--address`` / ``RAY_ADDRESS`` names a cluster that does not answer."""


def _host_port(address: str) -> tuple[str, int] | None:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str, timeout_s: float = 5.0) -> str:
    """Fail fast and clearly when the Ray cluster at ``address`` cannot be reached; returns the
    HOST:PORT it checked (``auto`` resolved as Ray resolves it). Join with the address as given,
    not with this result: Ray treats ``auto`` differently from an explicit address (token auth)."""
    where = f"Ray address {address!r}" + (" (from RAY_ADDRESS)" if address == os.environ.get("RAY_ADDRESS") else "")
    if address.startswith(("http://", "https://")):
        raise RayUnreachable(f"{where} is a dashboard (Jobs API) URL: use `batchgen submit --address {address}` "
                             "to run the job on that cluster, or give the cluster's GCS address (HEAD:6379) to "
                             "join it from here")
    if address in ("auto", "local"):
        if address == "local":
            return address
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address("auto")
        if resolved is None:
            raise RayUnreachable(f"{where}: no running Ray cluster was found on this machine")
        address = resolved
    hp = _host_port(address)
    if hp is None:
        raise RayUnreachable(f"{where}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001")
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayUnreachable(f"{where}: nothing answers at {hp[0]}:{hp[1]} ({exc.strerror or exc}); is the "
                             "cluster up? Leave out --address (and RAY_ADDRESS) to run on a private local Ray") from None
    return address


def ensure_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = True) -> bool:
    """Connect to Ray: keep an existing session; join ``address`` / RAY_ADDRESS (checked first:
    an unreachable cluster fails at once; then joined exactly as ``ray.init(address)`` would,
    ``auto`` included, with Ray's token when the cluster needs one); else start a private local Ray
    that never attaches to a cluster found through /tmp/ray. The workers' log lines reach this
    process without colour codes unless stderr is a terminal. Returns
    True when this call started (and so should shut down) Ray."""
    global _PRIVATE_RAY
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not _isatty(sys.stderr):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(Actor pid=...)" prefixes: no ANSI colours in logs
    address = address or os.environ.get("RAY_ADDRESS") or None
    level = logging.INFO if verbose else logging.WARNING
    # The workers' lines ("(GeneratorActor pid=...) ...") come through: batchgen's own warnings on the
    # workers (a truncated prompt) travel that way; the libraries there are quiet unless -v.
    if address and address != "local":
        # Checked (fails fast), but given to ray.init as written: "auto" must stay "auto", which is
        # what makes Ray join a local cluster with its token (~/.ray/auth_token) when it has one;
        # a resolved HOST:PORT is an explicit address, for which Ray never turns token auth on.
        check_address(address)
        ray.init(address=address, log_to_driver=True, logging_level=level)
        _PRIVATE_RAY = False
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 logging_level=level)
        _PRIVATE_RAY = True
    return True


def shutdown_ray() -> None:
    global _PRIVATE_RAY
    import ray

    ray.shutdown()
    _PRIVATE_RAY = False


__all__ = ["ensure_ray", "check_address", "shutdown_ray", "private_ray", "RayUnreachable"]
