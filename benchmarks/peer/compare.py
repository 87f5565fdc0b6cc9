"""Peer benchmark: TRL's DDPOTrainer against ``tdpo train --preset ddpo-2`` on the shapes world
at matched settings (README.md in this folder), in alternating rounds.

Each round runs both workers once, one after the other (TRL first in even rounds, tdpo first
in odd ones), each a fresh process with one thread that runs a warm-up epoch and then
``--epochs`` timed epochs. Per round: tdpo/TRL of the median epoch seconds, of the seconds per
guided sampling pass and per training pass (UNet forward calls counted with a hook on each
side's UNet2DConditionModel), and each side's peak RSS. The summary gives the median ratio over
rounds and its range.

    bash benchmarks/peer/setup.sh                      # once: benchmarks/peer/.venv with trl
    python benchmarks/peer/compare.py --rounds 3 --out peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".venv" / "bin" / "python"


def run_worker(side: str, epochs: int, warmup: int, extra: list[str]) -> dict:
    python = str(PEER_PYTHON) if side == "trl" else sys.executable
    args = [python, str(HERE / f"{side}_worker.py"), "--epochs", str(epochs)]
    args += ["--warmup", str(warmup)]
    if side == "tdpo":
        args += [x for kv in extra for x in ("--set", kv)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEER-RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("PEER-RESULT ") :])
    result["wall_s"] = wall
    return result


def per_pass(epoch: dict, phase: str) -> float:
    return epoch[f"seconds_{phase}"] / epoch[f"passes_{phase}"]


def summarize(result: dict) -> dict:
    eps = result["epochs"]
    return {
        "epoch_s": statistics.median(e["seconds"] for e in eps),
        "sample_pass_ms": 1e3 * statistics.median(per_pass(e, "sample") for e in eps),
        "train_pass_ms": 1e3 * statistics.median(per_pass(e, "train") for e in eps),
        "pass_ms": 1e3
        * statistics.median(e["seconds"] / (e["passes_sample"] + e["passes_train"]) for e in eps),
        "passes": (eps[0]["passes_sample"], eps[0]["passes_train"]),
        "rows": (eps[0]["rows_sample"], eps[0]["rows_train"]),
        "peak_rss_mib": result["peak_rss_mib"],
    }


KEYS = ("epoch_s", "pass_ms", "sample_pass_ms", "train_pass_ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per worker run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first epochs")
    parser.add_argument("--set", action="append", default=[], help="tdpo overrides key=value")
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args(argv)
    if not PEER_PYTHON.exists():
        print("no side environment: run `bash benchmarks/peer/setup.sh` first", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    rounds = []
    for r in range(args.rounds):
        order = ("trl", "tdpo") if r % 2 == 0 else ("tdpo", "trl")
        got = {side: run_worker(side, args.epochs, args.warmup, args.set) for side in order}
        s = {side: summarize(got[side]) for side in got}
        ratios = {k: s["tdpo"][k] / s["trl"][k] for k in KEYS}
        rounds.append({"order": order, "raw": got, "summary": s, "ratios": ratios})
        print(
            f"round {r + 1}/{args.rounds} ({' then '.join(order)}): "
            + " | ".join(f"{k} tdpo {s['tdpo'][k]:.3f} trl {s['trl'][k]:.3f}" for k in KEYS[:1])
            + " | "
            + " | ".join(f"{k} {ratios[k]:.3f}" for k in KEYS)
            + f" | passes tdpo {s['tdpo']['passes']} trl {s['trl']['passes']}"
            + f" | load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    summary = {}
    for k in KEYS:
        values = sorted(r["ratios"][k] for r in rounds)
        summary[k] = {"median": statistics.median(values), "min": values[0], "max": values[-1]}
    for side in ("tdpo", "trl"):
        for k in (*KEYS, "peak_rss_mib"):
            summary[f"{side}_{k}"] = statistics.median(r["summary"][side][k] for r in rounds)
    lines = [
        f"tdpo/TRL over {args.rounds} alternating rounds ({args.epochs} timed epochs each, "
        f"after {args.warmup} warm-up): median (range)"
    ]
    for k in KEYS:
        v = summary[k]
        lines.append(
            f"  {k:<15} {v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})   "
            f"tdpo {summary['tdpo_' + k]:.3f}  trl {summary['trl_' + k]:.3f}"
        )
    lines.append(
        f"  peak RSS MiB    tdpo {summary['tdpo_peak_rss_mib']:.0f}  "
        f"trl {summary['trl_peak_rss_mib']:.0f}"
    )
    lines.append(
        f"  UNet passes per epoch (sampling, training): tdpo {rounds[0]['summary']['tdpo']['passes']}"
        f", trl {rounds[0]['summary']['trl']['passes']}; rows tdpo "
        f"{rounds[0]['summary']['tdpo']['rows']}, trl {rounds[0]['summary']['trl']['rows']}"
    )
    lines.append(
        f"  started {started}, load average before {load_before[0]:.1f}, after "
        f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)"
    )
    print("\n".join(lines), flush=True)
    if args.out:
        data = {
            "started": started,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "settings": vars(args),
            "summary": summary,
            "rounds": rounds,
        }
        Path(args.out).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
