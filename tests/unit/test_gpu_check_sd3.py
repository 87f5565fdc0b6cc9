"""benchmarks/gpu_check.py --arch sd3 --tiny on CPU: every part of the SD3.5-medium check (the
pipeline call, FlowPolicy.sample against it, TDPO-R image and latent, GRPO, DDPO-2, AlignProp)
runs at toy size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_sd3_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    proc = subprocess.run(
        [sys.executable, script, "--tiny", "--arch", "sd3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
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
