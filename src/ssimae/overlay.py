"""Pictures of a prediction for people: the verdict overlay of `predict` and the heat-map blend of the
compare report's thumbnails.

verdict_overlay: three panels side by side, each at least PANEL_MIN_SIDE pixels on its short side
(small images are enlarged) and at most PANEL_MAX_SIDE on its long side (large ones are reduced, so
an 8192x8192 image costs megabytes, not gigabytes): the input | the anomaly map as a heat map from 0
to twice the pixel threshold | the input with the mask's contour in red; above them a caption with
the verdict, the score (1.00 = the image threshold), the regions and the defect area.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

PANEL_MIN_SIDE = 256
PANEL_MAX_SIDE = 1024
GAP = 6  # pixels between panels
CAPTION = 46  # caption height in pixels
RED = np.array([255, 0, 0], dtype=np.uint8)


def panel_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of a panel: the short side at least PANEL_MIN_SIDE, the long side at most
    PANEL_MAX_SIDE (the long side wins for very elongated images)."""
    scale = max(1.0, PANEL_MIN_SIDE / min(height, width))
    scale = min(scale, PANEL_MAX_SIDE / max(height, width)) if max(height, width) * scale > PANEL_MAX_SIDE else scale
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize_plane(plane: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """A 2-D float or bool array resized with Pillow (one plane at a time keeps the memory small)."""
    if plane.shape == size:
        return plane
    if plane.dtype == bool:
        return np.asarray(Image.fromarray(plane).resize(size[::-1], resample)) > 0
    return np.asarray(Image.fromarray(np.asarray(plane, dtype=np.float32), mode="F").resize(size[::-1], resample))


def _rgb_panel(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float image in [0, 1] -> (h, w, 3) uint8 at the panel size."""
    planes = [(np.clip(_resize_plane(image[:, :, c], size, Image.BILINEAR), 0, 1) * 255).round().astype(np.uint8)
              for c in range(image.shape[2])]  # to uint8 before stacking: a gray image is converted once
    return np.stack(planes * 3 if len(planes) == 1 else planes, axis=-1)


def heat_colours(amap: np.ndarray, top: float) -> np.ndarray:
    """(h, w) map -> (h, w, 3) uint8 jet colours, 0 (blue) to `top` (red)."""
    # bytes=True: matplotlib's own uint8 table, no float64 RGBA copy of the map (4x faster on 1024x1024;
    # its colours are truncated where the float ones were rounded, so some differ by one level)
    return colormaps["jet"](np.clip(amap / top, 0, 1), bytes=True)[:, :, :3]


def _cross_neighbours(mask: np.ndarray, combine) -> np.ndarray:
    """`combine` (np.logical_and or np.logical_or) of each pixel and its 4 neighbours, outside = False."""
    out = mask.copy()
    combine(out[1:], mask[:-1], out=out[1:])
    combine(out[:-1], mask[1:], out=out[:-1])
    combine(out[:, 1:], mask[:, :-1], out=out[:, 1:])
    combine(out[:, :-1], mask[:, 1:], out=out[:, :-1])
    if combine is np.logical_and:  # the pixels of the outer ring have a neighbour outside
        out[0], out[-1], out[:, 0], out[:, -1] = False, False, False, False
    return out


def contour(mask: np.ndarray, thick: bool) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it (the image edge counts as outside), thickened by
    one pixel when `thick`. scipy.ndimage's binary erosion and dilation with the same cross give the same
    result 14x slower on a 1024x1024 mask (bench/speed.py --sections outputs)."""
    edge = mask & ~_cross_neighbours(mask, np.logical_and)
    return _cross_neighbours(edge, np.logical_or) if thick else edge


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def verdict_overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, pixel_threshold: float,
                    caption: str, defective: bool) -> np.ndarray:
    """(caption + h, 3 w + 2 gaps, 3) uint8: input | heat map | mask contour, under a caption."""
    size = panel_size(*amap.shape)
    top = 2 * pixel_threshold if pixel_threshold > 0 else float(amap.max()) or 1.0
    picture = _rgb_panel(image, size)
    heat = heat_colours(_resize_plane(amap, size, Image.BILINEAR), top)
    outlined = picture.copy()
    outlined[contour(_resize_plane(mask, size, Image.NEAREST), thick=min(size) >= 256)] = RED
    height, width = size
    canvas = np.full((CAPTION + height, 3 * width + 2 * GAP, 3), 255, dtype=np.uint8)
    for index, panel in enumerate((picture, heat, outlined)):
        left = index * (width + GAP)
        canvas[CAPTION:, left : left + width] = panel
    # The text lies in the caption strip: only the strip goes through Pillow and back (a copy of the whole
    # page each way took as long as the heat map's colours on 1024x1024).
    strip = Image.fromarray(canvas[:CAPTION])
    draw = ImageDraw.Draw(strip)
    draw.text((6, 3), caption, fill=(190, 0, 0) if defective else (0, 110, 0), font=_font(18))
    labels = ("input", f"anomaly map 0 to {top:.3g} (2x threshold)", "mask (red contour)")
    for index, label in enumerate(labels):
        draw.text((index * (width + GAP) + 6, 26), label, fill=(60, 60, 60), font=_font(13))
    canvas[:CAPTION] = np.asarray(strip)
    return canvas


def blend_overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, top: float) -> np.ndarray:
    """(H, W, 3) uint8: the image and the heat map (0 to `top`) blended, the mask contour in red.
    For thumbnails: the image is used at the size it is given."""
    rgb = _rgb_panel(image, image.shape[:2]).astype(np.float32)
    blended = (0.6 * rgb + 0.4 * heat_colours(amap, top)).round().astype(np.uint8)
    blended[contour(mask, thick=min(mask.shape) >= 256)] = RED
    return blended
