"""The embedded shapes world: a procedural text-to-image world small enough to pre-train and
fine-tune on two CPU cores (see ``docs/shapes_world.md``).

- :mod:`tdpo.world.generator`  attributes -> 32x32 captioned images; seen / unseen prompts
- :mod:`tdpo.world.gold`       analytic gold metrics (alignment, aesthetic, gold)
- :mod:`tdpo.world.models`     model configurations and builders (tokenizer, VAE, UNet, CLIP)
- :mod:`tdpo.world.pretrain`   the staged, resumable pre-training
- :mod:`tdpo.world.flow_pretrain`  the flow shapes world (a tiny StableDiffusion3Pipeline)
- :mod:`tdpo.world.rewards`    learned and analytic rewards
- :mod:`tdpo.world.plugin`     registers the prompt sets and the rewards by name (a plug-in,
                               :mod:`tdpo.plugins`)
- :mod:`tdpo.world.cli`        the ``tdpo world pretrain | evaluate`` commands

Importing this package is cheap: it loads no model and imports nothing. The prompt sets
``shapes`` (seen prompts, the training set), ``shapes_unseen`` and ``shapes_all``, and the rewards
:data:`GOLD_REWARDS` and :data:`LEARNED_REWARDS`, are known to :mod:`tdpo.prompts` and
:mod:`tdpo.rewards` through the plug-in. The shipped weights are diffusers / transformers
directories under :data:`WEIGHTS_DIR`::

    from diffusers import StableDiffusionPipeline
    from tdpo.world import PIPELINE_DIR, DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_ETA
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE_DIR)
    images = pipe(["a large red circle on a white background"], num_inference_steps=DEFAULT_STEPS,
                  guidance_scale=DEFAULT_GUIDANCE, eta=DEFAULT_ETA, output_type="pt").images
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR: Path = WEIGHTS_DIR / "pipeline"
CLIP_DIR: Path = WEIGHTS_DIR / "clip"
REWARDS_DIR: Path = WEIGHTS_DIR / "rewards"
# The flow shapes world (docs/shapes_world.md): a StableDiffusion3Pipeline folder, alias shapes-flow.
FLOW_PIPELINE_DIR: Path = WEIGHTS_DIR / "flow"

# Default sampler settings of the base model (the figures in docs/shapes_world.md use them).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
DEFAULT_ETA = 1.0
# ... and of the flow base model: Euler steps, guidance, and the SDE noise level of tdpo's sampler
# (sample.noise_level's default) for the figures of its SDE samples.
DEFAULT_FLOW_STEPS = 20
DEFAULT_FLOW_GUIDANCE = 4.0
DEFAULT_FLOW_NOISE_LEVEL = 0.7

# The world's rewards, by registered name: analytic gold metrics (name -> gold.evaluate key) and
# learned rewards (weights under REWARDS_DIR). See tdpo.world.rewards.
GOLD_REWARDS = {
    "shapes_gold_alignment": "alignment",
    "shapes_gold_aesthetic": "aesthetic",
    "shapes_gold": "gold",
}
LEARNED_REWARDS = ("shapes_aesthetic", "shapes_pickscore", "shapes_hps", "shapes_imagereward")

__all__ = [
    "CLIP_DIR",
    "DEFAULT_ETA",
    "DEFAULT_FLOW_GUIDANCE",
    "DEFAULT_FLOW_NOISE_LEVEL",
    "DEFAULT_FLOW_STEPS",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "FLOW_PIPELINE_DIR",
    "GOLD_REWARDS",
    "LEARNED_REWARDS",
    "PIPELINE_DIR",
    "REWARDS_DIR",
    "WEIGHTS_DIR",
]
