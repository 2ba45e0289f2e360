"""The ``batchpunk`` command: run pipeline files, the demo, and dead-letter tools.

The command line is an extra (typer and rich): this module only checks that they are installed
and hands over to the commands, so that without them ``batchpunk`` prints the pip command to run
instead of a traceback.

Exit codes (the same for every command):

====  ======================================================================================
0     success: the source ended, or a first SIGINT/SIGTERM drained the pipeline and it stopped
1     failure: a connector or the run failed, messages were lost (a source that cannot take
      them back and a dead-letter sink that did not store them), the demo's check did not add
      up, or letters were left after a replay
2     usage error: bad arguments, or a pipeline file that is wrong (the message names the
      section and the key)
3     a missing optional dependency (the message gives the pip command)
130   stopped at once by a second SIGINT/SIGTERM: unfinished messages were nacked; or
      interrupted by SIGINT or SIGTERM before the pipeline started
====  ======================================================================================
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

__all__ = [
    "EXIT_ABORTED",
    "EXIT_FAILED",
    "EXIT_MISSING",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING = 3
EXIT_ABORTED = 130


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script and of ``python -m batchpunk``."""
    _interrupt_on_sigterm()
    try:
        missing = [name for name in ("typer", "rich") if importlib.util.find_spec(name) is None]
        if missing:
            sys.stderr.write(
                f"batchpunk's command line needs {' and '.join(missing)}: "
                "pip install 'batchpunk[cli]'\n"
            )
            raise SystemExit(EXIT_MISSING)
        from batchpunk._cli_app import app

        app(args=list(argv) if argv is not None else None, prog_name="batchpunk")
    except KeyboardInterrupt:  # a signal outside the commands' own handling (start-up, mostly)
        sys.stderr.write(_INTERRUPTED)
        raise SystemExit(EXIT_ABORTED) from None
    except SystemExit as done:
        if _silently_interrupted(done):
            sys.stderr.write(_INTERRUPTED)
        raise
    except Exception as exc:  # the last net: a bug must still be one line, not a traceback
        from batchpunk._redact import env_secrets, redact

        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        sys.stderr.write(f"error: {redact(text, env_secrets())}\n")
        sys.stderr.write(
            "(an unexpected error: please report it; BATCHPUNK_TRACEBACK=1 shows it)\n"
        )
        if os.environ.get("BATCHPUNK_TRACEBACK"):
            raise
        raise SystemExit(EXIT_FAILED) from None


_INTERRUPTED = "interrupted by a signal: stopped at once\n"


def _silently_interrupted(done: SystemExit) -> bool:
    """Whether typer turned a KeyboardInterrupt in a command into exit 130 without a word (it
    raises ``Exit(130) from`` the interrupt); the commands' own exits say what happened."""
    exit_ = done.__context__
    return exit_ is not None and isinstance(exit_.__cause__, KeyboardInterrupt)


def _interrupt_on_sigterm() -> None:
    """SIGTERM during start-up is an interrupt like SIGINT: one line and exit 130, not death by
    the default action. ``Pipeline.run`` replaces it with its own handlers (a drain)."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # pragma: no cover - not the main thread: leave signals alone
        pass


if __name__ == "__main__":  # pragma: no cover - python -m batchpunk.cli
    main()
