"""The training algorithms, one registry keyed by ``train.algorithm``.

Each entry names the class that implements the algorithm (a :class:`tdpo.methods.base.Method`);
it is imported only when asked for, so that validating a config or printing ``--help`` loads no
model code. Adding an algorithm = its own module (or class in a family's module) + one line here.
"""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "tdpo": "tdpo.methods.ppo:TDPO",  # TDPO, and TDPO-R with reset.enabled
    "ddpo": "tdpo.methods.ppo:DDPO",
    "grpo": "tdpo.methods.ppo:GRPO",
    "alignprop": "tdpo.methods.alignprop:AlignProp",
}
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)


def get_method(name: str) -> type:
    """The class (a ``tdpo.methods.base.Method``) of algorithm ``name``, a key of REGISTRY."""
    module, _, attr = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attr)
