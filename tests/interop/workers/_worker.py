"""The one exit path of the interop workers (each runs as a script in a tool's own virtual environment)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


def run(main: Callable[[], int]) -> NoReturn:
    """Exit with main()'s code; whatever the tool raised becomes one stderr line and exit code 1."""
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - the suite wants one line, whatever the tool raised
        line = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
        print(f"{type(e).__name__}: {line[:300]}", file=sys.stderr)
        sys.exit(1)
