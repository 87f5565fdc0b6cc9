"""The ``tdpo`` command: ``tdpo train | sample | eval | report | sweep | bench | world``.

Each command lives in its own module, which adds its parser and sets ``func``, the function that
runs it. ``main(argv) -> int`` never raises for a user mistake: it prints one line naming the
field, the value and the fix, and returns 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from tdpo.bench import add_bench_parser, run_bench
from tdpo.console import quiet_libraries
from tdpo.errors import StorageError, TrainingError, UsageError, is_disk_full
from tdpo.evalcli import add_eval_parser, run_eval
from tdpo.report import add_report_parser, run_report
from tdpo.samplecli import add_sample_parser
from tdpo.sweep import add_sweep_parser, run_sweep
from tdpo.traincli import add_train_parser
from tdpo.world.cli import add_world_parser, run_world


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(text: str) -> str:
    """``text`` with newlines and other unprintable characters (of a user's argument) escaped,
    so that an error is always one line on the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tdpo",
        description="Fine-tune text-to-image diffusion models against reward models with "
        "TDPO, TDPO-R, DDPO, GRPO or AlignProp (tdpo train --preset tdpo | tdpo-r | ddpo-2 | "
        "ddpo-100 | grpo | alignprop), and measure over-optimization.",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_eval_parser(sub).set_defaults(func=run_eval, loads_models=True)
    add_report_parser(sub).set_defaults(func=run_report)
    add_sweep_parser(sub).set_defaults(func=run_sweep, loads_models=True)
    add_bench_parser(sub).set_defaults(func=run_bench, loads_models=True)
    add_world_parser(sub).set_defaults(func=run_world, loads_models=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        if getattr(args, "loads_models", False):
            quiet_libraries(load=True)
        return args.func(args)
    except UsageError as exc:
        print(f"tdpo: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"tdpo: error: {one_line(exc)}", file=sys.stderr)
        return 3
    except StorageError as exc:
        print(f"tdpo: error: {one_line(exc)}", file=sys.stderr)
        return StorageError.exit_code
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"tdpo: error: no space left on the device{where}; free some space", file=sys.stderr)
        return StorageError.exit_code
    except KeyboardInterrupt:
        print("tdpo: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    code = main(sys.argv[1:])
    if code in (130, 143):
        # Stopped by a signal and the checkpoint is safe: a further Ctrl-C during interpreter
        # shutdown exits at once instead of printing a traceback from an exit hook.
        signal.signal(signal.SIGINT, lambda *_: _exit_now(code))
    sys.exit(code)


def _exit_now(code: int) -> None:
    os.write(sys.stderr.fileno(), b"tdpo: interrupted\n")
    os._exit(code)


if __name__ == "__main__":
    console_main()
