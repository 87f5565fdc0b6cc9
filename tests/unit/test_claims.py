"""tdpo.claims: bootstrap intervals, the per-run quantities and the claim verdicts, on run folders
written here with hand-checkable numbers."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tdpo.claims import (
    Estimate,
    SweepRuns,
    bootstrap_ci,
    change,
    gold_at_gain,
    panel_at_gain,
    queries_to_gain,
    write_claims,
)

PER_EPOCH = 64


def _run(folder, algorithm, seed, trained, gold, reset=False, panel=None):
    """A run evaluated at epochs 0, 4, 8: ``trained`` and ``gold`` are (seen, unseen) lists;
    ``panel``: {panel reward: its unseen values} (none by default)."""
    folder.mkdir(parents=True)
    config = {
        "seed": seed,
        "reward": {"name": "shapes_aesthetic"},
        "sample": {"samples_per_epoch": PER_EPOCH},
        "train": {"algorithm": algorithm},
        "reset": {"enabled": reset},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for i, epoch in enumerate((0, 4, 8)):
        row = {"epoch": epoch}
        for s, prompt_set in enumerate(("seen", "unseen")):
            row[f"eval/{prompt_set}/shapes_aesthetic"] = trained[s][i]
            row[f"eval/{prompt_set}/shapes_gold"] = gold[s][i]
            row[f"eval/{prompt_set}/kl"] = 0.1 * i
        for name, values in (panel or {}).items():
            row[f"eval/unseen/{name}"] = values[i]
        if epoch:
            row["reward_mean"] = trained[0][i]
            if algorithm == "tdpo":
                row["critic_ev/q4"] = 0.2 * i  # 0.2 at epoch 4, 0.4 at epoch 8
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_agreement():
    low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert low < 3.0 < high and low >= 1.0 and high <= 5.0
    tight = bootstrap_ci([2.9, 3.0, 3.1, 3.0, 3.0])
    assert tight[1] - tight[0] < (high - low) / 5
    assert bootstrap_ci([2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_estimate_verdicts_follow_the_interval():
    assert Estimate.of([0.1, 0.2, 0.15]).verdict() == "holds"
    assert Estimate.of([-0.1, -0.2, -0.15]).verdict() == "contradicted"
    assert Estimate.of([-0.1, 0.2, 0.0]).verdict() == "not shown"
    assert Estimate.of([0.3]).verdict() == "not shown (1 seed; a verdict needs 3)"
    assert Estimate.of([0.3, 0.4]).verdict().startswith("not shown (2 seeds")
    never = Estimate.of([math.nan, math.nan])
    assert never.n == 0 and never.text() == "never (0/2)"


def test_per_run_quantities(tmp_path):
    run = SweepRuns.load(
        [
            (
                "tdpo-r",
                0,
                _run(
                    tmp_path / "a",
                    "tdpo",
                    0,
                    trained=([0.40, 0.41, 0.45], [0.30, 0.31, 0.33]),
                    gold=([0.30, 0.29, 0.25], [0.20, 0.18, 0.10]),
                    reset=True,
                    panel={"shapes_pickscore": [1.0, 0.9, 0.5], "shapes_hps": [0.0, 0.1, 0.3]},
                ),
            )
        ]
    ).by_method["tdpo-r"][0]
    assert change(run, "unseen", "shapes_gold") == pytest.approx(-0.10)
    # the seen trained gain reaches +0.02 between epoch 4 (+0.01) and 8 (+0.05): first at 512
    assert queries_to_gain(run) == 512
    # gold (unseen) change at gain +0.02: -0.02 + (0.01/0.04) * (-0.10 - -0.02) = -0.04
    assert gold_at_gain(run) == pytest.approx(-0.04)
    # panel mean 0.5, 0.5, 0.4 -> changes 0, 0, -0.1 (the two rewards' moves cancel at epoch 4);
    # at gain +0.02: 0 + (0.01/0.04) * (-0.1 - 0) = -0.025
    assert panel_at_gain(run) == pytest.approx(-0.025)
    assert math.isnan(queries_to_gain(run, level=0.5))


def test_claims_pair_runs_by_seed_and_write_their_verdicts(tmp_path):
    entries = []
    for seed in range(3):
        d = 0.01 * seed  # per-seed offsets shared by both methods: pairing removes them
        entries.append(
            (
                "tdpo-r",
                seed,
                _run(
                    tmp_path / f"tdpo-r-{seed}",
                    "tdpo",
                    seed,
                    trained=([0.4 + d, 0.42 + d, 0.45 + d], [0.3, 0.31, 0.32]),
                    gold=([0.3, 0.3, 0.3], [0.2 + d, 0.2 + d, 0.19 + d]),
                    reset=True,
                ),
            )
        )
        entries.append(
            (
                "ddpo-40",
                seed,
                _run(
                    tmp_path / f"ddpo-40-{seed}",
                    "ddpo",
                    seed,
                    trained=([0.4 + d, 0.42 + d, 0.45 + d], [0.3, 0.31, 0.32]),
                    gold=([0.3, 0.3, 0.3], [0.2 + d, 0.17 + d, 0.12 + d]),
                ),
            )
        )
    path = write_claims(entries, tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "claims.json").read_text())
    gold_claim = next(c for c in summary["claims"] if c["claim"].startswith("Gold"))
    assert gold_claim["estimate"]["mean"] == pytest.approx(0.07)  # -0.01 - (-0.08)
    assert gold_claim["verdict"] == "holds" and gold_claim["estimate"]["positive"] == 3
    reset_claim = next(c for c in summary["claims"] if "dormant" in c["claim"])
    assert reset_claim["verdict"] == "not run"
    text = path.read_text()
    assert "| tdpo-r (3) |" in text and "**holds**" in text
    assert list(summary["critic"]) == ["tdpo-r"]  # only methods with a critic
    ev = summary["critic"]["tdpo-r"]["critic_ev/q4, mean of epochs 4+"]
    assert ev["mean"] == pytest.approx(0.3) and ev["n"] == 3
