"""critic.decoder=tiny: the image and x0 critics decode states with a tiny autoencoder (diffusers'
AutoencoderTiny, built here from its config at toy size: no download) instead of the VAE; a
tiny autoencoder for other latents is a clear usage error (exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tdpo.config import build_config
from tdpo.critic import TinyStateDecoder, load_tiny_decoder
from tdpo.errors import UsageError

SCALING, SHIFT = 0.5, 0.1  # not TAESD's 1 and 0: a decode that ignores them fails the test


def save_tiny_autoencoder(directory, latent_channels: int = 4, seed: int = 0):
    """A toy AutoencoderTiny (upsampling 2x, as the tiny pipeline's VAE), saved to a folder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        scaling_factor=SCALING,
        shift_factor=SHIFT,
    )
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def tiny_ae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("taesd") / "taesd"
    save_tiny_autoencoder(path)
    return path


def expected_images(directory, latents):
    """The tiny decoder's images as diffusers' pipelines make them with a tiny autoencoder."""
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny.from_pretrained(directory)
    with torch.no_grad():
        images = model.decode(latents / SCALING + SHIFT).sample
    return (images / 2 + 0.5).clamp(0, 1)


def test_image_critic_embeds_the_tiny_decoders_images(make_trainer, tiny_ae_dir):
    tiny = make_trainer(**{"critic.decoder": "tiny", "critic.tiny_decoder": str(tiny_ae_dir)})
    vae = make_trainer()
    assert isinstance(tiny.method.tiny_decoder, TinyStateDecoder)
    assert tiny.method.tiny_decoder.autoencoder.encoder is None  # only the decoder is kept
    traj, _ = tiny.method.sample(0)
    features, _ = tiny.method.state_features(traj)
    states = traj.latents[:, :-1]
    flat = states.reshape(-1, *states.shape[2:])
    with torch.no_grad():
        want = tiny.method.embedder(expected_images(tiny_ae_dir, flat)).float()
    n, T = traj.log_probs.shape
    torch.testing.assert_close(features, want.view(n, T, -1), atol=1e-5, rtol=1e-5)
    from_vae, _ = vae.method.state_features(traj)
    assert not torch.allclose(features, from_vae, atol=1e-3)  # the option changes the input
    metrics = tiny.epoch_step(0)
    assert metrics["seconds_value"] > 0 and "critic_ev" in metrics


def test_x0_critic_reference_still_scores_the_vaes_images(make_trainer, tiny_ae_dir):
    """With the x0 critic and log.critic_reference, the embedding sees the tiny decoder's image
    and the reference reward the VAE's (the same as without the tiny decoder)."""
    extra = {"critic.input": "x0", "log.critic_reference": True}
    tiny = make_trainer(
        **extra, **{"critic.decoder": "tiny", "critic.tiny_decoder": str(tiny_ae_dir)}
    )
    vae = make_trainer(**extra)
    traj, _ = tiny.method.sample(0)
    emb_tiny, ref_tiny = tiny.method.x0_features(traj, embed=True, score=True)
    emb_vae, ref_vae = vae.method.x0_features(traj, embed=True, score=True)
    torch.testing.assert_close(ref_tiny, ref_vae)
    assert not torch.allclose(emb_tiny, emb_vae, atol=1e-3)


def test_latent_channel_mismatch_names_field_value_and_fix(tmp_path):
    path = tmp_path / "taesd3-like"
    save_tiny_autoencoder(path, latent_channels=16)
    with pytest.raises(UsageError) as info:
        load_tiny_decoder(str(path), latent_channels=4, device="cpu")
    err = info.value
    assert err.field == "critic.tiny_decoder" and err.value == str(path)
    assert "latent_channels=16" in err.fix and "pipeline's 4" in err.fix
    assert "critic.decoder=vae" in err.fix


def test_a_vae_folder_or_a_missing_one_is_a_usage_error(tiny_pipeline_dir, tmp_path):
    with pytest.raises(UsageError, match="not an AutoencoderTiny"):
        load_tiny_decoder(str(tiny_pipeline_dir / "vae"), latent_channels=4, device="cpu")
    with pytest.raises(UsageError, match="does not exist"):
        load_tiny_decoder(str(tmp_path / "nowhere"), latent_channels=4, device="cpu")


def test_cli_mismatch_exits_2_with_one_line(tiny_pipeline_dir, tiny_clip_dir, tmp_path):
    from tests.fixtures.factories import as_set_args, tiny_overrides

    bad = tmp_path / "taesd-16"
    save_tiny_autoencoder(bad, latent_channels=16)
    overrides = tiny_overrides(
        tiny_pipeline_dir,
        tiny_clip_dir,
        **{"critic.decoder": "tiny", "critic.tiny_decoder": str(bad), "train.epochs": 1},
    )
    args = ["train", "--preset", "tdpo-r", "--output-dir", str(tmp_path / "runs")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tdpo.cli", *args, *as_set_args(overrides)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"critic.tiny_decoder='{bad}'" in proc.stderr
    assert "latent_channels=16" in proc.stderr and "critic.decoder=vae" in proc.stderr


def test_old_runs_keep_the_vae_and_latent_critic_refuses_tiny():
    assert build_config(base={"critic": {"input": "image"}}).critic.decoder == "vae"
    assert build_config().critic.decoder == "vae"
    with pytest.raises(UsageError, match="critic.decoder"):
        build_config(overrides={"critic.decoder": "tiny", "critic.input": "latent"})
