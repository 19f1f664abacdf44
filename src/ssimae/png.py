"""8-bit PNG encoding for predict's masks and overlays, with one fixed row filter.

Pillow's PNG encoder tries all five row filters on every row and keeps the best ("adaptive"
filtering) and offers no way to choose one. On a 1024x1024 image's three-panel overlay that choice
cost as much as the compression itself (bench/README.md), and writing outputs is what limits predict
once the network runs on a GPU. Here every row gets the "Up" filter (the difference to the row
above), computed in one numpy pass, then zlib at level 1: a standard PNG that every reader decodes,
of about the size Pillow writes at the same level. Reading stays with Pillow.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type: gray, RGB
UP_FILTER = 2
COMPRESSION_LEVEL = 1  # zlib level: Pillow's default 6 took 2.6-7x as long for a 5-33% smaller overlay


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(array: np.ndarray) -> bytes:
    """A (H, W) gray or (H, W, 3) RGB uint8 array -> the bytes of a PNG file."""
    if array.dtype != np.uint8:
        raise TypeError(f"encode_png takes uint8 arrays, not {array.dtype}")
    channels = {2: 1, 3: array.shape[-1]}.get(array.ndim)
    if channels not in COLOUR_TYPES or min(array.shape[:2]) < 1:
        raise ValueError(f"encode_png takes (H, W) or (H, W, 3) arrays of at least one pixel, not {array.shape}")
    height, width = array.shape[:2]
    rows = np.ascontiguousarray(array).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = UP_FILTER
    filtered[0, 1:] = rows[0]  # the row above the first is taken as zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps modulo 256, as PNG's filter does
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPES[channels], 0, 0, 0)
    return b"".join((SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(filtered.data, COMPRESSION_LEVEL)), _chunk(b"IEND", b"")))
