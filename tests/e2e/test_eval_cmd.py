"""``tdpo eval`` on the tiny pipeline: valid JSON, reproducible under fixed seeds, one-line
errors for bad input."""

from __future__ import annotations

import json
import math

import pytest

from tdpo.cli import main


def _eval(pipeline_dir, out, *extra):
    return main(
        [
            "eval",
            "--model",
            str(pipeline_dir),
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--seeds",
            "0,1,2",
            "--reward",
            "jpeg_compressibility",
            "--reward",
            "jpeg_incompressibility",
            "--steps",
            "3",
            "--guidance",
            "3.0",
            "--batch-size",
            "2",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_eval_writes_valid_reproducible_json(tiny_pipeline_dir, tmp_path, capsys):
    assert _eval(tiny_pipeline_dir, tmp_path / "a.json", "--grid", str(tmp_path / "g.png")) == 0
    printed = capsys.readouterr().out
    assert "jpeg_compressibility" in printed and "a red circle" in printed
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["seeds"] == [0, 1, 2] and a["num_prompts"] == 2
    assert len(a["images"]) == 6
    assert (tmp_path / "g.png").stat().st_size > 0
    for name in ("jpeg_compressibility", "jpeg_incompressibility"):
        r = a["rewards"][name]
        values = [i["rewards"][name] for i in a["images"]]
        assert r["n"] == 6 and r["mean"] == pytest.approx(sum(values) / 6)
        mean = sum(values) / 6
        assert r["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 5))
        assert [p["prompt"] for p in r["per_prompt"]] == ["a red circle", "a blue square"]
        assert r["per_prompt"][0]["mean"] == pytest.approx(sum(values[:3]) / 3)
    # the same command again: the same images, hence the same numbers
    assert _eval(tiny_pipeline_dir, tmp_path / "b.json") == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert [i["rewards"] for i in b["images"]] == [i["rewards"] for i in a["images"]]
    assert (
        b["rewards"]["jpeg_compressibility"]["mean"] == a["rewards"]["jpeg_compressibility"]["mean"]
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--seeds", "a,b"],
        ["--reward", "no_such_reward"],
        ["--steps", "0"],
        ["--lora", "/no/such/folder"],
        ["--out", "x.txt"],
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_pipeline_dir, tmp_path, capsys, args):
    base = ["eval", "--model", str(tiny_pipeline_dir), "--prompt", "a cat"]
    if "--reward" not in args:
        base += ["--reward", "jpeg_compressibility"]
    if "--out" not in args:
        base += ["--out", str(tmp_path / "e.json")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tdpo: error:")


def test_missing_prompts_or_model(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--reward", "jpeg_compressibility"]) == 2
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "nope"),
                "--prompt",
                "x",
                "--reward",
                "jpeg_compressibility",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 2
    )
