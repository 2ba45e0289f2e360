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
130   stopped at once by a second SIGINT/SIGTERM: unfinished messages were nacked
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
    missing = [name for name in ("typer", "rich") if importlib.util.find_spec(name) is None]
    if missing:
        sys.stderr.write(
            f"batchpunk's command line needs {' and '.join(missing)}: "
            "pip install 'batchpunk[cli]'\n"
        )
        raise SystemExit(EXIT_MISSING)
    from batchpunk._cli_app import app

    try:
        app(args=list(argv) if argv is not None else None, prog_name="batchpunk")
    except KeyboardInterrupt:  # an interrupt outside the commands' own handling
        sys.stderr.write("stopped at once by a second signal\n")
        raise SystemExit(EXIT_ABORTED) from None
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


if __name__ == "__main__":  # pragma: no cover - python -m batchpunk.cli
    main()
