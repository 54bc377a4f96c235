"""The job: a YAML spec rendered into images and a Parquet manifest, as a chain a reader can
follow top to bottom, each step a module, imports pointing down only:

- :mod:`~batchgen.job.spec`: the YAML spec (pydantic, strict);
- :mod:`~batchgen.job.preflight`: output location + lease, input scan, model check, resolved
  settings, overrides named -- cheapest first, all before Ray;
- :mod:`~batchgen.job.plan`: the Plan, read tasks (settings group x file x row group), actor plan;
- :mod:`~batchgen.job.stages`: the Ray Data callables ReadRows, GeneratorActor, EncodeAndStore;
- :mod:`~batchgen.job.commit`: manifest parts, progress, failure budget, signals;
- :mod:`~batchgen.job.finish`: consolidation, job.json's fingerprint, summary;
- :mod:`~batchgen.job.run`: ``run_job``: preflight -> plan -> stream -> finish.

Reading a finished output is :mod:`batchgen.outputs`.
"""

from .run import JobFailed, JobInterrupted, JobResult, TooManyFailures, execute, prepare, run_job  # noqa: F401
