"""``tdpo train --model shapes-flow``: GRPO on the shipped flow shapes world (a
StableDiffusion3Pipeline) with the shapes world's prompts and learned rewards, on a CPU."""

from __future__ import annotations

import time

from tdpo.cli import main
from tdpo.tracking import read_metrics

SMALL = {
    "train.epochs": 1,
    "eval.every": 0,
    "sample.samples_per_epoch": 8,
    "sample.batch_size": 8,
    "train.batch_size": 4,
}


def test_grpo_on_the_flow_shapes_world(tmp_path, capsys):
    args = ["train", "--model", "shapes-flow", "--preset", "grpo", "--output-dir", str(tmp_path)]
    args += ["--set", "run_name=flow"]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={value}"]
    t0 = time.process_time()  # CPU time: wall time depends on what else the machine runs
    assert main(args) == 0
    cpu_seconds = time.process_time() - t0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out
    rows = read_metrics(tmp_path / "flow")
    last = rows[-1]
    assert last["epoch"] == 1
    assert "reward_mean" in last or any(k.startswith("reward") for k in last)
    assert any(k.startswith("panel/shapes_gold") for k in last)  # measured against gold
    assert (tmp_path / "flow" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert cpu_seconds < 60, f"took {cpu_seconds:.0f} CPU s"
