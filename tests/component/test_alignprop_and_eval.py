"""AlignProp, held-out evaluation and non-finite rewards on a tiny pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SEEN = Path(__file__).parents[1] / "data" / "seen.txt"


def test_one_alignprop_step_changes_lora_and_raises_a_differentiable_reward(make_trainer):
    from tdpo.methods.alignprop import sample_with_grad
    from tdpo.sampling import sample_noise

    tr = make_trainer(
        "alignprop",
        **{
            "reward.name": "tests.rewards_for_tests:brightness",
            "sample.samples_per_epoch": 4,
            "train.learning_rate": 3e-3,
            "train.alignprop_steps": 2,
        },
    )
    assert tr.schedule.updates_per_epoch == 1 and getattr(tr.method, "critic", None) is None
    noise = sample_noise(list(range(4)), (5, 4, 8, 8))
    prompts = ["a red cat", "a blue dog", "a photo of a fish", "a cat"]

    def brightness():
        with torch.no_grad():
            return sample_with_grad(tr.policy, tr.unet, prompts, noise, 1).mean().item()

    before_params = {
        n: p.detach().clone() for n, p in tr.unet.named_parameters() if p.requires_grad
    }
    before = brightness()
    metrics = tr.epoch_step(0)
    after = brightness()
    changed = [
        n
        for n, p in tr.unet.named_parameters()
        if p.requires_grad and not torch.equal(p, before_params[n])
    ]
    assert changed
    assert after > before, (before, after)
    assert metrics["reward_queries"] == 4


def test_alignprop_refuses_a_non_differentiable_reward(make_trainer):
    from tdpo.errors import UsageError

    tr = make_trainer(
        "alignprop",
        **{"sample.samples_per_epoch": 4},
    )
    with pytest.raises(UsageError, match="differentiable"):
        tr.epoch_step(0)


def test_alignprop_refuses_a_reward_that_breaks_the_protocol(make_trainer):
    """A bare tensor instead of (rewards, info): with a batch of 2 it would unpack silently."""
    from tdpo.errors import UsageError

    tr = make_trainer("alignprop", **{"sample.samples_per_epoch": 4, "sample.batch_size": 2})
    tr.reward_fn = lambda images, prompts, meta: images.mean(dim=(1, 2, 3))
    with pytest.raises(UsageError, match="return a pair"):
        tr.epoch_step(0)


def test_evaluation_is_reproducible_and_keyed_by_set(make_trainer, tmp_path):
    tr = make_trainer(
        **{
            "eval.every": 1,
            "eval.prompt_sets": [f"seen={SEEN}"],
            "eval.seeds_per_prompt": 2,
            "eval.prompts_per_set": 2,
            "reward.panel": ["jpeg_incompressibility"],
        },
    )
    first = tr.evaluate()
    second = tr.evaluate()
    assert first == second
    for key in (
        "eval/seen/jpeg_compressibility",
        "eval/seen/jpeg_incompressibility",
        "eval/seen/kl",
        "eval/seen/diversity",
    ):
        assert key in first
    assert abs(first["eval/seen/kl"]) < 1e-6  # LoRA starts at the base model
    assert (tmp_path / "run" / "samples" / "eval_seen_epoch_0000.png").is_file()


def test_nonfinite_rewards_are_left_out_and_counted(make_trainer):
    tr = make_trainer(
        **{"reward.name": "tests.rewards_for_tests:nan_once", "train.max_nonfinite_fraction": 0.5},
    )
    metrics = tr.epoch_step(0)
    assert metrics["nonfinite_rewards"] == 1  # the reward scores the whole epoch at once
    assert all(torch.isfinite(p).all() for p in tr.unet.parameters())
    assert all(torch.isfinite(p).all() for p in tr.method.critic.parameters())
    assert metrics["reward_mean"] == metrics["reward_mean"]  # not NaN


def test_too_many_nonfinite_rewards_stop_the_run(make_trainer):
    from tdpo.errors import NonFiniteRewards

    tr = make_trainer(
        **{"reward.name": "tests.rewards_for_tests:nan_every_other"},
    )
    with pytest.raises(NonFiniteRewards, match="4 of 8"):
        tr.epoch_step(0)


def test_overoptimization_monitor_keeps_the_best_lora_and_stops_early(make_trainer, tmp_path):
    from tdpo.tracking import read_metrics

    run = tmp_path / "run"
    tr = make_trainer(
        **{
            "eval.every": 1,
            "eval.prompt_sets": [f"seen={SEEN}"],
            "eval.prompts_per_set": 2,
            "eval.seeds_per_prompt": 1,
            "eval.monitor": "eval/seen/jpeg_compressibility",
            "eval.patience": 1,
            "train.epochs": 6,
        },
    )
    assert tr.train() == 0
    rows = [r for r in read_metrics(run) if "eval/seen/jpeg_compressibility" in r]
    values = [r["eval/seen/jpeg_compressibility"] for r in rows]
    best_epoch, best_value = (run / "best" / "epoch.txt").read_text().split()
    assert float(best_value) == pytest.approx(max(values))
    assert int(best_epoch) == rows[values.index(max(values))]["epoch"]
    assert (run / "best" / "pytorch_lora_weights.safetensors").is_file()
    # patience 1: training stops at the first evaluation that does not improve the best value
    improving = all(b > a for a, b in zip(values, values[1:]))
    assert improving or len(rows) < 7


def test_monitor_must_name_an_eval_metric(make_trainer):
    from tdpo.errors import UsageError

    with pytest.raises(UsageError, match="eval.monitor"):
        make_trainer(**{"eval.monitor": "reward_mean"})
