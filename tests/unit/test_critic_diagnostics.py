"""The critic's diagnostics and the group normalization: pure functions against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdpo.algos.advantages import (
    explained_variance,
    explained_variance_by_quarter,
    group_normalize,
    pearson,
    r2_by_quarter,
    step_quarters,
)


def test_group_normalize_uses_each_group_alone():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 14.0, 5.0])
    groups = ["a", "a", "b", "b", "b", "c"]
    out = group_normalize(rewards, groups, eps=0.0 + 1e-12)
    torch.testing.assert_close(out[:2], torch.tensor([-1.0, 1.0]))
    b = torch.tensor([10.0, 10.0, 14.0])
    torch.testing.assert_close(out[2:5], (b - b.mean()) / b.std(correction=0))
    assert out[5] == 0  # a group of one carries no relative signal


def test_group_normalize_ignores_the_other_groups_scale():
    """Scaling one prompt's rewards changes nothing for another prompt (unlike batch stats)."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 9.0])
    groups = [0, 0, 0, 1, 1, 1]
    scaled = rewards.clone()
    scaled[3:] *= 100
    torch.testing.assert_close(
        group_normalize(rewards, groups)[:3], group_normalize(scaled, groups)[:3]
    )


@pytest.mark.parametrize(
    "steps, sizes",
    [(20, [5, 5, 5, 5]), (50, [12, 13, 12, 13]), (4, [1, 1, 1, 1]), (2, [0, 1, 0, 1])],
)
def test_step_quarters_cover_every_step_once(steps, sizes):
    quarters = step_quarters(steps)
    assert [len(q) for q in quarters] == sizes
    assert [k for q in quarters for k in q] == list(range(steps))


def test_explained_variance_by_quarter_matches_the_pooled_formula_per_quarter():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(64, 8, generator=gen)
    noise = torch.randn(64, 8, generator=gen)
    # the prediction gets better towards the image: noise shrinks with the step
    predicted = target + noise * torch.linspace(2.0, 0.1, 8)
    out = explained_variance_by_quarter(predicted, target)
    for i, cols in enumerate([[0, 1], [2, 3], [4, 5], [6, 7]], start=1):
        assert out[f"q{i}"] == pytest.approx(
            explained_variance(predicted[:, cols], target[:, cols])
        )
    assert out["q1"] < out["q2"] < out["q3"] < out["q4"] and out["q4"] > 0.9


def test_explained_variance_by_quarter_is_nan_for_an_empty_quarter():
    out = explained_variance_by_quarter(torch.zeros(4, 2), torch.randn(4, 2))
    assert math.isnan(out["q1"]) and math.isnan(out["q3"])


def test_r2_by_quarter_is_the_mean_squared_correlation_of_its_steps():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(50, 4, generator=gen)
    reference = 3 * target + torch.randn(50, 4, generator=gen) * torch.tensor([5.0, 2.0, 1.0, 0.0])
    out = r2_by_quarter(reference, target)
    for k in range(4):
        expected = np.corrcoef(reference[:, k].numpy(), target[:, k].numpy())[0, 1] ** 2
        assert out[f"q{k + 1}"] == pytest.approx(expected, rel=1e-6)
    assert out["q4"] == pytest.approx(1.0)


def test_pearson_against_numpy_and_constant_input():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, generator=gen), torch.randn(30, generator=gen)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a.numpy(), b.numpy())[0, 1], rel=1e-9)
    assert pearson(a, torch.ones(30)) == 0.0


def test_merge_moments_equals_the_pooled_moments():
    from tdpo.algos.advantages import merge_moments

    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 3, generator=gen) * (i + 1) + i for i, n in enumerate((5, 1, 12))]
    count, mean, var = 0.0, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for part in parts:
        count, mean, var = merge_moments(count, mean, var, part)
    pooled = torch.cat(parts).double()
    assert count == 18
    torch.testing.assert_close(mean, pooled.mean(0))
    torch.testing.assert_close(var, pooled.var(0, correction=0))


def test_running_reward_stats_normalize_with_the_whole_history_and_resume():
    from tdpo.algos.advantages import RunningRewardStats

    stats = RunningRewardStats()
    first = stats.update(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    resumed = RunningRewardStats()
    resumed.load_state_dict(stats.state_dict())
    second = resumed.update(torch.tensor([5.0, 7.0]))
    history = torch.tensor([1.0, 3.0, 5.0, 7.0])
    expected = (torch.tensor([5.0, 7.0]) - history.mean()) / history.std(correction=0)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=0)
