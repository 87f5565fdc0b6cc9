"""Without the Hub: a critic backbone that is not cached fails before anything loads (one line
naming critic.backbone, exit 2), and a cached Hub pipeline loads at once when the Hub's endpoint
does not answer (the local cache only, not huggingface_hub's retries)."""

from __future__ import annotations

import time

import pytest

from tdpo.backbones import sources
from tdpo.cli import main
from tdpo.errors import UsageError
from tests.fixtures.hub_cache import cache_repo, run_against_silent_hub

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
    cache_repo(tmp_path / "hf" / "hub", "tdpo-test/tiny-sd", tiny_pipeline_dir)
    what = "a cached Hub pipeline"
    result = run_against_silent_hub(LOAD, ["tdpo-test/tiny-sd"], tmp_path / "hf", what)
    assert result.returncode == 0, result.stderr[-2000:]
    name, seconds = result.stdout.split()[-2:]
    assert name == "StableDiffusionPipeline" and float(seconds) < 20
