"""Reward specs: the one parser of ``reward.name``-style strings (no torch, imports nothing).

A spec is a registered name (``pickscore``), a user factory ``package.module:factory``, or a
weighted sum of those, ``"pickscore:1.0,aesthetic:0.5"``. An item is ``name`` or
``name:weight``; a user factory also contains a colon, so an item is weighted only when the text
after its *last* colon parses as a float (``pkg.mod:factory:0.5`` is that factory with weight
0.5).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys

from tdpo.errors import UsageError


def parse_reward_spec(spec: str, field: str = "reward.name") -> list[tuple[str, float]]:
    """``"a:1.0,b:0.5,c"`` -> ``[("a", 1.0), ("b", 0.5), ("c", 1.0)]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(
            field, spec, "give a reward name, or weighted terms like 'pickscore:1.0,aesthetic:0.5'"
        )
    terms: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise UsageError(field, spec, "empty term; separate terms with single commas")
        name, weight = item, 1.0
        if ":" in item:
            head, tail = item.rsplit(":", 1)
            try:
                weight = float(tail)
            except ValueError:
                pass  # a dotted path package.module:factory
            else:
                name = head.strip()
                if not name:
                    raise UsageError(field, spec, f"term {item!r} has a weight but no name")
                if not math.isfinite(weight):
                    raise UsageError(field, spec, f"weight of {name!r} must be a finite number")
        terms.append((name, weight))
    return terms


def is_dotted_path(name: str) -> bool:
    """Whether ``name`` is a user factory ``package.module:factory``."""
    return ":" in name and "." in name.split(":", 1)[0]


def is_weighted(spec: str, field: str = "reward.name") -> bool:
    """Whether ``spec`` is a weighted sum rather than one plain term (name or dotted path)."""
    return "," in spec or parse_reward_spec(spec, field) != [(spec, 1.0)]


def find_module(name: str):
    """The import spec of module ``name`` without importing anything: not even its parent
    packages, whose ``__init__`` would run (``importlib.util.find_spec`` imports them). None if
    it cannot be found on ``sys.path``. A package that extends its ``__path__`` at import time
    (``pkgutil.extend_path``) is searched on its directory only."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    if name in sys.modules:  # imported already (also aliases such as os.path)
        return getattr(sys.modules[name], "__spec__", None) or sys.modules[name]
    spec = None
    for i in range(len(parts)):
        prefix = ".".join(parts[: i + 1])
        module = sys.modules.get(prefix)
        if module is not None:
            spec = getattr(module, "__spec__", None)
            path = getattr(module, "__path__", None)
            if i == len(parts) - 1:
                return spec or module
            if path is None:
                return None
            search = list(path)
        elif i == 0:
            spec = importlib.machinery.PathFinder.find_spec(prefix)
            if spec is None:
                spec = importlib.util.find_spec(prefix)  # built-in and frozen top-level modules
        else:
            spec = importlib.machinery.PathFinder.find_spec(prefix, search)
        if spec is None:
            return None
        if i < len(parts) - 1 and module is None:
            if spec.submodule_search_locations is None:
                return None  # a module, not a package: it has no submodules
            search = list(spec.submodule_search_locations)
    return spec


def check_factory_modules(spec: str, field: str = "reward.name") -> None:
    """Raise a UsageError when a ``package.module:factory`` term names a module that cannot be
    found. Nothing is imported (no package's ``__init__`` runs) until the reward is built,
    which imports and runs the module; blank specs are left to
    :func:`tdpo.rewards.check_reward_name`."""
    if not isinstance(spec, str) or not spec.strip():
        return
    for name, _ in parse_reward_spec(spec, field):
        if not is_dotted_path(name):
            continue
        module = name.split(":", 1)[0]
        try:
            found = find_module(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise UsageError(
                field, spec, f"cannot find the module {module}; check the package.module:callable"
            )
