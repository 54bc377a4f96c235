"""Kept for one release: the driver helpers moved to :mod:`batchgen.job` (pre-flight checks and
job.json in :mod:`~batchgen.job.preflight`; read tasks and the actor plan in
:mod:`~batchgen.job.plan`; progress and the stream's checks in :mod:`~batchgen.job.commit`;
consolidation and summary in :mod:`~batchgen.job.finish`). Re-exported unchanged."""

from __future__ import annotations

from .job.commit import (  # noqa: F401
    Progress, _duration, check_fingerprint, count_failed, count_retried, render_envs,
)
from .job.finish import (  # noqa: F401
    RUN_FIGURES, consolidate_and_record as finish, write_summary,
)
from .job.plan import (  # noqa: F401
    ActorPlan, ENCODE_CPUS, READ_CPUS, RESERVED_CPUS, SchedulingError, actor_plan, max_failures_for,
    read_tasks,
)
from .job.preflight import (  # noqa: F401
    GENERIC_DEFAULTS, OUR_ENTRIES, _check_loras, _entries, _identity_changes, _lora_key, _remove_ours,
    _within, _written_ids, check_images, check_inputs, check_lora_files, check_model, check_output_location,
    check_previous, check_sampler, check_sampling, counted_at_start, input_root, is_job_file, merge_inputs,
    part_run, prepare_output, read_previous, resolve, versions,
)
from .quiet import (  # noqa: F401
    _isatty,
)
