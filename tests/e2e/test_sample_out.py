"""``tdpo sample`` never overwrites a file: ``--out`` is a new or empty folder (else one line,
exit 2, before anything loads), and without ``--out`` each call writes a new folder."""

from __future__ import annotations

from tdpo.cli import main

FAST = ["--model", "shapes-world", "--prompt", "a small red circle", "--steps", "2"]


def test_a_folder_with_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "p000_s0.png").write_bytes(b"the user's own file")
    assert main(["sample", *FAST, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tdpo: error: --out='{out}': ") and err.count("\n") == 1
    assert "not empty" in err and "new or empty folder" in err
    assert (out / "p000_s0.png").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in out.iterdir()) == ["p000_s0.png"]


def test_an_empty_folder_is_used_and_no_out_writes_a_new_folder_each_time(
    tmp_path, capsys, monkeypatch
):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["sample", *FAST, "--out", str(empty)]) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["grid.png", "p000_s0.png"]
    monkeypatch.chdir(tmp_path)
    assert main(["sample", *FAST]) == 0
    assert main(["sample", *FAST]) == 0
    folders = sorted((tmp_path / "samples").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("sample-") for f in folders)
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "p000_s0.png"]
    capsys.readouterr()


def test_help_says_what_sample_and_eval_sample_with_and_that_out_is_new(capsys):
    import pytest

    from tdpo.cli import build_parser

    parser = build_parser()
    for command in ("sample", "eval"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "DDIM for SD 1.x/2.x and SDXL" in text
        assert "flow-matching Euler ODE for SD3" in text
        if command == "sample":
            assert "new or empty" in text and "never overwritten" in text
