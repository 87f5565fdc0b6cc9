"""tdpo.verdict: the rule, checked on hand-written metrics rows with hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from tdpo.verdict import CHANGE_TOLERANCE, eval_lines, judge, result_lines

REWARD = "shapes_aesthetic"


def _eval(epoch: int, **values: float) -> dict:
    """An evaluation row: ``seen_shapes_gold=0.3`` -> ``eval/seen/shapes_gold``."""
    row = {"epoch": epoch}
    for name, value in values.items():
        label, metric = name.split("_", 1)
        row[f"eval/{label}/{metric}"] = value
    return row


def _train(epoch: int, reward: float = 0.4) -> dict:
    return {"epoch": epoch, "reward_queries": 64 * epoch, "reward_mean": reward}


def _demo_rows(final_epoch: int = 16, trained: int = 16) -> list[dict]:
    """The default run's story (issue 13): seen aesthetic 0.446 -> 0.486, gold flat at 0.330;
    unseen aesthetic flat (0.356 -> 0.360) while gold falls 0.260 -> 0.236."""
    base = _eval(
        0,
        seen_shapes_aesthetic=0.446,
        seen_shapes_gold=0.330,
        seen_kl=0.0,
        unseen_shapes_aesthetic=0.356,
        unseen_shapes_gold=0.260,
        unseen_kl=0.0,
    )
    middle = {**_train(8), **_eval(8, seen_shapes_aesthetic=0.47, unseen_shapes_gold=0.25)}
    final = _eval(
        final_epoch,
        seen_shapes_aesthetic=0.486,
        seen_shapes_gold=0.331,
        seen_kl=0.04,
        unseen_shapes_aesthetic=0.360,
        unseen_shapes_gold=0.236,
        unseen_kl=0.05,
    )
    rows = [base, middle] + [_train(e) for e in range(9, trained + 1)]
    rows.insert(2 + final_epoch - 9, final)
    return rows


def test_one_run_over_optimized_on_unseen_prompts():
    verdict = judge([_demo_rows()], REWARD)
    # seen reward +0.040 > 2% of 0.446 = 0.0089: up; unseen +0.004 <= 2% of 0.356 = 0.0071: flat
    # seen gold +0.001 <= 0.0066: flat; unseen gold -0.024, |.| > 2% of 0.260 = 0.0052: down
    seen, unseen = verdict.changes["seen"], verdict.changes["unseen"]
    assert seen[REWARD].delta == pytest.approx(0.040)
    assert seen[REWARD].tolerance == pytest.approx(CHANGE_TOLERANCE * 0.446)
    assert [seen[REWARD].word, unseen[REWARD].word] == ["up", "flat"]
    assert [seen["shapes_gold"].word, unseen["shapes_gold"].word] == ["flat", "down"]
    assert unseen["shapes_gold"].delta == pytest.approx(-0.024)
    assert seen[REWARD].spread is None and seen[REWARD].n == 1
    assert verdict.kind == "over-optimized"
    assert verdict.conclusion == "over-optimized on unseen prompts"
    assert verdict.line == (
        "training reward +0.040 on seen, +0.004 (flat) on unseen; gold +0.001 (flat) on seen, "
        "-0.024 on unseen: over-optimized on unseen prompts"
    )
    assert verdict.final_epochs == [16] and verdict.note == ""
    # the order of the table: training reward, gold, then KL (shown, not judged)
    assert list(seen) == [REWARD, "shapes_gold", "kl"]


def test_seed_spread_decides_what_counts():
    # gold changes of two seeds: -0.03 and +0.01: mean -0.01, spread sqrt(0.0008) = 0.0283 > 0.01
    def run(gold_final: float, reward_final: float) -> list[dict]:
        return [
            _eval(0, seen_shapes_aesthetic=0.40, seen_shapes_gold=0.30),
            {
                **_train(4),
                **_eval(4, seen_shapes_aesthetic=reward_final, seen_shapes_gold=gold_final),
            },
        ]

    verdict = judge([run(0.27, 0.50), run(0.31, 0.52)], REWARD)
    gold = verdict.changes["seen"]["shapes_gold"]
    assert gold.delta == pytest.approx(-0.01)
    assert gold.spread == pytest.approx(math.sqrt(0.0008))
    assert gold.tolerance == pytest.approx(math.sqrt(0.0008)) and gold.word == "flat"
    reward = verdict.changes["seen"][REWARD]  # +0.10 and +0.12: spread 0.0141 < mean 0.11
    assert reward.delta == pytest.approx(0.11) and reward.word == "up" and reward.n == 2
    assert verdict.kind == "reward-only"
    assert verdict.conclusion.startswith("the training reward rose, gold stayed flat")
    # the same mean with a single seed counts: -0.01 beyond 2% of 0.30 = 0.006
    assert judge([run(0.29, 0.51)], REWARD).kind == "over-optimized"


def test_without_gold_the_other_rewards_decide():
    rows = [
        _eval(0, seen_shapes_aesthetic=0.4, seen_a=1.0, seen_b=2.0, seen_c=3.0, seen_diversity=0.1),
        _eval(2, seen_shapes_aesthetic=0.5, seen_a=0.9, seen_b=1.9, seen_c=3.0, seen_diversity=0.0),
    ]
    verdict = judge([rows], REWARD)
    assert verdict.gold is None
    assert verdict.kind == "over-optimized"
    assert "other rewards 2 of 3 down, 0 up on seen" in verdict.line
    assert verdict.conclusion == "over-optimized on seen prompts (most other rewards fell)"
    # diversity fell too, but it is shown, never judged: not among the "other rewards"
    assert "of 3" in verdict.line


@pytest.mark.parametrize(
    "gold_final, reward_final, kind",
    [
        (0.40, 0.50, "improved"),
        (0.25, 0.40, "worse"),
        (0.30, 0.30, "reward-down"),
        (0.301, 0.401, "no-change"),
    ],
)
def test_kinds(gold_final, reward_final, kind):
    rows = [
        _eval(0, seen_shapes_aesthetic=0.40, seen_shapes_gold=0.30),
        _eval(1, seen_shapes_aesthetic=reward_final, seen_shapes_gold=gold_final),
    ]
    assert judge([rows], REWARD).kind == kind


def test_both_fell():
    rows = [
        _eval(0, seen_shapes_aesthetic=0.446, seen_shapes_gold=0.330),
        _eval(16, seen_shapes_aesthetic=0.384, seen_shapes_gold=0.113),
    ]
    verdict = judge([rows], REWARD)
    assert verdict.kind == "worse"
    assert verdict.conclusion == "worse (the training reward and gold fell)"


def test_no_verdict_without_a_base_evaluation_and_a_note_when_the_last_epochs_are_not_evaluated():
    no_eval = judge([[_train(1), _train(2)]], REWARD)
    assert no_eval.kind == "no-eval" and no_eval.conclusion.startswith("no verdict")
    assert result_lines(no_eval) == [f"result: {no_eval.conclusion}"]
    stale = judge([_demo_rows(final_epoch=16, trained=18)], REWARD)
    assert stale.note == "the last held-out evaluation is at epoch 16 of 18 trained"
    assert result_lines(stale)[-1] == f"note: {stale.note}"


def test_terminal_lines():
    rows = _demo_rows()
    lines = result_lines(judge([rows], REWARD))
    assert lines == [
        "result on held-out prompts, base (epoch 0) -> epoch 16:",
        "  seen    shapes_aesthetic 0.446 -> 0.486 (+0.040) | shapes_gold 0.330 -> 0.331 "
        "(+0.001, flat)",
        "  unseen  shapes_aesthetic 0.356 -> 0.360 (+0.004, flat) | shapes_gold 0.260 -> 0.236 "
        "(-0.024)",
        "verdict: over-optimized on unseen prompts",
    ]
    final = next(r for r in rows if r["epoch"] == 16 and "eval/seen/kl" in r)
    assert eval_lines(final, rows[0], REWARD, 16, 16) == [
        "held-out seen   (epoch 16/16): shapes_aesthetic 0.486 (+0.040 vs base) | "
        "shapes_gold 0.331 (+0.001 vs base)",
        "held-out unseen (epoch 16/16): shapes_aesthetic 0.360 (+0.004 vs base) | "
        "shapes_gold 0.236 (-0.024 vs base)",
    ]
    assert eval_lines(rows[0], None, REWARD, 0, 16)[0] == (
        "held-out seen   (base model): shapes_aesthetic 0.446 | shapes_gold 0.330"
    )
    assert all(len(line) <= 120 for line in lines)


def test_training_on_gold_judges_against_the_other_gold_metrics():
    rows = [
        _eval(0, seen_shapes_gold=0.30, seen_shapes_gold_aesthetic=0.40),
        _eval(3, seen_shapes_gold=0.40, seen_shapes_gold_aesthetic=0.30),
    ]
    verdict = judge([rows], "shapes_gold")
    assert verdict.gold == "shapes_gold_aesthetic"
    assert list(verdict.changes["seen"]) == ["shapes_gold", "shapes_gold_aesthetic"]
    assert verdict.conclusion == "over-optimized on seen prompts"
    line = eval_lines(rows[1], rows[0], "shapes_gold", 3, 3)[0]
    assert line.count("shapes_gold ") == 1 and "shapes_gold_aesthetic 0.300" in line
