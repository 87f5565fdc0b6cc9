"""benchmarks/gpu_check.py --tiny --only critic-decoder on CPU: the image critic's epoch with
the VAE and with a tiny autoencoder (critic.decoder=tiny, TAESD's layout at toy width) against
DDPO-100, and the ratios it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_critic_decoder_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    proc = subprocess.run(
        [sys.executable, script, "--tiny", "--only", "critic-decoder", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for part in ("3_tdpo_r_image_epoch", "3t_tdpo_r_image_tiny_epoch", "5_ddpo100_epoch"):
        assert data[part]["seconds_value"] >= 0, data[part]
    assert "1_pipe_call" not in data and "4_tdpo_r_latent_epoch" not in data
    ratios = data["critic_decoder"]
    assert ratios["image_tiny_vs_ddpo100"] > 0 and ratios["image_vae_vs_ddpo100"] > 0
    assert "tiny decoder" in proc.stdout and "target for the tiny decoder <= 1.15" in proc.stdout
