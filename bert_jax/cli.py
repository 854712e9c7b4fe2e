"""How bert_jax's command-line tools end: one plain message and an exit status.

A usage or input error (a bad flag value, a missing or malformed file, a workdir of another
run) exits 2; a runtime failure (a full disk, a damaged checkpoint with nothing to fall back
on, a diverging run) exits 1. Either prints `error: <what and how to fix it>`, and the
traceback only with `--verbose`. SIGTERM during start-up (before a run has anything to save)
exits 143 with a line that says so. Imports nothing heavy, so that entry points can install
the SIGTERM handler before they import jax.
"""

import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

INPUT_ERRORS = (ValueError, LookupError, OSError)
TERMINATED_STATUS = 128 + signal.SIGTERM
_in_main = False
_terminated = False  # a start-up SIGTERM arrived (its exception may have been swallowed)


class Terminated(BaseException):
    """SIGTERM during start-up. A BaseException, so that no `except Exception` of the code
    it interrupts mistakes it for a failure of what that code was doing."""


def stop_on_sigterm() -> None:
    """Until a run installs its own handler (which saves a checkpoint), SIGTERM stops the
    process with a message instead of the silent default. Child processes that inherit the
    handler (worker pools) die of SIGTERM as by default."""
    owner = os.getpid()

    def handler(signum, frame):
        del frame
        global _terminated
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _terminated = True
        if _in_main:  # unwinds through main's `finally`s (the workdir lock)
            raise Terminated()
        print(f"error: {message(Terminated())}", file=sys.stderr, flush=True)
        os._exit(TERMINATED_STATUS)  # still importing: nothing to unwind

    signal.signal(signal.SIGTERM, handler)


def take_over_sigterm(handler: Callable) -> None:
    """Installs a run's own SIGTERM handler (one that saves). A start-up SIGTERM whose
    exception the interrupted code swallowed (a `__del__`, a callback, an `except
    BaseException` in a library) stops the run here instead of being lost."""
    signal.signal(signal.SIGTERM, handler)
    if _terminated:
        raise Terminated()


def exit_status(error: BaseException) -> int:
    if isinstance(error, Terminated):
        return TERMINATED_STATUS
    # OSErrors of the machine (a full disk) are runtime failures; the others are paths.
    if isinstance(error, OSError) and not isinstance(
        error, FileNotFoundError | FileExistsError | NotADirectoryError | IsADirectoryError
    ):
        return 2 if isinstance(error, PermissionError) else 1
    if isinstance(error, INPUT_ERRORS):
        return 2
    return 1


def message(error: BaseException) -> str:
    if isinstance(error, Terminated):
        text = "stopped by SIGTERM during start-up, before training began; nothing was lost"
        return f"{text} ({error.args[0]})" if error.args else text
    if isinstance(error, OSError) and error.strerror and error.errno is not None:
        text = error.strerror if not error.filename else f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError) is the repr of the key
        text = f"missing key {text}"
    return text


def report(error: BaseException, verbose: bool) -> int:
    """Prints the error (its traceback too when `verbose`); returns the exit status.

    After a start-up SIGTERM every error is the SIGTERM's: code it interrupted (a library
    that wraps what it catches, a half-made object used later) may fail with an error of
    its own, which is named but does not turn the stop into a failure."""
    if _terminated and not isinstance(error, Terminated):
        stopped = Terminated(f"while it stopped: {message(error)}")
        stopped.__cause__ = error
        error = stopped
    if verbose:
        traceback.print_exception(error)
    else:
        hint = "" if isinstance(error, Terminated) else " (--verbose for the traceback)"
        print(f"error: {message(error)}{hint}", file=sys.stderr)
    return exit_status(error)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """Runs an argparse tool's `main(argv)`; `--verbose` anywhere keeps tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        main([a for a in argv if a != "--verbose"])
    except (Exception, Terminated) as e:
        sys.exit(report(e, verbose))


def absl_main(main: Callable[[list[str]], object], verbose: Callable[[], bool]):
    """`main` for `absl.app.run`, reporting errors as `run` does; `verbose()` reads the flag."""

    def wrapped(argv: list[str]) -> None:
        global _in_main
        _in_main = True
        try:
            main(argv)
        except (Exception, Terminated) as e:
            from absl import app  # usage errors keep absl's own report (usage text, exit 1)

            if isinstance(e, app.UsageError):
                raise
            sys.exit(report(e, verbose()))

    return wrapped
