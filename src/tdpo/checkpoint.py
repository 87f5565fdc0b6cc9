"""Atomic, verified, resumable checkpoints of the whole training state.

Layout: ``run_dir/checkpoints/epoch_{epoch:06d}/`` holds ``state.pt`` (``torch.save`` of a
nested dict of tensors and plain Python values) and ``manifest.json`` (format, epoch, config
hash, sha256 and size of every file). A checkpoint is written under ``.tmp-*`` and renamed
into place only when complete, with the manifest written last; loading verifies every hash and
reads ``state.pt`` with ``torch.load(weights_only=True)``, so nothing is ever unpickled beyond
tensors and plain containers.

Crash safety: a process killed at any moment (SIGKILL, power loss) leaves only complete
checkpoints under their final names. Temporaries are named ``.tmp-*`` and ignored by readers;
old checkpoints are renamed to ``.tmp-*`` before they are deleted, so a half-deleted checkpoint
never keeps its final name. This module imports torch lazily: the CLI reads manifests (config
hash, process count) to refuse an incompatible resume before anything heavy loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tdpo.errors import StorageError, UsageError, is_disk_full

FORMAT = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"^epoch_(\d{6,})$")


def _allowed_leaves() -> tuple[type, ...]:
    """Leaf types that torch.load(weights_only=True) reads back without custom globals."""
    import torch  # deferred: manifests are read (resume checks) before torch loads

    return (torch.Tensor, bool, int, float, str, bytes, type(None), torch.dtype, torch.Size)


def config_hash(config_dict: dict) -> str:
    """First 16 hex chars of the sha256 of the config as sorted-key JSON."""
    text = json.dumps(config_dict, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_state(value: Any, where: str = "state", leaves: tuple[type, ...] | None = None) -> None:
    """Refuse anything that weights-only loading could not read back (or would have to unpickle)."""
    leaves = leaves or _allowed_leaves()
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint {where} has a key of type {type(key).__name__}")
            _check_state(item, f"{where}[{key!r}]", leaves)
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_state(item, f"{where}[{i}]", leaves)
    elif not isinstance(value, leaves):
        raise TypeError(
            f"checkpoint {where} is a {type(value).__module__}.{type(value).__qualname__}; a "
            "checkpoint holds only tensors, Python scalars, strings, lists, tuples and dicts "
            "(convert numpy arrays with .tolist() or torch.from_numpy)"
        )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _epoch_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def _final_dirs(checkpoints: Path) -> list[Path]:
    """Directories named ``epoch_*`` (complete or not), oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and _epoch_of(p) is not None]
    return sorted(found, key=lambda p: _epoch_of(p) or 0)


def save_checkpoint(run_dir: Path, epoch: int, state: dict, keep: int, config_hash: str) -> Path:
    """Write ``checkpoints/epoch_{epoch:06d}`` atomically and keep the newest ``keep``.

    Checkpoints of later epochs than ``epoch`` are deleted: they belong to a run that was
    resumed from an earlier point, and would otherwise be picked up by the next resume.
    Leftover ``.tmp-*`` directories (from a crash mid-save) are deleted too.
    """
    import torch  # deferred: manifests are read (resume checks) before torch loads

    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    _check_state(state)
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    name = f"epoch_{epoch:06d}"
    tmp = checkpoints / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        torch.save(state, tmp / STATE_FILE)
        _fsync_file(tmp / STATE_FILE)
        files = {
            p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {"format": FORMAT, "epoch": epoch, "config_hash": config_hash, "files": files}
        if isinstance(state.get("num_processes"), int):  # lets a resume be refused early
            manifest["num_processes"] = state["num_processes"]
        with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:  # last: marks completeness
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as error:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint stays behind
        needed = _state_bytes(state)
        free = _free_bytes(checkpoints)
        torch_write = isinstance(error, RuntimeError) and "inline_container" in str(error)
        if is_disk_full(error) or (torch_write and free is not None and free < needed):
            raise StorageError(
                f"cannot write checkpoint {name} into {checkpoints}: no space left on the "
                f"device (it needs about {_megabytes(needed)}, "
                f"{_megabytes(free) if free is not None else 'unknown'} free); free some space "
                f"and resume with: tdpo train --resume {Path(run_dir)} (the checkpoints "
                "written before are intact)"
            ) from None
        raise

    final = checkpoints / name
    if final.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = checkpoints / f".tmp-replaced-{name}-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(checkpoints)

    # Prune: stale temporaries, checkpoints from an abandoned later timeline, all but `keep`.
    # A checkpoint is renamed to .tmp-* (atomic) before it is deleted, so a kill mid-delete never
    # leaves a partial directory under a final name.
    complete = []
    for path in _final_dirs(checkpoints):
        if (_epoch_of(path) or 0) > epoch:
            _discard(path)
        elif (path / MANIFEST_FILE).is_file():
            complete.append(path)
    for path in complete[:-keep]:
        _discard(path)
    _fsync_dir(checkpoints)
    for path in checkpoints.iterdir():
        if path.name.startswith(".tmp-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".tmp-"):
            path.unlink(missing_ok=True)
    _fsync_dir(checkpoints)
    return final


def _state_bytes(state: Any) -> int:
    """About what ``torch.save(state)`` writes: the tensors' bytes plus 1 MB for the rest."""
    import torch  # deferred: manifests are read (resume checks) before torch loads

    total = 0
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return total + (1 << 20)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: rename it to ``.tmp-deleted-*`` first, then remove it."""
    doomed = path.parent / f".tmp-deleted-{path.name}-{os.getpid()}"
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (final name and a manifest), oldest first."""
    return [
        p for p in _final_dirs(Path(run_dir) / CHECKPOINTS_DIR) if (p / MANIFEST_FILE).is_file()
    ]


def read_manifest(path: Path) -> dict:
    """The parsed ``manifest.json`` of a checkpoint directory."""
    with open(Path(path) / MANIFEST_FILE, encoding="utf-8") as f:
        return json.load(f)


def verify_checkpoint(path: Path) -> str | None:
    """None if the manifest is present and every file matches it, else a one-line reason."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return f"missing {MANIFEST_FILE}"
    try:
        manifest = read_manifest(path)
        files = manifest["files"]
        fmt = manifest["format"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST_FILE} ({type(error).__name__})"
    if fmt != FORMAT:
        return f"unknown checkpoint format {fmt!r} (this tdpo reads format {FORMAT})"
    if _epoch_of(path) is not None and manifest.get("epoch") != _epoch_of(path):
        return f"manifest epoch {manifest.get('epoch')!r} does not match the directory name"
    if STATE_FILE not in files:
        return f"{STATE_FILE} not listed in {MANIFEST_FILE}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        size = file.stat().st_size
        if size != expected.get("bytes"):
            return f"size mismatch in {name}: {size} bytes, expected {expected.get('bytes')}"
        if _sha256(file) != expected.get("sha256"):
            return f"sha256 mismatch in {name}"
    return None


def load_latest_checkpoint(
    run_dir: Path, log: Callable[[str], None] = print
) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies and loads, with its state; None if there is none.

    Skipped (corrupt) checkpoints are reported in one line through ``log``. If checkpoints
    exist but none is usable, a :class:`UsageError` is raised rather than silently starting over.
    """
    import torch  # deferred: manifests are read (resume checks) before torch loads

    candidates = list(reversed(list_checkpoints(run_dir)))
    if not candidates:
        return None
    bad: list[tuple[str, str]] = []
    for path in candidates:
        reason = verify_checkpoint(path)
        if reason is None:
            try:
                state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
            except Exception as error:  # a refused (non weights-only) or unreadable pickle
                reason = f"{STATE_FILE} does not load weights-only ({type(error).__name__})"
            else:
                if bad:
                    log(f"{_describe(bad)}; using {path.name}")
                return path, state
        bad.append((path.name, reason))
    raise UsageError(
        "--resume",
        str(run_dir),
        f"{_describe(bad)}; no usable checkpoint is left: delete "
        f"{Path(run_dir) / CHECKPOINTS_DIR} to start over, or restore it from a backup",
    )


def _describe(bad: list[tuple[str, str]]) -> str:
    if len(bad) == 1:
        return f"checkpoint {bad[0][0]} is corrupt ({bad[0][1]})"
    details = "; ".join(f"{name}: {reason}" for name, reason in bad)
    return f"checkpoints {', '.join(n for n, _ in bad)} are corrupt ({details})"


def check_resume(run_dir: Path, expected_hash: str, num_processes: int) -> None:
    """Cheap checks of a resume against the newest complete checkpoint's manifest (no torch, no
    hashing of state files): the config hash and the process count. Raises :class:`UsageError`.

    Only a manifest that parses is checked; corruption is left to :func:`load_latest_checkpoint`,
    which falls back to an older checkpoint and reports it.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            manifest = read_manifest(path)
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, dict):
            continue
        if manifest.get("config_hash") != expected_hash:
            raise UsageError(
                "--resume",
                str(run_dir),
                f"{path.name} was written with a different configuration (config.yaml was "
                "edited?); resume with the run's own config.yaml or start a new run",
            )
        saved = manifest.get("num_processes")
        if isinstance(saved, int) and saved != num_processes:
            raise UsageError(
                "--resume",
                str(run_dir),
                f"the run used {saved} processes; resume it with the same number "
                f"(this launch has {num_processes})",
            )
        return


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and (if available) all CUDA RNG states, weights-only loadable."""
    # deferred: manifests are read (resume checks) before numpy and torch load
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": str(name),
            "keys": [int(k) for k in keys.tolist()],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA only where present and available)."""
    # deferred: manifests are read (resume checks) before numpy and torch load
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            np.asarray(n["keys"], dtype=np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("torch_cuda")
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for device in range(count):
            torch.cuda.set_rng_state(cuda_states[device].cpu(), device)
