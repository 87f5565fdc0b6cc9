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
