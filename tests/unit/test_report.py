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
    for name in (
        "heldout_0.png",
        "heldout_tradeoff_1.png",  # group 0 (shapes_pickscore) has no held-out reward
        "cross_reward_0.png",
        "gold_0.png",
        "critic_dynamics.png",
        "critic_quarters.png",
    ):
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


def test_first_screen_gives_the_verdict_of_each_method(report):
    """Hand computation (tests/fixtures/fake_runs.py, ``_eval``): held-out base = epoch 0, final =
    epoch 6. DDPO-2 seen prompts: training reward 0.9 -> 1.7 and 1.0 -> 1.9 (changes 0.8 and
    0.9: mean 0.85, spread 0.0707); gold 0.45 -> 0.41 and 0.46 -> 0.39 (-0.04 and -0.07: mean
    -0.055, spread 0.0212 > 2% of 0.455). Unseen gold: 0.40 -> 0.37, 0.41 -> 0.35 (mean -0.045)."""
    html = (report / "index.html").read_text()
    first, details = html.split("<h2>Details</h2>")
    assert "Did training help, and did it over-optimize?" in first
    summary = json.loads((report / "summary.json").read_text())
    verdicts = {(v["reward"], v["method"]): v for v in summary["verdicts"]}
    ddpo = verdicts[("shapes_aesthetic", "DDPO-2")]
    assert ddpo["runs"] == ["ddpo-2-s0", "ddpo-2-s1"]
    v = ddpo["verdict"]
    reward = v["changes"]["seen"]["shapes_aesthetic"]
    assert reward["base"] == pytest.approx(0.95) and reward["final"] == pytest.approx(1.8)
    assert reward["delta"] == pytest.approx(0.85)
    assert reward["spread"] == pytest.approx(math.sqrt(0.005))
    gold = v["changes"]["seen"]["shapes_gold"]
    assert gold["delta"] == pytest.approx(-0.055)
    assert gold["spread"] == pytest.approx(0.03 / math.sqrt(2))
    assert gold["word"] == "down"
    assert v["changes"]["unseen"]["shapes_gold"]["delta"] == pytest.approx(-0.045)
    assert v["conclusion"] == "over-optimized on seen and unseen prompts"
    # TDPO-R: gold 0.45 -> 0.62, 0.46 -> 0.61 on seen prompts (+0.17, +0.15): improved
    tdpo_r = verdicts[("shapes_aesthetic", "TDPO-R")]["verdict"]
    assert tdpo_r["changes"]["seen"]["shapes_gold"]["delta"] == pytest.approx(0.16)
    assert tdpo_r["kind"] == "improved"
    # the page says it, in this order, with the numbers of the table
    assert "DDPO-2, 2 seeds (0, 1): trained on shapes_aesthetic" in first
    assert "<b>over-optimized on seen and unseen prompts</b>" in first
    assert "+0.850 ± 0.071 ▲" in first and "-0.055 ± 0.021 ▼" in first
    assert first.index("TDPO-R, 2 seeds") < first.index("DDPO-2, 2 seeds")
    assert first.index("heldout_0.png") < len(first)  # the held-out curves on the first screen
    # the training reward of the pickscore run was never evaluated on held-out prompts
    pick = verdicts[("shapes_pickscore", "DDPO-100")]["verdict"]
    assert pick["kind"] == "no-eval" and "shapes_pickscore" in pick["conclusion"]
    # the critic section says what explained variance is; captions say "over seeds" here
    assert "1 − Var(G − V) / Var(G)" in details
    assert "standard deviation over seeds" in html
    md = (report / "summary.md").read_text()
    assert "### DDPO-2, 2 seeds (0, 1), trained on shapes_aesthetic\n\n**over-optimized on" in md
    assert "| shapes_gold | 0.455 | 0.400 | -0.055 ± 0.021 ▼ | 0.405 | 0.360 |" in md


def test_single_run_page_has_no_multi_seed_rows_and_shows_samples_before_and_after(tmp_path):
    runs = make_fake_runs(tmp_path)
    run = next(r for r in runs if r.name == "tdpo-s0")
    assert main(["report", str(run)]) == 0
    html = (run / "report" / "index.html").read_text()
    first, _ = html.split("<h2>Details</h2>")
    assert "runs (seeds)" not in html and "reached 1/1" not in html
    assert "reward queries to" not in html and "at training reward" not in html
    assert "over seeds" not in html and "mean of 1" not in html
    assert "TDPO, run tdpo-s0, seed 0: trained on shapes_aesthetic" in first
    # before / after on the same prompts and noise, side by side, on the first screen
    pairs = re.findall(r"<div class='pair'>(.*?)</div>", first)
    assert len(pairs) == 2  # seen and unseen
    assert "eval_seen_epoch_0000.png" in pairs[0] and "eval_seen_epoch_0006.png" in pairs[0]
    assert "before: the base model (epoch 0)" in pairs[0] and "after: epoch 6" in pairs[0]
    for name in ("eval_seen_epoch_0000.png", "eval_unseen_epoch_0006.png"):
        assert (run / "report" / "samples" / "tdpo-s0" / name).is_file()


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
        (  # the shapes defaults of this version: the critic replays the last 4 epochs
            {
                "train": {"algorithm": "tdpo", "normalization": "running"},
                "critic": {"input": "x0", "prompt_input": True, "replay_epochs": 4},
            },
            "TDPO-R (x0+prompt critic, replay 4, running norm)",
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


def test_long_legends_go_beside_the_figure_short_ones_stay_in_the_panel():
    from tdpo.report import LEGEND_INSIDE_MAX, _figure, _legend

    fig, axes = _figure(2)
    width = fig.get_size_inches()[0]
    for i in range(LEGEND_INSIDE_MAX + 3):
        for ax in axes:
            ax.plot([0, 1], [i, i], label=f"method {i} with a long descriptive label")
    for ax in axes:
        _legend(ax)
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    assert fig.get_size_inches()[0] > width  # room made for it, not taken from the panels

    fig, axes = _figure(1)
    axes[0].plot([0, 1], [0, 1], label="TDPO-R")
    _legend(axes[0])
    assert not fig.legends and axes[0].get_legend() is not None
