"""What the command lines share: one-line failures and flag parsing without tracebacks."""

from __future__ import annotations

import sys

from absl import flags


def fail(msg: str, code: int = 2) -> None:
    """Print ``error: msg`` on stderr and exit with ``code`` (2: bad input, 1: a failed write)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports a bad flag in one line instead of a usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return []
