"""A real ``accelerate launch`` with two CPU processes: global quantities equal a single-process
computation on the gathered batch."""

from __future__ import annotations

import subprocess

import torch

from tdpo.algos.advantages import PerPromptStatTracker, normalize_advantages
from tdpo.tracking import read_metrics
from tests.fixtures.factories import as_set_args, tiny_overrides
from tests.fixtures.processes import accelerate_command, cli_env


def test_two_process_launch_gathers_and_normalizes_globally(
    tiny_pipeline_dir, tiny_clip_dir, tmp_path
):
    overrides = tiny_overrides(
        tiny_pipeline_dir,
        tiny_clip_dir,
        run_name="ddp",
        **{"train.epochs": 1, "log.dump_tensors": True, "train.norm_min_count": 2},
    )
    cmd = accelerate_command(
        2, ["train", "--preset", "tdpo-r", "--output-dir", str(tmp_path), *as_set_args(overrides)]
    )
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "ddp"
    dumps = [
        torch.load(run / "debug" / f"epoch_0001_rank{r}.pt", weights_only=True) for r in (0, 1)
    ]
    # Every process holds the same global batch, in rank order.
    torch.testing.assert_close(dumps[0]["global_rewards"], dumps[1]["global_rewards"])
    torch.testing.assert_close(
        torch.cat([d["local_rewards"] for d in dumps]), dumps[0]["global_rewards"]
    )
    assert dumps[0]["global_prompts"] == dumps[1]["global_prompts"]
    assert len(dumps[0]["local_rewards"]) == 4 and len(dumps[0]["global_rewards"]) == 8
    # Per-prompt normalization over the global batch equals a single-process computation.
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    expected = tracker.update(dumps[0]["global_prompts"], dumps[0]["global_rewards"])
    for d in dumps:
        torch.testing.assert_close(d["global_normalized"], expected)
    # Advantages are normalized over all samples and steps of both processes, then split back.
    global_adv = torch.cat([d["local_advantages"] for d in dumps])
    torch.testing.assert_close(global_adv, dumps[0]["global_advantages"])
    assert abs(global_adv.mean().item()) < 1e-5
    assert abs(global_adv.std(correction=0).item() - 1) < 1e-4
    torch.testing.assert_close(normalize_advantages(global_adv), global_adv, atol=1e-5, rtol=1e-5)
    # Metrics are written once, by the main process, from global values.
    rows = read_metrics(run)
    assert len(rows) == 1 and rows[0]["reward_queries"] == 8
    assert abs(rows[0]["reward_mean"] - dumps[0]["global_rewards"].mean().item()) < 1e-6
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
