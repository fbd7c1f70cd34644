"""Our exception types and the process exit codes users script against."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, resumable from the last checkpoint


class SpotTrainerError(Exception):
    """An error with a message for a person: what went wrong, where, and what to do."""

    exit_code = EXIT_FAILED


class ConfigError(SpotTrainerError):
    """Bad configuration or usage: exit 2, nothing is retried."""

    exit_code = EXIT_USAGE


class StorageError(SpotTrainerError):
    """A remote-storage problem that retrying cannot fix (credentials, bucket, permissions)."""

    exit_code = EXIT_USAGE


class CheckpointError(SpotTrainerError):
    """A checkpoint is missing, partial or does not match its manifest."""
