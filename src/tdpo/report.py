"""``tdpo report RUN_DIR [RUN_DIR ...] [--out DIR]``: an offline HTML report of one or more runs.

The report folder (``RUN_DIR/report`` for one run, ``--out`` for several) holds ``index.html``
(relative links only, no JavaScript, no CDN), the PNG plots, copies of the runs' sample grids and
configs, ``summary.json`` (the numbers of the table) and ``summary.md`` (the table in Markdown).

The first screen answers "did training help, and did it over-optimize?": for each training
reward and method (over its seeds), the verdict of :func:`tdpo.verdict.judge` (the rule is in
that module's docstring; ``tdpo train`` prints the same verdict at its end) and the held-out
base (epoch 0) -> final table of every evaluated metric, then the held-out curves and, for a
single run, its held-out sample grids before and after training (same prompts and noise).

Plots (runs of the same method share a colour; with several seeds of a method, its mean and
standard deviation over seeds are drawn as a line and a band, the seeds as thin lines; bands and
"over seeds" appear only with several seeds):

- ``heldout_<k>.png``: every held-out metric (``eval/<set>/*``) against reward queries, x = 0
  the base model;
- ``heldout_tradeoff_<k>.png``: the held-out training reward against each held-out gold /
  other reward, points labelled with their epoch, start and end marked (Figure 3);
- ``sample_efficiency.png``: training reward against reward queries, one panel per training
  reward, with the base model's level (the first epoch's samples) dashed (Figure 4);
- ``gold_<k>.png``, ``cross_reward_<k>.png``: the gold metrics and the other panel rewards on
  each epoch's training samples against reward queries, first and last epoch marked;
- the critic's dormant and active fractions and explained variance over epochs, and its
  explained variance per quarter of the denoising steps;
- the training and evaluation sample grids of the first, middle and last epoch of each run.

The table groups runs by training reward and method (the *method label*: TDPO-R / TDPO /
DDPO-<updates per epoch> / AlignProp, from the config) and gives the mean and standard deviation over seeds (sample standard deviation, ``ddof=1``; none for
a single run) of:

- **final training reward**: ``reward_mean`` of the last training line;
- **final value of each panel/eval metric**: its last non-null value;
- **reward queries to threshold**: for each training reward a threshold
  ``r0 + THRESHOLD_FRACTION * (best - r0)`` where ``r0`` is the mean over all runs of the first
  logged training reward and ``best`` the best method's mean final training reward; a run's
  number is ``reward_queries`` of its first training line with ``reward_mean >= threshold``
  (resolution: one epoch); runs that never reach it are counted as not reached (``reached k/n``)
  and left out of the mean;
- **out-of-domain reward at matched training reward**: for each metric a level ``L`` reached by
  every run: the smallest, over runs, of the run's largest training reward among the points where
  the metric was logged. Each run's value is linearly interpolated between the two points of its
  first crossing of ``L`` (the last point below ``L`` and the first at or above it, in epoch
  order); a run whose first point is already at or above ``L`` gives that point's value.

For the matched level, the x value of a ``panel/*`` point is the ``reward_mean`` of the same
line. An ``eval/<set>/*`` point takes the ``reward_mean`` of the training line of the same epoch;
evaluation lines of an epoch without a training line (e.g. epoch 0, the base model) take the
evaluation's own score of the training reward, ``eval/<set>/<training reward>``, when it was
logged, else are left out. With a single run the table leaves out the comparisons across runs
(seed counts, queries to threshold, matched levels). Missing keys (a DDPO run has no critic
metrics) are skipped.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tdpo.config import build_config, load_yaml
from tdpo.config import method_label as config_method_label
from tdpo.errors import UsageError
from tdpo.fileio import check_output_folder
from tdpo.tracking import read_metrics
from tdpo.verdict import INFO_METRICS, RULE, judge, metric_order, num, rule_text, signed

THRESHOLD_FRACTION = 0.8
METHOD_ORDER = ("TDPO-R", "TDPO", "DDPO-2", "DDPO-100", "AlignProp")
METHOD_COLOURS = {
    "TDPO-R": "#d62728",
    "TDPO": "#ff7f0e",
    "DDPO-2": "#1f77b4",
    "DDPO-100": "#2ca02c",
    "AlignProp": "#9467bd",
}
_EXTRA_COLOURS = ("#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939")
DYNAMICS_KEYS = (
    ("dormant_fraction", "dormant fraction"),
    ("active_fraction", "active fraction"),
    ("critic_ev", "critic explained variance"),
)


# --------------------------------------------------------------------------------- loading


@dataclass
class Run:
    """One run directory: its config (plain dict), metrics lines and derived series."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    id: str = ""
    label: str = ""
    reward: str = ""
    seed: Any = None
    train_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


def _get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def method_label(config: dict[str, Any]) -> str:
    """The run's method as the algorithm registry names it (TDPO-R, TDPO, DDPO-<updates>,
    AlignProp, ...), from its saved config; a config this version cannot read is labelled by
    its ``train.algorithm``."""
    try:
        return config_method_label(build_config(base=config))
    except UsageError:
        return str(_get(config, "train.algorithm", "unknown"))


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is a regular file that is no symlink and lies inside ``folder`` (resolved): the
    report follows no link out of a run folder."""
    try:
        return (
            path.is_file()
            and not path.is_symlink()
            and path.resolve().is_relative_to(folder.resolve())
        )
    except OSError:
        return False


def load_run(path: Path) -> Run:
    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise UsageError("RUN_DIR", str(path), "not a run directory (no config.yaml)")
    for name in ("config.yaml", "metrics.jsonl"):
        if (path / name).exists() and not _inside(path / name, path):
            raise UsageError(
                "RUN_DIR", str(path), f"{name} is a symlink or not a file of this run folder"
            )
    config = load_yaml(config_path, "RUN_DIR")  # a mapping, UTF-8, no aliases or duplicate keys
    try:
        rows = read_metrics(path)
    except (ValueError, OSError) as exc:
        raise UsageError("RUN_DIR", str(path), f"unreadable metrics.jsonl ({exc})") from None
    rows = sorted(rows, key=lambda r: r.get("epoch") or 0)
    run = Run(path=path, config=config, rows=rows)
    run.label = method_label(config)
    run.reward = str(_get(config, "reward.name", "reward"))
    run.seed = config.get("seed")
    run.train_rows = [r for r in rows if _finite(r.get("reward_mean"))]
    return run


def expand_run_dirs(paths: list[str]) -> list[Path]:
    """Run directories; a folder without config.yaml stands for its run subfolders."""
    out: list[Path] = []
    for text in paths:
        path = Path(text)
        if (path / "config.yaml").is_file():
            out.append(path)
            continue
        if not path.is_dir():
            raise UsageError("RUN_DIR", text, "no such folder")
        found = sorted(p for p in path.iterdir() if (p / "config.yaml").is_file())
        if not found:
            raise UsageError(
                "RUN_DIR", text, "not a run directory (no config.yaml) and holds no runs"
            )
        out.extend(found)
    unique: list[Path] = []
    for p in out:
        if p.resolve() not in {u.resolve() for u in unique}:
            unique.append(p)
    return unique


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _assign_ids(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in run.name) or "run"
        count = seen.get(base, 0)
        seen[base] = count + 1
        run.id = base if count == 0 else f"{base}-{count + 1}"


# ------------------------------------------------------------------------------ series math


def ood_keys(run: Run) -> list[str]:
    """Out-of-domain metrics of a run: panel/* other than the training reward, and eval/*
    (the training reward on held-out prompts included)."""
    keys: set[str] = set()
    for row in run.rows:
        for key, value in row.items():
            if not key.startswith(("panel/", "eval/")) or value is None:
                continue
            if key == f"panel/{run.reward}":  # the training reward itself
                continue
            keys.add(key)
    return sorted(keys)


def training_curve(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(reward queries, training reward) of the training lines."""
    xs, ys = [], []
    per_epoch = _get(run.config, "sample.samples_per_epoch")
    for row in run.train_rows:
        q = row.get("reward_queries")
        if not _finite(q):
            if not (_finite(per_epoch) and _finite(row.get("epoch"))):
                continue
            q = row["epoch"] * per_epoch
        xs.append(float(q))
        ys.append(float(row["reward_mean"]))
    return np.asarray(xs), np.asarray(ys)


def _last(values: np.ndarray) -> float | None:
    """The last value, None if there is none (rows without queries and no samples_per_epoch)."""
    return values[-1].item() if len(values) else None


def ood_pairs(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(training reward, metric) points of one out-of-domain metric, in epoch order."""
    by_epoch = {r.get("epoch"): r["reward_mean"] for r in run.train_rows}
    xs, ys = [], []
    for row in run.rows:
        value = row.get(key)
        if not _finite(value):
            continue
        if key.startswith("panel/"):
            x = row.get("reward_mean")
        else:
            x = by_epoch.get(row.get("epoch"))
            if not _finite(x):
                prompt_set = key.split("/")[1]
                x = row.get(f"eval/{prompt_set}/{run.reward}")
        if _finite(x):
            xs.append(float(x))
            ys.append(float(value))
    return np.asarray(xs), np.asarray(ys)


def last_value(run: Run, key: str) -> float | None:
    for row in reversed(run.rows):
        if _finite(row.get(key)):
            return float(row[key])
    return None


def queries_to_threshold(run: Run, threshold: float) -> float | None:
    xs, ys = training_curve(run)
    hit = np.nonzero(ys >= threshold)[0]
    return float(xs[hit[0]]) if len(hit) else None


def value_at_level(xs: np.ndarray, ys: np.ndarray, level: float) -> float | None:
    """ys linearly interpolated at the first crossing of ``level`` by xs (in order)."""
    hit = np.nonzero(xs >= level)[0]
    if not len(hit):
        return None
    i = int(hit[0])
    if i == 0 or xs[i] == xs[i - 1]:
        return float(ys[i])
    t = (level - xs[i - 1]) / (xs[i] - xs[i - 1])
    return float(ys[i - 1] + t * (ys[i] - ys[i - 1]))


def stats(values: list[float | None]) -> dict[str, Any]:
    """mean, sample std (ddof=1, None for one value) and n over the non-None values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals)}


def _method_sort_key(label: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER), label)


def group_runs(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """{training reward: {method label: [runs]}}, methods in a fixed order."""
    groups: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        groups.setdefault(run.reward, {}).setdefault(run.label, []).append(run)
    return {
        reward: {m: by_method[m] for m in sorted(by_method, key=_method_sort_key)}
        for reward, by_method in groups.items()
    }


def summarize(runs: list[Run], fraction: float = THRESHOLD_FRACTION) -> dict[str, Any]:
    """The table's numbers (see the module docstring for every definition)."""
    out: dict[str, Any] = {
        "definitions": {
            "std": "sample standard deviation over runs (ddof=1); null for one run",
            "final_reward": "reward_mean of the last training line",
            "final": "last non-null value of each panel/eval metric",
            "threshold": f"r0 + {fraction} * (best - r0); r0 = mean first training reward over "
            "all runs of the training reward, best = best method's mean final training reward",
            "queries_to_threshold": "reward_queries of the first training line with "
            "reward_mean >= threshold; runs that never reach it are left out (see reached)",
            "matched_level": "per metric: min over runs of the run's max training reward among "
            "the points where the metric was logged",
            "ood_at_matched": "metric linearly interpolated at the first crossing of the matched "
            "level by the run's training reward",
            "verdict": RULE + " Base = the held-out evaluation of epoch 0, final = the last one "
            "(tdpo.verdict).",
        },
        "threshold_fraction": fraction,
        "verdicts": verdicts(runs),
        "groups": [],
        "runs": [],
    }
    for reward, by_method in group_runs(runs).items():
        group_runs_ = [r for rs in by_method.values() for r in rs]
        firsts = [float(r.train_rows[0]["reward_mean"]) for r in group_runs_ if r.train_rows]
        finals = {
            m: stats([r.train_rows[-1]["reward_mean"] if r.train_rows else None for r in rs])
            for m, rs in by_method.items()
        }
        best = max((s["mean"] for s in finals.values() if s["mean"] is not None), default=None)
        r0 = float(np.mean(firsts)) if firsts else None
        threshold = r0 + fraction * (best - r0) if (best is not None and r0 is not None) else None
        keys = sorted({k for r in group_runs_ for k in ood_keys(r)})
        all_keys = sorted(
            {
                k
                for r in group_runs_
                for row in r.rows
                for k in row
                if k.startswith(("panel/", "eval/"))
            }
        )
        levels: dict[str, float | None] = {}
        for key in keys:
            maxima = []
            for r in group_runs_:
                xs, _ = ood_pairs(r, key)
                maxima.append(float(xs.max()) if len(xs) else None)
            present = [m for m in maxima if m is not None]
            levels[key] = min(present) if present else None
        group: dict[str, Any] = {
            "reward": reward,
            "initial_reward": r0,
            "best_final_reward": best,
            "threshold": threshold,
            "matched_levels": levels,
            "metrics": all_keys,
            "methods": [],
        }
        for method, rs in by_method.items():
            q = [queries_to_threshold(r, threshold) if threshold is not None else None for r in rs]
            entry = {
                "method": method,
                "runs": [r.id for r in rs],
                "seeds": [r.seed for r in rs],
                "n": len(rs),
                "final_reward": finals[method],
                "final": {k: stats([last_value(r, k) for r in rs]) for k in all_keys},
                "queries_to_threshold": {
                    **stats(q),
                    "reached": sum(v is not None for v in q),
                },
                "ood_at_matched": {},
            }
            for key in keys:
                level = levels[key]
                vals = []
                for r in rs:
                    xs, ys = ood_pairs(r, key)
                    vals.append(value_at_level(xs, ys, level) if level is not None else None)
                entry["ood_at_matched"][key] = stats(vals)
            group["methods"].append(entry)
        out["groups"].append(group)
    for r in runs:
        out["runs"].append(
            {
                "id": r.id,
                "path": str(r.path),
                "method": r.label,
                "reward": r.reward,
                "seed": r.seed,
                "epochs": len(r.train_rows),
                "reward_queries": _last(training_curve(r)[0]),
                "final_reward": r.train_rows[-1]["reward_mean"] if r.train_rows else None,
                "verdict": judge([r.rows], r.reward).to_dict(),
            }
        )
    return out


def verdicts(runs: list[Run]) -> list[dict[str, Any]]:
    """The verdict (tdpo.verdict.judge) of each training reward and method, over its seeds."""
    out = []
    for reward, by_method in group_runs(runs).items():
        for method, rs in by_method.items():
            out.append(
                {
                    "reward": reward,
                    "method": method,
                    "runs": [r.id for r in rs],
                    "seeds": [r.seed for r in rs],
                    "verdict": judge([r.rows for r in rs], reward).to_dict(),
                }
            )
    return out


# ---------------------------------------------------------------------------------- tables


def _fmt(s: dict[str, Any], digits: int = 3) -> str:
    if s.get("mean") is None:
        return "–"
    mean = s["mean"]
    text = f"{mean:.{digits}g}" if abs(mean) >= 1000 else f"{mean:.{digits}f}"
    if s.get("std") is not None:
        text += f" ± {s['std']:.{digits}f}" if abs(mean) < 1000 else f" ± {s['std']:.{digits}g}"
    return text


def table_rows(group: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header (metric, then one column per method) and rows of one training reward's table."""
    methods = group["methods"]
    header = ["metric"] + [m["method"] for m in methods]
    # With one run there is nothing to compare: no seed counts, no threshold or matched level.
    several = sum(m["n"] for m in methods) > 1
    rows = []
    if any(m["n"] > 1 for m in methods):
        rows.append(
            ["runs (seeds)"] + [f"{m['n']} ({', '.join(map(str, m['seeds']))})" for m in methods]
        )
    rows.append(["final training reward"] + [_fmt(m["final_reward"]) for m in methods])
    thr = group["threshold"]
    if several:
        name = f"reward queries to {thr:.3f}" if thr is not None else "reward queries to threshold"
        row = [name]
        for m in methods:
            q = m["queries_to_threshold"]
            text = "–" if q["mean"] is None else f"{q['mean']:.0f}"
            if q["std"] is not None:
                text += f" ± {q['std']:.0f}"
            row.append(f"{text} (reached {q['reached']}/{m['n']})" if m["n"] > 1 else text)
        rows.append(row)
    for key in group["metrics"]:
        rows.append([f"final {key}"] + [_fmt(m["final"][key]) for m in methods])
    for key, level in group["matched_levels"].items() if several else ():
        label = f"{key} at training reward {level:.3f}" if level is not None else key
        rows.append([label] + [_fmt(m["ood_at_matched"][key]) for m in methods])
    return header, rows


def summary_markdown(summary: dict[str, Any]) -> str:
    several = any(len(e["runs"]) > 1 for e in summary.get("verdicts", []))
    lines = ["# Summary", "", "## Did training help, and did it over-optimize?", ""]
    lines.append(rule_text(several))
    for entry in summary.get("verdicts", []):
        v = entry["verdict"]
        lines += ["", f"### {_who(entry)}, trained on {entry['reward']}", ""]
        lines.append(f"**{v['conclusion']}**")
        if v["kind"] == "no-eval":
            continue
        final = max(v["final_epochs"], default=0)
        lines += ["", f"{v['evidence']} (epoch 0 -> {final}).", ""]
        sets = v["sets"]
        lines.append(
            "| held-out metric | "
            + " | ".join(f"{s_} base | {s_} final | {s_} change" for s_ in sets)
            + " |"
        )
        lines.append("|---|" + "---|---|---|" * len(sets))
        names = list(dict.fromkeys(m for s_ in sets for m in v["changes"][s_]))
        for name in names:
            cells = [name]
            for label in sets:
                c = v["changes"][label].get(name)
                if c is None:
                    cells += ["–"] * 3
                    continue
                change = signed(c["delta"]) + (
                    f" ± {num(c['spread'])}" if c["spread"] is not None else ""
                )
                if name not in INFO_METRICS:
                    change += {"up": " ▲", "down": " ▼", "flat": " (flat)"}[c["word"]]
                cells += [num(c["base"]), num(c["final"]), change]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Training", ""]
    lines.append(
        "Mean ± sample standard deviation over runs (seeds). Threshold = r0 + "
        f"{summary['threshold_fraction']} × (best − r0); matched level = the smallest, over "
        "runs, of each run's largest training reward; see `tdpo.report` for every definition."
    )
    for group in summary["groups"]:
        lines += ["", f"## Training reward: {group['reward']}", ""]
        header, rows = table_rows(group)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in rows:
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Runs", "", "| run | method | reward | seed | epochs | final reward |"]
    lines.append("|---|---|---|---|---|---|")
    for r in summary["runs"]:
        final = f"{r['final_reward']:.4f}" if r["final_reward"] is not None else "–"
        lines.append(
            f"| {r['id']} | {r['method']} | {r['reward']} | {r['seed']} | {r['epochs']} | {final} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- plots


def _colours(labels: list[str]) -> dict[str, str]:
    out, extra = {}, iter(_EXTRA_COLOURS * 10)
    for label in sorted(set(labels), key=_method_sort_key):
        out[label] = METHOD_COLOURS.get(label) or next(extra)
    return out


def _matplotlib_dir() -> None:
    """Keep matplotlib's font cache out of ``$HOME``: ``MPLCONFIGDIR`` (unless set) is a folder
    of this user's under the temporary directory, before matplotlib is first imported."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    folder = Path(tempfile.gettempdir()) / f"tdpo-matplotlib-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        usable = folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid()
    except OSError:
        usable = False
    os.environ["MPLCONFIGDIR"] = str(folder if usable else tempfile.mkdtemp(prefix="tdpo-mpl-"))


def _figure(n_panels: int, width: float = 5.0, height: float = 3.6, max_cols: int = 3):
    _matplotlib_dir()
    from matplotlib.figure import Figure  # deferred: matplotlib would slow down `tdpo --help`

    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _band(curves: list[tuple[np.ndarray, np.ndarray]]):
    """Mean and std over curves on the union of their x values within the common range."""
    curves = [(x, y) for x, y in curves if len(x)]
    if len(curves) < 2:
        return None
    lo = max(float(x.min()) for x, _ in curves)
    hi = min(float(x.max()) for x, _ in curves)
    if hi < lo:
        return None
    grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x, _ in curves]))
    if len(grid) < 1:
        return None
    stack = []
    for x, y in curves:
        order = np.argsort(x, kind="stable")
        stack.append(np.interp(grid, x[order], y[order]))
    stack = np.stack(stack)
    return grid, stack.mean(0), stack.std(0, ddof=1)


def _plot_runs(ax, by_method, colours, series, band: bool) -> None:
    for method, rs in by_method.items():
        colour = colours[method]
        curves = [series(r) for r in rs]
        stats_ = _band(curves) if band else None
        for i, (x, y) in enumerate(curves):
            if not len(x):
                continue
            ax.plot(
                x,
                y,
                color=colour,
                lw=0.8 if stats_ else 1.5,
                alpha=0.45 if stats_ else 0.9,
                marker="." if len(x) < 30 else None,
                label=None if (stats_ or i) else method,
            )
        if stats_:
            grid, mean, std = stats_
            ax.plot(grid, mean, color=colour, lw=2.0, label=f"{method} (mean of {len(rs)})")
            ax.fill_between(grid, mean - std, mean + std, color=colour, alpha=0.2, lw=0)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


def _several_seeds(by_method) -> bool:
    return any(len(rs) > 1 for rs in by_method.values())


def _mark_ends(ax, xs, ys, colour) -> None:
    """The first point (start) hollow, the last (end) filled."""
    if not len(xs):
        return
    ax.plot([xs[0]], [ys[0]], "o", ms=7, mfc="white", mec=colour, mew=1.5, zorder=4)
    ax.plot([xs[-1]], [ys[-1]], "s", ms=7, color=colour, zorder=4)


# More entries than this and a panel's legend would cover its data: it goes beside the figure.
LEGEND_INSIDE_MAX = 4


def _legend(ax, handles=None, labels=None, fontsize: int = 8) -> None:
    """The legend of ``ax``'s lines: inside the panel when short, else outside the figure on
    the right (the constrained layout makes room), so it never hides the curves."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if len(labels) <= LEGEND_INSIDE_MAX:
        ax.legend(handles, labels, fontsize=fontsize)
    elif not ax.figure.legends:  # one per figure: the panels share their methods
        fig = ax.figure
        width, height = fig.get_size_inches()
        longest = max(len(label) for label in labels)
        fig.set_size_inches(width + 0.6 + 0.075 * fontsize / 8 * longest, height)
        fig.legend(handles, labels, loc="outside right upper", fontsize=fontsize)


def _ends_legend(ax, start: str, end: str, fontsize: int = 8) -> None:
    """The method legend plus the start / end markers' meaning."""
    from matplotlib.lines import Line2D  # deferred with matplotlib

    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], ls="", marker="o", ms=7, mfc="white", mec="#444", mew=1.5),
        Line2D([], [], ls="", marker="s", ms=7, color="#444"),
    ]
    _legend(ax, handles, labels + [start, end], fontsize)


def _queries_by_epoch(run: Run) -> dict[int, float]:
    """Reward queries at the end of each epoch (0 for epoch 0, the base model)."""
    per_epoch = _get(run.config, "sample.samples_per_epoch")
    out = {0: 0.0}
    for row in run.rows:
        epoch = row.get("epoch")
        if not _finite(epoch):
            continue
        if _finite(row.get("reward_queries")):
            out[int(epoch)] = float(row["reward_queries"])
        elif int(epoch) not in out and _finite(per_epoch):
            out[int(epoch)] = float(epoch * per_epoch)
    return out


def plot_sample_efficiency(groups, colours, out: Path) -> list[tuple[str, str]]:
    """Training reward on each epoch's samples against reward queries, with the base model's
    level (the first epoch's samples are drawn before any update)."""
    fig, axes = _figure(len(groups))
    several = any(_several_seeds(by_method) for by_method in groups.values())
    for ax, (reward, by_method) in zip(axes, groups.items()):
        _plot_runs(ax, by_method, colours, training_curve, band=True)
        firsts = [r.train_rows[0]["reward_mean"] for rs in by_method.values() for r in rs]
        if firsts:
            r0 = float(np.mean(firsts))
            ax.axhline(r0, color="#555", ls="--", lw=1.0, label=f"base model ({r0:.3f})")
        ax.set_xlabel("reward queries")
        ax.set_ylabel(f"{reward}, epoch mean")
        ax.set_title(f"sample efficiency: {reward}")
        ax.grid(alpha=0.3)
        _legend(ax)
    name = "sample_efficiency.png"
    _save(fig, out / name)
    spread = (
        " Several seeds: thin lines per seed, a thick mean and a band of ± one standard "
        "deviation over seeds."
        if several
        else ""
    )
    return [
        (
            name,
            "Training reward (mean over each epoch's fresh samples, on training prompts) against "
            "reward queries; dashed: the base model's level, the mean reward of the first epoch's "
            "samples (drawn before any update). Each epoch draws new prompts, so the curve is "
            "noisy; the held-out curves above use fixed prompts and noise. Cf. the paper's "
            f"Figure 4.{spread}",
        )
    ]


def plot_ood(groups, colours, out: Path, gold_only: bool) -> list[tuple[str, str]]:
    """Each panel reward (or gold metric) on the training samples against reward queries."""
    made = []
    for g_index, (reward, by_method) in enumerate(groups.items()):
        runs = [r for rs in by_method.values() for r in rs]
        keys = sorted({k for r in runs for k in ood_keys(r) if k.startswith("panel/")})
        is_gold = ["shapes_gold" in k.rsplit("/", 1)[-1] for k in keys]
        keys = [k for k, g in zip(keys, is_gold) if g == gold_only]
        if not keys:
            continue
        fig, axes = _figure(len(keys), 4.6, 3.4)
        for ax, key in zip(axes, keys):

            def series(r, k=key):
                queries = _queries_by_epoch(r)
                pts = [
                    (queries[int(row["epoch"])], float(row[k]))
                    for row in r.rows
                    if _finite(row.get(k)) and int(row.get("epoch") or 0) in queries
                ]
                return np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts])

            _plot_runs(ax, by_method, colours, series, band=True)
            for method, rs in by_method.items():
                curves = [series(r) for r in rs if len(series(r)[0])]
                band = _band(curves)
                xs, ys = (band[0], band[1]) if band else (curves[0] if curves else ([], []))
                _mark_ends(ax, xs, ys, colours[method])
            ax.set_xlabel("reward queries")
            ax.set_ylabel(key.split("/", 1)[1])
            ax.set_title(f"{key.split('/', 1)[1]} on the training samples", fontsize=10)
            ax.grid(alpha=0.3)
        _ends_legend(axes[0], "first epoch (base model's samples)", "last epoch")
        name = f"{'gold' if gold_only else 'cross_reward'}_{g_index}.png"
        _save(fig, out / name)
        what = "Gold metrics" if gold_only else "The other rewards of the panel"
        spread = (
            " Several seeds: thin lines per seed, thick mean, band ± one standard deviation."
            if _several_seeds(by_method)
            else ""
        )
        made.append(
            (
                name,
                f"{what} (panel/*), scored on each epoch's training samples of the runs trained "
                f"on {reward}, against reward queries (hollow circle: the first epoch, whose "
                "samples come from the base model; square: the last). Training prompts differ "
                f"from epoch to epoch; the held-out plots use fixed prompts and noise.{spread}",
            )
        )
    return made


def heldout_series(run: Run, label: str, x_key: str, y_key: str) -> dict[int, tuple[float, float]]:
    """{epoch: (x, y)} from the evaluation lines of one run (fixed prompts and noise)."""
    out = {}
    for row in run.rows:
        x, y = row.get(f"eval/{label}/{x_key}"), row.get(f"eval/{label}/{y_key}")
        if _finite(x) and _finite(y):
            out[int(row["epoch"])] = (float(x), float(y))
    return out


def _heldout_keys(runs: list[Run]) -> list[str]:
    return sorted({k for r in runs for row in r.rows for k in row if k.startswith("eval/")})


def plot_heldout_curves(groups, colours, out: Path) -> list[tuple[str, str]]:
    """The headline: each held-out metric (training reward, gold, the other rewards, KL) against
    reward queries, seen prompts solid, unseen dashed; epoch 0 (x = 0) is the base model."""
    made = []
    for g_index, (reward, by_method) in enumerate(groups.items()):
        runs = [r for rs in by_method.values() for r in rs]
        keys = _heldout_keys(runs)
        labels = list(dict.fromkeys(k.split("/")[1] for k in keys))
        names = metric_order({k.split("/", 2)[2] for k in keys} - {"diversity"}, reward)
        if not labels or not names:
            continue
        styles = dict(zip(labels, ("-", "--", ":", "-.") * 4))
        markers = dict(zip(labels, ("o", "s", "^", "D") * 4))
        fig, axes = _figure(len(names), 4.2, 3.3, max_cols=4)
        for ax, name in zip(axes, names):
            for method, rs in by_method.items():
                for label in labels:
                    series = []
                    for r in rs:
                        queries = _queries_by_epoch(r)
                        values = {
                            int(row["epoch"]): float(row[f"eval/{label}/{name}"])
                            for row in r.rows
                            if _finite(row.get(f"eval/{label}/{name}"))
                        }
                        series.append({e: (queries.get(e), v) for e, v in values.items()})
                    common = set.intersection(*(set(s) for s in series)) if series else set()
                    epochs = sorted(e for e in common if all(s[e][0] is not None for s in series))
                    if not epochs:
                        continue
                    xs = np.array([[s[e][0] for e in epochs] for s in series]).mean(0)
                    ys = np.array([[s[e][1] for e in epochs] for s in series])
                    mean = ys.mean(0)
                    ax.plot(
                        xs,
                        mean,
                        styles[label],
                        marker=markers[label],
                        ms=4,
                        color=colours[method],
                        lw=1.6,
                        label=f"{method}, {label}"
                        + (f" (mean of {len(rs)})" if len(rs) > 1 else ""),
                    )
                    if len(rs) > 1:
                        std = ys.std(0, ddof=1)
                        ax.fill_between(
                            xs, mean - std, mean + std, color=colours[method], alpha=0.15, lw=0
                        )
            ax.set_xlabel("reward queries (0 = base model)")
            kind = " (training reward)" if name == reward else (" (gold)" if "gold" in name else "")
            ax.set_title(f"{name}{kind}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("held-out mean")
        _legend(axes[0], fontsize=7)
        name = f"heldout_{g_index}.png"
        _save(fig, out / name)
        spread = (
            " Several seeds: the mean over seeds, the band ± one standard deviation over seeds."
            if _several_seeds(by_method)
            else ""
        )
        made.append(
            (
                name,
                f"Held-out evaluation of the runs trained on {reward}: each metric's mean over "
                "fixed prompts and fixed initial noise (the same at every evaluation) against "
                f"reward queries; x = 0 is the base model. Line style: prompt set "
                f"({', '.join(f'{lb} {st}' for lb, st in _style_words(styles).items())}).{spread}",
            )
        )
    return made


def _style_words(styles: dict[str, str]) -> dict[str, str]:
    words = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dotted"}
    return {label: words[style] for label, style in styles.items()}


def plot_heldout_tradeoff(groups, colours, out: Path) -> list[tuple[str, str]]:
    """Held-out training reward (x) against each held-out gold / out-of-domain reward (y) at
    every evaluation epoch (the mean over seeds, ± one standard deviation with several): the
    same prompts and initial noise at every point, so the curves are free of the epoch-to-epoch
    prompt mix. Start (epoch 0, the base model) and end are marked, every point is labelled
    with its epoch."""
    made = []
    for g_index, (reward, by_method) in enumerate(groups.items()):
        runs = [r for rs in by_method.values() for r in rs]
        keys = _heldout_keys(runs)
        labels = sorted({k.split("/")[1] for k in keys if k.endswith(f"/{reward}")})
        targets = sorted({k.split("/", 2)[2] for k in keys} - {reward, "kl", "diversity"})
        gold = [t for t in targets if "gold" in t]
        targets = gold + [t for t in targets if t not in gold]
        panels = [(label, t) for label in labels for t in targets]
        if not panels:
            continue
        several = _several_seeds(by_method)
        fig, axes = _figure(len(panels), 4.6, 3.4)
        for ax, (label, target) in zip(axes, panels):
            for method, method_runs in by_method.items():
                series = [heldout_series(r, label, reward, target) for r in method_runs]
                epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
                if not epochs:
                    continue
                xs = np.array([[s[e][0] for e in epochs] for s in series])
                ys = np.array([[s[e][1] for e in epochs] for s in series])
                colour = colours[method]
                kwargs = {}
                if len(method_runs) > 1:
                    kwargs = {"xerr": xs.std(0, ddof=1), "yerr": ys.std(0, ddof=1), "capsize": 2}
                ax.errorbar(
                    xs.mean(0),
                    ys.mean(0),
                    marker=".",
                    ms=4,
                    lw=1.2,
                    color=colour,
                    label=method,
                    **kwargs,
                )
                _mark_ends(ax, xs.mean(0), ys.mean(0), colour)
                for e, x, y in zip(epochs, xs.mean(0), ys.mean(0)):
                    ax.annotate(
                        str(e),
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 3),
                        fontsize=8,
                        color=colour,
                    )
            ax.locator_params(axis="x", nbins=5)  # long tick labels must not overlap
            ax.set_xlabel(f"{reward} (training reward), held-out")
            ax.set_ylabel(f"{target}, held-out")
            ax.set_title(f"{label} prompts: {target}", fontsize=10)
            ax.grid(alpha=0.3)
        _ends_legend(axes[0], "start: base model (epoch 0)", "end: last evaluation", 7)
        name = f"heldout_tradeoff_{g_index}.png"
        _save(fig, out / name)
        spread = (
            "the mean over seeds with ± one standard deviation over seeds as error bars"
            if several
            else "one run per method"
        )
        made.append(
            (
                name,
                f"Held-out trade-off, training on {reward}: the held-out training reward (x) "
                "against gold and the other rewards (y) on fixed prompts and noise at every "
                f"evaluation, {spread}; numbers are epochs, the hollow circle the base model "
                "(epoch 0), the square the last evaluation. Right and down = the training reward "
                "rose while the other metric fell (over-optimization). Cf. the paper's Figure 3.",
            )
        )
    return made


def plot_dynamics(runs: list[Run], colours, out: Path) -> list[tuple[str, str]]:
    present = [(k, t) for k, t in DYNAMICS_KEYS if any(last_value(r, k) is not None for r in runs)]
    if not present:
        return []
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(r.label, []).append(r)
    by_method = {m: by_method[m] for m in sorted(by_method, key=_method_sort_key)}
    fig, axes = _figure(len(present), 4.6, 3.4)
    for ax, (key, title) in zip(axes, present):

        def series(r, k=key):
            pts = [(row["epoch"], row[k]) for row in r.rows if _finite(row.get(k))]
            return np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts])

        _plot_runs(ax, by_method, colours, series, band=False)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    _legend(axes[0])
    name = "critic_dynamics.png"
    _save(fig, out / name)
    return [
        (
            name,
            "The critic over epochs: the fractions of its dormant and active neurons (TDPO-R "
            "re-initializes the active ones) and its explained variance of the returns on each "
            "epoch's samples (1 = exact, 0 = no better than a constant).",
        )
    ]


CRITIC_QUARTERS = ("q1", "q2", "q3", "q4")


def plot_critic_quarters(runs: list[Run], colours, out: Path) -> list[tuple[str, str]]:
    """critic_ev/q1..q4 over epochs per method, and critic_ref/q1..q4 (dashed) where logged."""
    if not any(last_value(r, "critic_ev/q4") is not None for r in runs):
        return []
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(r.label, []).append(r)
    by_method = {m: by_method[m] for m in sorted(by_method, key=_method_sort_key)}
    fig, axes = _figure(4, 3.4, 3.2, max_cols=4)
    for ax, q in zip(axes, CRITIC_QUARTERS):
        for prefix, style in (("critic_ev", "-"), ("critic_ref", "--")):

            def series(r, k=f"{prefix}/{q}"):
                pts = [(row["epoch"], row[k]) for row in r.rows if _finite(row.get(k))]
                return np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts])

            for method, rs in by_method.items():
                curves = [series(r) for r in rs if len(series(r)[0])]
                if not curves:
                    continue
                band = _band(curves)
                xs, mean = (band[0], band[1]) if band else curves[0]
                label = method if prefix == "critic_ev" else f"{method} (x0 reward)"
                ax.plot(xs, mean, style, color=colours[method], label=label, lw=1.4)
        ax.axhline(0.0, color="#999", lw=0.8)
        ax.set_xlabel("epoch")
        where = {"q1": " (from noise)", "q4": " (nearest the image)"}.get(q, "")
        ax.set_title(f"{q}{where}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("explained variance")
    _legend(axes[0], fontsize=7)
    name = "critic_quarters.png"
    _save(fig, out / name)
    return [
        (
            name,
            "How much the critic knows: the explained variance of its values V_old for the "
            "returns, on each epoch's fresh samples, per quarter of the denoising steps (q1 the "
            "first, from noise; q4 the last, nearest the image)"
            + (", mean over seeds" if _several_seeds(by_method) else "")
            + ". 1 = the critic "
            "predicts the return exactly, 0 = no better than a constant, below 0 worse. Dashed: "
            "the share that the training reward of the denoiser's own x0 estimate explains (an "
            "upper reference, log.critic_reference).",
        )
    ]


# --------------------------------------------------------------------------------- samples


def _pick_first_middle_last(items: list[Path]) -> list[Path]:
    if len(items) <= 3:
        return items
    return [items[0], items[len(items) // 2], items[-1]]


def copy_samples(run: Run, out: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """Copy first/middle/last grids of each kind; [(kind, [(relative path, caption)])]."""
    samples = run.path / "samples"
    if not samples.is_dir():
        return []
    kinds: dict[str, list[Path]] = {}
    for path in sorted(samples.glob("*.png")):
        if not _inside(path, run.path):  # a symlink (e.g. to /etc/shadow) is never copied
            continue
        stem = path.stem
        if not stem.rsplit("_", 1)[-1].isdigit():
            continue
        kinds.setdefault(stem.rsplit("_", 1)[0], []).append(path)
    made = []
    target = out / "samples" / run.id
    for kind in sorted(kinds, key=lambda k: (k != "epoch", k)):
        paths = sorted(kinds[kind], key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
        picked = []
        for path in _pick_first_middle_last(paths):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / path.name)
            epoch = int(path.stem.rsplit("_", 1)[-1])
            picked.append((f"samples/{run.id}/{path.name}", _grid_caption(kind, epoch)))
        title = (
            "training samples (each epoch draws its own prompts and noise)"
            if kind == "epoch"
            else kind.replace("_", " ").removesuffix(" epoch").replace("eval ", "held-out ")
            + " prompts (the same prompts and noise at every evaluation)"
        )
        made.append((title, picked))
    return made


def _grid_caption(kind: str, epoch: int) -> str:
    if kind == "epoch":
        return f"epoch {epoch}: samples of the model before that epoch's update"
    return "epoch 0: the base model" if epoch == 0 else f"epoch {epoch}"


def sample_pairs(run: Run, out: Path) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """For each held-out prompt set: its grid of the base model (epoch 0) and of the last
    evaluation, copied into the report; [(set, (path, caption), (path, caption))]."""
    samples = run.path / "samples"
    if not samples.is_dir():
        return []
    by_set: dict[str, dict[int, Path]] = {}
    for path in sorted(samples.glob("eval_*_epoch_*.png")):
        label, _, epoch = path.stem.removeprefix("eval_").rpartition("_epoch_")
        if label and epoch.isdigit() and _inside(path, run.path):
            by_set.setdefault(label, {})[int(epoch)] = path
    made = []
    target = out / "samples" / run.id
    for label, grids in by_set.items():
        last = max(grids)
        if 0 not in grids or last == 0:
            continue
        picked = []
        for epoch, words in (
            (0, "before: the base model (epoch 0)"),
            (last, f"after: epoch {last}"),
        ):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grids[epoch], target / grids[epoch].name)
            picked.append(
                (
                    f"samples/{run.id}/{grids[epoch].name}",
                    f"{words}; under each image its prompt and scores",
                )
            )
        made.append((label, picked[0], picked[1]))
    return made


# ------------------------------------------------------------------------------------ html

_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th.set { text-align: center; background: #f4f4f4; }
tr.key td { font-weight: bold; }
td.up { color: #06700c; } td.down { color: #b00020; } td.flat { color: #777; }
p.verdict { font-size: 1.15em; margin: 0.2em 0; }
p.verdict.over-optimized, p.verdict.worse, p.verdict.reward-down { color: #b00020; }
p.verdict.improved, p.verdict.reward-only { color: #06700c; }
img.plot { max-width: 100%; border: 1px solid #eee; }
figure { margin: 0.8em 0; } figcaption { color: #444; font-size: 0.9em; max-width: 1100px; }
.pair { display: flex; gap: 1em; align-items: flex-start; }
.pair figure { margin: 0; flex: 1 1 0; min-width: 0; }
.pair img, .grids img { max-width: 100%; border: 1px solid #eee; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.grids figure { margin: 0; max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure_html(src: str, caption: str, css: str = "plot", caption_first: bool = False) -> str:
    image = f"<a href='{_e(src)}'><img class='{css}' src='{_e(src)}' alt='{_e(caption)}'></a>"
    text = f"<figcaption>{_e(caption)}</figcaption>"
    return f"<figure>{text + image if caption_first else image + text}</figure>"


def _who(entry: dict[str, Any]) -> str:
    """The method and its seeds: ``TDPO-R, 3 seeds (0, 1, 2)`` or ``TDPO-R, run x, seed 0``."""
    runs, seeds = entry["runs"], entry["seeds"]
    if len(runs) > 1:
        return f"{entry['method']}, {len(runs)} seeds ({', '.join(map(str, seeds))})"
    return f"{entry['method']}, run {runs[0]}, seed {seeds[0]}"


def verdict_table(verdict: dict[str, Any]) -> str:
    """Base, final and change of every held-out metric, one column group per prompt set; a
    counted change is marked ▲ / ▼ (see tdpo.verdict), KL and diversity are not judged."""
    sets = verdict["sets"]
    reward, gold = verdict["reward"], verdict["gold"]
    names: list[str] = []
    for label in sets:
        names += [m for m in verdict["changes"][label] if m not in names]
    head = "<tr><th rowspan='2'>held-out metric</th>" + "".join(
        f"<th class='set' colspan='3'>{_e(label)} prompts</th>" for label in sets
    )
    head += "</tr><tr>" + "<th>base (epoch 0)</th><th>final</th><th>change</th>" * len(sets)
    head += "</tr>"
    body = []
    for name in names:
        title = name
        if name == reward:
            title += " (training reward)"
        elif name == gold:
            title += " (gold)"
        key = name in (reward, gold)
        cells = [f"<td>{_e(title)}</td>"]
        for label in sets:
            c = verdict["changes"][label].get(name)
            if c is None:
                cells.append("<td>–</td>" * 3)
                continue
            change = signed(c["delta"])
            if c["spread"] is not None:
                change += f" ± {num(c['spread'])}"
            if name in INFO_METRICS:
                css = ""
            else:
                css = c["word"]
                change += {"up": " ▲", "down": " ▼", "flat": " (flat)"}[c["word"]]
            cells.append(
                f"<td>{_e(num(c['base']))}</td><td>{_e(num(c['final']))}</td>"
                f"<td class='{css}'>{_e(change)}</td>"
            )
        body.append(f"<tr class='{'key' if key else ''}'>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def verdict_html(entry: dict[str, Any]) -> str:
    v = entry["verdict"]
    parts = [
        f"<h3>{_e(_who(entry))}: trained on {_e(entry['reward'])}</h3>",
        f"<p class='verdict {_e(v['kind'])}'><b>{_e(v['conclusion'])}</b></p>",
    ]
    if v["kind"] != "no-eval":
        final = max(v["final_epochs"], default=0)
        evidence = v["evidence"][:1].upper() + v["evidence"][1:]
        parts.append(f"<p class='note'>{_e(evidence)} (epoch 0 → {final}).</p>")
        if v["note"]:
            parts.append(f"<p class='note'><b>Note:</b> {_e(v['note'])}.</p>")
        parts.append(verdict_table(v))
    return "\n".join(parts)


def _pairs_html(pairs) -> list[str]:
    parts = []
    for label, (base_src, base_cap), (final_src, final_cap) in pairs:
        parts.append(f"<h4>Held-out samples, {_e(label)} prompts: before and after</h4>")
        parts.append(
            "<div class='pair'>"
            + _figure_html(base_src, base_cap, "grid", caption_first=True)
            + _figure_html(final_src, final_cap, "grid", caption_first=True)
            + "</div>"
        )
    return parts


CRITIC_NOTE = (
    "The critic V(x_t) of TDPO and TDPO-R predicts the return G of each intermediate state. Its "
    "explained variance, 1 − Var(G − V) / Var(G), is the share of the returns' variation it "
    "predicts: 1 = exactly, 0 = no better than a constant, below 0 = worse than a constant. Near "
    "0, the per-step advantages G − V carry no more information than DDPO's final reward."
)


def write_html(out: Path, runs: list[Run], summary, plots, samples, skipped, pairs=None) -> Path:
    pairs = pairs or {}
    single = len(runs) == 1
    headline = [p for p in plots if p[0].startswith("heldout_") and "tradeoff" not in p[0]]
    critic = [p for p in plots if p[0].startswith("critic_")]
    others = [p for p in plots if p not in headline and p not in critic]
    title = runs[0].id if single else f"{len(runs)} runs"
    several = any(len(e["runs"]) > 1 for e in summary["verdicts"])
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tdpo report: {_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tdpo report: {_e(title)}</h1>",
    ]
    if skipped:
        parts.append(
            "<p class='note'>Left out (no training metrics yet): "
            + ", ".join(_e(s) for s in skipped)
            + "</p>"
        )
    parts.append("<h2>Did training help, and did it over-optimize?</h2>")
    parts.append(
        "<p class='note'>Held-out evaluation: the same prompts (seen = training prompts, unseen "
        "= prompts never trained on) and the same initial noise for the base model (epoch 0) and "
        f"after training. {_e(rule_text(several))} ▲ / ▼: a change that counts; KL (to the base "
        "model) and "
        "diversity are shown, not judged.</p>"
    )
    for reward in dict.fromkeys(e["reward"] for e in summary["verdicts"]):
        for entry in (e for e in summary["verdicts"] if e["reward"] == reward):
            parts.append(verdict_html(entry))
        group_index = list(dict.fromkeys(e["reward"] for e in summary["verdicts"])).index(reward)
        for name, caption in headline:
            if name == f"heldout_{group_index}.png":
                parts.append(_figure_html(name, caption))
    if single:
        parts += _pairs_html(pairs.get(runs[0].id, []))
    parts.append("<h2>Details</h2>")
    parts.append(
        "<p class='note'>Numbers: <a href='summary.json'>summary.json</a>, "
        "<a href='summary.md'>summary.md</a>. Definitions of every number are in the "
        "docstrings of <code>tdpo.report</code> and <code>tdpo.verdict</code>.</p>"
    )
    parts.append("<h3>Training (the epochs' own samples)</h3>")
    note = (
        "Training-batch figures: each epoch's fresh samples on training prompts; the panel "
        "rewards are those of the last training epoch. "
    )
    if not single:
        note += (
            "Mean ± sample standard deviation over runs. Queries to threshold: threshold = r0 + "
            f"{summary['threshold_fraction']} × (best − r0), r0 = mean first training reward, "
            "best = best method's mean final training reward. <i>X at L</i>: the metric "
            "interpolated at training reward L, the smallest over runs of each run's largest "
            "training reward (a level every run reached)."
        )
    parts.append(f"<p class='note'>{note}</p>")
    for group in summary["groups"]:
        parts.append(f"<h4>Training reward: {_e(group['reward'])}</h4>")
        parts.append(_html_table(*table_rows(group)))
    parts.append("<h3>Plots</h3>")
    for name, caption in others:
        parts.append(_figure_html(name, caption))
    if critic:
        parts.append("<h3>Critic (TDPO, TDPO-R)</h3>")
        parts.append(f"<p>{_e(CRITIC_NOTE)}</p>")
        for name, caption in critic:
            parts.append(_figure_html(name, caption))
    parts.append("<h3>Runs</h3>")
    rows = [
        [
            r["id"],
            r["method"],
            r["reward"],
            r["seed"],
            r["epochs"],
            _fmt({"mean": r["final_reward"]}),
            r["verdict"]["conclusion"],
        ]
        for r in summary["runs"]
    ]
    header = ["run", "method", "reward", "seed", "epochs", "final training reward", "verdict"]
    parts.append(_html_table(header, rows))
    for run in runs:
        parts.append(
            f"<h4 id='{_e(run.id)}'>{_e(run.id)} ({_e(run.label)}, {_e(run.reward)}, "
            f"seed {_e(run.seed)})</h4>"
        )
        parts.append(
            f"<p class='note'>From <code>{_e(run.path)}</code>; "
            f"<a href='runs/{_e(run.id)}/config.yaml'>config.yaml</a></p>"
        )
        if not single:
            parts += _pairs_html(pairs.get(run.id, []))
        for title_, grids in samples.get(run.id, []):
            parts.append(f"<h4>{_e(title_)}</h4><div class='grids'>")
            for src, caption in grids:
                parts.append(_figure_html(src, caption, "grid"))
            parts.append("</div>")
    parts.append("</body></html>\n")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- build


def check_report_dir(out: Path) -> None:
    """``out`` is a new folder, an empty one, or an earlier report (it is replaced): never a file,
    a symlink, or a folder of other files."""
    field = "--out"
    if out.is_symlink():
        raise UsageError(field, str(out), "is a symbolic link; the report goes to a real folder")
    if out.exists() and not out.is_dir():
        raise UsageError(field, str(out), "exists and is not a folder; give a report folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file():
        raise UsageError(
            field, str(out), "holds files that are not a tdpo report; give a new or empty folder"
        )
    check_output_folder(out.parent, field)


def build_report(run_dirs: list[Path], out: Path, log=print) -> Path:
    """Write the report of ``run_dirs`` into ``out``; returns the path of index.html. The report
    is written into a temporary folder next to ``out`` and renamed into place, so ``out`` holds
    either the previous report or the new one, and nothing is written through a symlink."""
    out = Path(os.path.abspath(Path(out).expanduser()))  # "." and ".." have no name to rename
    check_report_dir(out)
    all_runs = [load_run(p) for p in run_dirs]
    _assign_ids(all_runs)
    runs = [r for r in all_runs if r.train_rows]
    skipped = [r.id for r in all_runs if not r.train_rows]
    if not runs:
        raise UsageError(
            "RUN_DIR", ", ".join(str(p) for p in run_dirs), "no run has training metrics yet"
        )
    final = out
    out.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        count = _write_report(out, runs, skipped)
        old = None
        if final.is_dir() and not any(final.iterdir()):  # empty (maybe the cwd): fill it
            for entry in out.iterdir():
                os.replace(entry, final / entry.name)
            out.rmdir()
        else:
            if final.is_dir():  # an earlier report: swap the folders
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                os.replace(final, old / final.name)
            os.replace(out, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    index = final / "index.html"
    log(f"report: {index} ({len(runs)} runs, {count} plots)")
    return index


def _write_report(out: Path, runs: list[Run], skipped: list[str]) -> int:
    """Every file of the report into the (new, empty) folder ``out``; returns the plot count."""
    os.chmod(out, 0o755)  # mkdtemp makes it private
    summary = summarize(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    groups = group_runs(runs)
    colours = _colours([r.label for r in runs])
    plots = plot_heldout_curves(groups, colours, out)  # the headline, after the verdict
    plots += plot_heldout_tradeoff(groups, colours, out)
    plots += plot_sample_efficiency(groups, colours, out)
    plots += plot_ood(groups, colours, out, gold_only=True)
    plots += plot_ood(groups, colours, out, gold_only=False)
    plots += plot_dynamics(runs, colours, out)
    plots += plot_critic_quarters(runs, colours, out)
    samples, pairs = {}, {}
    for run in runs:
        samples[run.id] = copy_samples(run, out)
        pairs[run.id] = sample_pairs(run, out)
        (out / "runs" / run.id).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.path / "config.yaml", out / "runs" / run.id / "config.yaml")
    write_html(out, runs, summary, plots, samples, skipped, pairs)
    return len(plots)


def add_report_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "report",
        help="HTML report (plots, sample grids, summary table) of one or more runs",
        description="Write an offline HTML report with PNG plots, sample grids and a summary "
        "table (summary.json, summary.md) of one or more run directories. A folder without "
        "config.yaml stands for the runs in it.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="report folder (default: RUN_DIR/report for a single run; required for several)",
    )
    return parser


def run_report(args: argparse.Namespace) -> int:
    run_dirs = expand_run_dirs(args.run_dirs)
    if args.out:
        out = Path(args.out).expanduser()
    elif len(run_dirs) == 1:
        out = run_dirs[0] / "report"
    else:
        raise UsageError("--out", None, f"{len(run_dirs)} runs: give the report folder --out DIR")
    build_report(run_dirs, out)
    return 0
