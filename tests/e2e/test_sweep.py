"""``tdpo sweep``: two tiny runs, the second crashing in its second epoch; running the sweep again
skips the finished run, resumes the crashed one from its checkpoint, and writes the report."""

from __future__ import annotations

import json

import pytest
import yaml

from tdpo.cli import main
from tdpo.sweep import build_plan, parse_shard
from tdpo.tracking import read_metrics
from tests.fixtures.factories import tiny_overrides


def _spec(tmp_path, pipeline_dir, clip_dir) -> dict:
    overrides = tiny_overrides(pipeline_dir, clip_dir)
    overrides.pop("reward.name")
    overrides["reward.panel"] = ["jpeg_incompressibility"]
    overrides.update({"sample.num_steps": 2, "sample.samples_per_epoch": 4})
    return {
        "out": str(tmp_path / "sweep"),
        "overrides": overrides,
        "methods": {
            # critic-free methods keep the test fast; the sweep logic does not depend on them
            "ddpo-4": {"preset": "ddpo-2", "overrides": {"train.updates_per_epoch": 4}},
            "ddpo-2": {"preset": "ddpo-2"},
        },
        "rewards": ["jpeg_compressibility"],
        "seeds": [0],
    }


def test_sweep_resumes_after_a_crash_and_skips_finished_runs(
    tiny_pipeline_dir, tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    from tdpo.trainers.loop import Trainer

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        yaml.safe_dump(_spec(tmp_path, tiny_pipeline_dir, tiny_clip_dir), sort_keys=False)
    )
    out = tmp_path / "sweep"
    first, second = out / "ddpo-4-jpeg_compressibility-s0", out / "ddpo-2-jpeg_compressibility-s0"

    assert main(["sweep", str(spec_file), "--dry-run"]) == 0
    plan_text = capsys.readouterr().out
    assert first.name in plan_text and second.name in plan_text and not out.exists()

    original = Trainer.epoch_step

    def crash_once(self, epoch):
        if self.run_dir.name == second.name and epoch == 1:
            raise RuntimeError("simulated crash")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "epoch_step", crash_once)
    assert main(["sweep", str(spec_file), "--no-report"]) == 1
    monkeypatch.setattr(Trainer, "epoch_step", original)
    state = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert state[first.name]["status"] == "trained"
    assert state[second.name]["status"] == "failed"
    assert "simulated crash" in state[second.name]["error"]
    assert (first / "final").is_dir() and not (second / "final").exists()
    assert [r["epoch"] for r in read_metrics(second)] == [1]
    first_metrics = (first / "metrics.jsonl").read_text()
    cfg = yaml.safe_load((second / "config.yaml").read_text())
    assert cfg["train"]["algorithm"] == "ddpo" and cfg["seed"] == 0
    assert cfg["reward"]["name"] == "jpeg_compressibility"

    capsys.readouterr()
    assert main(["sweep", str(spec_file)]) == 0
    log = capsys.readouterr().out
    assert f"{first.name}: done already, skipped" in log
    assert f"{second.name}: resuming" in log
    state = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert state[first.name]["status"] == "skipped"
    assert state[second.name]["status"] == "resumed"
    assert (second / "final").is_dir()
    assert [r["epoch"] for r in read_metrics(second)] == [1, 2]
    assert (first / "metrics.jsonl").read_text() == first_metrics  # untouched
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert {m["method"] for g in summary["groups"] for m in g["methods"]} == {"DDPO-4", "DDPO-2"}
    assert (out / "report" / "index.html").is_file()
    claims = json.loads((out / "report" / "claims.json").read_text())
    assert set(claims["methods"]) == {"ddpo-2", "ddpo-4"}  # the finished runs, by sweep name
    assert all(c["verdict"] == "not run" for c in claims["claims"])  # no TDPO in this sweep
    assert "resuming" in (out / "sweep.log").read_text()


def test_plan_order_shards_and_bad_specs(tmp_path, capsys):
    spec = {
        "methods": {"a": {"preset": "tdpo"}, "b": {"preset": "no-such-preset"}},
        "grid": [{"rewards": ["r1"], "seeds": [0, 1]}, {"rewards": ["r2"], "seeds": [0]}],
        "overrides": {"train.epochs": 3},
    }
    plan = build_plan(spec)
    assert [r.name for r in plan] == [
        "a-r1-s0",
        "b-r1-s0",
        "a-r1-s1",
        "b-r1-s1",
        "a-r2-s0",
        "b-r2-s0",
    ]
    assert plan[0].overrides["train.epochs"] == 3 and plan[0].overrides["seed"] == 0
    assert not plan[1].available  # unknown train preset: reported, not tried
    assert parse_shard("1/3") == (1, 3)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    assert (
        main(["sweep", str(spec_file), "--out", str(tmp_path / "o"), "--dry-run", "--shard", "1/2"])
        == 0
    )
    text = capsys.readouterr().out
    assert "b-r1-s0" in text and "unavailable" in text and "other shard" in text
    assert main(["sweep", str(spec_file), "--out", str(tmp_path / "o"), "--shard", "2/2"]) == 2
    assert main(["sweep", "--preset", "paper-shapes", str(spec_file)]) == 2
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2


def test_paper_shapes_preset_plan():
    from tdpo.config import build_config
    from tdpo.policy import resolve_alias
    from tdpo.sweep import SWEEP_PRESETS
    from tdpo.world import PIPELINE_DIR

    plan = build_plan(SWEEP_PRESETS["paper-shapes"]())
    assert len(plan) == 5 * 3 + 5
    assert {r.method for r in plan} == {"ddpo-2", "ddpo-100", "tdpo", "tdpo-r", "alignprop"}
    assert sum(r.reward == "shapes_pickscore" for r in plan) == 5
    for run in plan:  # every run fine-tunes the shipped shapes world
        config = build_config(overrides=run.overrides)
        assert resolve_alias(config.model.pretrained) == str(PIPELINE_DIR)


@pytest.mark.parametrize("text", ["1", "a/b", "3/3", "-1/2", "0/0"])
def test_bad_shard(text):
    from tdpo.errors import UsageError

    with pytest.raises(UsageError):
        parse_shard(text)
