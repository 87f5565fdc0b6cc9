"""Weighted reward specs, model sources and Hub reward errors (no model loads)."""

from __future__ import annotations

import pytest
import torch

from tdpo.backbones.sources import SOURCES, resolve, resolve_file
from tdpo.errors import UsageError
from tdpo.rewards import _REGISTRY, build_reward, build_weighted_reward, register_reward
from tdpo.rewards.combine import parse_reward_spec


@pytest.mark.parametrize(
    ("spec", "terms"),
    [
        ("pickscore", [("pickscore", 1.0)]),
        ("pickscore:1.0,aesthetic:0.5", [("pickscore", 1.0), ("aesthetic", 0.5)]),
        (" hpsv2 : 2 , aesthetic:-1e-1 ", [("hpsv2", 2.0), ("aesthetic", -0.1)]),
        ("my_pkg.rewards:make", [("my_pkg.rewards:make", 1.0)]),
        ("my_pkg.rewards:make:0.25,aesthetic", [("my_pkg.rewards:make", 0.25), ("aesthetic", 1.0)]),
    ],
)
def test_parse_reward_spec(spec, terms):
    assert parse_reward_spec(spec) == terms


@pytest.mark.parametrize("spec", ["", "a,,b", ":0.5", "a:nan", "a:inf"])
def test_parse_reward_spec_rejects(spec):
    with pytest.raises(UsageError):
        parse_reward_spec(spec)


@pytest.fixture
def toy_rewards():
    def make(value):
        def factory(device=None):
            def reward(images, prompts, metadata):
                out = images.mean(dim=(1, 2, 3)) * value
                return out, {"toy": value}

            return reward

        return factory

    register_reward("_toy_one")(make(1.0))
    register_reward("_toy_two")(make(2.0))
    yield
    _REGISTRY.pop("_toy_one", None)
    _REGISTRY.pop("_toy_two", None)


def test_weighted_sum_of_rewards_is_differentiable(toy_rewards):
    reward = build_reward("_toy_one:0.5,_toy_two:-1")
    assert reward.terms == [("_toy_one", 0.5), ("_toy_two", -1.0)]
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    values, info = reward(images, ["a"] * 3, [{}] * 3)
    mean = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(values, 0.5 * mean - 2 * mean)
    assert set(info) >= {"_toy_one_mean", "_toy_two_mean"}
    values.sum().backward()
    assert images.grad is not None


def test_single_unit_term_is_returned_unwrapped(toy_rewards):
    reward = build_weighted_reward([("_toy_one", 1.0)])
    assert not hasattr(reward, "terms")


def test_check_factory_modules_finds_modules_without_importing_them():
    import sys

    from tdpo.rewards import check_factory_modules

    sys.modules.pop("tests.rewards_for_tests", None)
    check_factory_modules("jpeg_compressibility:1,tests.rewards_for_tests:brightness:0.5")
    check_factory_modules("no_such_reward")  # names are left to check_reward_name
    assert "tests.rewards_for_tests" not in sys.modules
    with pytest.raises(UsageError, match="cannot find the module no_such_pkg.mod") as info:
        check_factory_modules("aesthetic,no_such_pkg.mod:make:0.5", "reward.panel[0]")
    assert info.value.field == "reward.panel[0]"


def test_check_reward_name_checks_every_term():
    from tdpo.rewards import check_reward_name

    check_reward_name("jpeg_compressibility:0.5,tests.rewards_for_tests:brightness")
    with pytest.raises(UsageError, match="unknown reward") as info:
        check_reward_name("jpeg_compressibility,no_such_reward:2", "eval.rewards[1]")
    assert info.value.field == "eval.rewards[1]" and "no_such_reward" in str(info.value)
    with pytest.raises(UsageError, match="name a reward"):
        check_reward_name(" ")


def test_unknown_term_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown reward"):
        build_reward("no_such_reward:1.0")


def test_sources_resolve_override_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.delenv("TDPO_PICKSCORE_MODEL", raising=False)
    assert resolve("pickscore_model") == "yuvalkirstain/PickScore_v1"
    monkeypatch.setenv("TDPO_PICKSCORE_MODEL", str(tmp_path))
    assert resolve("pickscore_model") == str(tmp_path)
    assert resolve("pickscore_model", "other/model") == "other/model"
    monkeypatch.delenv("TDPO_AESTHETIC_MLP", raising=False)
    assert resolve("aesthetic_mlp") == (
        "hub:camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
    )
    assert all(source.env.startswith("TDPO_") for source in SOURCES.values())


def test_missing_weight_files_are_one_line_usage_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("TDPO_HPSV2_CHECKPOINT", raising=False)
    with pytest.raises(UsageError, match="TDPO_HPSV2_CHECKPOINT") as info:
        resolve_file("hpsv2_checkpoint")
    assert "\n" not in str(info.value)
    monkeypatch.setenv("TDPO_AESTHETIC_MLP", str(tmp_path / "missing.pth"))
    with pytest.raises(UsageError, match="file not found"):
        resolve_file("aesthetic_mlp")


def test_hub_rewards_register_without_loading_models():
    from tdpo.rewards import hub

    for name in ("aesthetic", "pickscore", "hpsv2", "imagereward", "clipscore"):
        assert _REGISTRY[name] is getattr(hub, name)


def test_missing_local_model_folder_is_a_usage_error(tmp_path):
    from tdpo.rewards import hub

    with pytest.raises(UsageError, match="does not exist"):
        hub.clipscore(model=str(tmp_path / "nope"))
