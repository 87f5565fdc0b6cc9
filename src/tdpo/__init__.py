"""tdpo: temporal diffusion policy optimization (TDPO, TDPO-R) for text-to-image diffusion models.

The library in brief (``help(tdpo.run)``, ``help(tdpo.config)``, ``help(tdpo.results)``)::

    import tdpo
    config = tdpo.build_config(preset=["tdpo-r"], overrides={"train.epochs": 4})
    code = tdpo.train(config, "runs/x")        # a run folder; 0 when done
    tdpo.train(tdpo.resume_config("runs/x"), "runs/x", resume=True)

    pipe = tdpo.load_trained_pipeline("runs/x")   # the run's diffusers pipeline + its LoRA
    image = pipe("a small red circle on a white background",
                 **tdpo.sampler_settings("runs/x")).images[0]

The default run's model, ``model.pretrained: shapes-world``, is the pipeline folder shipped in the
package, :data:`tdpo.world.PIPELINE_DIR` (a ``StableDiffusionPipeline``). ``tdpo report RUN``
(:mod:`tdpo.report`) writes a run's HTML report; its verdict ("did training help, did it
over-optimize?") is :func:`tdpo.verdict.judge`.

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
    "load_trained_pipeline": "tdpo.results",
    "sampler_settings": "tdpo.results",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tdpo' has no attribute {name!r}")
