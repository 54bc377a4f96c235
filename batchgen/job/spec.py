"""The job spec: the YAML file (pydantic models, strict: an unknown key is an error).

The models live in :mod:`batchgen.spec` (the CLI, ``submit`` and the outputs read specs too);
this is the job package's name for them, the first step of the chain.
"""

from __future__ import annotations

from ..spec import *  # noqa: F401,F403
from ..spec import JobSpec, diff_keys, load_spec, spec_from_dict  # noqa: F401
