"""``tdpo report RUN_DIR [RUN_DIR ...] [--out DIR]``: an offline HTML report of one or more runs.

The report folder (``RUN_DIR/report`` for one run, ``--out`` for several) holds ``index.html``
(relative links only, no JavaScript, no CDN), the PNG plots, copies of the runs' sample grids and
configs, ``summary.json`` (the numbers of the table) and ``summary.md`` (the table in Markdown).

Plots (runs of the same method share a colour; with several seeds of a method, its mean and
standard deviation over seeds are drawn as a line and a band, the seeds as thin lines):

- training reward against reward queries, one panel per training reward (sample efficiency, the
  paper's Figure 4);
- every out-of-domain reward (``panel/*`` and ``eval/*``) against the training reward
  (cross-reward generalization, Figure 3), and the gold metrics (``*shapes_gold*``) alone;
- the critic's dormant and active fractions and explained variance over epochs;
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

The x value of a ``panel/*`` point is the ``reward_mean`` of the same line. An ``eval/<set>/*``
point takes the ``reward_mean`` of the training line of the same epoch; evaluation lines of an
epoch without a training line (e.g. epoch 0, the base model) take the evaluation's own score of
the training reward, ``eval/<set>/<training reward>``, when it was logged, else are left out.
Missing keys (a DDPO run has no critic metrics) are skipped.
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
        },
        "threshold_fraction": fraction,
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
    rows = [["runs (seeds)"] + [f"{m['n']} ({', '.join(map(str, m['seeds']))})" for m in methods]]
    rows.append(["final training reward"] + [_fmt(m["final_reward"]) for m in methods])
    thr = group["threshold"]
    name = f"reward queries to {thr:.3f}" if thr is not None else "reward queries to threshold"
    row = [name]
    for m in methods:
        q = m["queries_to_threshold"]
        text = "–" if q["mean"] is None else f"{q['mean']:.0f}"
        if q["std"] is not None:
            text += f" ± {q['std']:.0f}"
        row.append(f"{text} (reached {q['reached']}/{m['n']})")
    rows.append(row)
    for key in group["metrics"]:
        rows.append([f"final {key}"] + [_fmt(m["final"][key]) for m in methods])
    for key, level in group["matched_levels"].items():
        label = f"{key} at training reward {level:.3f}" if level is not None else key
        rows.append([label] + [_fmt(m["ood_at_matched"][key]) for m in methods])
    return header, rows


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Summary", ""]
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


def _figure(n_panels: int, width: float = 5.0, height: float = 3.6):
    _matplotlib_dir()
    from matplotlib.figure import Figure  # deferred: matplotlib would slow down `tdpo --help`

    cols = min(n_panels, 3)
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


def plot_sample_efficiency(groups, colours, out: Path) -> list[tuple[str, str]]:
    fig, axes = _figure(len(groups))
    for ax, (reward, by_method) in zip(axes, groups.items()):
        _plot_runs(ax, by_method, colours, training_curve, band=True)
        ax.set_xlabel("reward queries")
        ax.set_ylabel(f"training reward ({reward})")
        ax.set_title(f"sample efficiency: {reward}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    name = "sample_efficiency.png"
    _save(fig, out / name)
    return [(name, "Training reward against reward queries (sample efficiency, cf. Figure 4).")]


def plot_ood(groups, colours, out: Path, gold_only: bool) -> list[tuple[str, str]]:
    made = []
    for g_index, (reward, by_method) in enumerate(groups.items()):
        runs = [r for rs in by_method.values() for r in rs]
        keys = sorted({k for r in runs for k in ood_keys(r)})
        if gold_only:
            keys = [k for k in keys if "shapes_gold" in k.rsplit("/", 1)[-1]]
        if not keys:
            continue
        fig, axes = _figure(len(keys), 4.6, 3.4)
        for ax, key in zip(axes, keys):
            _plot_runs(ax, by_method, colours, lambda r, k=key: ood_pairs(r, k), band=False)
            ax.set_xlabel(f"training reward ({reward})")
            ax.set_ylabel(key)
            ax.set_title(key, fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        name = f"{'gold' if gold_only else 'cross_reward'}_{g_index}.png"
        _save(fig, out / name)
        what = "Gold metrics" if gold_only else "Out-of-domain rewards and metrics"
        made.append(
            (
                name,
                f"{what} against the training reward {reward} (cross-reward "
                "generalization, cf. Figure 3).",
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


def plot_heldout_tradeoff(groups, colours, out: Path) -> list[tuple[str, str]]:
    """Held-out training reward (x) against each held-out gold / out-of-domain reward (y), mean
    and standard deviation over seeds at every evaluation epoch: the same prompts and initial
    noise at every point, so the curves are free of the epoch-to-epoch prompt mix."""
    made = []
    for g_index, (reward, by_method) in enumerate(groups.items()):
        runs = [r for rs in by_method.values() for r in rs]
        keys = sorted(
            {k for r in runs for k in r.rows[-1] if k.startswith("eval/")}
            | {k for r in runs for row in r.rows for k in row if k.startswith("eval/")}
        )
        labels = sorted({k.split("/")[1] for k in keys if k.endswith(f"/{reward}")})
        targets = sorted({k.split("/", 2)[2] for k in keys} - {reward, "kl", "diversity"})
        gold = [t for t in targets if "gold" in t]
        targets = gold + [t for t in targets if t not in gold]
        panels = [(label, t) for label in labels for t in targets]
        if not panels:
            continue
        fig, axes = _figure(len(panels), 4.6, 3.4)
        for ax, (label, target) in zip(axes, panels):
            for method, method_runs in by_method.items():
                series = [heldout_series(r, label, reward, target) for r in method_runs]
                epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
                if not epochs:
                    continue
                xs = np.array([[s[e][0] for e in epochs] for s in series])
                ys = np.array([[s[e][1] for e in epochs] for s in series])
                ax.errorbar(
                    xs.mean(0),
                    ys.mean(0),
                    xerr=xs.std(0),
                    yerr=ys.std(0),
                    marker="o",
                    ms=3,
                    lw=1.2,
                    capsize=2,
                    color=colours[method],
                    label=method,
                )
            ax.set_xlabel(f"eval/{label}/{reward} (training reward)")
            ax.set_ylabel(f"eval/{label}/{target}")
            ax.set_title(f"{label} prompts: {target}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        name = f"heldout_tradeoff_{g_index}.png"
        _save(fig, out / name)
        made.append(
            (
                name,
                f"Held-out evaluation, training on {reward}: the training reward "
                "against gold and the other rewards on fixed prompts and noise, mean and "
                "standard deviation over seeds at each evaluation epoch (the first point is "
                "the base model). Cf. the paper's Figure 3.",
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
    axes[0].legend(fontsize=8)
    name = "critic_dynamics.png"
    _save(fig, out / name)
    return [(name, "Critic neurons (dormant and active fractions) and explained variance.")]


CRITIC_QUARTERS = ("q1", "q2", "q3", "q4")


def plot_critic_quarters(runs: list[Run], colours, out: Path) -> list[tuple[str, str]]:
    """critic_ev/q1..q4 over epochs per method, and critic_ref/q1..q4 (dashed) where logged."""
    if not any(last_value(r, "critic_ev/q4") is not None for r in runs):
        return []
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(r.label, []).append(r)
    by_method = {m: by_method[m] for m in sorted(by_method, key=_method_sort_key)}
    fig, axes = _figure(4, 3.6, 3.2)
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
    axes[0].legend(fontsize=7)
    name = "critic_quarters.png"
    _save(fig, out / name)
    return [
        (
            name,
            "How much the critic knows: the explained variance of its values V_old for the "
            "returns, on each epoch's fresh samples, per quarter of the denoising steps (q1 the "
            "first, from noise; q4 the last, nearest the image), mean over seeds. 1 = the critic "
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
            picked.append((f"samples/{run.id}/{path.name}", f"epoch {epoch}"))
        title = (
            "training samples" if kind == "epoch" else kind.replace("_", " ").removesuffix(" epoch")
        )
        made.append((title, picked))
    return made


# ------------------------------------------------------------------------------------ html

_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; }
.grids figure { margin: 0; } .grids img { max-width: 420px; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(out: Path, runs: list[Run], summary, plots, samples, skipped) -> Path:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tdpo report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tdpo report: {len(runs)} run{'s' if len(runs) != 1 else ''}</h1>",
        "<p class='note'>Numbers: <a href='summary.json'>summary.json</a>, "
        "<a href='summary.md'>summary.md</a>. Definitions of every number are in the "
        "docstring of <code>tdpo.report</code>.</p>",
    ]
    if skipped:
        parts.append(
            "<p class='note'>Left out (no training metrics yet): "
            + ", ".join(_e(s) for s in skipped)
            + "</p>"
        )
    parts.append("<h2>Summary</h2>")
    parts.append(
        f"<p class='note'>Mean ± sample standard deviation over runs. Queries to threshold: "
        f"threshold = r0 + {summary['threshold_fraction']} × (best − r0), r0 = mean first "
        "training reward, best = best method's mean final training reward. <i>X at L</i>: the "
        "metric interpolated at training reward L, the smallest over runs of each run's "
        "largest training reward (a level every run reached).</p>"
    )
    for group in summary["groups"]:
        parts.append(f"<h3>Training reward: {_e(group['reward'])}</h3>")
        parts.append(_html_table(*table_rows(group)))
    parts.append("<h2>Plots</h2>")
    for name, caption in plots:
        parts.append(
            f"<figure><img class='plot' src='{_e(name)}' alt='{_e(caption)}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    parts.append("<h2>Runs</h2>")
    rows = [
        [
            r["id"],
            r["method"],
            r["reward"],
            r["seed"],
            r["epochs"],
            _fmt({"mean": r["final_reward"]}),
        ]
        for r in summary["runs"]
    ]
    parts.append(_html_table(["run", "method", "reward", "seed", "epochs", "final reward"], rows))
    for run in runs:
        parts.append(
            f"<h3 id='{_e(run.id)}'>{_e(run.id)} ({_e(run.label)}, {_e(run.reward)}, "
            f"seed {_e(run.seed)})</h3>"
        )
        parts.append(
            f"<p class='note'>From <code>{_e(run.path)}</code>; "
            f"<a href='runs/{_e(run.id)}/config.yaml'>config.yaml</a></p>"
        )
        for title, grids in samples.get(run.id, []):
            parts.append(f"<h4>{_e(title)}</h4><div class='grids'>")
            for src, caption in grids:
                parts.append(
                    f"<figure><a href='{_e(src)}'><img src='{_e(src)}' alt='{_e(caption)}'></a>"
                    f"<figcaption>{_e(caption)}</figcaption></figure>"
                )
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
    plots = plot_sample_efficiency(groups, colours, out)
    plots += plot_ood(groups, colours, out, gold_only=False)
    plots += plot_ood(groups, colours, out, gold_only=True)
    plots += plot_heldout_tradeoff(groups, colours, out)
    plots += plot_dynamics(runs, colours, out)
    plots += plot_critic_quarters(runs, colours, out)
    samples = {}
    for run in runs:
        samples[run.id] = copy_samples(run, out)
        (out / "runs" / run.id).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.path / "config.yaml", out / "runs" / run.id / "config.yaml")
    write_html(out, runs, summary, plots, samples, skipped)
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
