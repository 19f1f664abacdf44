"""Decision thresholds chosen on anomaly maps of defect-free validation images.

A pixel is defective when its anomaly score is strictly greater than the pixel threshold; an image
is defective when its image score is strictly greater than the image threshold. Rules:
    pixel-fpr   the smallest threshold at which at most a fraction `fpr` of validation pixels is above
    min-area    MVTec AD's rule: the smallest threshold at which no connected region of any
                validation map reaches `min_defect_area` pixels, so the masks (which keep regions
                of at least that many pixels) are empty on every validation image
    image       the smallest image threshold at which at most a fraction `rate` of validation images
                scores above it (the false-alarm rate on defect-free images)
"""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

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


def drop_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The mask without its 8-connected regions of fewer than `min_area` pixels."""
    if min_area <= 1 or not mask.any():
        return mask
    return kept_regions(mask, min_area)[0]


def kept_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, int]:
    """drop_small_regions' mask, and the number of 8-connected regions it keeps (one labelling for both)."""
    if not mask.any():
        return mask, 0
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if min_area <= 1:
        return mask, count
    sizes = np.bincount(labels.ravel())  # (count + 1,); sizes[0] is the background
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels], int(keep.sum())


def min_area_threshold(maps: list[np.ndarray], min_defect_area: int) -> float:
    """MVTec AD's rule: the smallest threshold at which every connected component of the thresholded
    validation maps is smaller than `min_defect_area` pixels (drop_small_regions then leaves their masks
    empty; with min_defect_area <= 1 nothing is dropped, so no pixel may be above the threshold).

    Map by map: a map's largest component only shrinks as the threshold rises and changes only at the
    map's own values, so a binary search over them finds the smallest of its values that it allows, and
    every threshold from there up. The answer is the largest of these, with one map's values sorted at a
    time (searching all maps' values together held two more copies of every validation pixel: 20 maps of
    2048x2048, 320 MB, took 800 MB more at the peak, now 44-48 MB, in the same time). A map with no
    component too large even with every pixel marked allows any threshold; if no map constrains it, the
    answer is the smallest value of all. (ValidationSummary does the work.)
    """
    return _summary(maps, "min-area", min_area=min_defect_area).threshold()


def _summary(maps: list[np.ndarray], rule: str, fpr: float = 0.0, min_area: int = 0) -> ValidationSummary:
    """The summary of maps held in a list (their image scores are not needed: 0)."""
    summary = ValidationSummary(rule, fpr, min_area, sum(m.size for m in maps))
    for amap in maps:
        summary.add(amap, 0.0)
    return summary


def _smallest_allowed(amap: np.ndarray, largest_allowed: int) -> float | None:
    """The smallest value t of the map with no component of (map > t) over largest_allowed pixels, or
    None when even the whole map, every pixel marked, is no larger (any threshold will do)."""
    if amap.size <= largest_allowed:  # every pixel marked is one component of amap.size pixels
        return None
    candidates = np.unique(amap)  # ascending; the maximum always satisfies the rule
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        if largest_component(amap > candidates[middle]) <= largest_allowed:
            high = middle
        else:
            low = middle + 1
    return float(candidates[high])


def rate_threshold(values: np.ndarray, rate: float) -> float:
    """The smallest value t of `values` at which at most a fraction `rate` of them is > t."""
    if not 0 < rate < 1:
        raise SsimaeError(f"false-positive rate {rate} must be in (0, 1)")
    values = np.sort(np.asarray(values).ravel())
    if values.size == 0:
        raise SsimaeError("no validation values to choose a threshold on; add defect-free validation images")
    return float(values[max(values.size - 1 - _allowed_above(rate, values.size), 0)])


def _allowed_above(rate: float, count: int) -> int:
    """How many of `count` values may lie above a threshold at a false-positive rate. Counting from the
    rate directly: ceil((1 - rate) * n) rounded up on values like 1 - 0.7 = 0.30000000000000004 and gave
    a threshold one step too high."""
    return int(np.floor(rate * count + 1e-9))


def fpr_threshold(maps: list[np.ndarray], fpr: float) -> float:
    """The smallest map value t at which at most a fraction `fpr` of validation pixels is > t.

    rate_threshold's value over all pixels, from each map's largest values in turn: t is the
    (allowed + 1)-th largest pixel, so no other pixel is needed. Sorting every validation pixel at once
    held two more copies of them all (20 maps of 2048x2048, 320 MB: 640 MB more at the peak). (ValidationSummary
    does the work.)"""
    return _summary(maps, "pixel-fpr", fpr=fpr).threshold()


def _keep_largest(largest: np.ndarray, values: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` largest of `largest` and `values` together (all of them if fewer), in no order."""
    if values.size > keep:
        values = np.partition(values, values.size - keep)[values.size - keep :]
    largest = np.concatenate([largest, values])
    if largest.size > keep:
        largest = np.partition(largest, largest.size - keep)[largest.size - keep :]
    return largest


class ValidationSummary:
    """What the pixel threshold rules and the validation figures need from the maps of defect-free
    validation images, taken one map at a time, so that no map is kept (200 maps of 2048x2048 are 3.2 GB).

    For each map it keeps its image score and the pixels (flat indices and values) above a lower bound
    of the threshold the rule will choose: pixel-fpr's threshold is the (allowed + 1)-th largest pixel,
    at least the one among the pixels seen so far (`total_pixels`, an upper bound of all the maps'
    pixels, fixes how many that is); min-area's is the largest of the maps' own smallest allowed values
    (min_area_threshold), at least the largest so far. Every pixel above the final threshold is then
    kept, so its count and each map's mask at the threshold are exact. What is kept is the rule's top
    pixels (pixel FPR 0.001: a thousandth of all) plus, per map, those above the bound when it came.
    Summaries of disjoint maps merge (torchrun: one per process)."""

    def __init__(self, rule: str, fpr: float, min_area: int, total_pixels: int):
        if rule not in ("pixel-fpr", "min-area"):
            raise SsimaeError(f"threshold rule {rule!r} is not pixel-fpr or min-area")
        if rule == "pixel-fpr" and not 0 < fpr < 1:
            raise SsimaeError(f"false-positive rate {fpr} must be in (0, 1)")
        if min_area < 0:
            raise SsimaeError(f"min_defect_area {min_area} must be >= 0")
        self.rule, self.fpr, self.min_area, self.total_pixels = rule, fpr, min_area, total_pixels
        self.keep = _allowed_above(fpr, total_pixels) + 1 if rule == "pixel-fpr" else 0
        self.largest = np.empty(0, dtype=np.float32)  # pixel-fpr: the `keep` largest pixels so far
        self.allowed: list[float] = []  # min-area: each constraining map's smallest allowed value
        self.lowest = math.inf  # the smallest pixel of all
        self.pixels = 0
        self.kept: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]] = []  # (shape, flat indices, values)
        self.scores: list[float] = []

    def bound(self) -> float:
        """A value the final threshold cannot be below."""
        if self.rule == "pixel-fpr":
            return float(np.partition(self.largest, 0)[0]) if self.largest.size >= self.keep else -math.inf
        return max(self.allowed) if self.allowed else -math.inf

    def add(self, amap: np.ndarray, score: float) -> None:
        values = np.asarray(amap).ravel()
        self.pixels += values.size
        self.lowest = min(self.lowest, float(values.min()))
        if self.rule == "pixel-fpr":
            self.largest = _keep_largest(self.largest, values, self.keep)
        else:
            allowed = _smallest_allowed(np.asarray(amap), max(self.min_area - 1, 0))
            if allowed is not None:
                self.allowed.append(allowed)
        above = np.flatnonzero(values > self.bound())
        self.kept.append((tuple(amap.shape), above, values[above]))
        self.scores.append(float(score))

    @classmethod
    def merge(cls, parts: list[ValidationSummary]) -> ValidationSummary:
        """One summary of the maps of all `parts` (made with the same settings), in the order of the maps
        before they were shared out: part r holds maps r, r + R, r + 2R, ... of R parts (distributed.shard),
        as torchrun's processes take them. The order matters to the image threshold's normal fit (its
        mean and deviation round differently in another order)."""
        first = parts[0]
        merged = cls(first.rule, first.fpr, first.min_area, first.total_pixels)
        for part in parts:
            if merged.rule == "pixel-fpr":
                merged.largest = _keep_largest(merged.largest, part.largest, merged.keep)
            merged.allowed += part.allowed
            merged.lowest = min(merged.lowest, part.lowest)
            merged.pixels += part.pixels
        for group in itertools.zip_longest(*(zip(part.kept, part.scores) for part in parts)):
            for kept, score in (item for item in group if item is not None):
                merged.kept.append(kept)
                merged.scores.append(score)
        return merged

    def threshold(self) -> float:
        """The pixel threshold of the rule: fpr_threshold or min_area_threshold of all the maps."""
        if not self.kept:
            raise SsimaeError("no validation maps to choose a threshold on; add defect-free validation images")
        if self.rule == "min-area":
            return max(self.allowed) if self.allowed else self.lowest
        if self.pixels > self.total_pixels:
            raise RuntimeError(f"validation maps have {self.pixels} pixels, more than the {self.total_pixels} announced")
        needed = min(_allowed_above(self.fpr, self.pixels) + 1, self.pixels)  # at most keep: pixels <= total_pixels
        return float(np.partition(self.largest, self.largest.size - needed)[self.largest.size - needed])

    def figures(self, pixel_threshold: float, image_threshold: float) -> dict:
        """validation_figures of all the maps, from the pixels kept: every pixel above the threshold is."""
        if pixel_threshold < self.bound():
            raise ValueError(f"threshold {pixel_threshold} is below what the summary kept ({self.bound()})")
        above, flagged = 0, []
        for shape, indices, values in self.kept:
            marked = indices[values > pixel_threshold]
            above += marked.size
            mask = np.zeros(shape, dtype=bool)
            mask.flat[marked] = True
            flagged.append(drop_small_regions(mask, self.min_area).any())
        return {
            "images": len(self.kept),
            "pixel_fpr": above / self.pixels,
            "images_with_false_region": float(np.mean(flagged)),
            "image_fpr": float(np.mean(np.asarray(self.scores) > image_threshold)),
        }

    def rule_text(self) -> str:
        if self.rule == "pixel-fpr":
            return f"pixel FPR {self.fpr:g} on validation images"
        return f"min defect area {self.min_area} px on validation images"


def image_threshold(scores: np.ndarray, rate: float) -> tuple[float, str]:
    """(image threshold, how it was set) for a false-alarm rate on defect-free validation image scores.

    With at least images_needed(rate) images: the empirical quantile (rate_threshold). With fewer,
    the empirical quantile would be the highest score, and about 1 / (n + 1) of new good images
    would score above it; the threshold is then the (1 - rate) quantile of a normal distribution
    fitted to the scores, or their maximum if that is higher.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) >= images_needed(rate) or len(scores) < 2:
        return rate_threshold(scores, rate), "empirical quantile"
    fitted = float(scores.mean() + NormalDist().inv_cdf(1 - rate) * scores.std(ddof=1))
    return max(fitted, float(scores.max())), "normal fit (too few images for the empirical quantile)"


def images_needed(rate: float) -> int:
    """Defect-free validation images needed before a false-alarm rate `rate` can be resolved at all:
    with fewer than 1 / rate images, no image may score above the threshold, so the threshold is the
    validation maximum and the rate on new images is about 1 / (n + 1), above the target."""
    return math.ceil(1 / rate - 1e-9)


def validation_figures(maps: list[np.ndarray], pixel_threshold: float, min_area: int, scores: np.ndarray,
                       image_threshold: float) -> dict:
    """What the thresholds achieve on the validation images themselves."""
    pixels = sum(m.size for m in maps)
    above = sum(int(np.count_nonzero(m > pixel_threshold)) for m in maps)
    flagged = [drop_small_regions(m > pixel_threshold, min_area).any() for m in maps]
    return {
        "images": len(maps),
        "pixel_fpr": above / pixels,
        "images_with_false_region": float(np.mean(flagged)),
        "image_fpr": float(np.mean(np.asarray(scores) > image_threshold)),
    }
