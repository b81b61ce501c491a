"""The one exception type users see: the CLI and the benchmark scripts print its message and exit 2."""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class W2DError(Exception):
    """Bad input or an unmet precondition, with a message that says what to do."""


def exit_on_error(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's `main`: a W2DError ends it with its message and status 2, not a traceback."""
    try:
        sys.exit(main())
    except W2DError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
