"""The paper's claims tested on a sweep's runs, with bootstrap confidence intervals over seeds.

Every figure is read from the held-out evaluation lines (``eval/<set>/<metric>``: fixed prompts
and noise at every evaluation, so a change is the model's, not the draw's):

- ``change`` of a run: metric at its last evaluation minus at epoch 0 (the base model);
- ``trained gain at q``: the held-out trained reward's change at the evaluation after ``q``
  reward queries (the sample-efficiency curve, paper Figure 4);
- a method's figure is the mean over seeds with a 95 % percentile-bootstrap interval over seeds;
  a comparison of two methods pairs runs by seed (same seed: same base model, prompts and
  evaluation noise) and bootstraps the mean of the per-seed differences; ``k/n`` counts the
  seeds on which the difference is positive.

A claim **holds** when the interval of its comparison lies above 0, is **contradicted** when it
lies below 0, and is **not shown** otherwise (the experiment could not separate the methods) or
with fewer than 3 paired seeds.
With 5 seeds a percentile bootstrap is narrow rather than conservative; the per-seed counts are
printed beside it for that reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tdpo.fileio import atomic_write
from tdpo.report import Run, load_run, value_at_level

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
MIN_SEEDS = 3  # fewer paired seeds give no verdict (2 values make a degenerate bootstrap)


def bootstrap_ci(values: list[float], samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement);
    (nan, nan) for no values, (v, v) for one."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


@dataclass
class Estimate:
    """A mean over seeds with its bootstrap interval (and, for a comparison, the sign count)."""

    mean: float
    low: float
    high: float
    n: int
    positive: int = 0
    total: int = 0  # values given, the non-finite ones (a level never reached) included

    @classmethod
    def of(cls, values: list[float]) -> Estimate:
        x = [v for v in values if math.isfinite(v)]
        low, high = bootstrap_ci(x)
        mean = float(np.mean(x)) if x else math.nan
        return cls(mean, low, high, len(x), sum(v > 0 for v in x), len(values))

    def verdict(self) -> str:
        if self.n < MIN_SEEDS:
            return f"not shown ({self.n} seed{'s' * (self.n != 1)}; a verdict needs {MIN_SEEDS})"
        if self.low > 0:
            return "holds"
        if self.high < 0:
            return "contradicted"
        return "not shown"

    def text(self, digits: int = 3, signs: bool = False) -> str:
        if not self.n:
            return f"never (0/{self.total})" if self.total else "–"
        sign = "+" if digits else ""
        body = f"{self.mean:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"
        if self.n < self.total:
            body += f" ({self.n}/{self.total} reached)"
        return body + (f" ({self.positive}/{self.n} > 0)" if signs else "")


# ----------------------------------------------------------------------------- per run


def eval_rows(run: Run) -> list[dict[str, Any]]:
    return [r for r in run.rows if any(k.startswith("eval/") for k in r)]


def eval_value(row: dict[str, Any], prompt_set: str, metric: str) -> float:
    value = row.get(f"eval/{prompt_set}/{metric}")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def change(run: Run, prompt_set: str, metric: str) -> float:
    """Metric at the last evaluation minus at epoch 0 (nan without both)."""
    rows = eval_rows(run)
    base = [r for r in rows if r.get("epoch") == 0]
    if not base or len(rows) < 2:
        return math.nan
    return eval_value(rows[-1], prompt_set, metric) - eval_value(base[0], prompt_set, metric)


def final(run: Run, prompt_set: str, metric: str) -> float:
    rows = eval_rows(run)
    return eval_value(rows[-1], prompt_set, metric) if rows else math.nan


def gain_curve(run: Run, prompt_set: str) -> dict[int, float]:
    """{reward queries: held-out trained-reward change from the base} at every evaluation."""
    per_epoch = run.config.get("sample", {}).get("samples_per_epoch", 0)
    rows = eval_rows(run)
    base = [r for r in rows if r.get("epoch") == 0]
    if not base:
        return {}
    start = eval_value(base[0], prompt_set, run.reward)
    return {
        int(r["epoch"]) * per_epoch: eval_value(r, prompt_set, run.reward) - start for r in rows
    }


# ----------------------------------------------------------------------------- the claims


@dataclass
class SweepRuns:
    """The sweep's finished runs: {method key: {seed: Run}} for one training reward."""

    by_method: dict[str, dict[int, Run]]

    @classmethod
    def load(cls, entries: list[tuple[str, int, Path]]) -> SweepRuns:
        """``entries``: (method key of the sweep spec, seed, run folder) of finished runs."""
        by_method: dict[str, dict[int, Run]] = {}
        for method, seed, path in entries:
            by_method.setdefault(method, {})[seed] = load_run(path)
        return cls(by_method)

    def per_seed(self, method: str, fn) -> dict[int, float]:
        return {seed: fn(run) for seed, run in self.by_method.get(method, {}).items()}

    def estimate(self, method: str, fn) -> Estimate:
        return Estimate.of(list(self.per_seed(method, fn).values()))

    def paired(self, treatment: str, control: str, fn) -> Estimate:
        """Mean over shared seeds of fn(treatment run) - fn(control run)."""
        a, b = self.per_seed(treatment, fn), self.per_seed(control, fn)
        return Estimate.of([a[s] - b[s] for s in sorted(set(a) & set(b))])


PANEL = ("shapes_pickscore", "shapes_hps", "shapes_imagereward")
GOLD = "shapes_gold"


def cross_reward_score(run: Run) -> float:
    """Paper Figure 3's quantity on unseen prompts: the mean change of the rewards it was not
    trained on (the panel), each in its own units."""
    values = [change(run, "unseen", m) for m in PANEL]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


MATCHED_GAIN = 0.02  # the held-out trained-reward gain at which methods are compared


def queries_to_gain(run: Run, level: float = MATCHED_GAIN) -> float:
    """Reward queries at the first evaluation whose held-out (seen) trained-reward gain reaches
    ``level`` (nan if none does: the run never got there)."""
    hits = [q for q, g in sorted(gain_curve(run, "seen").items()) if q > 0 and g >= level]
    return float(hits[0]) if hits else math.nan


def unseen_change_at_gain(run: Run, value, level: float = MATCHED_GAIN) -> float:
    """The change of ``value(eval row)`` on unseen prompts where the seen trained-reward gain
    first reaches ``level``, linearly interpolated between evaluations (matched reward: who pays
    more for the same gain; nan if the run never reaches it)."""
    gains = gain_curve(run, "seen")
    rows = {
        int(r["epoch"]) * run.config.get("sample", {}).get("samples_per_epoch", 0): r
        for r in eval_rows(run)
    }
    if 0 not in rows:
        return math.nan
    base = value(rows[0])
    qs = sorted(q for q in gains if q in rows)
    xs = np.asarray([gains[q] for q in qs])
    ys = np.asarray([value(rows[q]) - base for q in qs])
    found = value_at_level(xs, ys, level)
    return math.nan if found is None else found


def gold_at_gain(run: Run, level: float = MATCHED_GAIN) -> float:
    """Gold's change on unseen prompts at a matched seen trained-reward gain."""
    return unseen_change_at_gain(run, lambda row: eval_value(row, "unseen", GOLD), level)


def panel_at_gain(run: Run, level: float = MATCHED_GAIN) -> float:
    """Figure 3's quantity (the panel's mean change on unseen prompts) at a matched seen
    trained-reward gain (nan without panel rewards)."""

    def panel_mean(row) -> float:
        values = [eval_value(row, "unseen", m) for m in PANEL]
        values = [v for v in values if math.isfinite(v)]
        return float(np.mean(values)) if values else math.nan

    return unseen_change_at_gain(run, panel_mean, level)


def mean_gain(run: Run) -> float:
    """Sample efficiency as one number: the mean held-out (seen) trained-reward gain over the
    evaluations after the base (an area under Figure 4's curve, per evaluation)."""
    curve = gain_curve(run, "seen")
    gains = [g for q, g in sorted(curve.items()) if q > 0]
    return float(np.mean(gains)) if gains else math.nan


@dataclass
class Claim:
    title: str
    treatment: str
    control: str
    quantity: str
    fn: Any


CLAIMS = [
    Claim(
        "Cross-reward generalization (Figure 3): TDPO-R improves the rewards it was not "
        "trained on more than DDPO with as many updates",
        "tdpo-r",
        "ddpo-40",
        "mean change of the panel rewards on unseen prompts",
        cross_reward_score,
    ),
    Claim(
        "Gold (the truth the rewards stand for) on unseen prompts: TDPO-R over-optimizes less "
        "than DDPO-40",
        "tdpo-r",
        "ddpo-40",
        "change of gold on unseen prompts",
        lambda run: change(run, "unseen", GOLD),
    ),
    Claim(
        "Sample efficiency (Figure 4): TDPO-R raises the held-out trained reward faster than "
        "DDPO-40",
        "tdpo-r",
        "ddpo-40",
        "mean held-out trained-reward gain over the evaluations",
        mean_gain,
    ),
    Claim(
        "The temporal critic itself: TDPO (no reset) keeps more gold on unseen prompts than "
        "DDPO-40",
        "tdpo",
        "ddpo-40",
        "change of gold on unseen prompts",
        lambda run: change(run, "unseen", GOLD),
    ),
    Claim(
        "Resetting active neurons beats resetting dormant ones (TDPO-R vs ReDo-style)",
        "tdpo-r",
        "tdpo-r-dormant",
        "change of gold on unseen prompts",
        lambda run: change(run, "unseen", GOLD),
    ),
    Claim(
        "Resetting active neurons beats never resetting (TDPO-R vs TDPO)",
        "tdpo-r",
        "tdpo",
        "change of gold on unseen prompts",
        lambda run: change(run, "unseen", GOLD),
    ),
]

METHOD_COLUMNS = [
    ("trained, seen", lambda run: change(run, "seen", run.reward), 3),
    ("trained, unseen", lambda run: change(run, "unseen", run.reward), 3),
    ("gold, seen", lambda run: change(run, "seen", GOLD), 3),
    ("gold, unseen", lambda run: change(run, "unseen", GOLD), 3),
    (f"gold, unseen, at trained gain +{MATCHED_GAIN}", gold_at_gain, 3),
    (f"queries to trained gain +{MATCHED_GAIN}", queries_to_gain, 0),
    ("panel, unseen", cross_reward_score, 3),
    (f"panel, unseen, at trained gain +{MATCHED_GAIN}", panel_at_gain, 3),
    ("KL, unseen (final)", lambda run: final(run, "unseen", "kl"), 3),
    ("diversity, unseen", lambda run: change(run, "unseen", "diversity"), 3),
]


def train_series(run: Run, key: str, first_epoch: int = 1) -> list[float]:
    """The training lines' values of ``key`` from ``first_epoch`` on (finite ones only)."""
    values = [r.get(key) for r in run.train_rows if (r.get("epoch") or 0) >= first_epoch]
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


CRITIC_FROM_EPOCH = 4  # the critic's figures from here on (it starts from nothing at epoch 1)
CRITIC_COLUMNS = [
    (
        f"critic_ev/q4, mean of epochs {CRITIC_FROM_EPOCH}+",
        lambda run: _mean(train_series(run, "critic_ev/q4", CRITIC_FROM_EPOCH)),
        2,
    ),
    (
        f"share of epochs {CRITIC_FROM_EPOCH}+ with critic_ev/q4 >= 0.3",
        lambda run: _mean(
            [float(v >= 0.3) for v in train_series(run, "critic_ev/q4", CRITIC_FROM_EPOCH)]
        ),
        2,
    ),
    (
        "critic_ref/q4 (upper reference), mean",
        lambda run: _mean(train_series(run, "critic_ref/q4", CRITIC_FROM_EPOCH)),
        2,
    ),
    ("neurons reset, total", lambda run: float(sum(train_series(run, "neurons_reset"))), 0),
    (
        "dormant fraction at 8 states, mean",
        lambda run: _mean(train_series(run, "dormant_fraction/b8")),
        3,
    ),
]


def critic_methods(runs: SweepRuns) -> list[str]:
    return [
        m
        for m, by_seed in runs.by_method.items()
        if any(train_series(run, "critic_ev/q4") for run in by_seed.values())
    ]


def summarize_claims(runs: SweepRuns) -> dict[str, Any]:
    methods = {}
    for method in runs.by_method:
        methods[method] = {
            "seeds": sorted(runs.by_method[method]),
            **{name: vars(runs.estimate(method, fn)) for name, fn, _ in METHOD_COLUMNS},
        }
    claims = []
    for claim in CLAIMS:
        est = runs.paired(claim.treatment, claim.control, claim.fn)
        claims.append(
            {
                "claim": claim.title,
                "comparison": f"{claim.treatment} - {claim.control}",
                "quantity": claim.quantity,
                "estimate": vars(est),
                "verdict": est.verdict() if est.n else "not run",
            }
        )
    critic = {
        method: {name: vars(runs.estimate(method, fn)) for name, fn, _ in CRITIC_COLUMNS}
        for method in critic_methods(runs)
    }
    return {"methods": methods, "critic": critic, "claims": claims, "confidence": CONFIDENCE}


def claims_markdown(runs: SweepRuns) -> str:
    lines = [
        "# The paper's claims on this sweep",
        "",
        "Changes from the base model (epoch 0) to the last evaluation on held-out prompts with "
        f"fixed noise; mean over seeds [{CONFIDENCE:.0%} bootstrap interval]. A comparison pairs "
        "runs by seed; it holds when its interval lies above 0, is contradicted below 0, and is "
        f"not shown otherwise or with fewer than {MIN_SEEDS} paired seeds. Definitions: "
        "`tdpo.claims`.",
        "",
        "| claim | comparison | quantity | difference | verdict |",
        "|---|---|---|---|---|",
    ]
    for claim in CLAIMS:
        est = runs.paired(claim.treatment, claim.control, claim.fn)
        verdict = est.verdict() if est.n else "not run"
        lines.append(
            f"| {claim.title} | {claim.treatment} − {claim.control} | {claim.quantity} | "
            f"{est.text(signs=True)} | **{verdict}** |"
        )
    header = " | ".join(name for name, _, _ in METHOD_COLUMNS)
    lines += ["", f"| method (seeds) | {header} |", "|---" * (len(METHOD_COLUMNS) + 1) + "|"]
    for method, by_seed in runs.by_method.items():
        cells = [runs.estimate(method, fn).text(digits) for _, fn, digits in METHOD_COLUMNS]
        lines.append(f"| {method} ({len(by_seed)}) | " + " | ".join(cells) + " |")
    critics = critic_methods(runs)
    if critics:
        header = " | ".join(name for name, _, _ in CRITIC_COLUMNS)
        lines += [
            "",
            "The critic (training lines; `critic_ev/q4`: the share of the return's variance that "
            "V_old explains on the epoch's fresh samples in the last quarter of the steps):",
            "",
            f"| method (seeds) | {header} |",
            "|---" * (len(CRITIC_COLUMNS) + 1) + "|",
        ]
        for method in critics:
            cells = [runs.estimate(method, fn).text(digits) for _, fn, digits in CRITIC_COLUMNS]
            n = len(runs.by_method[method])
            lines.append(f"| {method} ({n}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_claims(entries: list[tuple[str, int, Path]], out: Path) -> Path:
    """Write ``out/claims.md`` and ``out/claims.json`` from the finished runs ``entries``."""
    runs = SweepRuns.load(entries)
    out.mkdir(parents=True, exist_ok=True)
    summary = json.dumps(summarize_claims(runs), indent=2)
    atomic_write(out / "claims.json", lambda f: f.write(summary))
    text = claims_markdown(runs)
    return atomic_write(out / "claims.md", lambda f: f.write(text))
