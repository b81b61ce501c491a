"""The one exception type users see: the CLI prints its message and exits non-zero."""


class W2DError(Exception):
    """Bad input or an unmet precondition, with a message that says what to do."""
