"""Without the Hub: a cached Hub CLIP model loads as the critic's backbone at once when the
Hub's endpoint does not answer (the local cache only, not huggingface_hub's retries), by Hub id
and by a named spec; a local folder needs no probe of the Hub."""

from __future__ import annotations

import time

from tdpo.backbones import load_image_embedder, sources
from tests.fixtures.hub_cache import cache_repo, run_against_silent_hub, silent_endpoint

REPO = "tdpo-test/tiny-clip"

LOAD = """
import sys, time
from tdpo.backbones import sources
sources.PROBE_SECONDS = 1.0  # the probe's own wait, shortened for the test
from tdpo.backbones import load_image_embedder
# imported before the clock starts (seconds on a loaded machine): the clock times the loads
from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection
for spec in sys.argv[1:]:
    start = time.monotonic()
    embedder = load_image_embedder(spec)
    print(spec, embedder.embed_dim, round(time.monotonic() - start, 1))
"""


def test_a_cached_hub_backbone_loads_at_once_when_the_hub_does_not_answer(tiny_clip_dir, tmp_path):
    cache_repo(tmp_path / "hf" / "hub", REPO, tiny_clip_dir)
    # TDPO_CLIP_L14: the named spec "clip" reads the same cached model
    args = [REPO, f"hf:{REPO}", "clip"]
    what = "a cached Hub backbone"
    result = run_against_silent_hub(LOAD, args, tmp_path / "hf", what, TDPO_CLIP_L14=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.strip().splitlines()]
    assert [(spec, dim) for spec, dim, _ in lines] == [
        (REPO, "16"),
        (f"hf:{REPO}", "16"),
        ("clip", "16"),
    ]
    assert all(float(seconds) < 10 for _, _, seconds in lines), lines


def test_a_local_backbone_folder_does_not_probe_the_hub(tiny_clip_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_PROBES", {})
    with silent_endpoint() as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        start = time.monotonic()
        assert load_image_embedder(str(tiny_clip_dir)).embed_dim == 16
        elapsed = time.monotonic() - start
    assert sources._PROBES == {}  # no HEAD request: a folder is no Hub load
    assert elapsed < sources.PROBE_SECONDS


def test_every_named_backbone_spec_has_its_sources():
    """One list (sources.BACKBONES) for the loader and the offline check."""
    assert {"clip", "pickscore", "hpsv2"} <= set(sources.BACKBONES)
    for spec, backbone in sources.BACKBONES.items():
        assert spec == spec.lower()
        assert all(name in sources.SOURCES for name in backbone.sources)
