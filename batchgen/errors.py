"""Error types. Every message says what was wrong, where (file, row, column, key) and what to do."""


class BatchgenError(Exception):
    """A user-facing error: the CLI prints its message without a traceback and exits non-zero."""


class CheckpointError(BatchgenError):
    """A checkpoint is missing a file, has a wrong key or shape, or is in a refused format."""


class InputError(BatchgenError):
    """Bad job input: spec, prompt files, rows, columns."""


class StorageError(BatchgenError):
    """A URI cannot be read or written (missing bucket, wrong credentials, unreachable endpoint)."""
