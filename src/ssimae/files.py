"""Atomic file writing: write to a temp file in the target folder, then rename over the target.

A crash or a user error mid-write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix + ".tmp")
    except OSError as error:  # a read-only or missing folder: name the file the user asked for
        raise OSError(error.errno, error.strerror, str(path)) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        # Name the user's path, not our temp file; a full disk raises with no file name at all.
        if error.filename in (None, tmp) or error.filename2 == str(path):
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_folder(path: str | os.PathLike) -> Path:
    """Create an output folder (and its parents) now, so a folder that cannot exist fails before any work."""
    from .errors import SsimaeError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SsimaeError(f"output {path} is a file, not a folder; choose another --output")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SsimaeError(f"cannot create the output folder {path}: {error.strerror or error}; "
                          "choose another --output") from None
    try:  # a folder that exists but refuses files fails now too, not after the work
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise SsimaeError(f"the output folder {path} does not accept new files ({error.strerror or error}); "
                          "choose another --output or fix its permissions") from None
    return path


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete the temp files atomic_path leaves when its process is killed mid-write (SIGKILL gives it
    no chance to clean up); returns how many. Only hidden '.<stem>.<random><suffix>.tmp' names match."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_safe(value):
    """NaN/inf -> None and numpy scalars -> Python numbers, recursively, so json.dumps writes strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
