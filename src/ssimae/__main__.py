"""`python -m ssimae` and the `ssimae` command."""

import sys


def run() -> int:
    """The command line; Ctrl-C while its modules (torch) are still importing ends it like one later does."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("ssimae: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
