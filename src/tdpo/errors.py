"""User-facing errors: each names the field, the value and the fix; the CLI prints one line, exit 2."""

from __future__ import annotations


class UsageError(Exception):
    """A user mistake (bad config, bad path, unknown name). Never shown as a traceback."""

    def __init__(self, field: str, value: object, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}={value!r}: {fix}")


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite rewards). The CLI prints one line and
    exits with 3; the last checkpoint is left intact."""


class StorageError(Exception):
    """The run directory cannot be written (no space left on the device, a quota): the CLI
    prints one line naming the folder and the space needed and exits with 4. Temporaries are
    removed and the checkpoints written before are intact, so the run resumes once there is
    space."""

    exit_code = 4


DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT (Linux)


def is_disk_full(error: BaseException) -> bool:
    """An error that means the device (or the quota) is full, also as the RuntimeError torch
    raises (``[enforce fail at inline_container.cc]``) or a safetensors/Rust I/O error."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


class NonFiniteRewards(TrainingError):
    """Too many NaN/inf training rewards in one epoch: stop (the last checkpoint is intact)."""

    def __init__(self, count: int, total: int, epoch: int):
        self.count, self.total, self.epoch = count, total, epoch
        super().__init__(
            f"{count} of {total} training rewards were NaN or infinite in epoch "
            f"{epoch + 1} (more than train.max_nonfinite_fraction); check the reward "
            "model, or raise train.max_nonfinite_fraction"
        )
