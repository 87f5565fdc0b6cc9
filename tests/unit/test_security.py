"""Security: no unsafe deserialization or dynamic code in ``src/``; checkpoints are read
weights-only (a pickled object is refused, never run); a run writes only inside its own output
directory. See docs/reliability.md."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdpo.checkpoint import load_latest_checkpoint, save_checkpoint
from tdpo.errors import UsageError
from tests.fixtures.factories import as_set_args, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "tdpo"
# Known offender (not owned by this test's author): pretraining caches of the shapes world are
# read with weights_only=False. See test_world_pretrain_reads_its_caches_weights_only.
KNOWN_UNSAFE_TORCH_LOAD: set[str] = set()


def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _sources():
    return sorted(SRC.rglob("*.py"))


def _unsafe_torch_loads() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in _sources():
        for call in _calls(path):
            if _dotted(call.func) in ("torch.load", "load") and _dotted(call.func).endswith("load"):
                if _dotted(call.func) == "load":
                    continue  # a bare load() is not torch.load
                value = _kw(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    rel = str(path.relative_to(SRC))
                    found.setdefault(rel, []).append(call.lineno)
    return found


def test_every_torch_load_is_weights_only():
    found = {k: v for k, v in _unsafe_torch_loads().items() if k not in KNOWN_UNSAFE_TORCH_LOAD}
    assert not found, f"torch.load without weights_only=True: {found}"


def test_world_pretrain_reads_its_caches_weights_only():
    assert "world/pretrain.py" not in _unsafe_torch_loads()


def test_no_eval_exec_pickle_or_unsafe_yaml():
    problems = []
    for path in _sources():
        rel = path.relative_to(SRC)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n in ("pickle", "cPickle", "dill", "marshal", "shelve") for n in names):
                    problems.append(f"{rel}:{node.lineno} imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            builtin = isinstance(node.func, ast.Name)
            if builtin and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{rel}:{node.lineno} {name}(")
            if name in ("pickle.load", "pickle.loads", "yaml.unsafe_load", "yaml.full_load"):
                problems.append(f"{rel}:{node.lineno} {name}(")
            if name == "yaml.load":
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if not (loader is not None and "SafeLoader" in ast.unparse(loader)):
                    problems.append(f"{rel}:{node.lineno} yaml.load without SafeLoader")
            if name in ("numpy.load", "np.load"):
                allow = _kw(node, "allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    problems.append(f"{rel}:{node.lineno} np.load(allow_pickle=True)")
    assert not problems, problems


def test_checkpoint_module_reads_weights_only():
    calls = [c for c in _calls(SRC / "checkpoint.py") if _dotted(c.func) == "torch.load"]
    assert calls, "checkpoint.py must read state.pt with torch.load"
    for call in calls:
        value = _kw(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True


class _Payload:
    """Unpickling this would create a file: it must never happen when a checkpoint loads."""

    marker: Path | None = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_in_a_checkpoint_is_refused_not_run(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 1, {"epoch": 1, "w": torch.zeros(2)}, 2, "h")
    ckpt = run / "checkpoints" / "epoch_000001"
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    torch.save({"epoch": 1, "w": payload}, ckpt / "state.pt")
    # A manifest that matches the malicious file: checksums do not protect against a forger.
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "state.pt").read_bytes()
    manifest["files"]["state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="does not load weights-only"):
        load_latest_checkpoint(run, log=lambda _: None)
    assert not marker.exists()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            out[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


def test_a_run_writes_only_inside_its_output_dir(tiny_pipeline_dir, tiny_clip_dir, tmp_path):
    home, cwd, out = tmp_path / "home", tmp_path / "cwd", tmp_path / "out"
    for d in (home, cwd, out):
        d.mkdir()
    (home / ".keep").write_text("x")
    overrides = tiny_overrides(
        tiny_pipeline_dir,
        tiny_clip_dir,
        run_name="run",
        **{"train.batch_size": 4, "train.epochs": 1, "log.tensorboard": True},
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "XDG_", "TORCH_", "TRANSFORMERS_", "MPL"))
    }
    env.update(HOME=str(home), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    models = [tiny_pipeline_dir, tiny_clip_dir]
    before_home, before_cwd = _snapshot(home), _snapshot(cwd)
    before_models = [_snapshot(m) for m in models]
    result = subprocess.run(
        [sys.executable, "-m", "tdpo.cli", "train", "--preset", "tdpo-r"]
        + ["--output-dir", str(out), *as_set_args(overrides)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert _snapshot(home) == before_home, "the run wrote under $HOME"
    assert _snapshot(cwd) == before_cwd, "the run wrote into the working directory"
    assert [_snapshot(m) for m in models] == before_models, "the run modified its models"
    assert sorted(p.name for p in out.iterdir()) == ["run"]
