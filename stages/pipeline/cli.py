"""Entry points: a user's mistake is one line on stderr, a bug keeps its traceback.

Every stage and tool ends with ``cli.run(main, __doc__)``. A :class:`UserError` (a bad param, a
missing or corrupt input, an unmet budget: something the user must fix) is printed as
``<command>: <message>`` and exits with status 1. Ctrl-C prints one line and exits with 130 (every
output is written atomically: none is left half-written). Any other exception is a
bug in this project and propagates with its full traceback. ``PIPELINE_TRACEBACK=1`` shows the
traceback of user errors and interruptions too. ``--help`` prints the module docstring: what the
command reads and writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

TRACEBACK_VARIABLE = "PIPELINE_TRACEBACK"


class UserError(Exception):
    """Something the user must fix (params, inputs, budgets); the message says what and how."""


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help shows ``doc`` as written (the module docstring)."""
    return argparse.ArgumentParser(
        prog=f"python -m {_module_name()}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def interrupted_message(command: str) -> str:
    return (
        f"{command}: interrupted; no output is half-written (each is the last good run's, or "
        f"complete), and `dvc repro` runs this stage again"
    )


def one_line_interrupts() -> None:
    """Make a Ctrl-C that arrives before :func:`run` starts (while torch and ultralytics are
    imported, which takes seconds) one line too, for the stages' and tools' entry points."""
    argv = getattr(sys, "orig_argv", [])  # the spec of __main__ is not set yet at import time
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    if not module.startswith("stages.") or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(interrupted_message(module.rsplit(".", 1)[-1]), file=sys.stderr)
        else:
            previous(kind, value, tb)

    sys.excepthook = hook


@contextmanager
def user_errors_as_messages(command: str) -> Iterator[None]:
    """Turn a :class:`UserError` into ``command: message`` on stderr and exit status 1, and
    Ctrl-C into one line and exit status 130."""
    tracebacks = os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0")
    try:
        yield
    except UserError as err:
        if tracebacks:
            raise
        print(f"{command}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if tracebacks:
            raise
        print(interrupted_message(command), file=sys.stderr)
        sys.exit(INTERRUPTED)


def run(main: Callable[..., object], doc: str | None = None) -> None:
    """Run an entry point. With ``doc`` (a stage, which takes no options) the command line is
    parsed here, so that ``--help`` works; a tool's ``main`` parses its own arguments."""
    module = _module_name()
    if doc is not None:
        parser(doc).parse_args()
    with user_errors_as_messages(module.rsplit(".", 1)[-1]):
        main()


def _module_name() -> str:
    """``stages.prune`` for ``python -m stages.prune`` (or the script's name otherwise)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]
