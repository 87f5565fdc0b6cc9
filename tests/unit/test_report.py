"""``tdpo report`` on fake run directories (tests/fixtures/fake_runs.py): every file present and
linked, images decode and are not blank, table numbers against hand computations."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdpo.cli import main
from tdpo.report import method_label, value_at_level
from tests.fixtures.fake_runs import make_fake_runs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_fake_runs(root)
    out = root / "report"
    assert main(["report", str(root), "--out", str(out)]) == 0
    return out


def _links(index: Path) -> list[str]:
    text = index.read_text()
    return re.findall(r"(?:src|href)='([^']*)'", text) + re.findall(r'(?:src|href)="([^"]*)"', text)


def test_every_file_present_and_every_link_resolves(report):
    for name in ("index.html", "summary.json", "summary.md", "sample_efficiency.png"):
        assert (report / name).is_file(), name
    links = _links(report / "index.html")
    assert len(links) > 20
    for link in links:
        assert not link.startswith(("http:", "https:", "/", "//")), link
        assert (report / link).is_file(), link
    html = (report / "index.html").read_text()
    assert "<script" not in html
    # plots of cross-reward generalization, gold, critic dynamics; grids of first/middle/last
    for name in ("cross_reward_0.png", "gold_0.png", "critic_dynamics.png", "critic_quarters.png"):
        assert name in links
    grids = sorted(p.name for p in (report / "samples" / "tdpo-r-s0").glob("*.png"))
    assert grids[:3] == ["epoch_0001.png", "epoch_0004.png", "epoch_0006.png"]
    assert "eval_unseen_epoch_0003.png" in grids
    assert "alignprop-s0" in html  # listed as left out (no metrics)


def test_images_decode_and_are_not_blank(report):
    pngs = [p for p in report.rglob("*.png")]
    assert len(pngs) > 20
    for path in pngs:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
        assert array.size > 0 and array.std() > 1.0, path


def test_summary_matches_hand_computation(report):
    summary = json.loads((report / "summary.json").read_text())
    group = next(g for g in summary["groups"] if g["reward"] == "shapes_aesthetic")
    methods = {m["method"]: m for m in group["methods"]}
    assert list(methods) == ["TDPO-R", "TDPO", "DDPO-2"]
    # threshold = r0 + 0.8 (best - r0), r0 = mean first reward, best = TDPO-R's mean final
    r0 = (1.0 + 1.2 + 1.0 + 1.1 + 1.1) / 5
    assert group["threshold"] == pytest.approx(r0 + 0.8 * (3.1 - r0))
    tdpo_r = methods["TDPO-R"]
    assert tdpo_r["final_reward"]["mean"] == pytest.approx(3.1)
    assert tdpo_r["final_reward"]["std"] == pytest.approx(math.sqrt(0.02))
    assert tdpo_r["queries_to_threshold"] == pytest.approx(
        {"mean": 320.0, "std": 0.0, "n": 2, "reached": 2}
    )
    assert methods["TDPO"]["queries_to_threshold"]["mean"] == 384.0
    assert methods["TDPO"]["final_reward"]["std"] is None  # one seed
    assert methods["DDPO-2"]["queries_to_threshold"]["reached"] == 0
    assert methods["DDPO-2"]["queries_to_threshold"]["mean"] is None
    # matched level of panel/shapes_gold: min over runs of max reward = 1.7 (DDPO-2 seed 0);
    # seed 0 crosses 1.7 between (1.5, 0.50) and (2.0, 0.56); seed 1 between (1.6, .51), (2.1, .55)
    assert group["matched_levels"]["panel/shapes_gold"] == pytest.approx(1.7)
    s0 = 0.50 + 0.4 * (0.56 - 0.50)
    s1 = 0.51 + 0.2 * (0.55 - 0.51)
    cell = tdpo_r["ood_at_matched"]["panel/shapes_gold"]
    assert cell["mean"] == pytest.approx((s0 + s1) / 2)
    assert cell["std"] == pytest.approx(abs(s0 - s1) / math.sqrt(2))
    # a null (NaN) value is skipped: DDPO-2 seed 0 has no pickscore at its last epoch
    assert methods["DDPO-2"]["final"]["panel/shapes_pickscore"]["mean"] == pytest.approx(
        (0.09 + 0.08) / 2
    )
    # the training reward is not its own out-of-domain metric
    assert "panel/shapes_aesthetic" not in group["matched_levels"]
    md = (report / "summary.md").read_text()
    assert "| final training reward | 3.100 ± 0.141 | 2.800 | 1.800 ± 0.141 |" in md
    assert "reward queries to 2.696" in md


def test_single_run_defaults_to_its_report_folder_and_ddpo_has_no_critic_plot(tmp_path):
    runs = make_fake_runs(tmp_path)
    ddpo = next(r for r in runs if r.name == "ddpo-2-s0")
    assert main(["report", str(ddpo)]) == 0
    assert (ddpo / "report" / "index.html").is_file()
    assert not (ddpo / "report" / "critic_dynamics.png").exists()
    assert not (ddpo / "report" / "critic_quarters.png").exists()


def test_bad_input_exits_2(tmp_path, capsys):
    runs = make_fake_runs(tmp_path)
    empty = next(r for r in runs if r.name == "alignprop-s0")
    assert main(["report", str(empty)]) == 2
    assert main(["report", str(runs[0]), str(runs[1])]) == 2  # several runs need --out
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("tdpo: error:") == 3


IMAGE = {"input": "image"}  # configs written before the x0 critic became the shapes default


@pytest.mark.parametrize(
    "config, label",
    [
        (
            {
                "train": {"algorithm": "tdpo"},
                "critic": IMAGE,
                "reset": {"enabled": True, "target": "active"},
            },
            "TDPO-R",
        ),
        ({"train": {"algorithm": "tdpo"}, "critic": IMAGE, "reset": {"enabled": False}}, "TDPO"),
        (
            {"train": {"algorithm": "ddpo", "updates_per_epoch": 0}, "sample": {"num_steps": 20}},
            "DDPO-40",
        ),
        (
            {
                "train": {"algorithm": "tdpo"},
                "reset": {"enabled": True},
                "critic": {"input": "latent"},
            },
            "TDPO-R (latent critic)",
        ),
        ({"train": {"algorithm": "ddpo", "updates_per_epoch": 100}}, "DDPO-100"),
        ({"train": {"algorithm": "alignprop"}}, "AlignProp"),
        (  # a config of this version: the shapes defaults say how they differ from the paper
            {
                "train": {"algorithm": "tdpo", "normalization": "running"},
                "critic": {"input": "x0", "prompt_input": True},
            },
            "TDPO-R (x0+prompt critic, running norm)",
        ),
        ({"train": {"algorithm": "grpo", "normalization": "group"}}, "GRPO"),
    ],
)
def test_method_label(config, label):
    assert method_label(config) == label


def test_value_at_level_interpolates_the_first_crossing():
    xs = np.array([1.0, 2.0, 1.5, 3.0])
    ys = np.array([10.0, 20.0, 0.0, 0.0])
    assert value_at_level(xs, ys, 1.5) == pytest.approx(15.0)
    assert value_at_level(xs, ys, 0.5) == 10.0  # already above at the first point
    assert value_at_level(xs, ys, 4.0) is None
