"""Kept for one release: the job moved to :mod:`batchgen.job` (``run_job``, ``prepare`` and
``execute`` in :mod:`batchgen.job.run`; joining or starting Ray in :mod:`batchgen.ray_session`).
Import from there; these names are re-exported unchanged."""

from __future__ import annotations

from .job.commit import (  # noqa: F401
    JobFailed, JobInterrupted, PART_MAX_ROWS, PART_MAX_SECONDS, _Critical, _Guard, _Stop, _StreamState,
    _consume, _stopped, _stream, _sum, _translate,
)
from .job.finish import (  # noqa: F401
    JobResult, TooManyFailures, finish as _finish,
)
from .job.plan import (  # noqa: F401
    Plan,
)
from .job.preflight import (  # noqa: F401
    _phase, _remove_if_empty, prepare,
)
from .job.run import (  # noqa: F401
    execute, run_job,
)
from .ray_session import (  # noqa: F401
    RayUnreachable, _PRIVATE_RAY, _host_port, check_address, ensure_ray, shutdown_ray,
)
