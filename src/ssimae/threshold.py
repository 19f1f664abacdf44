"""Segmentation thresholds chosen on anomaly maps of defect-free validation images.

A pixel is defective when its anomaly score is strictly greater than the threshold.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import SsimaeError

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> int:
    """Pixel count of the largest 8-connected component of a bool mask (0 if empty)."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count == 0:
        return 0
    return int(np.bincount(labels.ravel())[1:].max())


def _max_component(maps: list[np.ndarray], threshold: float) -> int:
    return max(largest_component(m > threshold) for m in maps)


def min_area_threshold(maps: list[np.ndarray], min_defect_area: int) -> float:
    """MVTec AD's rule: the smallest threshold at which no connected component of the thresholded
    validation maps is larger than `min_defect_area` pixels.

    The largest component only shrinks as the threshold rises, so a binary search over the
    distinct map values finds the exact smallest such value.
    """
    if not maps:
        raise SsimaeError("no validation maps to choose a threshold on; add defect-free validation images")
    if min_defect_area < 0:
        raise SsimaeError(f"min_defect_area {min_defect_area} must be >= 0")
    candidates = np.unique(np.concatenate([m.ravel() for m in maps]))  # ascending
    low, high = 0, len(candidates) - 1  # candidates[high] (the maximum) always satisfies the rule
    while low < high:
        middle = (low + high) // 2
        if _max_component(maps, float(candidates[middle])) <= min_defect_area:
            high = middle
        else:
            low = middle + 1
    return float(candidates[high])


def fpr_threshold(maps: list[np.ndarray], fpr: float) -> float:
    """The smallest map value t at which at most a fraction `fpr` of validation pixels is > t."""
    if not maps:
        raise SsimaeError("no validation maps to choose a threshold on; add defect-free validation images")
    if not 0 < fpr < 1:
        raise SsimaeError(f"false-positive rate {fpr} must be in (0, 1)")
    values = np.sort(np.concatenate([m.ravel() for m in maps]))
    # At most `allowed` pixels may lie above t. Counting from fpr directly: ceil((1 - fpr) * n)
    # rounded up on values like 1 - 0.7 = 0.30000000000000004 and gave a threshold one step too high.
    allowed = int(np.floor(fpr * len(values) + 1e-9))
    index = len(values) - 1 - allowed
    return float(values[max(index, 0)])


def choose_threshold(maps: list[np.ndarray], min_defect_area: int, threshold_fpr: float | None) -> tuple[float, str]:
    """(threshold, rule description) by the configured rule."""
    if threshold_fpr is not None:
        return fpr_threshold(maps, threshold_fpr), f"pixel FPR {threshold_fpr} on validation images"
    return min_area_threshold(maps, min_defect_area), f"min defect area {min_defect_area} px on validation images"
