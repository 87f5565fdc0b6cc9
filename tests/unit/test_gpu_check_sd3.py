"""benchmarks/gpu_check.py --arch sd3 --tiny on CPU: every part of the SD3.5-medium check (the
pipeline call, FlowPolicy.sample against it, TDPO-R image and latent, GRPO, DDPO-2, AlignProp)
runs at toy size."""

from __future__ import annotations

from tests.fixtures.processes import run_gpu_check_tiny


def test_gpu_check_sd3_tiny_runs_on_cpu(tmp_path):
    proc, data = run_gpu_check_tiny(["--arch", "sd3"], tmp_path)
    for part in (
        "1_pipe_call",
        "2_policy_sample_vs_pipe",
        "3_tdpo_r_image_epoch",
        "4_tdpo_r_latent_epoch",
        "5_grpo_epoch",
        "6_ddpo2_epoch",
        "7_alignprop_epoch",
    ):
        assert "seconds" in data[part], data[part]
    assert "(sd3)" in data["settings"]["what"] and data["settings"]["eta"] == 0.7
    assert "noise level 0.7" in proc.stdout
