"""What makes the temporal critic generalize: replay its online training offline (issue 11).

Step 1 records, for every epoch of one real run, what TDPO's critic saw: the state features
[N, T, d], the timesteps and the returns G_k (a hook on ``TDPO.set_advantages``)::

    python benchmarks/critic_offline.py collect data.pt --set train.epochs=12 \
        --set eval.every=0 --set reset.enabled=false

Step 2 replays the critic's protocol on those epochs for several critic settings, several seeds
each: value the new epoch with the current head (V_old; its explained variance per quarter of
the steps is what ``critic_ev/q1..q4`` logs), then train the head as the PPO update does (the
same minibatches, clipped value loss, AdamW, gradient clip), optionally on the last K epochs::

    python benchmarks/critic_offline.py replay data.pt

Replaying takes seconds per setting, a real run minutes; the policy is held to the recorded run
(its samples do not react to the critic), which is what makes settings comparable. Measured
figures: docs/results/mechanism.md.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tdpo.algos.advantages import explained_variance
from tdpo.algos.losses import clipped_value_loss
from tdpo.critic import CriticHead

SETTINGS = {  # name -> (head, init, standardize, replay epochs)
    "paper head, no replay": ("linear", "reference", False, 1),
    "paper head, replay 4": ("linear", "reference", False, 4),
    "relu/fan-in/std, no replay": ("relu", "fan_in", True, 1),
    "relu/fan-in/std, replay 4 (default)": ("relu", "fan_in", True, 4),
    "relu/fan-in/std, replay 8": ("relu", "fan_in", True, 8),
}


def collect(out: str, sets: list[str]) -> int:
    import yaml

    import tdpo
    from tdpo.config import build_config
    from tdpo.methods import ppo

    record = []
    original = ppo.TDPO.set_advantages

    def recording(self, batch, traj, global_prompts, finite, local):
        metrics = original(self, batch, traj, global_prompts, finite, local)
        n = len(batch.advantages)
        targets = batch.critic  # this epoch's states are the last n rows
        record.append(
            {
                "features": targets.features[-n:].cpu(),
                "timesteps": targets.timesteps[-n:].cpu(),
                "returns": targets.returns[-n:].cpu(),
                "prompts": list(global_prompts),
                "metrics": metrics,
            }
        )
        torch.save(record, out)
        return metrics

    ppo.TDPO.set_advantages = recording
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)}
    config = build_config(overrides={"train.algorithm": "tdpo", **overrides})
    return tdpo.train(config, None, quiet=True)


def quarter_ev(values: torch.Tensor, returns: torch.Tensor) -> list[float]:
    q = returns.shape[1] // 4
    return [
        explained_variance(
            values[:, i * q : (i + 1) * q].reshape(-1), returns[:, i * q : (i + 1) * q].reshape(-1)
        )
        for i in range(4)
    ]


def replay(epochs, head_kind, init, standardize, keep, seed, lr=1e-3, clip=0.2, batch=16, accum=2):
    """q4 explained variance of V_old on each epoch's fresh states, training as the update does."""
    torch.manual_seed(seed)
    head = CriticHead(
        epochs[0]["features"].shape[-1], head_kind, standardize=standardize, init=init
    )
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    buffer, out = [], []
    for e, epoch in enumerate(epochs):
        x, g = epoch["features"].float(), epoch["returns"].float()
        head.update_statistics(x, None)
        head.eval()
        with torch.no_grad():
            out.append(quarter_ev(head(x), g)[3])
        buffer = (buffer + [(x, g)])[-keep:]
        xs, gs = torch.cat([b[0] for b in buffer]), torch.cat([b[1] for b in buffer])
        with torch.no_grad():
            v_old = head(xs)
        head.train()
        gen = torch.Generator().manual_seed(1000 * seed + e)
        perm = torch.randperm(len(gs), generator=gen)
        order = torch.argsort(torch.rand(len(gs), gs.shape[1], generator=gen), dim=1)
        blocks, passes = len(gs) // batch, (len(g) // batch) * g.shape[1]
        for i in range(passes):  # as many passes as the policy's update: T x minibatches
            j, m = divmod(i, len(g) // batch)
            rows = perm[((j * (len(g) // batch) + m) % blocks) * batch :][:batch]
            k = order[rows, j]
            loss = clipped_value_loss(head(xs[rows, k]), v_old[rows, k], gs[rows, k], clip)
            (loss / accum).backward()
            if (i + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
    return out


def replay_all(path: str, seeds: int) -> int:
    epochs = torch.load(path, weights_only=False)
    logged = " ".join(f"{e['metrics'].get('critic_ev/q4', float('nan')):5.2f}" for e in epochs)
    print(f"{'logged in the run':38s} {logged}")
    for name, (kind, init, standardize, keep) in SETTINGS.items():
        runs = torch.tensor(
            [replay(epochs, kind, init, standardize, keep, s) for s in range(seeds)]
        )
        mean = " ".join(f"{v:5.2f}" for v in runs.mean(0))
        print(f"{name:38s} {mean}  | min over seeds, epochs 2+: {runs[:, 1:].min():.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="run tdpo train and record what the critic saw")
    c.add_argument("out")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("replay", help="critic_ev/q4 per epoch for each critic setting")
    r.add_argument("data")
    r.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "collect":
        return collect(args.out, args.set)
    return replay_all(args.data, args.seeds)


if __name__ == "__main__":
    sys.exit(main())
