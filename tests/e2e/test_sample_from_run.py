"""``tdpo sample`` and ``tdpo eval`` from a run (issue 13): the model, sampler and runtime come
from the run's config.yaml, the output goes into the run folder; a shapes-world run needs no
--model. Also the help texts and the default run names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tdpo.cli import build_parser, main

SMALL = {
    "train.epochs": 1,
    "sample.samples_per_epoch": 8,
    "sample.batch_size": 8,
    "sample.prompts_per_epoch": 2,
    "sample.num_steps": 4,
    "sample.guidance_scale": 2.5,
    "sample.eta": 0.5,
    "train.batch_size": 4,
    "eval.every": 0,
    "reward.panel": "[]",
    "log.tensorboard": False,
    "cpu_threads": 2,  # not torch's setting in tests (1): sample and eval must apply it
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch shapes-world run (the default model, TDPO-R) at small settings."""
    out = tmp_path_factory.mktemp("runs")
    args = ["train", "--output-dir", str(out), "--set", "run_name=small"]
    for key, value in SMALL.items():
        args += ["--set", f"{key}={value}"]
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(1)
    return out / "small"


def _new_folders(folder, before):
    return sorted(p for p in folder.iterdir() if p.name not in before)


def test_sample_from_a_run_folder_reads_its_config(run, capsys):
    from PIL import Image

    import tdpo

    samples = run / "samples"
    before = {p.name for p in samples.iterdir()}
    try:
        code = main(["sample", "--lora", str(run / "final"), "--prompt", "a small red circle"])
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    assert code == 0
    assert threads == 2  # the run's cpu_threads, as tdpo train sets it
    printed = capsys.readouterr().out
    assert "sampling shapes-world + " in printed
    assert "DDIM 4 steps, guidance 2.5, eta 0.5; cpu, float32, 2 CPU threads" in printed
    (folder,) = _new_folders(samples, before)  # a new folder inside the run, no --out
    assert folder.name.startswith("sample-final-")
    assert (folder / "grid.png").is_file()
    png = Image.open(folder / "p000_s0.png")
    assert png.size == (32, 32)  # the model's own size, as in training
    # The same image as the documented Python call (model, LoRA and sampler of the run).
    pipe = tdpo.load_trained_pipeline(run)
    expected = pipe(
        "a small red circle",
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **tdpo.sampler_settings(run),
    ).images[0]
    got = torch.from_numpy(np.array(png)).permute(2, 0, 1).float() / 255
    assert (got - expected.float()).abs().max().item() <= 1 / 255 + 1e-6
    # The run folder itself gives the same files as its final/.
    before = {p.name for p in samples.iterdir()}
    assert main(["sample", "--lora", str(run), "--prompt", "a small red circle"]) == 0
    torch.set_num_threads(1)
    (again,) = _new_folders(samples, before)
    assert again != folder
    assert (again / "p000_s0.png").read_bytes() == (folder / "p000_s0.png").read_bytes()


def test_sample_flags_win_over_the_run(run, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sample", "--lora", str(run), "--prompt", "a cat", "--steps", "2", "--eta", "0"]
    assert main([*args, "--cpu-threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DDIM 2 steps, guidance 2.5, eta 0; cpu, float32, 1 CPU thread" in printed
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p000_s0.png"]


def test_eval_accepts_a_run_folder(run, capsys):
    before = set()
    code = main(
        ["eval", "--lora", str(run), "--prompt", "a small red circle", "--seeds", "0,1"]
        + ["--reward", "shapes_gold", "--reward", "jpeg_compressibility"]
    )
    torch.set_num_threads(1)
    assert code == 0
    (summary_file,) = _new_folders(run / "eval", before)
    assert summary_file.name.startswith("final-") and summary_file.suffix == ".json"
    summary = json.loads(summary_file.read_text())
    assert summary["model"] == "shapes-world" and summary["run"] == str(run)
    assert summary["lora"] == str(run / "final")
    assert summary["sampler"] == {"steps": 4, "guidance": 2.5, "eta": 0.5}
    assert summary["cpu_threads"] == 2 and summary["dtype"] == "float32"
    assert summary["rewards"]["shapes_gold"]["n"] == 2
    assert str(summary_file) in capsys.readouterr().out


def test_a_run_without_final_and_no_model_are_one_line_errors(run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("final", "eval", "samples"))
    for command in ("sample", "eval"):
        extra = ["--reward", "shapes_gold"] if command == "eval" else []
        assert main([command, "--lora", str(unfinished), "--prompt", "x", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tdpo: error: --lora=") and "no final/ yet" in err
        assert "tdpo train --resume" in err and "\n" not in err
    assert main(["sample", "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tdpo: error: --model=None") and "shapes-world" in err
    assert not (tmp_path / "o").exists()


def test_help_names_shapes_world_and_every_method(capsys):
    parser = build_parser()
    for command in ("sample", "eval"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "shapes-world" in text and "run folder" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for method in ("TDPO,", "TDPO-R", "DDPO", "GRPO", "AlignProp"):
        assert method in text


@pytest.mark.parametrize(
    "presets, start",
    [
        (None, "tdpo-r-"),
        (["tdpo"], "tdpo-"),
        (["ddpo-100"], "ddpo-100-"),
        (["grpo"], "grpo-"),
        (["alignprop"], "alignprop-"),
        (["sd14-aesthetic"], "sd14-aesthetic-tdpo-r-"),
        (["sd14-aesthetic", "ddpo-2"], "sd14-aesthetic-ddpo-2-"),
    ],
)
def test_default_run_names_name_the_method(presets, start):
    from tdpo.config import build_config
    from tdpo.run import default_run_dir

    name = default_run_dir(build_config(presets), "-".join(presets) if presets else None).name
    assert name.startswith(start) and name[len(start) :][:2] == "20", name
