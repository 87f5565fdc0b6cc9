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
    old = build_config(base={"critic": {"input": "image"}})  # keys added since: old behaviour
    assert old.train.normalization == "per_prompt" and not old.critic.prompt_input
    assert (old.critic.init, old.kl.loss_coef, old.log.critic_reference) == ("reference", 0, False)
    assert old.critic.replay_epochs == 1
    assert build_config().critic.prompt_input  # a new config gets the new defaults


def test_standardized_head_keeps_the_pooled_statistics_of_every_update():
    from tdpo.critic import CriticHead

    head = CriticHead(6, timestep_input=True, standardize=True)
    gen = torch.Generator().manual_seed(0)
    first, second = (
        torch.randn(10, 3, 6, generator=gen) * 5 + 2,
        torch.randn(7, 3, 6, generator=gen),
    )
    t1, t2 = (
        torch.randint(0, 1000, (10, 3), generator=gen),
        torch.randint(0, 1000, (7, 3), generator=gen),
    )
    head.update_statistics(first, t1)
    head.update_statistics(second, t2)
    pooled = torch.cat(
        [head.raw_features(first, t1).reshape(-1, 7), head.raw_features(second, t2).reshape(-1, 7)]
    ).double()
    torch.testing.assert_close(head.feature_mean, pooled.mean(0))
    torch.testing.assert_close(head.feature_var, pooled.var(0, correction=0))
    standardized = head.features(second, t2).reshape(-1, 7)
    expected = (head.raw_features(second, t2).reshape(-1, 7) - pooled.mean(0)) / pooled.std(
        0, correction=0
    )
    torch.testing.assert_close(standardized, expected.float(), atol=1e-5, rtol=1e-5)
    assert "feature_mean" in head.state_dict()  # saved with the head (checkpoints, final/)


def test_fan_in_init_starts_at_zero_and_resets_redraw_per_layer():
    from tdpo.algos.neurons import reset_neurons
    from tdpo.critic import CriticHead

    head = CriticHead(32, kind="relu", init="fan_in")
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert torch.count_nonzero(linears[-1].weight) == 0
    assert linears[0].weight.std().item() == pytest.approx(32**-0.5, rel=0.1)
    assert linears[1].weight.std().item() == pytest.approx(1024**-0.5, rel=0.1)
    masks = [torch.ones(layer.out_features, dtype=torch.bool) for layer in linears[:-1]]
    reset_neurons(head.mlp, masks, head.weight_std, generator=torch.Generator().manual_seed(3))
    assert linears[1].weight.std().item() == pytest.approx(1024**-0.5, rel=0.1)
    assert torch.count_nonzero(linears[-1].weight) == 0  # the output layer's own init is zero


def test_critic_replays_the_last_epochs_and_keeps_them_in_its_state(make_trainer, tmp_path):
    """critic.replay_epochs=2: the critic trains on this epoch's and the last epoch's states (the
    advantages use this epoch's only); with one epoch in the buffer it is exactly the paper's
    path; the buffer survives a state round trip (resume)."""
    replay = make_trainer(**{"critic.replay_epochs": 2, "train.epochs": 3})
    paper = make_trainer(run_dir=tmp_path / "paper", **{"train.epochs": 3})
    seen = []
    targets_of = replay.method.critic_targets

    def record(features, timesteps, returns, old_values):
        out = targets_of(features, timesteps, returns, old_values)
        seen.append((features, out))
        return out

    replay.method.critic_targets = record
    n = replay.schedule.samples_per_process
    for epoch in range(2):
        replay.epoch_step(epoch)
        paper.epoch_step(epoch)
        if epoch == 0:  # one epoch in the buffer: the same critic as the paper's
            for a, b in zip(replay.method.critic.parameters(), paper.method.critic.parameters()):
                assert torch.equal(a, b)
    first, second = seen[0][0], seen[1][1]
    assert second.features.shape[0] == 2 * n  # last epoch's states, then this epoch's
    assert torch.equal(second.features[:n], first) and torch.equal(second.features[n:], seen[1][0])
    moved = [
        not torch.equal(a, b)
        for a, b in zip(replay.method.critic.parameters(), paper.method.critic.parameters())
    ]
    assert any(moved)  # the replayed states changed what the critic learned
    replay.epoch_step(2)
    assert len(replay.method.replay) == 2 and seen[2][1].features.shape[0] == 2 * n

    state = replay.method.state_dict()
    restored = make_trainer(run_dir=tmp_path / "restored", **{"critic.replay_epochs": 2})
    restored.method.load_state_dict(state)
    for kept, loaded in zip(replay.method.replay, restored.method.replay):
        assert all(torch.equal(kept[k], loaded[k].to(kept[k].device)) for k in kept)


def test_replay_epochs_must_be_positive():
    with pytest.raises(UsageError, match="critic.replay_epochs"):
        build_config(overrides={"critic.replay_epochs": 0})
