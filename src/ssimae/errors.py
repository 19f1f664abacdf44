"""The exception types for user errors: the CLI prints their message on one line, without a traceback."""


class SsimaeError(Exception):
    """Bad input or settings from the user; the message names the file or value and the fix."""


class SettingError(SsimaeError):
    """A setting with a bad value. `setting` is the Config field, so the CLI can name the flag typed."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting
