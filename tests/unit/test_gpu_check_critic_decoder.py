"""benchmarks/gpu_check.py --tiny --only critic-decoder on CPU: the image critic's epoch with
the VAE and with a tiny autoencoder (critic.decoder=tiny, TAESD's layout at toy width) against
DDPO-100, and the ratios it prints."""

from __future__ import annotations

from tests.fixtures.processes import run_gpu_check_tiny


def test_gpu_check_critic_decoder_tiny_runs_on_cpu(tmp_path):
    proc, data = run_gpu_check_tiny(["--only", "critic-decoder"], tmp_path, OMP_NUM_THREADS="1")
    for part in ("3_tdpo_r_image_epoch", "3t_tdpo_r_image_tiny_epoch", "5_ddpo100_epoch"):
        assert data[part]["seconds_value"] >= 0, data[part]
    assert "1_pipe_call" not in data and "4_tdpo_r_latent_epoch" not in data
    ratios = data["critic_decoder"]
    assert ratios["image_tiny_vs_ddpo100"] > 0 and ratios["image_vae_vs_ddpo100"] > 0
    assert "tiny decoder" in proc.stdout and "target for the tiny decoder <= 1.15" in proc.stdout
