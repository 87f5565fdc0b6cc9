"""Bad input, table-driven (``tests/fixtures/bad_inputs.py``), through ``python -m tdpo.cli``
subprocesses: each exits with code 2 and ONE line on stderr naming the field, the value and the
fix, without a traceback, and leaves no run directory behind. Checks that need no model run
before torch or diffusers is imported (seen with ``-X importtime``). How long each rejection
takes is measured by ``benchmarks/bad_input_latency.py``, not asserted here."""

from __future__ import annotations

import subprocess

import pytest

from tests.fixtures.bad_inputs import (
    CASES,
    FAST,
    LOADS,
    case_id,
    prepare_case,
    write_fake_runs,
)
from tests.fixtures.processes import REPO, cli_env, tdpo_command

HEAVY = ("torch", "diffusers")  # what a check before any model loads must not import
IMPORT_TIME = "import time:"


@pytest.fixture(scope="module")
def fake_runs(tiny_pipeline_dir, tiny_clip_dir, tmp_path_factory):
    return write_fake_runs(tmp_path_factory.mktemp("fake-runs"), tiny_pipeline_dir, tiny_clip_dir)


def run_with_imports(args: list[str]) -> tuple[subprocess.CompletedProcess, str, set[str]]:
    """Run the CLI under ``-X importtime``: (result, stderr without the import lines, the
    top-level packages imported)."""
    cmd = tdpo_command(args)
    cmd[1:1] = ["-X", "importtime"]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO
    )
    imported, stderr = set(), []
    for line in result.stderr.splitlines():
        if line.startswith(IMPORT_TIME):
            imported.add(line.rsplit("|", 1)[1].strip().split(".")[0])
        else:
            stderr.append(line)
    return result, "\n".join(stderr), imported


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_exits_2_with_one_line(
    case, tiny_pipeline_dir, tiny_clip_dir, fake_runs, tmp_path
):
    prepared = prepare_case(case, tiny_pipeline_dir, tiny_clip_dir, fake_runs, tmp_path)
    result, stderr, imported = run_with_imports(prepared.args)
    print(f"{prepared.name}: exit {result.returncode}: {stderr.strip()}")
    assert result.returncode == 2, result.stdout[-1500:] + stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert "Traceback" not in stderr and line.startswith("tdpo")
    for text in prepared.expected:
        assert text in line, (text, line)
    if prepared.kind != LOADS:
        assert not any(prepared.out.iterdir()), "a rejected config must not create a run directory"
    assert "tdpo" in imported, "no -X importtime lines: the import check below would be vacuous"
    if prepared.kind == FAST:
        assert not imported & set(HEAVY), f"{prepared.name} imported {imported & set(HEAVY)}"
        assert "run directory:" not in result.stdout


def test_table_has_at_least_30_cases():
    assert len(CASES) >= 30
    assert len({case_id(c) for c in CASES}) == len(CASES)
