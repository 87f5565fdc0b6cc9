"""tdpo: temporal diffusion policy optimization (TDPO, TDPO-R) for text-to-image diffusion models.

The library in brief (``help(tdpo.run)``, ``help(tdpo.config)`` for more)::

    import tdpo
    config = tdpo.build_config(preset=["tdpo-r"], overrides={"train.epochs": 4})
    code = tdpo.train(config)                  # a run under config.output_dir; 0 when done
    tdpo.train(tdpo.resume_config("runs/x"), "runs/x", resume=True)

Algorithms live in ``tdpo.methods`` (one registry keyed by ``train.algorithm``), the math in
``tdpo.algos``, the training lifecycle in ``tdpo.trainers.loop.Trainer``.
"""

import importlib

__version__ = "0.1.0"

# name -> module: imported on first use, so that `import tdpo` (and `tdpo --help`) stays light.
_EXPORTS = {
    "train": "tdpo.run",
    "resume_config": "tdpo.run",
    "build_config": "tdpo.config",
    "Config": "tdpo.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tdpo' has no attribute {name!r}")
