"""What every job's entry point shares: a user's mistake is one line and exit code 2.

    if __name__ == "__main__":
        sys.exit(run_job(main))

Bad input (a missing dataset, a malformed manifest, a wrong config key, broken YAML, a checkpoint
whose weights do not match its fingerprint) raises ValueError or OSError with a message that says
what and where; a traceback adds nothing for the user. ``--debug`` (or ``DCGH_DEBUG=1``) shows it.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

# OSError covers FileNotFoundError, PermissionError, IsADirectoryError: paths the user gave.
USER_ERRORS = (ValueError, OSError)


def run_job(main: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DCGH_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
