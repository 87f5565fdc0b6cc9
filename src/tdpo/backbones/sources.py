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

Without the Hub (HF_HUB_OFFLINE=1, or its endpoint not answering one HEAD request), a run checks
before anything loads that every Hub model it needs is cached (:func:`check_available`), and
loads read the local cache only (:func:`cache_only_unless_reachable`): a missing file fails at
once, naming the user's value, the file and the variable to set, not after huggingface_hub's
retries.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tdpo.errors import UsageError


@dataclass(frozen=True)
class Source:
    default: str  # a Hub model id, or a Hub repo id when ``filename`` is set
    env: str
    filename: str | None = None  # a file inside the Hub repo (checkpoints that are single files)
    probe: str = "config.json"  # the first file a load reads (for the offline check)


_TOKENIZER = "tokenizer_config.json"
SOURCES: dict[str, Source] = {
    "clip_l14": Source("openai/clip-vit-large-patch14", "TDPO_CLIP_L14"),
    "aesthetic_mlp": Source(
        "camenduru/improved-aesthetic-predictor",
        "TDPO_AESTHETIC_MLP",
        "sac+logos+ava1-l14-linearMSE.pth",
    ),
    "pickscore_model": Source("yuvalkirstain/PickScore_v1", "TDPO_PICKSCORE_MODEL"),
    "pickscore_processor": Source(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "TDPO_PICKSCORE_PROCESSOR", probe=_TOKENIZER
    ),
    "hpsv2_checkpoint": Source("xswu/HPSv2", "TDPO_HPSV2_CHECKPOINT", "HPS_v2.1_compressed.pt"),
    "hpsv2_tokenizer": Source(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "TDPO_HPSV2_TOKENIZER", probe=_TOKENIZER
    ),
    "imagereward_checkpoint": Source(
        "THUDM/ImageReward", "TDPO_IMAGEREWARD_CHECKPOINT", "ImageReward.pt"
    ),
    "imagereward_tokenizer": Source(
        "google-bert/bert-base-uncased", "TDPO_IMAGEREWARD_TOKENIZER", probe=_TOKENIZER
    ),
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
        with cache_only_unless_reachable():
            return hf_hub_download(repo_id, filename)
    except Exception as exc:  # noqa: BLE001 - offline, missing, gated: all the same fix
        why = (
            _why_unreachable()
            if not hub_reachable()
            else f"the download failed ({type(exc).__name__})"
        )
        raise UsageError(
            field,
            f"{repo_id}/{filename}",
            f"not in the local Hugging Face cache and "
            f"{why}; download it, or set {env} to a local copy",
        ) from None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "0"
    return value.lower() in ("1", "true", "yes", "on")


PROBE_SECONDS = 5.0  # one HEAD request to the Hub's endpoint, no retries
_PROBES: dict[str, tuple[float, bool]] = {}  # endpoint -> (time, reachable), kept a minute


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable() -> bool:
    """Whether the Hub can be used: not HF_HUB_OFFLINE, and one HEAD request to its endpoint
    (through huggingface_hub's session: proxies and HF_ENDPOINT apply) answers within
    :data:`PROBE_SECONDS`. The answer is kept for a minute."""
    if hub_offline():
        return False
    endpoint = hub_endpoint()
    known = _PROBES.get(endpoint)
    if known is not None and time.monotonic() - known[0] < 60:
        return known[1]
    from huggingface_hub.utils import get_session  # deferred: heavy to import

    try:
        get_session().head(endpoint, timeout=PROBE_SECONDS)
        reachable = True
    except Exception:  # noqa: BLE001 - DNS, connection, proxy, TLS: all "cannot be reached"
        reachable = False
    _PROBES[endpoint] = (time.monotonic(), reachable)
    return reachable


@contextlib.contextmanager
def cache_only_unless_reachable() -> Iterator[bool]:
    """Within: when the Hub cannot be reached (:func:`hub_reachable`), huggingface_hub, and so
    transformers and diffusers, read the local cache only, so that a missing file fails at once
    (and a cached one loads at once) instead of after huggingface_hub's retries (five, about
    30 s; without end against an endpoint that accepts and never answers). Yields whether it
    does: pass it on as ``from_pretrained(..., local_files_only=...)``."""
    if hub_reachable():
        yield False
        return
    from huggingface_hub import constants  # deferred: heavy to import

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True  # read at each call (is_offline_mode)
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_access(*specs: str) -> contextlib.AbstractContextManager[bool]:
    """Around the loads of ``specs`` (Hub ids, ``hub:<repo>/<file>`` or local paths):
    :func:`cache_only_unless_reachable` when one of them is on the Hub; nothing (no probe of the
    Hub) when all are local. Yields ``local_files_only``."""
    if all(is_local(spec) for spec in specs):
        return contextlib.nullcontext(False)
    return cache_only_unless_reachable()


def _why_unreachable() -> str:
    if hub_offline():
        return "the Hub is offline (HF_HUB_OFFLINE=1)"
    return f"the Hub ({hub_endpoint()}) cannot be reached"


def hub_cached(repo_id: str, filename: str, revision: str | None = None) -> bool:
    """``repo_id/filename`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache  # deferred: heavy to import

    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)


def check_available(name: str, field: str, value: object) -> None:
    """Before anything loads: the source ``name`` (:data:`SOURCES`) is a local path that exists,
    or a Hub id that is reachable or cached (its first file). UsageError naming ``field`` and
    the user's ``value`` (e.g. ``reward.name='aesthetic'``), the file missing and the variable
    to set."""
    source = SOURCES[name]
    spec = resolve(name)
    if spec.startswith("hub:"):
        repo_id, filename = spec[len("hub:") :].rsplit("/", 1)
    elif is_local(spec):
        if not os.path.exists(os.path.expanduser(spec)):
            raise UsageError(
                field,
                value,
                f"needs {spec} ({source.env}), which does not exist; set {source.env} to an "
                f"existing {source.filename or 'model folder'} or unset it (the Hub's copy)",
            )
        return
    else:
        repo_id, filename = spec, source.probe
    if hub_reachable() or hub_cached(repo_id, filename):
        return
    download = f"hf download {repo_id}" + (f" {filename}" if source.filename else "")
    online = "unset HF_HUB_OFFLINE and run" if hub_offline() else "run where the Hub is reachable"
    raise UsageError(
        field,
        value,
        f"needs {repo_id}/{filename}, which is not in the local Hugging Face cache, and "
        f"{_why_unreachable()}: {online} `{download}` once, or set {source.env} to a local copy",
    )


def check_pipeline_available(spec: str, revision: str | None, field: str) -> None:
    """The offline check of a Hub pipeline id (a folder is checked by tdpo.paths): reachable,
    or its model_index.json cached; UsageError otherwise, before anything loads."""
    if is_local(spec) or spec.count("/") != 1 or hub_reachable():
        return
    if hub_cached(spec, "model_index.json", revision):
        return
    online = "unset HF_HUB_OFFLINE and run" if hub_offline() else "run where the Hub is reachable"
    raise UsageError(
        field,
        spec,
        f"cannot load the pipeline: {spec}/model_index.json is not in the local Hugging Face "
        "cache, and "
        f"{_why_unreachable()}: {online} `hf download {spec}` once, or give a "
        "local pipeline folder",
    )


@dataclass(frozen=True)
class Backbone:
    """A named ``critic.backbone`` spec: the sources (:data:`SOURCES`) it loads."""

    model: str  # the image tower: a transformers CLIP model, or an open_clip checkpoint file
    processor: str | None = None  # its image processor, when it is not the model's own
    open_clip_arch: str | None = None  # set when ``model`` is an open_clip checkpoint

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.model,) + ((self.processor,) if self.processor else ())


_CLIP_L14 = Backbone("clip_l14")
_PICKSCORE = Backbone("pickscore_model", processor="pickscore_processor")
_HPSV2 = Backbone("hpsv2_checkpoint", open_clip_arch="ViT-H-14")
# critic.backbone's named specs (lower case), the one list for tdpo.backbones.load_image_embedder
# and the offline check (check_backbone_available).
BACKBONES: dict[str, Backbone] = {
    "clip": _CLIP_L14,
    "clip-vit-l-14": _CLIP_L14,
    "clip_vit_l14": _CLIP_L14,
    "aesthetic": _CLIP_L14,
    "pickscore": _PICKSCORE,
    "hpsv2": _HPSV2,
    "hpsv2.1": _HPSV2,
    "hps": _HPSV2,
}


def check_backbone_available(spec: str, field: str = "critic.backbone") -> None:
    """The offline check of a critic backbone spec (``clip``, ``pickscore``, ``hpsv2``, a Hub id
    or ``hf:<id>``): its models reachable or cached, as :func:`check_available`; a local folder
    or an ``open_clip:`` checkpoint file is checked when it loads. UsageError naming ``field``
    and ``spec``, before anything loads."""
    if not isinstance(spec, str) or not spec.strip():
        return  # the loader's own error names the accepted specs
    key = spec.strip().lower()
    if key in BACKBONES:
        for name in BACKBONES[key].sources:
            check_available(name, field, spec)
        return
    if key.startswith("open_clip:"):
        return
    repo_id = spec.strip()[3:] if key.startswith("hf:") else spec.strip()
    if is_local(repo_id) or repo_id.count("/") != 1 or hub_reachable():
        return
    if hub_cached(repo_id, "config.json"):
        return
    online = "unset HF_HUB_OFFLINE and run" if hub_offline() else "run where the Hub is reachable"
    raise UsageError(
        field,
        spec,
        f"needs {repo_id}/config.json, which is not in the local Hugging Face cache, and "
        f"{_why_unreachable()}: {online} `hf download {repo_id}` once, or give a local CLIP "
        "model folder",
    )


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
    where = _why_unreachable() if not hub_reachable() else "it could not be downloaded"
    return (
        f"not found in the local Hugging Face cache and {where}; download it first "
        "(hf download ...) or give a local folder"
    )
