"""The exception types for user errors: the CLI prints their message on one line, without a traceback."""


class SsimaeError(Exception):
    """Bad input or settings from the user; the message names the file or value and the fix."""


class SettingError(SsimaeError):
    """A setting with a bad value. `setting` is the Config field, so the CLI can name the flag typed;
    `source` is where the value came from when that was not the command line (a YAML file, a preset)."""

    def __init__(self, setting: str, message: str, source: str | None = None):
        super().__init__(message)
        self.setting = setting
        self.source = source
