"""The terminal: one flushed log line, and library chatter kept off the user's screen."""

from __future__ import annotations

import os
import warnings


def log_line(message: str) -> None:
    """One line on stdout, flushed (so progress shows when output is redirected to a file)."""
    print(message, flush=True)


def quiet_libraries(load: bool = False) -> None:
    """Keep the terminal for our own progress: silence library chatter and loading bars.

    Without ``load`` only environment variables and warning filters are set (cheap: a bad
    argument is reported before torch or diffusers is imported); with it, the libraries'
    loggers too (call it right before a command loads models)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    # diffusers passes huggingface_hub a deprecated argument: a warning before our error line
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    if not load:
        return
    try:  # the Hub client's retry messages ("Retrying in 8s") when a Hub id cannot be reached
        import huggingface_hub.utils.logging as hlog  # deferred: only right before loading

        hlog.set_verbosity_error()
    except ImportError:
        pass
    try:
        import diffusers.utils.logging as dlog  # deferred: heavy, only right before loading
        import transformers.utils.logging as tlog
    except ImportError:
        return
    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()
