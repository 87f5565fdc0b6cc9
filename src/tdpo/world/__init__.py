"""The embedded shapes world: a procedural text-to-image world small enough to pre-train and
fine-tune on two CPU cores (see ``docs/shapes_world.md``).

- :mod:`tdpo.world.generator`  attributes -> 32x32 captioned images; seen / unseen prompts
- :mod:`tdpo.world.gold`       analytic gold metrics (alignment, aesthetic, gold)
- :mod:`tdpo.world.models`     model configurations and builders (tokenizer, VAE, UNet, CLIP)
- :mod:`tdpo.world.pretrain`   the staged, resumable pre-training
- :mod:`tdpo.world.rewards`    learned and analytic rewards, registered by name
- :mod:`tdpo.world.cli`        the ``tdpo world pretrain | evaluate`` commands

Importing this package is cheap: it registers the prompt sets ``shapes`` (seen prompts, the
training set) and ``shapes_unseen`` and loads no model. The shipped weights are diffusers /
transformers directories under :data:`WEIGHTS_DIR`::

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

# Default sampler settings of the base model (the figures in docs/shapes_world.md use them).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
DEFAULT_ETA = 1.0

from tdpo.world import prompts as _prompts  # noqa: E402,F401  (registers the prompt sets)

__all__ = [
    "CLIP_DIR",
    "DEFAULT_ETA",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "PIPELINE_DIR",
    "REWARDS_DIR",
    "WEIGHTS_DIR",
]
