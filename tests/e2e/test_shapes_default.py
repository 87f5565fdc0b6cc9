"""The default run (the shipped shapes world) at small settings, through the CLI."""

from __future__ import annotations

from tdpo.cli import main
from tdpo.tracking import read_metrics


def test_default_run_on_the_shipped_world_at_small_settings(tmp_path, capsys):
    args = ["train", "--output-dir", str(tmp_path), "--set", "run_name=demo"]
    small = {
        "train.epochs": 1,
        "sample.samples_per_epoch": 8,
        "sample.batch_size": 8,
        "sample.prompts_per_epoch": 2,
        "sample.num_steps": 4,
        "train.batch_size": 4,
        "eval.prompts_per_set": 2,
        "eval.seeds_per_prompt": 1,
        "eval.every": 1,
        "log.tensorboard": False,
    }
    for key, value in small.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    rows = read_metrics(tmp_path / "demo")
    assert [r["epoch"] for r in rows] == [0, 1]  # the base model's evaluation, then epoch 1
    last = rows[-1]
    for reward in (
        "shapes_pickscore",
        "shapes_hps",
        "shapes_imagereward",
        "shapes_gold",
        "shapes_gold_alignment",
        "shapes_gold_aesthetic",
    ):
        assert f"panel/{reward}" in last
    for label in ("seen", "unseen"):
        for reward in ("shapes_aesthetic", "shapes_gold", "kl", "diversity"):
            assert f"eval/{label}/{reward}" in last
    assert 0.0 <= last["eval/seen/shapes_gold"] <= 1.0
    assert last["neurons_reset"] == 0  # TDPO-R resets every 8 epochs by default
    for q in ("q1", "q2", "q3", "q4"):  # the critic's diagnostics are on every training line
        assert f"critic_ev/{q}" in last and f"critic_ref/{q}" in last
    assert (tmp_path / "demo" / "samples" / "eval_unseen_epoch_0001.png").is_file()
    assert "run directory:" in capsys.readouterr().out
