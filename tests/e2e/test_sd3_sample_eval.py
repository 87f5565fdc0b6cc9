"""``tdpo sample``, ``tdpo eval`` and the Python API (``tdpo.load_trained_pipeline``,
``tdpo.sampler_settings``) on Stable Diffusion 3 runs: the pipeline's own sampler (the
flow-matching Euler ODE, which takes no ``eta``), the one loader of trained weights (a LoRA, or a
fully fine-tuned ``final/transformer/``) with a one-line error for a damaged file, the held-out
evaluation during an SD3 run, and the closing line saying what was saved."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tdpo.cli import main
from tdpo.errors import UsageError
from tests.fixtures.factories import SD3_ISSUE_SETTINGS, as_set_args

# The issue's command, at one epoch.
COMMAND = [
    "--preset",
    "grpo",
    "--reward",
    "jpeg_compressibility",
    *as_set_args({**SD3_ISSUE_SETTINGS, "train.epochs": 1, "log.tensorboard": False}),
]


@pytest.fixture(scope="module")
def lora_run(tiny_sd3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    args = ["train", "--model", str(tiny_sd3_dir), *COMMAND, "--set", "eval.every=0"]
    assert main([*args, "--output-dir", str(out), "--set", "run_name=lora"]) == 0
    return out / "lora"


def _png(path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255


def test_sample_uses_the_pipelines_own_ode_and_matches_the_python_api(lora_run, capsys):
    import tdpo

    settings = tdpo.sampler_settings(lora_run)
    assert settings == {"num_inference_steps": 4, "guidance_scale": 4.0}  # no eta for SD3
    samples = lora_run / "samples"
    before = {p.name for p in samples.iterdir()} if samples.is_dir() else set()
    assert main(["sample", "--lora", str(lora_run), "--prompt", "a cat", "--seeds", "0,1"]) == 0
    printed = capsys.readouterr().out
    assert "flow-matching Euler ODE 4 steps, guidance 4;" in printed and "eta" not in printed
    (folder,) = [p for p in samples.iterdir() if p.name not in before]
    pipe = tdpo.load_trained_pipeline(lora_run)
    expected = pipe(
        "a cat", generator=torch.Generator().manual_seed(1), output_type="pt", **settings
    ).images[0]
    assert (_png(folder / "p000_s1.png") - expected.float()).abs().max() <= 1 / 255 + 1e-6


def test_eval_on_an_sd3_run(lora_run, capsys):
    out = lora_run.parent / "e.json"
    args = ["eval", "--lora", str(lora_run), "--prompt", "a cat", "--seeds", "0,1"]
    assert main([*args, "--reward", "jpeg_compressibility", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["sampler"] == {"steps": 4, "guidance": 4.0, "eta": None}
    assert summary["rewards"]["jpeg_compressibility"]["n"] == 2
    assert "flow-matching Euler ODE" in capsys.readouterr().out


def test_eta_for_sd3_and_a_damaged_lora_are_one_line_errors(lora_run, tmp_path, capsys):
    import tdpo

    code = main(["sample", "--lora", str(lora_run), "--prompt", "x", "--eta", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tdpo: error: --eta=0.5: ") and err.count("\n") == 1
    assert "StableDiffusion3Pipeline" in err and "drop --eta" in err
    damaged = tmp_path / "damaged"
    shutil.copytree(lora_run, damaged, ignore=shutil.ignore_patterns("samples", "eval"))
    lora = damaged / "final" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:300])  # truncated
    with pytest.raises(UsageError) as info:
        tdpo.load_trained_pipeline(damaged)
    assert info.value.field == "run" and "damaged" in info.value.fix
    assert "\n" not in str(info.value)
    out = tmp_path / "s"
    assert main(["sample", "--lora", str(damaged), "--prompt", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tdpo: error: --lora=") and "damaged" in err and err.count("\n") == 1


def test_full_finetune_with_held_out_evaluation(tiny_sd3_dir, tmp_path, capsys):
    """model.finetune=full writes final/transformer/: the closing line says so, and the Python
    API and tdpo sample load it; eval.every=1 evaluates the SD3 run on held-out prompts."""
    import tdpo

    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a cat\na dog\n")
    args = ["train", "--model", str(tiny_sd3_dir), *COMMAND, "--set", "model.finetune=full"]
    args += ["--set", "eval.every=1", "--set", f"eval.prompt_sets=[{prompts}]"]
    args += ["--set", "eval.seeds_per_prompt=1", "--output-dir", str(tmp_path)]
    assert main([*args, "--set", "run_name=full"]) == 0
    run = tmp_path / "full"
    printed = capsys.readouterr().out
    assert "held-out heldout (base model): jpeg_compressibility" in printed
    assert "held-out heldout (epoch 1/1): jpeg_compressibility" in printed
    assert f"(fine-tuned transformer in {run / 'final' / 'transformer'}," in printed
    assert "LoRA" not in printed.splitlines()[-1]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "eval/heldout/jpeg_compressibility" in metrics[-1]
    pipe = tdpo.load_trained_pipeline(run)
    trained = pipe.transformer.state_dict()
    from tdpo.policy import load_pipeline

    base = load_pipeline(str(tiny_sd3_dir)).transformer.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base), "final/transformer not loaded"
    out = tmp_path / "s"
    assert main(["sample", "--lora", str(run), "--prompt", "a cat", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p000_s0.png"]
