"""The verdict of a run: did training help, and did it over-optimize?

One function, :func:`judge`, used by ``tdpo report`` (its first screen, ``summary.json``) and by
``tdpo train`` (the lines printed after each evaluation and at the end), so both say the same.

What is compared: the held-out evaluation (``eval/<set>/<metric>`` in ``metrics.jsonl``: fixed
prompts and fixed initial noise, the same at every evaluation) of the **base** model (epoch 0)
with the run's **final** one (its last evaluation after epoch 0), on every prompt set (``seen``:
training prompts, ``unseen``: held-out prompts), for the training reward, the gold metrics, the
other rewards, the KL to the base model and the diversity.

The rule (``CHANGE_TOLERANCE`` = 0.02):

- the change of a metric on a prompt set is ``final - base``; over several runs (seeds) of a
  method, the mean of the per-run changes, and its **seed spread**, the sample standard deviation
  of the per-run changes (ddof=1; none for one run);
- a change **counts** (up or down) when ``|change| > max(CHANGE_TOLERANCE * |base|, seed
  spread)``: larger than 2% of the base value and than the seed-to-seed spread; otherwise the
  metric is **flat**;
- **gold** is ``shapes_gold`` when it was evaluated, else the first metric whose name contains
  ``gold`` (never the training reward itself); without gold, the other rewards stand in for it (down on a set when more of them
  fell than rose);
- the verdict, from the training reward and gold:

  - ``over-optimized``: the training reward rose on some set and gold fell on one or more sets
    (named: "over-optimized on unseen prompts");
  - ``improved``: the training reward rose and gold rose on some set, fell on none;
  - ``reward-only``: the training reward rose, gold stayed flat;
  - ``worse``: gold fell without a rise of the training reward (or both fell);
  - ``reward-down``: the training reward fell (and gold did not);
  - ``no-change``: nothing counts;
  - ``no-eval``: no held-out evaluation of the base model and of a trained epoch to compare.

Only the standard library: the report and the training loop import it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

CHANGE_TOLERANCE = 0.02
PRIMARY_GOLD = "shapes_gold"
INFO_METRICS = ("kl", "diversity")  # shown, never judged


def rule_text(several_seeds: bool = True) -> str:
    """The rule in one paragraph; without ``several_seeds`` it leaves out the seed spread."""
    spread = (
        " and than the seed spread (the standard deviation of the change over seeds)"
        if several_seeds
        else " (one run per method: no seed spread to compare with)"
    )
    return (
        f"A change (final − base, same prompts and noise) counts when it is larger than "
        f"{CHANGE_TOLERANCE:.0%} of the base value{spread}; otherwise the metric is flat. "
        "Over-optimized: the training reward rose while gold (or, without gold, most other "
        "rewards) fell on some prompt set."
    )


RULE = rule_text()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def heldout_sets(rows: list[dict[str, Any]]) -> list[str]:
    """The held-out prompt sets (``eval/<set>/...``) in order of first appearance."""
    out: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("eval/") and key.count("/") >= 2:
                label = key.split("/")[1]
                if label not in out:
                    out.append(label)
    return out


def heldout_metrics(rows: list[dict[str, Any]], label: str) -> list[str]:
    """Metric names evaluated on one prompt set (``eval/<label>/<metric>``)."""
    prefix = f"eval/{label}/"
    names: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix) and _finite(value):
                name = key[len(prefix) :]
                if name not in names:
                    names.append(name)
    return names


def gold_metric(names) -> str | None:
    """``shapes_gold`` if among ``names``, else the first (sorted) name containing ``gold``."""
    names = list(names)
    if PRIMARY_GOLD in names:
        return PRIMARY_GOLD
    golds = sorted(n for n in names if "gold" in n)
    return golds[0] if golds else None


def gold_or_first(names) -> str | None:
    """The gold metric among ``names``, else the first name (None for none)."""
    names = list(names)
    return gold_metric(names) or (names[0] if names else None)


def metric_order(names, reward: str) -> list[str]:
    """Training reward, gold, the other gold metrics, the other rewards, then KL and diversity."""
    names = list(dict.fromkeys(names))
    gold = gold_metric(n for n in names if n != reward)
    first = [n for n in (reward, gold) if n is not None and n in names]
    golds = sorted(n for n in names if "gold" in n and n not in first)
    info = [n for n in INFO_METRICS if n in names]
    rest = sorted(n for n in names if n not in first + golds + info)
    return first + golds + rest + info


def base_and_final(rows: list[dict[str, Any]], key: str) -> tuple[float, float, int] | None:
    """(value at epoch 0, value at the last logged epoch after 0, that epoch), or None."""
    base = None
    final = None
    for row in rows:
        value, epoch = row.get(key), row.get("epoch")
        if not _finite(value) or not _finite(epoch):
            continue
        if epoch == 0:
            base = float(value)
        elif final is None or epoch >= final[1]:
            final = (float(value), int(epoch))
    if base is None or final is None:
        return None
    return base, final[0], final[1]


@dataclass
class Change:
    """One metric on one prompt set: base -> final (means over runs) and whether it counts."""

    set: str
    metric: str
    base: float
    final: float
    delta: float
    spread: float | None  # sample std of the per-run changes (None for one run)
    n: int
    tolerance: float
    direction: int  # +1 up, -1 down, 0 flat

    @property
    def word(self) -> str:
        return {1: "up", -1: "down", 0: "flat"}[self.direction]


def compare(
    runs: list[list[dict[str, Any]]], label: str, metric: str, tolerance: float = CHANGE_TOLERANCE
) -> Change | None:
    """The change of ``eval/<label>/<metric>`` from base to final over ``runs`` (rows each)."""
    pairs = [p for p in (base_and_final(rows, f"eval/{label}/{metric}") for rows in runs) if p]
    if not pairs:
        return None
    n = len(pairs)
    bases = [p[0] for p in pairs]
    finals = [p[1] for p in pairs]
    deltas = [f - b for b, f in zip(bases, finals)]
    base, final, delta = sum(bases) / n, sum(finals) / n, sum(deltas) / n
    spread = None
    if n > 1:
        spread = math.sqrt(sum((d - delta) ** 2 for d in deltas) / (n - 1))
    limit = max(tolerance * abs(base), spread or 0.0)
    direction = 0 if abs(delta) <= limit else (1 if delta > 0 else -1)
    return Change(label, metric, base, final, delta, spread, n, limit, direction)


@dataclass
class Verdict:
    """The verdict of one run or of one method over seeds (see the module docstring)."""

    reward: str
    kind: str
    conclusion: str  # plain words: "over-optimized on unseen prompts"
    line: str  # the one-line verdict with its numbers: "<evidence>: <conclusion>"
    evidence: str = ""  # the changes the conclusion rests on
    gold: str | None = None
    sets: list[str] = field(default_factory=list)
    changes: dict[str, dict[str, Change]] = field(default_factory=dict)  # set -> metric -> change
    n: int = 0  # runs compared
    final_epochs: list[int] = field(default_factory=list)  # each run's last evaluated epoch
    trained_epochs: list[int] = field(default_factory=list)  # each run's last training epoch
    note: str = ""  # e.g. "the last evaluation is at epoch 16 of 18"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["changes"] = {
            s: {m: {**asdict(c), "word": c.word} for m, c in by_metric.items()}
            for s, by_metric in self.changes.items()
        }
        return out


def num(value: float | None) -> str:
    """A metric value for people: 3 decimals (scientific below 1e-3, 4 digits from 1000)."""
    if value is None:
        return "–"
    if abs(value) < 1e-12:  # rounding noise (e.g. the spread of equal changes)
        value = 0.0
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.3f}"


def signed(value: float) -> str:
    """A change: ``+0.040``; 4 decimals below 0.001 (``+0.0009``)."""
    if abs(value) < 1e-3:
        return f"{value:+.4f}"
    return f"{value:+.4g}" if abs(value) >= 1000 else f"{value:+.3f}"


def describe(change: Change) -> str:
    """``+0.040``, or ``+0.004 (flat)`` when the change does not count."""
    return signed(change.delta) + ("" if change.direction else " (flat)")


def _on_sets(changes: list[Change]) -> str:
    return ", ".join(f"{describe(c)} on {c.set}" for c in changes)


def _names(sets: list[str]) -> str:
    return " and ".join(sets)


def judge(
    runs: list[list[dict[str, Any]]], reward: str, tolerance: float = CHANGE_TOLERANCE
) -> Verdict:
    """The verdict of one run (``[rows]``) or of several seeds of one method, trained on
    ``reward``, from their ``metrics.jsonl`` rows (see the module docstring for the rule)."""
    runs = [list(rows) for rows in runs]
    trained = [
        max((int(r["epoch"]) for r in rows if _finite(r.get("reward_mean"))), default=0)
        for rows in runs
    ]
    sets: list[str] = []
    for rows in runs:
        sets += [s for s in heldout_sets(rows) if s not in sets]
    changes: dict[str, dict[str, Change]] = {}
    for label in sets:
        names: list[str] = []
        for rows in runs:
            names += [n for n in heldout_metrics(rows, label) if n not in names]
        by_metric = {}
        for name in metric_order(names, reward):
            change = compare(runs, label, name, tolerance)
            if change is not None:
                by_metric[name] = change
        if by_metric:
            changes[label] = by_metric
    sets = [s for s in sets if s in changes]
    finals = []
    for rows in runs:
        done = [
            int(r["epoch"])
            for r in rows
            if _finite(r.get("epoch")) and r["epoch"] > 0 and any(k.startswith("eval/") for k in r)
        ]
        finals.append(max(done, default=0))
    verdict = Verdict(
        reward=reward,
        kind="no-eval",
        conclusion="",
        line="",
        sets=sets,
        changes=changes,
        n=len(runs),
        final_epochs=finals,
        trained_epochs=trained,
    )
    if any(f < t for f, t in zip(finals, trained)) and finals and max(finals) > 0:
        verdict.note = (
            f"the last held-out evaluation is at epoch {min(finals)} of {max(trained)} trained"
        )
    reward_changes = [changes[s][reward] for s in sets if reward in changes[s]]
    if not reward_changes:
        verdict.conclusion = (
            f"no verdict: the training reward ({reward}) was not evaluated on held-out prompts "
            "(eval.rewards leaves it out)"
            if sets
            else "no verdict: the run has no held-out evaluation of the base model (epoch 0) and "
            "of a trained epoch (eval.every=0, or not evaluated yet)"
        )
        verdict.line = verdict.conclusion
        return verdict
    names_all = {m for s in sets for m in changes[s]}
    gold = gold_metric(names_all - {reward})  # never the training reward itself
    verdict.gold = gold
    gold_changes = [changes[s][gold] for s in sets if gold in changes[s]] if gold else []
    up_sets = [c.set for c in reward_changes if c.direction > 0]
    down_sets = [c.set for c in reward_changes if c.direction < 0]
    parts = [f"training reward {_on_sets(reward_changes)}"]
    if gold:
        gold_down = [c.set for c in gold_changes if c.direction < 0]
        gold_up = [c.set for c in gold_changes if c.direction > 0]
        parts.append(f"gold {_on_sets(gold_changes)}")
        against = "gold"
    else:  # the other rewards stand in for gold
        gold_down, gold_up, counts = [], [], []
        for s in sets:
            others = [
                c
                for m, c in changes[s].items()
                if m != reward and m not in INFO_METRICS and "gold" not in m
            ]
            if not others:
                continue
            fell = sum(c.direction < 0 for c in others)
            rose = sum(c.direction > 0 for c in others)
            counts.append(f"{fell} of {len(others)} down, {rose} up on {s}")
            if fell > rose:
                gold_down.append(s)
            elif rose > fell:
                gold_up.append(s)
        if counts:
            parts.append("other rewards " + "; ".join(counts))
        against = "the other rewards"
        if not counts:
            verdict.kind = (
                "reward-only" if up_sets else ("reward-down" if down_sets else "no-change")
            )
            verdict.conclusion = (
                "over-optimization cannot be judged (no reward besides the training reward was "
                "evaluated)"
            )
            verdict.evidence = parts[0]
            verdict.line = f"{parts[0]}: {verdict.conclusion}"
            return verdict
    if up_sets and gold_down:
        kind = "over-optimized"
        conclusion = f"over-optimized on {_names(gold_down)} prompts"
        if not gold:
            conclusion += " (most other rewards fell)"
    elif up_sets and gold_up:
        kind, conclusion = "improved", f"improved (the training reward and {against} rose)"
    elif up_sets:
        kind = "reward-only"
        conclusion = f"the training reward rose, {against} stayed flat (no over-optimization seen)"
    elif gold_down:
        kind = "worse"
        conclusion = (
            f"worse (the training reward and {against} fell)"
            if down_sets
            else f"worse ({against} fell on {_names(gold_down)} prompts without a gain)"
        )
    elif down_sets:
        kind, conclusion = "reward-down", f"the training reward fell on {_names(down_sets)} prompts"
    else:
        kind = "no-change"
        conclusion = "no change beyond the tolerance (training did not measurably help)"
    verdict.kind, verdict.conclusion = kind, conclusion
    verdict.evidence = "; ".join(parts)
    verdict.line = f"{verdict.evidence}: {conclusion}"
    return verdict


# --------------------------------------------------------------------------------- terminal


def eval_lines(
    metrics: dict[str, Any],
    base: dict[str, Any] | None,
    reward: str,
    epoch: int,
    epochs: int,
) -> list[str]:
    """One short line per held-out set of one evaluation: the training reward and gold with
    their change since epoch 0 (``base``: the epoch-0 evaluation; None at epoch 0 itself)."""
    lines = []
    rows = [{"epoch": epoch, **metrics}]
    gold_names: set[str] = set()
    for label in heldout_sets(rows):
        gold_names |= set(heldout_metrics(rows, label))
    gold = gold_metric(gold_names - {reward})
    where = "base model" if epoch == 0 else f"epoch {epoch}/{epochs}"
    labels = heldout_sets(rows)
    width = max((len(s) for s in labels), default=0)
    for label in labels:
        parts = []
        for name in (reward, gold):
            key = f"eval/{label}/{name}"
            if name is None or not _finite(metrics.get(key)):
                continue
            text = f"{name} {num(metrics[key])}"
            if base is not None and epoch > 0 and _finite(base.get(key)):
                text += f" ({signed(metrics[key] - base[key])} vs base)"
            parts.append(text)
        if parts:
            lines.append(f"held-out {label:<{width}} ({where}): " + " | ".join(parts))
    return lines


def result_lines(verdict: Verdict) -> list[str]:
    """The closing summary: base -> final of the training reward and gold per set, the verdict."""
    if verdict.kind == "no-eval":
        return [f"result: {verdict.conclusion}"]
    final = max(verdict.final_epochs, default=0)
    lines = [f"result on held-out prompts, base (epoch 0) -> epoch {final}:"]
    width = max(len(s) for s in verdict.sets)
    for label in verdict.sets:
        parts = []
        for name in (verdict.reward, verdict.gold):
            change = verdict.changes[label].get(name) if name else None
            if change is not None:
                flat = "" if change.direction else ", flat"
                parts.append(
                    f"{name} {num(change.base)} -> {num(change.final)} "
                    f"({signed(change.delta)}{flat})"
                )
        lines.append(f"  {label:<{width}}  " + " | ".join(parts))
    lines.append(f"verdict: {verdict.conclusion}")
    if verdict.note:
        lines.append(f"note: {verdict.note}")
    return lines
