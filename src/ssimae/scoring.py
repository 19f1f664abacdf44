"""Image scores: one number per anomaly map, higher = more likely defective.

    max       the map's maximum (MVTec AD's protocol); one noisy pixel decides it
    top-mean  the mean of the highest `fraction` of the map's pixels (at least one pixel): a defect
              must cover that much of the image to raise the score fully, so isolated spikes at
              borders or in the background count less
"""

from __future__ import annotations

import numpy as np

IMAGE_SCORES = ("max", "top-mean")


def image_score(amap: np.ndarray, kind: str = "max", fraction: float = 0.01) -> float:
    if kind == "max":
        return float(amap.max())
    if kind == "top-mean":
        count = max(1, int(round(fraction * amap.size)))
        flat = amap.ravel()
        return float(np.partition(flat, flat.size - count)[flat.size - count:].mean(dtype=np.float64))
    raise ValueError(f"unknown image score {kind!r}; use one of {', '.join(IMAGE_SCORES)}")
