"""tdpo bench (timing helpers, a --quick run) and benchmarks/gpu_check.py --tiny on CPU."""

from __future__ import annotations

import json

import pytest

from tdpo.bench import PeakMemory, alternate, linear_fit, paired_ratio
from tests.fixtures.processes import run_gpu_check_tiny


def test_paired_ratio_is_the_median_of_per_round_ratios():
    r = paired_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 1.0])
    assert r["median"] == 3.0 and r["min"] == 2.0 and r["max"] == 10.0 and r["rounds"] == 3


def test_linear_fit_of_a_proportional_series():
    fit = linear_fit([4, 8, 16], [1.0, 2.0, 4.0])
    assert fit["loglog_slope"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["intercept_s"] == pytest.approx(0.0, abs=1e-12)
    fixed = linear_fit([4, 8, 16], [2.0, 3.0, 5.0])  # 1 s of fixed cost
    assert fixed["loglog_slope"] < 1.0
    assert fixed["intercept_share_at_min"] == pytest.approx(0.5)


def test_alternate_rotates_the_order_and_records_every_round():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    out = alternate(fns, repeats=3, memory=PeakMemory(), warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(out[n]["seconds"]) == 3 for n in fns)


def test_bench_quick_writes_ratios(tmp_path):
    from tdpo.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--quick", "--no-scaling", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    figures = {row["figure"]: row for row in data["summary"]}
    for name in ("sample_vs_pipeline", "ddpo100_vs_floor", "tdpo_latent_vs_ddpo100"):
        assert figures[name]["median"] > 0
    assert data["epochs"]["times"]["floor"]["seconds"]


def test_bench_rejects_bad_sizes(capsys):
    from tdpo.cli import main

    assert main(["bench", "--quick", "--samples", "3", "--batch", "2"]) == 2
    assert "--samples" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_gpu_check_tiny_runs_on_cpu(arch, tmp_path):
    _, data = run_gpu_check_tiny(["--arch", arch], tmp_path)
    parts = [
        "1_pipe_call",
        "2_policy_sample_vs_pipe",
        "3_tdpo_r_image_epoch",
        "4_tdpo_r_latent_epoch",
    ]
    if arch == "sd15":  # the SDXL check leaves DDPO out to fit the device time
        parts.append("5_ddpo100_epoch")
    for part in parts:
        assert "seconds" in data[part], data[part]
    assert data["3_tdpo_r_image_epoch"]["seconds_value"] >= 0
    assert arch in data["settings"]["what"]
