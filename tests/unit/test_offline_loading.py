"""Without the Hub: a critic backbone that is not cached fails before anything loads (one line
naming critic.backbone, exit 2), and a cached Hub pipeline loads at once when the Hub's endpoint
does not answer (the local cache only, not huggingface_hub's retries)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdpo.backbones import sources
from tdpo.cli import main
from tdpo.errors import UsageError

MISSING = "openai/clip-vit-base-patch32"  # a Hub id the test cache does not hold


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(sources, "_PROBES", {})


def test_offline_critic_backbone_fails_before_anything_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "runs"
    start = time.monotonic()
    code = main(["train", "--set", f"critic.backbone={MISSING}", "--output-dir", str(out)])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tdpo: error: critic.backbone='{MISSING}': needs {MISSING}/config.json")
    assert "HF_HUB_OFFLINE" in err and f"hf download {MISSING}" in err
    assert not out.exists()  # before the run folder or a model
    assert elapsed < 10  # loading the pipeline first took longer than this alone
    # named backbones name their sources' variables
    code = main(["train", "--set", "critic.backbone=pickscore", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tdpo: error: critic.backbone='pickscore': needs ")
    assert "TDPO_PICKSCORE_MODEL" in err


def test_a_critic_that_does_not_embed_images_needs_no_backbone(monkeypatch):
    from tdpo.config import build_config
    from tdpo.run import check_hub_sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for preset, extra in (("ddpo-2", {}), ("tdpo-r", {"critic.input": "latent"})):
        config = build_config(preset=preset, overrides={"critic.backbone": MISSING, **extra})
        check_hub_sources(config, [])  # no error: the backbone is never loaded
    config = build_config(preset="tdpo-r", overrides={"critic.backbone": f"hf:{MISSING}"})
    with pytest.raises(UsageError) as info:
        check_hub_sources(config, [])
    assert info.value.field == "critic.backbone" and info.value.value == f"hf:{MISSING}"


def _cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """``repo_id`` in huggingface_hub's cache layout (what ``hf download`` leaves)."""
    commit = "0" * 40
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


LOAD = """
import sys, time
from tdpo.backbones import sources
sources.PROBE_SECONDS = 1.0  # the probe's own wait, shortened for the test
from tdpo.policy import load_pipeline
start = time.monotonic()
pipe = load_pipeline(sys.argv[1])
print(type(pipe).__name__, round(time.monotonic() - start, 1))
"""


def test_a_cached_hub_pipeline_loads_at_once_when_the_hub_does_not_answer(
    tiny_pipeline_dir, tmp_path
):
    """The endpoint accepts connections and never answers (a stalled proxy): huggingface_hub
    alone waits and retries on every file (minutes); tdpo probes once and reads the cache."""
    _cache_repo(tmp_path / "hf" / "hub", "tdpo-test/tiny-sd", tiny_pipeline_dir)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1024)  # never accepted: requests time out
        env = {
            **os.environ,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}",
        }
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
        try:
            result = subprocess.run(
                [sys.executable, "-c", LOAD, "tdpo-test/tiny-sd"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("loading a cached Hub pipeline went through huggingface_hub's retries")
    assert result.returncode == 0, result.stderr[-2000:]
    name, seconds = result.stdout.split()[-2:]
    assert name == "StableDiffusionPipeline" and float(seconds) < 20
