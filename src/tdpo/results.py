"""A trained run as a diffusers pipeline: ``tdpo.load_trained_pipeline(run_dir)``.

::

    import tdpo
    pipe = tdpo.load_trained_pipeline("runs/<name>")          # the run's model + final/ LoRA
    images = pipe("a small red circle on a white background",
                  **tdpo.sampler_settings("runs/<name>")).images

The run's ``config.yaml`` names its model (``model.pretrained``; ``shapes-world`` is the shipped
pipeline folder, :data:`tdpo.world.PIPELINE_DIR`) and its sampler (DDIM steps, guidance, eta).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tdpo.errors import UsageError
from tdpo.run import resume_config
from tdpo.rundir import BEST_DIR, CONFIG_FILE, FINAL_DIR

LORA_FILE = "pytorch_lora_weights.safetensors"


def _run_and_weights(run: str | Path, weights: str) -> tuple[Path, Path]:
    """(run folder, weights folder) from a run folder or its final/ or best/ folder."""
    run = Path(run).expanduser()
    if not (run / CONFIG_FILE).is_file() and (run.parent / CONFIG_FILE).is_file():
        return run.parent, run
    if weights not in (FINAL_DIR, BEST_DIR):
        raise UsageError("weights", weights, f"give {FINAL_DIR!r} or {BEST_DIR!r}")
    return run, run / weights


def sampler_settings(run: str | Path) -> dict[str, Any]:
    """The run's sampler as ``pipe(...)`` keywords: ``num_inference_steps``, ``guidance_scale``,
    ``eta`` (the pipeline's scheduler is DDIM, as in training)."""
    run_dir, _ = _run_and_weights(run, FINAL_DIR)
    s = resume_config(run_dir).sample
    return {"num_inference_steps": s.num_steps, "guidance_scale": s.guidance_scale, "eta": s.eta}


def load_trained_pipeline(run: str | Path, weights: str = FINAL_DIR, dtype=None):
    """The run's diffusers pipeline (``model.pretrained`` of its config.yaml, DDIM scheduler)
    with its trained weights loaded: the LoRA of ``final/`` (or ``best/``), or the fully
    fine-tuned UNet. ``run`` is a run folder or its ``final/`` / ``best/`` folder; ``dtype`` a
    torch dtype (default float32). Move it with ``pipe.to("cuda")``."""
    import torch  # deferred: `import tdpo` stays light

    run_dir, folder = _run_and_weights(run, weights)
    config = resume_config(run_dir)
    from tdpo.policy import load_pipeline  # deferred: diffusers

    if not folder.is_dir():
        raise UsageError("run", str(folder), "no such folder; has the run finished?")
    pipe = load_pipeline(config.model.pretrained, config.model.revision, dtype or torch.float32)
    if (folder / LORA_FILE).is_file():
        pipe.load_lora_weights(str(folder))
    elif (folder / "unet" / "config.json").is_file():
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=pipe.unet.dtype)
        pipe.unet = unet
    else:
        raise UsageError(
            "run", str(folder), f"holds neither {LORA_FILE} nor unet/; give a run's final/ or best/"
        )
    return pipe
