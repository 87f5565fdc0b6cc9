"""How long ``tdpo train`` takes to reject each bad input (wall and CPU seconds of the child).

The cases are the table of ``tests/fixtures/bad_inputs.py``; ``tests/e2e/test_bad_inputs.py``
checks the behaviour (exit 2, one line, no run directory, no torch import before models load),
this script only measures. Each case runs ``python -m tdpo.cli`` in a subprocess (one thread,
offline) on tiny models built in a temporary folder. Kinds: ``fast`` (nothing heavy imported;
about 0.5 s), ``registry`` (the reward registry imports torch), ``at-load`` and ``loads`` (the
pipeline loads first). The numbers depend on the machine and its load: nothing is asserted.

Run from the repository root::

    .venv/bin/python benchmarks/bad_input_latency.py                 # every case once
    .venv/bin/python benchmarks/bad_input_latency.py --kind fast --repeat 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "src", ROOT):  # tdpo, and the table in tests/fixtures
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.fixtures.bad_inputs import (  # noqa: E402
    CASES,
    case_id,
    case_kind,
    prepare_case,
    write_fake_runs,
)
from tests.fixtures.processes import cli_env, tdpo_command  # noqa: E402

KINDS = ("fast", "registry", "at-load", "loads")


def timed_run(args: list[str]) -> tuple[int, float, float]:
    """(exit code, wall seconds, CPU seconds of the child, user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = subprocess.run(
        tdpo_command(args), capture_output=True, text=True, timeout=600, env=cli_env(), cwd=ROOT
    )
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result.returncode, wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", action="append", choices=KINDS, help="only these kinds")
    parser.add_argument("--case", action="append", help="only these case ids")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (default 1)")
    args = parser.parse_args(argv)
    cases = [
        c
        for c in CASES
        if (not args.kind or case_kind(c) in args.kind)
        and (not args.case or case_id(c) in args.case)
    ]
    if not cases:
        parser.error("no case matches --kind / --case")

    from tdpo.tiny import build_tiny_clip, build_tiny_pipeline

    with tempfile.TemporaryDirectory(prefix="bad-input-latency-") as tmp:
        tmp = Path(tmp)
        pipeline_dir, clip_dir = tmp / "pipeline", tmp / "clip"
        build_tiny_pipeline(pipeline_dir)
        build_tiny_clip(clip_dir)
        runs_root = write_fake_runs(tmp / "fake-runs", pipeline_dir, clip_dir)
        print(f"{'case':<28} {'kind':<9} {'exit':>4} {'wall s':>7} {'CPU s':>7}", flush=True)
        by_kind: dict[str, list[tuple[float, float]]] = {}
        for n, case in enumerate(cases):
            for r in range(args.repeat):
                work = tmp / f"case-{n}-{r}"
                work.mkdir()
                prepared = prepare_case(case, pipeline_dir, clip_dir, runs_root, work)
                code, wall, cpu = timed_run(prepared.args)
                by_kind.setdefault(prepared.kind, []).append((wall, cpu))
                note = "" if code == 2 else "  (expected exit 2)"
                print(
                    f"{prepared.name:<28} {prepared.kind:<9} {code:>4} {wall:>7.2f} {cpu:>7.2f}"
                    + note,
                    flush=True,
                )
    print("\nper kind: runs, median / max wall s, median / max CPU s")
    for kind in KINDS:
        if kind in by_kind:
            walls, cpus = zip(*by_kind[kind])
            print(
                f"{kind:<9} {len(walls):>4}  wall {statistics.median(walls):.2f} / "
                f"{max(walls):.2f}  CPU {statistics.median(cpus):.2f} / {max(cpus):.2f}"
            )
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
