"""What the command lines of eval/ and bench/ share: `run(main)` in place of absl's app.run.

Asking for help (--help, --helpshort, --helpfull, -?) prints it and exits 0 (absl: 1). The
errors a program expects (bad input: a missing file, a damaged run directory, a refused
configuration) end it with one line on stderr, `error: <message>`, and exit status 2;
--verbose prints the traceback before it.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

HELP_FLAGS = frozenset({"help", "helpshort", "helpfull", "helpxml", "?"})
ERROR_EXIT = 2


def asks_for_help(argv: Sequence[str]) -> bool:
    """Whether the command line holds a help flag (before a "--")."""
    for arg in argv[1:]:
        if arg == "--":
            return False
        if arg.startswith("-"):
            name, _, value = arg.lstrip("-").partition("=")
            if name in HELP_FLAGS and value.lower() not in ("false", "0"):
                return True
    return False


def one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or repr(e)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Bad input to an evaluation, not bugs: the message says what to fix (no traceback
    without --verbose)."""
    from safetensors import SafetensorError

    from eval.runner import TooManyErrors

    # ValueError covers DatasetError, CheckpointError and eval.records' refusals.
    return (ValueError, OSError, SafetensorError, TooManyErrors)


def checked(main: Callable[[list[str]], None], errors: tuple[type[BaseException], ...]):
    """main, ending with `error: <one line>` and exit status 2 on any of `errors`."""

    def checked_main(argv):
        try:
            main(argv)
        except errors as e:
            if "verbose" in flags.FLAGS and flags.FLAGS.verbose:
                traceback.print_exc()
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(ERROR_EXIT)

    return checked_main


def run(main: Callable[[list[str]], None], errors: tuple[type[BaseException], ...] = ()) -> None:
    """absl's app.run(main), with help exiting 0 and `errors` reported in one line."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool(
            "verbose", False, "on an error, print its traceback", module_name=sys.argv[0]
        )

    try:
        app.run(checked(main, errors))
    except SystemExit as e:
        if e.code == 1 and asks_for_help(sys.argv):
            sys.exit(0)
        raise
