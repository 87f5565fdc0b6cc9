"""Per-pass work of tdpo against TRL on one LoRA UNet, in one process (item 2 of issue 15).

Both sides' code paths drive the *same* UNet (the shapes world's, with tdpo's LoRA: rank 4 on
to_q/k/v/out.0) on the same inputs, alternating, so the differences are what each side does
around the UNet:

- ``floor_sample``: the bare guided UNet forward (batch 8 doubled for CFG, no grad), x 20, plus
  one VAE decode: the floor of one sampling batch;
- ``tdpo_sample``: ``DiffusionPolicy.sample`` of 8 prompts, 20 DDIM steps with log-probs, with
  ``sample.merge_lora`` (tdpo's default: the LoRA folded into merged weights, so it can go below
  the floor, which runs peft's LoRA layers); ``tdpo_unmerged_sample``: the same without it;
- ``trl_sample``: TRL's ``pipeline_step`` (``DefaultDDPOStableDiffusionPipeline.__call__``) at
  the same settings, with the prompt embeddings encoded as ``DDPOTrainer._generate_samples``
  does;
- ``floor_train``: the bare guided forward + backward (batch 4 doubled for CFG, loss = mean of
  the output);
- ``tdpo_train``: ``policy.step_log_prob`` + ``ppo_clip_loss`` + backward;
- ``trl_train``: ``DDPOTrainer.calculate_loss`` (called on a stand-in holding the same UNet and
  config) + backward.

Run with the peer venv (it imports both trl and tdpo's src/)::

    benchmarks/peer/.venv/bin/python benchmarks/peer/pass_profile.py --rounds 5
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = c.rounds_parser(__doc__, repeats=10, repeats_help="training passes per timing")
    args = parser.parse_args(argv)
    pipe, policy = c.shapes_policy(batch_size=c.SAMPLE_BATCH)
    from trl import DDPOConfig, DDPOTrainer
    from trl.models.modeling_sd_base import pipeline_step, scheduler_step

    from tdpo.algos.losses import ppo_clip_loss
    from tdpo.sampling import sample_noise

    unet = policy.unet  # with tdpo's LoRA; pipe.unet is the same module
    assert pipe.unet is unet
    prompts = c.shapes_prompts()[: c.SAMPLE_BATCH]
    noise = sample_noise(list(range(c.SAMPLE_BATCH)), policy.noise_shape)

    def tdpo_sample():  # sample.merge_lora on (tdpo's default)
        return policy.sample(unet, prompts, noise)

    def tdpo_unmerged_sample():  # sample.merge_lora off: the LoRA layers run as peft's
        policy.sample_cfg.merge_lora = False
        try:
            return policy.sample(unet, prompts, noise)
        finally:
            policy.sample_cfg.merge_lora = True

    ids = pipe.tokenizer(
        prompts,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
    ).input_ids
    neg_ids = pipe.tokenizer(
        [""], return_tensors="pt", padding="max_length", max_length=pipe.tokenizer.model_max_length
    ).input_ids
    with torch.no_grad():
        neg = pipe.text_encoder(neg_ids)[0].repeat(c.SAMPLE_BATCH, 1, 1)

    def trl_sample():
        with torch.no_grad():
            embeds = pipe.text_encoder(ids)[0]
        return pipeline_step(
            pipe,
            prompt_embeds=embeds,
            negative_prompt_embeds=neg,
            num_inference_steps=c.STEPS,
            guidance_scale=c.GUIDANCE,
            eta=c.ETA,
            output_type="pt",
        )

    traj = tdpo_sample()
    pos = traj.prompt_embeds
    lat0 = traj.latents[:, 3].clone()

    @torch.no_grad()
    def floor_sample():
        x = torch.cat([lat0, lat0])
        t = traj.timesteps[:, 3].repeat(2)
        cond = torch.cat([neg, pos])
        for _ in range(c.STEPS):
            unet(x, t, cond)
        return policy.decode(lat0)

    rows = torch.arange(c.TRAIN_BATCH)
    k = torch.full((c.TRAIN_BATCH,), 3)
    lat, nxt = traj.latents[rows, k], traj.latents[rows, k + 1]
    ts, old = traj.timesteps[rows, k], traj.log_probs[rows, k]
    adv = torch.randn(c.TRAIN_BATCH)
    pos4, neg4 = pos[rows], neg[rows]

    def floor_train():
        for _ in range(args.repeats):
            out = unet(torch.cat([lat, lat]), torch.cat([ts, ts]), torch.cat([neg4, pos4])).sample
            out.mean().backward()

    def tdpo_train():
        for _ in range(args.repeats):
            log_prob = policy.step_log_prob(unet, lat, nxt, ts, pos4, neg4)
            loss, _info = ppo_clip_loss(log_prob, old, adv, c.CLIP_RANGE)
            loss.backward()

    config = DDPOConfig(
        sample_num_steps=c.STEPS,
        sample_eta=c.ETA,
        sample_guidance_scale=c.GUIDANCE,
        train_cfg=True,
        train_clip_range=c.CLIP_RANGE,
        mixed_precision="no",
    )
    stand_in = types.SimpleNamespace(
        config=config,
        autocast=contextlib.nullcontext,
        sd_pipeline=types.SimpleNamespace(
            unet=unet, scheduler_step=lambda *a, **kw: scheduler_step(pipe.scheduler, *a, **kw)
        ),
    )
    stand_in.loss = types.MethodType(DDPOTrainer.loss, stand_in)
    embeds4 = torch.cat([neg4, pos4])

    def trl_train():
        for _ in range(args.repeats):
            loss, _kl, _cf = DDPOTrainer.calculate_loss(stand_in, lat, ts, nxt, old, adv, embeds4)
            loss.backward()

    fns = {
        "floor_sample": floor_sample,
        "tdpo_sample": tdpo_sample,
        "tdpo_unmerged_sample": tdpo_unmerged_sample,
        "trl_sample": trl_sample,
        "floor_train": floor_train,
        "tdpo_train": tdpo_train,
        "trl_train": trl_train,
    }
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
        unet.zero_grad(set_to_none=True)
    passes = {"sample": c.STEPS, "train": args.repeats}
    print(f"per pass, median of {args.rounds} alternating rounds (ms) and ratio to the floor:")
    for phase in ("sample", "train"):
        sides = [n.removesuffix(f"_{phase}") for n in names if n.endswith(f"_{phase}")]
        floor = statistics.median(times[f"floor_{phase}"]) / passes[phase]
        for side in sides:
            ms = statistics.median(times[f"{side}_{phase}"]) / passes[phase]
            print(f"  {phase:<6} {side:<13} {ms * 1e3:7.2f} ms  x{ms / floor:.3f}")
        for side in sides:
            if side.startswith("tdpo"):
                r = [a / b for a, b in zip(times[f"{side}_{phase}"], times[f"trl_{phase}"])]
                print(
                    f"  {phase:<6} {side}/trl {statistics.median(r):.3f} "
                    f"({min(r):.3f}-{max(r):.3f})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
