"""Image scores: one number per anomaly map, higher = more likely defective.

    max       the map's maximum (MVTec AD's protocol); one noisy pixel decides it
    top-mean  the mean of the highest `fraction` of the map's pixels (at least one pixel): a defect
              must cover that much of the image to raise the score fully, so isolated spikes at
              borders or in the background count less

Either may leave out a margin of the map: `margin` of its height and width at each side. PatchCore's
maps score high near the image border on good images too (not the backbone's zero padding: with the
input reflect-padded the rise stayed, bench/README.md). Its image score leaves out the outer 1/32 (one
stride-8 feature cell at 256x256), which raised its image AUROC on the 6 of 13 data sets below 1.000
and lowered it on none (bench/README.md). Masks keep the whole map.
"""

from __future__ import annotations

import numpy as np

IMAGE_SCORES = ("max", "top-mean")


def interior(amap: np.ndarray, margin: float) -> np.ndarray:
    """The map without `margin` of its height and width at each side (at least its middle row and column)."""
    height, width = amap.shape[:2]
    top = min(int(round(margin * height)), (height - 1) // 2)
    left = min(int(round(margin * width)), (width - 1) // 2)
    return amap[top : height - top, left : width - left]


def image_score(amap: np.ndarray, kind: str = "max", fraction: float = 0.01, margin: float = 0.0) -> float:
    if margin > 0:
        amap = interior(amap, margin)
    if kind == "max":
        return float(amap.max())
    if kind == "top-mean":
        count = max(1, int(round(fraction * amap.size)))
        flat = amap.ravel()
        return float(np.partition(flat, flat.size - count)[flat.size - count:].mean(dtype=np.float64))
    raise ValueError(f"unknown image score {kind!r}; use one of {', '.join(IMAGE_SCORES)}")
