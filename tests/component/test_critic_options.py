"""The critic's options (x0 input, prompt input), the group normalization, the per-quarter
diagnostics and the reset schedule, on tiny models."""

from __future__ import annotations

import pytest
import torch

from tdpo.config import build_config
from tdpo.errors import UsageError

GROUPED = {"sample.prompts_per_epoch": 2, "train.normalization": "group"}


def test_x0_prompt_critic_logs_every_diagnostic(make_trainer):
    tr = make_trainer(
        **GROUPED,
        **{
            "critic.input": "x0",
            "critic.prompt_input": True,
            "critic.head": "relu",
            "log.critic_reference": True,
        },
    )
    method = tr.method
    text_dim = tr.policy.unet.config.cross_attention_dim
    assert method.critic.in_dim == method.embedder.embed_dim + text_dim
    metrics = tr.epoch_step(0)
    for q in ("q1", "q2", "q3", "q4"):
        assert f"critic_ev/{q}" in metrics and f"critic_ref/{q}" in metrics
        assert 0.0 <= metrics[f"critic_ref/{q}"] <= 1.0
    assert 0.0 <= metrics["dormant_fraction/b8"] <= 1.0


def test_x0_features_differ_from_state_features(make_trainer):
    """At step 0 the state is pure noise but the x0 estimate is an image: the critic inputs
    of the two options must differ (the option is wired to what it says)."""
    states = make_trainer(**GROUPED)
    x0 = make_trainer(**GROUPED, **{"critic.input": "x0"})
    traj, _ = x0.method.sample(0)
    assert traj.x0_preds.shape == traj.latents[:, 1:].shape
    from_x0, _ = x0.method.state_features(traj)
    from_states, _ = states.method.state_features(traj)
    assert from_x0.shape == from_states.shape
    assert not torch.allclose(from_x0[:, 0], from_states[:, 0], atol=1e-3)


def test_group_normalization_gives_each_prompt_zero_mean(make_trainer):
    tr = make_trainer(**GROUPED, preset="ddpo-2")
    rewards = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 9.0])
    prompts = ["a"] * 4 + ["b"] * 4
    out = tr.method.normalize(rewards, prompts, torch.ones(8, dtype=torch.bool))
    assert out[:4].mean().abs() < 1e-6 and out[4:].mean().abs() < 1e-6
    assert out[:4].std(correction=0) == pytest.approx(1.0, abs=1e-4)


def test_no_reset_after_the_last_epoch(make_trainer):
    """A reset at the end would train nothing and only overwrite the saved critic."""
    tr = make_trainer(**{"reset.every": 1, "train.epochs": 2})
    assert tr.epoch_step(0)["neurons_reset"] > 0
    assert tr.epoch_step(1)["neurons_reset"] == 0


def test_group_normalization_needs_groups():
    with pytest.raises(UsageError, match="sample.prompts_per_epoch"):
        build_config(overrides={"train.normalization": "group", "sample.prompts_per_epoch": 0})


def test_old_run_configs_still_load():
    """train.per_prompt_normalization (earlier versions) maps onto train.normalization."""
    off = build_config(base={"train": {"per_prompt_normalization": False}})
    on = build_config(base={"train": {"per_prompt_normalization": True}})
    assert (off.train.normalization, on.train.normalization) == ("batch", "per_prompt")
