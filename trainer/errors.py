"""Our exception types and the process exit codes users script against."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_OOM = 3  # out of GPU memory: the last completed step is checkpointed; the same config would run out again
EXIT_STORAGE = 69  # EX_UNAVAILABLE: storage the run needs cannot be used yet (remote down, disk too small); resumable
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
    """A checkpoint is missing, partial, unreadable or does not match its manifest."""


class CorruptCheckpoint(CheckpointError):
    """Verified damage: a file's sha256 or size differs from the manifest, a file is missing, or the manifest itself
    is not a manifest. Such a checkpoint is moved to checkpoints/corrupt/, never deleted."""


class UntrustedCheckpoint(CorruptCheckpoint):
    """Signing is on (checkpoint.sign_key_env) and the manifest's signature is missing or does not verify: the
    choice goes to the previous checkpoint, as for a corrupt one, but this one is skipped and kept, never moved
    or deleted."""


class UnsupportedCheckpoint(CheckpointError):
    """Written by a newer version in a format this one cannot read: skipped and kept, never deleted."""


class StorageWait(SpotTrainerError):
    """The run cannot go on without storage it cannot use now (the remote is unreachable while it may hold the run's
    progress, or the disk is too small for the checkpoint to pull): exit 69, resumable; the supervisor retries later."""

    exit_code = EXIT_STORAGE
