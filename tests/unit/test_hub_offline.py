"""Hub rewards without the Hub (issue 13): offline (HF_HUB_OFFLINE=1) or with the Hub out of
reach, a reward whose model is not cached fails at once, before anything loads and without
huggingface_hub's retries, naming the user's value, the missing file and the variable to set."""

from __future__ import annotations

import time

import pytest

from tdpo.backbones import sources
from tdpo.cli import main
from tdpo.errors import UsageError

MISSING = "nobody/no-such-clip-model"  # a Hub id no cache holds


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(sources, "_PROBES", {})
    monkeypatch.setenv("TDPO_CLIP_L14", MISSING)


def test_offline_train_names_the_reward_the_file_and_the_variables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "runs"
    code = main(["train", "--reward", "aesthetic", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"tdpo: error: reward.name='aesthetic': needs {MISSING}/config.json")
    assert "not in the local Hugging Face cache" in err
    assert "HF_HUB_OFFLINE" in err and "TDPO_CLIP_L14" in err
    assert not out.exists()  # checked before the run folder or a model
    # a panel reward names its own field
    code = main(["train", "--set", "reward.panel=[clipscore]", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tdpo: error: reward.panel[0]='clipscore': needs ")
    assert "TDPO_CLIPSCORE_MODEL" in err


def test_offline_eval_checks_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["eval", "--model", "shapes-world", "--prompt", "a cat", "--reward"]
    code = main([*args, "shapes_gold:1.0,aesthetic:0.5", "--out", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tdpo: error: --reward='shapes_gold:1.0,aesthetic:0.5'")
    assert f"needs {MISSING}/config.json" in err and "sampling" not in capsys.readouterr().out


def test_an_unreachable_hub_fails_at_once_without_retries(monkeypatch):
    """No HF_HUB_OFFLINE, but the Hub's endpoint refuses connections: one probe, then the
    local cache only (huggingface_hub alone retries five times, about 30 s)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported online
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    from tdpo.rewards import build_reward
    from tdpo.rewards.hub import check_reward_sources

    assert not sources.hub_reachable()
    with pytest.raises(UsageError) as info:
        check_reward_sources("aesthetic")
    assert "cannot be reached" in info.value.fix and info.value.value == "aesthetic"
    start = time.monotonic()
    with pytest.raises(UsageError) as info:  # the factory itself, past the check
        build_reward("aesthetic")
    assert time.monotonic() - start < 10
    assert info.value.field == "reward.name" and info.value.value == "aesthetic"
    assert MISSING in info.value.fix and "\n" not in str(info.value)
    assert constants.HF_HUB_OFFLINE is False  # restored after the load


def test_a_local_path_that_does_not_exist_names_its_variable(monkeypatch):
    monkeypatch.setenv("TDPO_AESTHETIC_MLP", "/no/such/mlp.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as info:
        sources.check_available("aesthetic_mlp", "reward.name", "aesthetic")
    assert "/no/such/mlp.pth" in info.value.fix and "TDPO_AESTHETIC_MLP" in info.value.fix
