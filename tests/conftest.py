"""Fixtures only: tiny models built from configs once per session (no download), and a trainer
factory on them. Shared helpers that are not fixtures live in ``tests/fixtures/``; no test
module imports this file or another test module."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # robust when the 2 cores are shared (see docs/performance.md)
# Helpers in tests/fixtures assert too: show their failures with pytest's introspection.
pytest.register_assert_rewrite("tests.fixtures")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    from tdpo.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipeline"
    build_tiny_pipeline(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny ``StableDiffusion3Pipeline`` folder without T5 (``tdpo.tiny``)."""
    from tdpo.tiny import build_tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    build_tiny_sd3_pipeline(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from tdpo.tiny import build_tiny_clip

    path = tmp_path_factory.mktemp("tiny") / "clip"
    build_tiny_clip(path)
    return path


@pytest.fixture()
def one_thread():
    """torch on one thread during the test, whatever an earlier test left; the count it found
    is put back afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def make_trainer(tiny_pipeline_dir, tiny_clip_dir, tmp_path):
    """``make_trainer(preset="tdpo-r", *, run_dir=tmp_path / "run", pipeline_dir=the tiny
    pipeline, log=silent, **overrides)``: a Trainer on the tiny config
    (``tests.fixtures.factories.tiny_overrides``) with ``overrides`` applied."""
    from tests.fixtures.factories import build_trainer

    def make(preset="tdpo-r", *, run_dir=None, pipeline_dir=None, log=None, **overrides):
        return build_trainer(
            pipeline_dir or tiny_pipeline_dir,
            tiny_clip_dir,
            run_dir or tmp_path / "run",
            preset,
            log,
            **overrides,
        )

    return make
