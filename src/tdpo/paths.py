"""Model specs: aliases of the shipped shapes world and the cheap, torch-free check of a local
pipeline folder (the CLI runs it before importing torch)."""

from __future__ import annotations

from pathlib import Path

from tdpo.errors import UsageError
from tdpo.world import CLIP_DIR, FLOW_PIPELINE_DIR, PIPELINE_DIR


def resolve_alias(spec: str) -> str:
    """Names of the shipped shapes world: ``shapes-world`` (the pipeline folder),
    ``shapes-flow`` (the flow world's ``StableDiffusion3Pipeline`` folder) and ``shapes-clip``
    (its tiny CLIP); anything else is returned unchanged."""
    aliases = {
        "shapes-world": PIPELINE_DIR,
        "shapes-flow": FLOW_PIPELINE_DIR,
        "shapes-clip": CLIP_DIR,
    }
    return str(aliases[spec]) if spec in aliases else spec


def looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).exists() or spec.count("/") > 1


def check_pipeline_path(spec: str, field: str = "model.pretrained") -> None:
    """Fail early (before any load) on a local path that is not a saved diffusers pipeline;
    Hub ids are checked when they load."""
    spec = resolve_alias(spec)
    if not looks_like_path(spec):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(field, spec, "no such folder; give a Hub id or a pipeline folder")
    if not (path / "model_index.json").is_file():
        raise UsageError(
            field,
            spec,
            "not a diffusers pipeline folder (no model_index.json); "
            "save one with pipe.save_pretrained(DIR)",
        )
