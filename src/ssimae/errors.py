"""The one exception type for user errors: the CLI prints its message on one line, without a traceback."""


class SsimaeError(Exception):
    """Bad input or settings from the user; the message names the file or value and the fix."""
