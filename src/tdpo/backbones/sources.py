"""Where each pretrained model comes from, and how to point it at local copies.

Shared by the backbones and the rewards (``tdpo.rewards.hub``); it lives here, below both.

Every entry has a default (a Hugging Face Hub model id, or a file inside a Hub repository) and
an environment variable that overrides it with another Hub id or a local path. Factories also
take keyword overrides, which win over the environment.

| name | default | environment variable |
|---|---|---|
| clip_l14 | openai/clip-vit-large-patch14 | TDPO_CLIP_L14 |
| aesthetic_mlp | camenduru/improved-aesthetic-predictor / sac+logos+ava1-l14-linearMSE.pth | TDPO_AESTHETIC_MLP |
| pickscore_model | yuvalkirstain/PickScore_v1 | TDPO_PICKSCORE_MODEL |
| pickscore_processor | laion/CLIP-ViT-H-14-laion2B-s32B-b79K | TDPO_PICKSCORE_PROCESSOR |
| hpsv2_checkpoint | xswu/HPSv2 / HPS_v2.1_compressed.pt | TDPO_HPSV2_CHECKPOINT |
| hpsv2_tokenizer | laion/CLIP-ViT-H-14-laion2B-s32B-b79K | TDPO_HPSV2_TOKENIZER |
| imagereward_checkpoint | THUDM/ImageReward / ImageReward.pt | TDPO_IMAGEREWARD_CHECKPOINT |
| imagereward_tokenizer | google-bert/bert-base-uncased | TDPO_IMAGEREWARD_TOKENIZER |
| clipscore_model | openai/clip-vit-large-patch14 | TDPO_CLIPSCORE_MODEL |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tdpo.errors import UsageError


@dataclass(frozen=True)
class Source:
    default: str  # a Hub model id, or a Hub repo id when ``filename`` is set
    env: str
    filename: str | None = None  # a file inside the Hub repo (checkpoints that are single files)


SOURCES: dict[str, Source] = {
    "clip_l14": Source("openai/clip-vit-large-patch14", "TDPO_CLIP_L14"),
    "aesthetic_mlp": Source(
        "camenduru/improved-aesthetic-predictor",
        "TDPO_AESTHETIC_MLP",
        "sac+logos+ava1-l14-linearMSE.pth",
    ),
    "pickscore_model": Source("yuvalkirstain/PickScore_v1", "TDPO_PICKSCORE_MODEL"),
    "pickscore_processor": Source(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "TDPO_PICKSCORE_PROCESSOR"
    ),
    "hpsv2_checkpoint": Source("xswu/HPSv2", "TDPO_HPSV2_CHECKPOINT", "HPS_v2.1_compressed.pt"),
    "hpsv2_tokenizer": Source("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "TDPO_HPSV2_TOKENIZER"),
    "imagereward_checkpoint": Source(
        "THUDM/ImageReward", "TDPO_IMAGEREWARD_CHECKPOINT", "ImageReward.pt"
    ),
    "imagereward_tokenizer": Source("google-bert/bert-base-uncased", "TDPO_IMAGEREWARD_TOKENIZER"),
    "clipscore_model": Source("openai/clip-vit-large-patch14", "TDPO_CLIPSCORE_MODEL"),
}


def resolve(name: str, override: str | None = None) -> str:
    """The model id or path for ``name``: ``override``, else its environment variable, else the
    default. For file sources this is a local path or ``hub:<repo>/<filename>`` (see
    :func:`resolve_file` to get a local file)."""
    source = SOURCES[name]
    if override:
        return os.path.expanduser(str(override))
    value = os.environ.get(source.env, "").strip()
    if value:
        return os.path.expanduser(value)
    if source.filename:
        return f"hub:{source.default}/{source.filename}"
    return source.default


def resolve_file(name: str, override: str | None = None, field: str = "reward.name") -> str:
    """A local path for the single-file source ``name``, downloading it from the Hub (or taking it
    from the local cache) when no local path is given."""
    value = resolve(name, override)
    if value.startswith("hub:"):
        repo_file = value[len("hub:") :]
        repo_id, filename = repo_file.rsplit("/", 1)
        return hub_file(repo_id, filename, field, SOURCES[name].env)
    if not os.path.isfile(value):
        raise UsageError(
            field,
            value,
            f"file not found; set {SOURCES[name].env} to an existing "
            f"{SOURCES[name].filename or 'checkpoint'} file",
        )
    return value


def hub_file(repo_id: str, filename: str, field: str, env: str) -> str:
    """``hf_hub_download`` with a one-line UsageError when it is not cached and cannot be fetched."""
    from huggingface_hub import hf_hub_download  # deferred: an optional extra, heavy to import

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as exc:  # noqa: BLE001 - offline, missing, gated: all the same fix
        why = (
            "the Hub is offline (HF_HUB_OFFLINE=1)"
            if hub_offline()
            else f"download failed ({type(exc).__name__})"
        )
        raise UsageError(
            field,
            f"{repo_id}/{filename}",
            f"not in the local Hugging Face cache and "
            f"{why}; download it, or set {env} to a local copy",
        ) from None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def is_local(spec: str) -> bool:
    """Whether ``spec`` names a local path (it starts with ., / or ~, or exists) and not a Hub id."""
    return spec.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(spec))


def hub_error_fix(spec: str, exc: BaseException) -> str:
    """A one-line fix for a failed ``from_pretrained``/download of ``spec``."""
    if is_local(spec):
        if not os.path.exists(os.path.expanduser(spec)):
            return "the path does not exist; give an existing model folder or a Hub id"
        return (
            f"cannot load a model from this path ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        )
    where = (
        "the Hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "the Hub could not be reached"
    )
    return (
        f"not found in the local Hugging Face cache and {where}; download it first "
        "(huggingface-cli download ...) or give a local folder"
    )
