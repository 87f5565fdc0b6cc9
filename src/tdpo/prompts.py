"""Named prompt sets and a seeded, resumable prompt sampler.

Shipped sets are the text files under ``tdpo/assets/prompts`` (one prompt a line; see
``NOTICE.md`` there for provenance). Plug-ins (:mod:`tdpo.plugins`; the shapes world's is
``tdpo.world.plugin``) add sets with :func:`register_prompt_set`; they are loaded the first time
a name is looked up that is not a shipped set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tdpo.errors import UsageError
from tdpo.plugins import load_plugins

_REGISTRY: dict[str, Callable[[], list[str]]] = {}

# The text encoders read 77 tokens; a longer prompt only costs time (tokenizing, captioning the
# sample grids), so a prompt file with a runaway line is refused rather than read.
MAX_PROMPT_CHARS = 2000


def _shipped_dir() -> Path:
    return Path(str(resources.files("tdpo") / "assets" / "prompts"))


def _shipped_sets() -> dict[str, Path]:
    directory = _shipped_dir()
    if not directory.is_dir():
        return {}
    return {p.stem: p for p in sorted(directory.glob("*.txt"))}


def register_prompt_set(name: str, loader: Callable[[], list[str]]) -> None:
    """Register ``loader() -> prompts`` under ``name`` (called lazily, on load)."""
    if not name or "/" in name or name.endswith(".txt"):
        raise ValueError(f"prompt set name {name!r} must be a plain name, not a path")
    if name in _shipped_sets():
        raise ValueError(f"prompt set {name!r} is shipped with tdpo; choose another name")
    _REGISTRY[name] = loader


def available_prompt_sets() -> list[str]:
    """Names of the shipped sets (file stems) and of the registered ones, sorted."""
    load_plugins()
    return sorted(set(_shipped_sets()) | set(_REGISTRY))


def read_prompt_file(path: Path, field: str = "prompts.train") -> list[str]:
    """Read one prompt a line; strip lines, skip blank lines and lines starting with ``#``.
    UsageError for a file that is unreadable, not UTF-8, or has a line over
    :data:`MAX_PROMPT_CHARS` characters."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(field, str(path), f"cannot read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UsageError(
            field, str(path), f"not UTF-8 text (line {line}); save the prompts as UTF-8"
        ) from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            check_prompt(line, field, f"{path}:{number}")
            prompts.append(line)
    return prompts


def check_prompt(prompt: str, field: str, where: str | None = None) -> None:
    """UsageError for a prompt longer than :data:`MAX_PROMPT_CHARS` characters."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UsageError(
            field,
            where or prompt[:40] + "...",
            f"a prompt of {len(prompt)} characters; prompts are at most {MAX_PROMPT_CHARS} "
            "(the text encoder reads the first 77 tokens): shorten it",
        )


def prompt_set_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``["seen=shapes", "unseen.txt"]`` -> [(label, set name or file)]: the label before ``=``,
    else the set's name (a file's stem). Strings only: nothing is read."""
    out = []
    for spec in specs:
        label, _, source = spec.partition("=") if "=" in spec else (None, "", spec)
        source = source or spec
        out.append((label if label is not None else _stem(source), source))
    return out


def _stem(source: str) -> str:
    return source.rsplit("/", 1)[-1].removesuffix(".txt")


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.endswith(".txt") or spec.startswith(("~", "."))


def load_prompts(spec: str | list[str], field: str = "prompts.train") -> list[str]:
    """Resolve a prompt set name, a ``.txt`` path or an inline list to a non-empty list."""
    if isinstance(spec, (list, tuple)):
        prompts = [str(p).strip() for p in spec]
        if not prompts or not all(prompts):
            raise UsageError(field, list(spec), "give at least one prompt, none of them empty")
        for prompt in prompts:
            check_prompt(prompt, field)
        return prompts
    if not isinstance(spec, str):
        raise UsageError(field, spec, "give a prompt set name, a .txt file or a list of prompts")

    shipped = _shipped_sets()
    if spec in shipped:
        prompts = read_prompt_file(shipped[spec], field)
    else:
        load_plugins()
        if spec in _REGISTRY:
            prompts = [str(p) for p in _REGISTRY[spec]()]
        elif _looks_like_path(spec) or Path(spec).expanduser().is_file():
            path = Path(spec).expanduser()
            if not path.is_file():
                raise UsageError(
                    field,
                    spec,
                    "no such prompt file; give an existing .txt file "
                    f"or one of the sets {', '.join(available_prompt_sets())}",
                )
            prompts = read_prompt_file(path, field)
        else:
            raise UsageError(
                field,
                spec,
                "unknown prompt set; choose one of "
                f"{', '.join(available_prompt_sets())}, or give a .txt file path",
            )
    if not prompts:
        raise UsageError(
            field,
            spec,
            "the prompt set is empty; give a file with at least one non-blank, non-comment line",
        )
    return prompts


def _prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


class PromptSampler:
    """Draw prompts uniformly with replacement from a fixed list, reproducibly across resumes."""

    def __init__(self, prompts: list[str], seed: int):
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        self.prompts = list(prompts)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self, n: int) -> list[str]:
        """``n`` prompts drawn uniformly with replacement."""
        indices = self._rng.integers(0, len(self.prompts), size=n)
        return [self.prompts[i] for i in indices.tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Generator state and a digest of the prompt list, as plain JSON-able Python types."""
        return {
            "bit_generator": _plain(self._rng.bit_generator.state),
            "num_prompts": len(self.prompts),
            "prompts_sha256": _prompts_digest(self.prompts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the prompt list must be the same."""
        digest = _prompts_digest(self.prompts)
        if state.get("prompts_sha256") not in (None, digest):
            raise ValueError(
                f"the saved prompt sampler drew from another prompt list "
                f"({state.get('num_prompts')} prompts, digest {state.get('prompts_sha256')}) "
                f"than this one ({len(self.prompts)} prompts, digest {digest})"
            )
        self._rng.bit_generator.state = state["bit_generator"]


def _plain(value: Any) -> Any:
    """Convert numpy scalars inside nested dicts/lists to Python types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
