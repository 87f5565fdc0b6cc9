"""Plug-ins: modules that register prompt sets and rewards by name when they are imported.

The registries (:mod:`tdpo.prompts`, :mod:`tdpo.rewards`) call :func:`load_plugins` before they
look a name up or list the names; a plug-in imports the registries and registers with
:func:`tdpo.prompts.register_prompt_set` and :func:`tdpo.rewards.register_reward`. So the
registries know plug-ins only by the module names below and never import them statically: the
dependency goes one way, plug-in -> registry.

A listed module that is not installed is skipped; an error raised while importing one that
exists propagates. Importing a plug-in should stay cheap (no torch, no weights): its factories
and loaders import what they need when called.
"""

from __future__ import annotations

import importlib

PLUGINS: tuple[str, ...] = ("tdpo.world.plugin",)


def load_plugins() -> None:
    """Import every module of :data:`PLUGINS` (a no-op for those already imported)."""
    for module in PLUGINS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            # Only the plug-in module itself (or a package above it) may be absent; a broken
            # import inside it must surface.
            if error.name is None or not (module + ".").startswith(error.name + "."):
                raise
