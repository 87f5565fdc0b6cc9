"""``tdpo eval`` never overwrites a file: an existing ``--out`` (or ``--grid``) file is one line,
exit 2, before anything loads, and the file is left as it was; without ``--out`` and without a
run each call writes a new ``./eval-<time>.json`` (no fixed ./eval.json)."""

from __future__ import annotations

import json

import pytest

from tdpo.cli import build_parser, main

FAST = [
    "--model",
    "shapes-world",
    "--prompt",
    "a small red circle",
    "--steps",
    "2",
    "--reward",
    "jpeg_compressibility",
]
MINE = b"the user's own file"


@pytest.mark.parametrize("flag", ["--out", "--grid"])
def test_an_existing_file_is_refused_and_left_as_it_was(tmp_path, capsys, flag):
    mine = tmp_path / ("mine.json" if flag == "--out" else "mine.png")
    mine.write_bytes(MINE)
    extra = [flag, str(mine)] + (["--out", str(tmp_path / "new.json")] if flag == "--grid" else [])
    assert main(["eval", *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tdpo: error: {flag}='{mine}': ") and err.count("\n") == 1
    assert "never overwrites" in err and "give a new file name" in err
    assert "Traceback" not in err
    if flag == "--out":
        assert "leave out --out" in err
    assert mine.read_bytes() == MINE
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]  # nothing written


def test_without_out_or_run_each_call_writes_a_new_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", *FAST]) == 0
    assert main(["eval", *FAST]) == 0
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2, files
    assert all(f.name.startswith("eval-") and f.suffix == ".json" for f in files)
    assert not (tmp_path / "eval.json").exists()
    for file in files:
        assert json.loads(file.read_text())["rewards"]["jpeg_compressibility"]["n"] == 1
    out = capsys.readouterr().out
    assert all(f"wrote {f.name}" in out for f in files)


def test_help_says_out_is_a_new_file(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "never overwritten" in text and "a new ./eval-<time>.json" in text
    assert "else eval.json" not in text
