"""``python -m batchpunk``: the same command as the ``batchpunk`` console script."""

from batchpunk.cli import main

main()
