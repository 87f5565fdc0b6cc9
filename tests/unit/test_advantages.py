"""Reward normalization, returns and advantages on hand-computed values."""

from __future__ import annotations

import io
import math

import pytest
import torch

from tdpo.algos.advantages import (
    PerPromptStatTracker,
    explained_variance,
    normalize_advantages,
    returns_from_rewards,
    temporal_advantages,
)


def close(got: torch.Tensor, expected: list) -> None:
    # float32 means, stds and divisions against 7-digit hand values (rounded by 5e-8): measured
    # up to 1.2e-7 off (1 ulp near 1.34); a CPU with another SIMD width reduces in another
    # order, an ulp or two more. 5e-7 allows that and stays below the 1e-6 added to every std,
    # so a dropped or changed epsilon still fails.
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=0, atol=5e-7)


def test_tracker_hand_sequence_switches_from_batch_to_prompt_stats():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)

    # batch 1: a -> buffer [1, 3] (2 >= min_count): mean 2, std 1.
    #          b -> buffer [5] (1 < 2): whole batch [1, 3, 5]: mean 3, std sqrt(8/3) = 1.6329932
    out = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    assert out.dtype == torch.float32 and out.shape == (3,)
    close(
        out, [-1 / (1 + 1e-6), 1 / (1 + 1e-6), 2 / (1.6329932 + 1e-6)]
    )  # [-0.999999, 0.999999, 1.2247441]

    # batch 2: batch [7, 5, 0]: mean 4, std sqrt(26/3) = 2.9439203
    #          b -> buffer [5, 7]: now per-prompt stats, mean 6, std 1 -> 0.999999 (batch: 1.019)
    #          a -> buffer [1, 3, 5] (maxlen 3): mean 3, std 1.6329932 -> 1.2247441
    #          c -> buffer [0]: batch stats -> (0 - 4) / 2.9439203 = -1.3587320
    out = tracker.update(["b", "a", "c"], torch.tensor([7.0, 5.0, 0.0], dtype=torch.float64))
    close(out, [0.999999, 1.2247441, -1.3587320])

    # batch 3: a -> buffer [3, 5, 0] (the 1 fell out): mean 8/3, std 2.0548047 -> -1.2977707
    out = tracker.update(["a"], torch.tensor([0.0]))
    close(out, [-1.2977707])
    assert list(tracker.stats["a"]) == [3.0, 5.0, 0.0]


def test_tracker_state_dict_round_trip_through_weights_only_load():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    tracker.update(["x", "y", "x"], torch.tensor([1.0, 2.0, 4.0]))
    tracker.update(["y", "x"], torch.tensor([0.5, -1.0]))

    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = PerPromptStatTracker()  # defaults differ: the state carries buffer_size/min_count
    restored.load_state_dict(state)
    assert restored.buffer_size == 4 and restored.min_count == 2
    prompts, rewards = ["x", "y", "z", "x"], torch.tensor([3.0, 1.0, 7.0, 9.0])
    torch.testing.assert_close(restored.update(prompts, rewards), tracker.update(prompts, rewards))
    assert restored.state_dict() == tracker.state_dict()
    assert restored.stats["x"].maxlen == 4


def test_tracker_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        PerPromptStatTracker().update(["a", "b"], torch.tensor([1.0]))


def test_returns_without_kl_are_the_reward_at_every_step():
    returns = returns_from_rewards(torch.tensor([1.0, -2.0]), num_steps=3)
    close(returns, [[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])


def test_returns_with_kl_are_backward_cumulative_sums():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.5, 1.0]])
    # per-step rewards r_k = -2 * kl_k, plus R~ at the last step:
    #   row 0: [-0.2, -0.4, -0.6 + 1] = [-0.2, -0.4, 0.4] -> G = [-0.2, 0.0, 0.4]
    #   row 1: [0.0, -1.0, -2.0 - 2] = [0.0, -1.0, -4.0] -> G = [-5.0, -5.0, -4.0]
    returns = returns_from_rewards(torch.tensor([1.0, -2.0]), num_steps=3, kl=kl, kl_coef=2.0)
    close(returns, [[-0.2, 0.0, 0.4], [-5.0, -5.0, -4.0]])
    # kl_coef = 0 ignores the KL
    close(returns_from_rewards(torch.tensor([1.0, -2.0]), 3, kl=kl), [[1.0] * 3, [-2.0] * 3])
    with pytest.raises(ValueError):
        returns_from_rewards(torch.tensor([1.0, -2.0]), 4, kl=kl, kl_coef=1.0)


def test_temporal_advantages():
    returns = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    values = torch.tensor([[0.5, 1.5], [0.0, -3.0]])
    close(temporal_advantages(returns, values), [[0.5, -0.5], [-2.0, 1.0]])
    with pytest.raises(ValueError):
        temporal_advantages(returns, values[:, :1])


def test_normalize_advantages_over_all_elements_population_std():
    # mean 2.5, population std sqrt(1.25) = 1.1180340
    got = normalize_advantages(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    close(got, [[-1.3416408, -0.4472136], [0.4472136, 1.3416408]])
    assert normalize_advantages(torch.tensor([5.0])).item() == 0.0


def test_explained_variance():
    target = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # residual [0, 0, 0, -1]: Var = 0.1875; Var(target) = 1.25 -> 1 - 0.15 = 0.85
    assert explained_variance(torch.tensor([1.0, 2.0, 3.0, 5.0]), target) == pytest.approx(0.85)
    assert explained_variance(target, target) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), target) == pytest.approx(0.0)
    assert math.isnan(explained_variance(target, torch.ones(4)))
