"""The default run (the shipped shapes world) at small settings, through the CLI."""

from __future__ import annotations

import html
import re
from pathlib import Path

from tdpo.cli import main
from tdpo.tracking import read_metrics
from tdpo.verdict import judge, result_lines, signed


def test_default_run_on_the_shipped_world_at_small_settings(tmp_path, capsys):
    args = ["train", "--output-dir", str(tmp_path), "--set", "run_name=demo"]
    small = {
        "train.epochs": 1,
        "sample.samples_per_epoch": 8,
        "sample.batch_size": 8,
        "sample.prompts_per_epoch": 2,
        "sample.num_steps": 4,
        "train.batch_size": 4,
        "eval.prompts_per_set": 2,
        "eval.seeds_per_prompt": 1,
        "eval.every": 1,
        "log.tensorboard": False,
    }
    for key, value in small.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    rows = read_metrics(tmp_path / "demo")
    assert [r["epoch"] for r in rows] == [0, 1]  # the base model's evaluation, then epoch 1
    last = rows[-1]
    for reward in (
        "shapes_pickscore",
        "shapes_hps",
        "shapes_imagereward",
        "shapes_gold",
        "shapes_gold_alignment",
        "shapes_gold_aesthetic",
    ):
        assert f"panel/{reward}" in last
    for label in ("seen", "unseen"):
        for reward in ("shapes_aesthetic", "shapes_gold", "kl", "diversity"):
            assert f"eval/{label}/{reward}" in last
    assert 0.0 <= last["eval/seen/shapes_gold"] <= 1.0
    assert last["neurons_reset"] == 0  # TDPO-R resets every 8 epochs by default
    for q in ("q1", "q2", "q3", "q4"):  # the critic's diagnostics are on every training line
        assert f"critic_ev/{q}" in last and f"critic_ref/{q}" in last
    assert (tmp_path / "demo" / "samples" / "eval_unseen_epoch_0001.png").is_file()
    out = capsys.readouterr().out
    assert "run directory:" in out
    check_terminal(out.splitlines(), rows, tmp_path / "demo")
    check_report_verdict(tmp_path / "demo", capsys)
    check_readme_snippets(tmp_path / "demo")


def check_terminal(lines: list[str], rows: list[dict], run: Path) -> None:
    """What `tdpo train` prints (issue 13): a line before the base evaluation, short 1-based
    epoch lines, the held-out figures of each evaluation with their change since epoch 0, the
    verdict of tdpo.verdict (the report's) at the end, and where the report comes from."""
    announce = next(i for i, line in enumerate(lines) if line.startswith("evaluating the base"))
    assert lines[announce + 1].startswith("held-out seen   (base model): shapes_aesthetic ")
    epoch = next(line for line in lines if line.startswith("epoch "))
    assert epoch.startswith("epoch 1/1 | queries 8 | reward ") and epoch.endswith("s")
    assert "| shapes_gold " in epoch and "| critic EV " in epoch and len(epoch) <= 120
    held_out = [line for line in lines if line.startswith("held-out unseen (epoch 1/1)")]
    base, last = rows[0], rows[-1]
    change = last["eval/unseen/shapes_gold"] - base["eval/unseen/shapes_gold"]
    assert (
        len(held_out) == 1 and f"shapes_gold {last['eval/unseen/shapes_gold']:.3f}" in held_out[0]
    )
    assert f"({signed(change)} vs base)" in held_out[0]
    start = lines.index("result on held-out prompts, base (epoch 0) -> epoch 1:")
    expected = result_lines(judge([rows], "shapes_aesthetic"))
    assert lines[start : start + len(expected)] == expected
    assert expected[-1].startswith("verdict: ")
    assert sum(str(run / "report") in line or "tdpo report" in line for line in lines) == 1
    for line in lines:
        if line.startswith(("epoch ", "held-out ", "result ", "  seen", "  unseen", "verdict")):
            assert len(line) <= 120, line


def check_report_verdict(run: Path, capsys) -> None:
    """The report's first screen says the verdict the terminal printed (one function)."""
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(str(run / "report" / "index.html")) == 1
    verdict = judge([read_metrics(run)], "shapes_aesthetic")
    first = (run / "report" / "index.html").read_text().split("<h2>Details</h2>")[0]
    assert f"<b>{html.escape(verdict.conclusion)}</b>" in first


def check_readme_snippets(run: Path) -> None:
    """The README's "Load the result" snippets, run as written on this run: the same images as
    each other, and not the base model's (the LoRA is loaded)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    import tdpo
    from tdpo.world import PIPELINE_DIR

    assert "tdpo.load_trained_pipeline" in tdpo.__doc__ and "PIPELINE_DIR" in tdpo.__doc__
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("Load the result", 1)[1]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    assert "load_trained_pipeline" in snippets[0] and "PIPELINE_DIR" in snippets[1]
    pipes = []
    for code in snippets:
        scope: dict = {}
        exec(code.replace("runs/<name>", str(run)), scope)  # noqa: S102 (our own README)
        assert scope["image"].size == (32, 32)
        pipes.append(scope["pipe"])
    base = StableDiffusionPipeline.from_pretrained(PIPELINE_DIR)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    images = []
    for pipe in (*pipes, base):
        generator = torch.Generator().manual_seed(0)
        kwargs = {"num_inference_steps": 4, "guidance_scale": 4.0, "eta": 1.0}
        images.append(pipe("a small red circle", generator=generator, output_type="pt", **kwargs))
    first, second, untrained = (i.images for i in images)
    assert torch.equal(first, second)
    assert not torch.equal(first, untrained)
