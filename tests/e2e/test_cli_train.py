"""End-to-end: the CLI in-process through main(argv), on tiny models built from configs."""

from __future__ import annotations

import json
import re

import pytest

from tdpo.cli import main
from tdpo.tracking import read_metrics
from tests.fixtures.factories import as_set_args, tiny_overrides
from tests.fixtures.run_checks import assert_same_metrics


def _train(pipeline_dir, clip_dir, out_dir, name, *extra_args, **overrides):
    args = [
        "train",
        "--preset",
        "tdpo-r",
        "--output-dir",
        str(out_dir),
        *as_set_args(tiny_overrides(pipeline_dir, clip_dir, run_name=name, **overrides)),
        *extra_args,
    ]
    return main(args)


def test_two_epoch_run_writes_the_run_directory(tiny_pipeline_dir, tiny_clip_dir, tmp_path, capsys):
    code = _train(
        tiny_pipeline_dir,
        tiny_clip_dir,
        tmp_path,
        "run",
        **{"reward.panel": ["jpeg_incompressibility"], "reset.every": 1},
    )
    assert code == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert f"run directory: {run}" in out and "epoch 2/2" in out
    assert (run / "config.yaml").is_file()
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "reward_queries",
        "reward_mean",
        "reward_std",
        "panel/jpeg_incompressibility",
        "policy_loss",
        "critic_loss",
        "approx_kl",
        "clipfrac",
        "critic_ev",
        "dormant_fraction",
        "active_fraction",
        "neurons_reset",
        "seconds",
    ):
        assert key in rows[-1], key
    assert rows[-1]["reward_queries"] == 16
    assert rows[0]["neurons_reset"] > 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "epoch_0001.png",
        "epoch_0002.png",
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch_000001",
        "epoch_000002",
    ]
    assert (run / "final" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    # A second run into the same folder is refused instead of clobbering it.
    assert _train(tiny_pipeline_dir, tiny_clip_dir, tmp_path, "run") == 2
    assert "already holds a run" in capsys.readouterr().err


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(
    tiny_pipeline_dir, tiny_clip_dir, tmp_path
):
    # Resets after epoch 2 (not after 4: a run's last epoch does not reset). The split run stops
    # after epoch 3, not 2: stopped after a reset epoch, it would have skipped that reset as its
    # last epoch, which no resume can replay.
    common = {"train.epochs": 4, "reset.every": 2}
    assert _train(tiny_pipeline_dir, tiny_clip_dir, tmp_path, "full", **common) == 0
    assert (
        _train(tiny_pipeline_dir, tiny_clip_dir, tmp_path, "split", **{**common, "train.epochs": 3})
        == 0
    )
    assert main(["train", "--resume", str(tmp_path / "split"), "--set", "train.epochs=4"]) == 0
    full, split = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert len(full) == 4 and full[1]["neurons_reset"] > 0
    assert_same_metrics(full, split)


# Bad configurations and their one-line errors: the table in tests/fixtures/bad_inputs.py, run
# through `python -m tdpo.cli` by tests/e2e/test_bad_inputs.py. In-process, main() leaves
# argparse's own errors to argparse:
def test_unknown_preset_is_an_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_field(capsys):
    from tdpo.config import iter_fields

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name, *_ in iter_fields():
        assert name in text


def test_python_dash_m_runs_the_same_command_line():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "tdpo", "train", "--preset", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "tdpo train: error" in out.stderr and "invalid choice" in out.stderr


def test_dry_run_prints_schedule_and_loads_nothing(capsys):
    assert main(["train", "--preset", "sd14-aesthetic", "--preset", "tdpo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "updates per epoch: 100" in out and "gradient accumulation: 128" in out
    # The training reward and the paper's panel stay loaded: aesthetic + imagereward +
    # pickscore + hpsv2 (304.9 + 446.2 + 986.1 + 986.1 M parameters).
    assert "rewards 2723.3 M" in out


def test_dry_run_without_a_gpu_also_gives_the_gpu_figure(capsys, monkeypatch):
    """Without a GPU the frozen weights count in fp32 (16.13 GiB for sd14-aesthetic); the next
    line gives them in bf16, the README's 8.5 GiB: half the weights + the same rest."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as on a machine without a GPU
    assert main(["train", "--preset", "sd14-aesthetic", "--dry-run"]) == 0
    out = capsys.readouterr().out
    memory = re.search(
        r"frozen weights (\d+) MiB \(fp32\), trainable \+ AdamW (\d+) MiB, stored epoch "
        r"(\d+) MiB; total ~([\d.]+) GiB",
        out,
    )
    weights, trainable, stored = (int(memory.group(i)) for i in (1, 2, 3))
    gpu = re.search(r"on a GPU with mixed_precision=bf16 they take (\d+) MiB: total ~([\d.]+)", out)
    assert int(gpu.group(1)) == pytest.approx(weights / 2, abs=1)
    assert float(gpu.group(2)) == pytest.approx((weights / 2 + trainable + stored) / 1024, abs=0.01)
    assert float(memory.group(4)) == pytest.approx(16.13) and float(gpu.group(2)) == 8.51


def test_dry_run_counts_the_sdxl_text_encoders_and_latents(capsys):
    from tdpo.estimate import KNOWN_PIPELINES

    sdxl = "stabilityai/stable-diffusion-xl-base-1.0"
    # The paper's image critic (768-dim CLIP embeddings of x_t), not the shapes default.
    critic = ["--set", "critic.input=image", "--set", "critic.prompt_input=false"]
    args = ["train", "--model", sdxl, "--set", "sample.samples_per_epoch=64", *critic]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"UNet {KNOWN_PIPELINES[sdxl][0]} M" in out and "text encoder 817.7 M" in out
    # 64 samples x 21 states x 4x128x128 fp32 latents (336 MiB) + 64 x 20 critic embeddings.
    assert "stored epoch 340 MiB" in out


def test_yaml_config_file_is_applied(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"train": {"epochs": 7}, "sample": {"num_steps": 10}}))
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 7" in out and "num_steps: 10" in out


def test_sample_command_with_a_trained_lora(tiny_pipeline_dir, tiny_clip_dir, tmp_path, capsys):
    from PIL import Image

    assert (
        _train(
            tiny_pipeline_dir,
            tiny_clip_dir,
            tmp_path,
            "run",
            **{"train.epochs": 1, "log.tensorboard": True},
        )
        == 0
    )
    assert list((tmp_path / "run").glob("events.out.tfevents.*")), "no TensorBoard events"
    out = tmp_path / "samples"
    code = main(
        [
            "sample",
            "--model",
            str(tiny_pipeline_dir),
            "--lora",
            str(tmp_path / "run" / "final"),
            "--prompt",
            "a red cat",
            "--prompt",
            "a blue dog",
            "--seeds",
            "0,1",
            "--steps",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    pngs = sorted(p.name for p in out.glob("p*_s*.png"))
    assert pngs == ["p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"]
    assert Image.open(out / "p000_s0.png").size == (16, 16)
    assert (out / "grid.png").is_file()
    assert (
        main(
            [
                "sample",
                "--model",
                str(tiny_pipeline_dir),
                "--lora",
                "/no/such/lora",
                "--prompt",
                "x",
            ]
        )
        == 2
    )
