"""The run directory's guards (issue 14, items 2-4): a run name is one folder name, a new run goes
only into a new or empty folder, and one process at a time writes a run (an OS file lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdpo.errors import UsageError
from tdpo.rundir import (
    LOCK_FILE,
    RunLock,
    check_new_run_dir,
    check_not_locked,
    check_run_name,
    lock_holder,
)


@pytest.mark.parametrize("name", ["run", "tdpo-r-20260101-000000", "a.b", "é" * 127, "x" * 255])
def test_a_run_name_is_one_folder_name(name):
    check_run_name(name)


@pytest.mark.parametrize(
    ("name", "fix"),
    [
        (".", "one folder name"),
        ("..", "one folder name"),
        ("../../x", "one folder name"),
        ("/tmp/elsewhere", "one folder name"),
        ("a/b", "one folder name"),
        ("a\\b", "one folder name"),
        ("x" * 300, "300 bytes"),
        ("é" * 128, "256 bytes"),
    ],
)
def test_run_names_that_escape_or_cannot_exist_are_refused(name, fix):
    with pytest.raises(UsageError, match="^run_name=") as info:
        check_run_name(name)
    assert fix in str(info.value)
    assert len(str(info.value)) < 300  # a 300-character name is shortened in the message


def test_validate_refuses_the_run_name():
    from tdpo.config import build_config

    with pytest.raises(UsageError, match="run_name='../../x'"):
        build_config(overrides={"run_name": "../../x"})


def test_new_run_dir_accepts_a_new_or_empty_folder(tmp_path):
    check_new_run_dir(tmp_path / "new" / "run")
    (tmp_path / "empty").mkdir()
    check_new_run_dir(tmp_path / "empty")
    (tmp_path / "lock-only").mkdir()
    (tmp_path / "lock-only" / LOCK_FILE).write_text("123\n")  # a stale lock, not held
    check_new_run_dir(tmp_path / "lock-only")


@pytest.mark.parametrize(
    ("files", "fix"),
    [
        ({"config.yaml": "my: notes\n"}, "not a tdpo run"),
        ({"samples/epoch_0001.png": "png"}, "not a tdpo run"),
        ({"notes.txt": "x"}, "not a tdpo run"),
        ({"config.yaml": "seed: 0\n", LOCK_FILE: ""}, "already holds a run"),
        ({"config.yaml": "seed: 0\n", "metrics.jsonl": ""}, "already holds a run"),
        ({"checkpoints/x": ""}, "already holds a run"),
    ],
)
def test_new_run_dir_refuses_a_folder_that_is_not_empty(tmp_path, files, fix):
    run = tmp_path / "run"
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    with pytest.raises(UsageError, match="^run_name='run'") as info:
        check_new_run_dir(run)
    assert fix in str(info.value)


def test_new_run_dir_refuses_a_file_and_a_symlink(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        check_new_run_dir(tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(UsageError, match="not a folder"):
        check_new_run_dir(tmp_path / "link")


def test_a_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    run = tmp_path / "run"
    first = RunLock(run).acquire()
    assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert lock_holder(run) == str(os.getpid())
    with pytest.raises(UsageError, match=f"PID {os.getpid()}"):
        RunLock(run).acquire()
    with pytest.raises(UsageError, match=f"--resume=.*PID {os.getpid()}"):
        check_not_locked(run, "--resume")
    first.release()
    assert lock_holder(run) is None
    second = RunLock(run).acquire()  # the file stays; the lock is free again
    second.release(remove=True)
    assert not (run / LOCK_FILE).exists()


def test_the_lock_of_another_process_is_seen_and_freed_when_it_dies(tmp_path):
    run = tmp_path / "run"
    code = (
        "import sys, time; from tdpo.rundir import RunLock; "
        f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert lock_holder(run) == str(proc.pid)
        with pytest.raises(UsageError, match=f"PID {proc.pid}"):
            check_new_run_dir(run)
    finally:
        proc.kill()  # SIGKILL: the OS releases the lock
        proc.wait()
    deadline = time.monotonic() + 10
    while lock_holder(run) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock_holder(run) is None
    RunLock(run).acquire().release()


def test_lock_on_an_uncreatable_folder_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="^output_dir=.*cannot create"):
        RunLock(Path(tmp_path / "file" / "run")).acquire()


def test_under_accelerate_only_the_main_process_checks_the_folder(tmp_path, monkeypatch):
    """The other processes start while the main one creates, locks and writes the folder: they
    must not refuse it as "already holds a run" or "being written by PID"."""
    from tdpo.config import build_config
    from tdpo.run import check_run_dir

    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    (run / "config.yaml").write_text("seed: 0\n")
    config = build_config()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    check_run_dir(config, run, resume=False)
    check_run_dir(config, run, resume=True)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="PID"):
        check_run_dir(config, run, resume=False)
    lock.release()
