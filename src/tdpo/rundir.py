"""The run directory, the user-facing contract of a training run (README, "The run directory"):
the names of its parts, in one place, and the checks made before a run writes into a folder.

    runs/<name>/
      config.yaml     the full resolved config (what --resume reads)
      metrics.jsonl   one JSON object per epoch (and per evaluation)
      samples/        image grids
      checkpoints/    resumable state, written atomically
      final/          LoRA weights in diffusers format (and the critic head)
      best/           the best LoRA by eval.monitor
      report/         `tdpo report` output (rewritten when the run is resumed)
      eval/           `tdpo eval --lora RUN` summaries (tdpo sample writes into samples/)
      .lock           the run's writer lock: an OS file lock (flock) held for the whole run by
                      the process that writes it; holds its PID
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tdpo.errors import UsageError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
BEST_DIR = "best"
REPORT_DIR = "report"
LOCK_FILE = ".lock"
MAX_NAME_BYTES = 255  # a folder name on Linux and macOS file systems


def is_run_dir(path: Path) -> bool:
    """A folder that a run has written (its config.yaml)."""
    return (Path(path) / CONFIG_FILE).is_file()


def has_started(run_dir: Path) -> bool:
    """The run has trained or evaluated at least once (metrics or checkpoints exist)."""
    return (run_dir / CHECKPOINTS_DIR).exists() or (run_dir / METRICS_FILE).exists()


def is_our_run(run_dir: Path) -> bool:
    """A folder that ``tdpo train`` wrote: metrics or checkpoints, or its config.yaml and lock
    (a user's folder that merely holds a config.yaml is not)."""
    run_dir = Path(run_dir)
    return has_started(run_dir) or (is_run_dir(run_dir) and (run_dir / LOCK_FILE).is_file())


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_run_name(name: str | None, field: str = "run_name") -> None:
    """A run name is one folder name: no ``/``, not ``.`` or ``..``, at most 255 bytes (None or
    empty: the default ``<presets>-<method>-<timestamp>``, see tdpo.run.default_run_dir)."""
    if not name:
        return
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise UsageError(
            field,
            _short(name),
            "must be one folder name (no '/' or '\\', not '.' or '..'): the run is written to "
            "output_dir/run_name; choose the parent folder with --output-dir",
        )
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise UsageError(
            field,
            _short(name),
            f"is {size} bytes long; a folder name has at most {MAX_NAME_BYTES}: choose a shorter one",
        )


PROBE_WAIT_S = 0.5  # a lock held this long is a writer, not another process's momentary probe


def _flock_exclusive(fd: int) -> bool:
    """Take the exclusive lock, retrying for PROBE_WAIT_S: :func:`lock_holder` (e.g. a second
    `tdpo train`'s check) holds a shared lock for microseconds, which must not read as a writer."""
    deadline = time.monotonic() + PROBE_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def lock_holder(run_dir: Path) -> str | None:
    """The PID (as text, or "unknown") of the process holding the run's lock; None when no
    process holds it. Reads and probes the lock file without writing anything."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:  # shared: probes from several processes never block each other
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return text if text.isdigit() else "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _locked_message(run_dir: Path, pid: str) -> str:
    return (
        f"{run_dir} is being written by another tdpo process (PID {pid}); one process writes a "
        "run: wait for it to end (or stop it), or choose another --set run_name=..."
    )


def check_not_locked(run_dir: Path, field: str = "run_name") -> None:
    """UsageError naming the holder's PID when another process writes the run directory."""
    pid = lock_holder(run_dir)
    if pid is not None:
        raise UsageError(field, str(run_dir), _locked_message(run_dir, pid))


def check_new_run_dir(run_dir: Path, probe_lock: bool = True) -> None:
    """A new run goes into a folder that does not exist yet or is empty (but for its lock): never
    into another run, never into a folder of the user's files. The folder must be creatable and
    writable (checked without writing anything). ``probe_lock=False`` when this process holds
    the lock (the check repeated under it)."""
    run_dir = Path(run_dir)
    try:
        _check_new_run_dir(run_dir, probe_lock)
    except OSError as error:  # e.g. a name too long for the file system, a permission
        raise UsageError(
            "output_dir",
            str(run_dir.parent),
            f"cannot use {_short(str(run_dir), 120)} ({error.strerror or error}); "
            "choose another --output-dir or --set run_name=...",
        ) from None


def _check_new_run_dir(run_dir: Path, probe_lock: bool) -> None:
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UsageError(
            "run_name",
            run_dir.name,
            f"{run_dir} exists and is not a folder; choose another --set run_name=...",
        )
    if run_dir.is_dir():
        if probe_lock:
            check_not_locked(run_dir)
        if is_our_run(run_dir):
            raise UsageError(
                "run_name",
                run_dir.name,
                f"{run_dir} already holds a run; resume it with tdpo train --resume {run_dir}, "
                "or choose another --set run_name=...",
            )
        if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise UsageError(
                "run_name",
                run_dir.name,
                f"{run_dir} is not empty and not a tdpo run; a new run goes into a new or empty "
                "folder (nothing is overwritten): choose another --set run_name=... or "
                "--output-dir",
            )
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # e.g. output_dir=/etc/hostname/x: a regular file in the path
        raise UsageError(
            "output_dir",
            str(run_dir.parent),
            f"{parent} is a file, not a folder; choose another --output-dir",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            "output_dir", str(run_dir.parent), "not writable; choose another --output-dir"
        )


class RunLock:
    """One writer per run directory: an exclusive ``fcntl.flock`` on ``run_dir/.lock`` (holding
    the PID), taken before anything is written and held until :meth:`release` (or the process
    ends: the OS releases it, also after SIGKILL). A second writer gets a UsageError naming the
    holder's PID. The file stays (removing it would race with a process opening it), except
    with ``release(remove=True)`` for a run folder that is being removed."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, field: str = "run_name") -> RunLock:
        """Create the run folder if needed and lock it; UsageError if another process holds the
        lock or the folder cannot be created."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # e.g. --output-dir /proc/x as root, a read-only file system
            raise UsageError(
                "output_dir",
                str(self.run_dir.parent),
                f"cannot create {_short(str(self.run_dir), 120)} ({error.strerror or error}); "
                "choose another --output-dir",
            ) from None
        if fcntl is None:
            return self
        for _ in range(10):
            try:
                fd = os.open(
                    self.path,
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0),
                    0o644,
                )
            except OSError as error:
                raise UsageError(
                    field,
                    str(self.run_dir),
                    f"cannot create the lock file {self.path} ({error.strerror or error})",
                ) from None
            if not _flock_exclusive(fd):
                text = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                pid = text if text.isdigit() else "unknown"
                raise UsageError(
                    field, str(self.run_dir), _locked_message(self.run_dir, pid)
                ) from None
            # The holder we waited for may have removed the file: lock the file the path names.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            self._fd = fd
            return self
        raise UsageError(field, str(self.run_dir), "could not lock the run directory; try again")

    def release(self, remove: bool = False) -> None:
        """Unlock (and with ``remove`` delete the lock file first, while still holding it)."""
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
