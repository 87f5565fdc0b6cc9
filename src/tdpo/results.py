"""A trained run as a diffusers pipeline: ``tdpo.load_trained_pipeline(run_dir)``.

::

    import tdpo
    pipe = tdpo.load_trained_pipeline("runs/<name>")          # the run's model + final/ LoRA
    images = pipe("a small red circle on a white background",
                  **tdpo.sampler_settings("runs/<name>")).images

The run's ``config.yaml`` names its model (``model.pretrained``; ``shapes-world`` is the shipped
pipeline folder, :data:`tdpo.world.PIPELINE_DIR`) and its sampler (steps, guidance, and DDIM's
eta for SD 1.x/2.x and SDXL; SD3's pipeline samples with its flow-matching Euler ODE, no eta).

:func:`load_weights` is the one loader of a run's trained weights (``final/`` or ``best/``: a
LoRA, or the fully fine-tuned UNet or SD3 transformer), shared with ``tdpo sample`` and
``tdpo eval``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tdpo.errors import UsageError
from tdpo.rundir import BEST_DIR, CONFIG_FILE, FINAL_DIR

LORA_FILE = "pytorch_lora_weights.safetensors"
# A fully fine-tuned denoiser (model.finetune=full), by the pipeline attribute it replaces:
# SD 1.x/2.x and SDXL save final/unet/ (DiffusionPolicy.save_final), SD3 final/transformer/
# (FlowPolicy.save_final).
FULL_DIRS = ("unet", "transformer")


def saved_weights(folder: str | Path) -> str | None:
    """What a run's ``final/`` or ``best/`` holds: ``"lora"`` (:data:`LORA_FILE`), ``"unet"`` or
    ``"transformer"`` (a fully fine-tuned denoiser, a diffusers model folder), or None."""
    folder = Path(folder).expanduser()
    if (folder / LORA_FILE).is_file():
        return "lora"
    for name in FULL_DIRS:
        if (folder / name / "config.json").is_file():
            return name
    return None


def describe_saved(folder: str | Path) -> str:
    """What a run saved, for the closing line: ``LoRA in runs/x/final``, ``fine-tuned UNet in
    runs/x/final/unet``, ``fine-tuned transformer in runs/x/final/transformer``."""
    kind = saved_weights(folder)
    if kind == "lora":
        return f"LoRA in {folder}"
    if kind is None:
        return f"weights in {folder}"
    return f"fine-tuned {'UNet' if kind == 'unet' else kind} in {Path(folder) / kind}"


def check_saved_weights(folder: str | Path, field: str = "run", value: Any = None) -> str:
    """:func:`saved_weights` of ``folder``, or a UsageError naming ``field`` and ``value``
    (default: the folder) when it holds none."""
    kind = saved_weights(folder)
    if kind is None:
        raise UsageError(
            field,
            str(folder) if value is None else value,
            f"holds neither {LORA_FILE} nor unet/ or transformer/ (a fully fine-tuned model); "
            f"give a run folder, or its {FINAL_DIR}/ or {BEST_DIR}/",
        )
    return kind


def load_weights(pipe, folder: str | Path, field: str = "run", value: Any = None) -> None:
    """Load the trained weights of a run's ``final/`` or ``best/`` (or a folder holding a LoRA)
    into ``pipe``: the LoRA (``pipe.load_lora_weights``), or the fully fine-tuned ``unet/`` /
    ``transformer/`` in place of the pipeline's own. A missing, damaged or foreign file is one
    UsageError naming ``field`` and ``value`` (default: the folder)."""
    folder = Path(folder).expanduser()
    value = str(folder) if value is None else value
    kind = check_saved_weights(folder, field, value)
    current = getattr(pipe, kind, None) if kind != "lora" else None
    if kind != "lora" and current is None:
        raise UsageError(
            field,
            value,
            f"holds a fully fine-tuned {kind}/, which a {type(pipe).__name__} has no place for; "
            "give the model the run was trained on (its model.pretrained)",
        )
    try:
        if kind == "lora":
            pipe.load_lora_weights(str(folder))
        else:  # UNet2DConditionModel or SD3Transformer2DModel, as the pipeline's own
            model = type(current).from_pretrained(folder / kind, torch_dtype=current.dtype)
            setattr(pipe, kind, model)
    except Exception as exc:  # a damaged or foreign file: safetensors, peft and diffusers errors
        text = str(exc).strip()
        shown = folder / (LORA_FILE if kind == "lora" else kind)
        first = text.splitlines()[0].replace(str(shown), shown.name) if text else ""
        first = first[:160] or type(exc).__name__
        raise UsageError(
            field,
            value,
            f"cannot load the trained weights in {shown} ({first}); the file is damaged or not "
            "from this model: give the run's other weights (final/ or best/), or train again",
        ) from None


def _run_and_weights(run: str | Path, weights: str) -> tuple[Path, Path]:
    """(run folder, weights folder) from a run folder or its final/ or best/ folder."""
    run = Path(run).expanduser()
    if not (run / CONFIG_FILE).is_file() and (run.parent / CONFIG_FILE).is_file():
        return run.parent, run
    if weights not in (FINAL_DIR, BEST_DIR):
        raise UsageError("weights", weights, f"give {FINAL_DIR!r} or {BEST_DIR!r}")
    return run, run / weights


def _run_config(run_dir: Path):
    """The run's own config (its config.yaml); UsageError naming ``run`` otherwise."""
    from tdpo.config import build_config, load_yaml  # deferred: `import tdpo` stays light

    if not (run_dir / CONFIG_FILE).is_file():
        raise UsageError(
            "run", str(run_dir), f"not a run folder (no {CONFIG_FILE}); give runs/<name>"
        )
    return build_config(base=load_yaml(run_dir / CONFIG_FILE, "run"))


def sampler_settings(run: str | Path) -> dict[str, Any]:
    """The run's sampler as ``pipe(...)`` keywords, those its pipeline takes:
    ``num_inference_steps``, ``guidance_scale``, and ``eta`` for SD 1.x/2.x and SDXL (DDIM, as
    in training); SD3's pipeline samples with its flow-matching Euler ODE and takes no eta.
    Reads the pipeline's ``model_index.json`` (not its weights) for its class."""
    import diffusers  # deferred: `import tdpo` stays light

    from tdpo.policy import pipeline_class
    from tdpo.sampling import pipeline_sampler_kwargs

    run_dir, _ = _run_and_weights(run, FINAL_DIR)
    config = _run_config(run_dir)
    s = config.sample
    cls = getattr(diffusers, pipeline_class(config.model.pretrained, config.model.revision))
    return pipeline_sampler_kwargs(cls, s.num_steps, s.guidance_scale, s.eta)


def load_trained_pipeline(run: str | Path, weights: str = FINAL_DIR, dtype=None):
    """The run's diffusers pipeline (``model.pretrained`` of its config.yaml: DDIM scheduler for
    SD 1.x/2.x and SDXL, flow-matching Euler for SD3) with its trained weights loaded
    (:func:`load_weights`): the LoRA of ``final/`` (or ``best/``), or the fully fine-tuned UNet
    (``unet/``) or SD3 transformer (``transformer/``). ``run`` is a run folder or its
    ``final/`` / ``best/`` folder; ``dtype`` a torch dtype (default float32). Move it with
    ``pipe.to("cuda")``. A missing or damaged file raises one UsageError."""
    import torch  # deferred: `import tdpo` stays light

    run_dir, folder = _run_and_weights(run, weights)
    config = _run_config(run_dir)
    from tdpo.policy import load_pipeline  # deferred: diffusers

    if not folder.is_dir():
        raise UsageError("run", str(folder), "no such folder; has the run finished?")
    check_saved_weights(folder)  # before the pipeline loads
    pipe = load_pipeline(config.model.pretrained, config.model.revision, dtype or torch.float32)
    load_weights(pipe, folder)
    return pipe
