"""Anomaly-segmentation metrics computed as MVTec AD's official evaluation does.

Inputs are lists of 2-D anomaly maps (higher = more anomalous) and ground-truth
masks of the same shapes (bool, 0/1 or 0/255; nonzero = defect); images may
differ in size. All pixel metrics pool the pixels of all images, good images
included. numpy/scipy only.

Every curve is tie-aware: one point per distinct score, a pixel being positive
when its score is >= the threshold. All curves come from one routine
(`_count_curve`): sort the scores once, then for each distinct threshold count
the pixels (and defect pixels) scoring >= it, in exact integer arithmetic.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from ssimae.errors import SsimaeError

__all__ = [
    "Curve",
    "pixel_roc_curve",
    "pixel_auroc",
    "pro_curve",
    "au_pro",
    "image_auroc",
    "image_scores",
    "f1_max",
    "trapezoid_area",
    "evaluate_maps",
    "best_accuracy",
]

# 8-connectivity for ground-truth regions, as the official label(gt, np.ones((3, 3))).
_STRUCTURE = np.ones((3, 3), dtype=int)


class Curve(NamedTuple):
    """A curve sampled at increasing FPR: ``value`` is TPR or PRO."""

    fpr: np.ndarray
    value: np.ndarray


# --------------------------------------------------------------------------- #
# Core: counts per distinct threshold
# --------------------------------------------------------------------------- #


def _count_curve(s_all: np.ndarray, s_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative counts per distinct threshold.

    s_all: (N,) all scores, sorted ascending; s_pos: (P,) positive scores, sorted
    ascending. Returns thresholds (D,) = distinct scores, descending, and int64
    tps (D,), fps (D,) = positives / negatives scoring >= each threshold.
    """
    n = s_all.size
    new_run = np.empty(n, dtype=bool)  # (N,) True at the first index of each run of equal scores
    new_run[0] = True
    np.not_equal(s_all[1:], s_all[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)[::-1]  # (D,) run starts, highest score first
    del new_run
    thresholds = s_all[starts]
    n_ge = n - starts  # scores >= threshold (a whole tie run counts at once)
    tps = s_pos.size - np.searchsorted(s_pos, thresholds, side="left")
    fps = n_ge - tps
    return thresholds, tps, fps


def _auc_from_counts(tps: np.ndarray, fps: np.ndarray, n_pos: int, n_neg: int) -> float:
    """Trapezoid ROC AUC from cumulative counts (curve starts at (0, 0)); nan if one class."""
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Twice the area in count units, exact in int64 (bounded by 2 * n_pos * n_neg).
    d_fps = np.diff(fps, prepend=0)
    tp_sum = tps + np.concatenate(([0], tps[:-1]))
    area2 = int(np.dot(d_fps, tp_sum))
    return area2 / (2.0 * n_pos * n_neg)


# --------------------------------------------------------------------------- #
# Input handling
# --------------------------------------------------------------------------- #


def _check_pairs(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(maps) != len(masks):
        raise SsimaeError(f"got {len(maps)} anomaly maps but {len(masks)} masks; need one mask per map")
    if len(maps) == 0:
        raise SsimaeError("no images to evaluate: the lists of maps and masks are empty")
    pairs = []
    for i, (m, g) in enumerate(zip(maps, masks)):
        m = _check_map(m, i)
        g = np.asarray(g)
        if g.shape != m.shape:
            raise SsimaeError(f"image {i}: anomaly map shape {m.shape} differs from mask shape {g.shape}")
        pairs.append((m, g.astype(bool, copy=False)))
    return pairs


def _check_map(m: np.ndarray, i: int) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2 or m.size == 0:
        raise SsimaeError(f"image {i}: anomaly map must be a non-empty 2-D array, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.number) and m.dtype != bool:
        raise SsimaeError(f"image {i}: anomaly map has non-numeric dtype {m.dtype}")
    if not np.isfinite(m).all():
        raise SsimaeError(f"image {i}: anomaly map (shape {m.shape}) contains NaN or infinite values")
    return m


def _score_dtype(arrays: Sequence[np.ndarray]) -> np.dtype:
    # float32 unless some map needs float64 (so float64 inputs keep their exact order).
    return np.result_type(np.float32, *(a.dtype for a in arrays))


class _Pixels:
    """All pixels of a dataset, sorted once and shared by every pixel metric."""

    def __init__(self, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], regions: bool = True):
        pairs = _check_pairs(maps, masks)
        n = sum(m.size for m, _ in pairs)
        scores = np.empty(n, dtype=_score_dtype([m for m, _ in pairs]))  # (N,) all pixels, image by image
        pos_scores, pos_weights = [], []
        self.n_regions = 0
        offset = 0
        for m, g in pairs:
            scores[offset : offset + m.size] = m.ravel()
            offset += m.size
            if not g.any():
                continue
            pos_scores.append(m[g])  # (P_i,) defect pixels of this image
            if regions:
                labeled, n_comp = ndimage.label(g, structure=_STRUCTURE)
                ids = labeled[g]  # (P_i,) region id 1..n_comp of each defect pixel
                # Official "pro increment": 1 / region size (divided by the region count below).
                pos_weights.append(1.0 / np.bincount(ids)[ids])
                self.n_regions += n_comp
        scores.sort()
        self.scores = scores  # (N,) ascending
        self.n_pos = sum(p.size for p in pos_scores)
        self.n_neg = n - self.n_pos
        pos = np.concatenate(pos_scores).astype(scores.dtype, copy=False) if pos_scores else scores[:0]
        order = np.argsort(pos, kind="stable")
        self.pos_scores = pos[order]  # (P,) ascending
        if regions and self.n_regions:
            w_desc = np.concatenate(pos_weights)[order[::-1]]  # (P,) highest score first
            # cum_pro[k] = PRO when the k highest-scoring defect pixels are flagged.
            self.cum_pro = np.concatenate(([0.0], np.cumsum(w_desc) / self.n_regions))
        else:
            self.cum_pro = None
        self._curve = None

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._curve is None:
            self._curve = _count_curve(self.scores, self.pos_scores)
        return self._curve

    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        thr, tps, fps = self.counts()
        fpr = np.concatenate(([0.0], fps / self.n_neg)) if self.n_neg else np.full(thr.size + 1, np.nan)
        tpr = np.concatenate(([0.0], tps / self.n_pos)) if self.n_pos else np.full(thr.size + 1, np.nan)
        return fpr, tpr, np.concatenate(([np.inf], thr.astype(np.float64)))

    def auroc(self) -> float:
        _, tps, fps = self.counts()
        return _auc_from_counts(tps, fps, self.n_pos, self.n_neg)

    def pro(self, fpr_stop: float | None = None) -> Curve:
        # MVTec AD compute_pro (pro_curve_util.py): sort all pixels by score descending,
        # cumsum the fpr increments (1/num_ok_pixels per normal pixel) and the pro increments
        # (1/(region_size*num_regions) per region pixel), keep the last index of each run of
        # equal scores, prepend (0, 0) and clip to [0, 1]. Here both cumsums are read off the
        # integer counts of _count_curve, which gives the same points.
        _, tps, fps = self.counts()
        if self.cum_pro is None or self.n_neg == 0:
            nan = np.full(tps.size + 1, np.nan)
            return Curve(nan, nan.copy())
        if fpr_stop is not None:
            # Only the points up to fpr_stop, plus two beyond it (integration needs the next one).
            k = int(np.searchsorted(fps, fpr_stop * self.n_neg, side="right"))
            tps, fps = tps[: k + 2], fps[: k + 2]
        fpr = np.concatenate(([0.0], fps / self.n_neg))
        pro = np.concatenate(([0.0], self.cum_pro[tps]))
        np.clip(fpr, 0.0, 1.0, out=fpr)
        np.clip(pro, 0.0, 1.0, out=pro)
        return Curve(fpr, pro)

    def au_pro(self, fpr_limit: float) -> float:
        _check_fpr_limit(fpr_limit)
        fpr, pro = self.pro(fpr_stop=fpr_limit)
        if not np.isfinite(fpr[-1]) or not np.isfinite(pro[-1]):
            return float("nan")
        return float(np.clip(trapezoid_area(fpr, pro, x_max=fpr_limit) / fpr_limit, 0.0, 1.0))

    def f1_max(self) -> tuple[float, float]:
        thr, tps, fps = self.counts()
        if self.n_pos == 0:
            return float("nan"), float("nan")
        f1 = 2.0 * tps / (self.n_pos + tps + fps)  # 2TP / (2TP + FP + FN)
        best = int(np.argmax(f1))  # first = highest threshold among equal maxima
        return float(f1[best]), float(thr[best])


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise SsimaeError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def pixel_roc_curve(maps, masks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel ROC over all pixels of all images: (fpr, tpr, thresholds).

    One point per distinct score, thresholds descending, starting at (0, 0) with
    threshold +inf (as sklearn's roc_curve with drop_intermediate=False). A rate
    whose class is absent is all NaN.
    """
    return _Pixels(maps, masks, regions=False).roc()


def pixel_auroc(maps, masks) -> float:
    """Pixel-level ROC AUC (equals sklearn's roc_auc_score on all pixels); NaN if one class."""
    return _Pixels(maps, masks, regions=False).auroc()


def pro_curve(maps, masks, max_steps: int | None = None) -> Curve:
    """Per-region-overlap curve (fpr, pro), increasing, from (0, 0) to (1, 1).

    Exact: one point per distinct score. ``max_steps`` thins the returned curve to at
    most that many evenly spaced points (first and last kept), for plotting or storage;
    au_pro always integrates the full curve. NaN arrays if there is no defect region
    or no normal pixel.
    """
    curve = _Pixels(maps, masks).pro()
    if max_steps is not None:
        if max_steps < 2:
            raise SsimaeError(f"max_steps must be at least 2, got {max_steps}")
        if curve.fpr.size > max_steps:
            keep = np.unique(np.linspace(0, curve.fpr.size - 1, max_steps).round().astype(np.int64))
            curve = Curve(curve.fpr[keep], curve.value[keep])
    return curve


def au_pro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (in [0, 1]).

    NaN if there is no defect region or no normal pixel. Random scores give about
    fpr_limit / 2 (0.15 at the default limit).
    """
    _check_fpr_limit(fpr_limit)
    return _Pixels(maps, masks).au_pro(fpr_limit)


def image_auroc(scores, labels) -> float:
    """Image-level ROC AUC (labels: 1 = defective); same tie-aware routine as pixel_auroc.

    NaN if only one class is present.
    """
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise SsimaeError(
            f"image_auroc needs 1-D scores and labels of equal length, got shapes {s.shape} and {y.shape}"
        )
    if s.size == 0:
        raise SsimaeError("image_auroc got no scores")
    if not np.isfinite(s).all():
        raise SsimaeError(f"image score {int(np.flatnonzero(~np.isfinite(s))[0])} is NaN or infinite")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise SsimaeError(f"image labels must be 0/1 or bool, got values {np.unique(y)[:5].tolist()}")
    s = s.astype(_score_dtype([s]), copy=False)
    y = y.astype(bool, copy=False)
    _, tps, fps = _count_curve(np.sort(s), np.sort(s[y]))
    n_pos = int(y.sum())
    return _auc_from_counts(tps, fps, n_pos, s.size - n_pos)


def image_scores(maps) -> np.ndarray:
    """Image anomaly score = maximum of its map; (num_images,) float64."""
    return np.array([float(_check_map(m, i).max()) for i, m in enumerate(maps)], dtype=np.float64)


def f1_max(maps, masks) -> tuple[float, float]:
    """Best pixel F1 over all distinct thresholds, and that threshold.

    Pixels with score >= threshold are predicted defective; among equal F1 maxima the
    highest threshold is returned. (NaN, NaN) if there is no defect pixel.
    """
    return _Pixels(maps, masks, regions=False).f1_max()


def trapezoid_area(x, y, x_max: float | None) -> float:
    """Trapezoid integral of y over ascending x, up to ``x_max`` (as MVTec's generic_util.trapezoid).

    If x_max falls between two points, y at x_max is interpolated linearly and the partial
    segment is added. Non-finite points are dropped. Deviations from the official function
    (which asserts instead): x_max beyond the last point integrates the whole curve (no
    extrapolation); x_max before the first point gives 0. ``x_max=None`` integrates everything.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise SsimaeError(
            f"trapezoid_area needs 1-D x and y of equal length, got shapes {x.shape} and {y.shape}"
        )
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size == 0:
        return float("nan")
    correction = 0.0
    if x_max is not None:
        ins = int(np.searchsorted(x, x_max, side="right"))  # as bisect.bisect
        if ins == 0:
            return 0.0
        if x[ins - 1] != x_max and ins < x.size:
            # Partial segment [x[ins-1], x_max], y interpolated between points ins-1 and ins.
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        x, y = x[:ins], y[:ins]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def best_accuracy(scores, labels) -> dict:
    """The best image accuracy any threshold on `scores` reaches (score > t = defective), with the
    precision and recall there: {"accuracy", "threshold", "precision", "recall"}."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.concatenate(([0], np.cumsum(y)))  # flagging the k highest scores, k = 0..n
    fp = np.concatenate(([0], np.cumsum(~y)))
    cut = np.concatenate(([True], s[1:] != s[:-1], [True]))  # only between distinct scores
    accuracy = np.where(cut, (tp + (~y).sum() - fp) / len(s), -1.0)
    k = int(np.argmax(accuracy))
    threshold = float(s[k]) if k < len(s) else -math.inf  # score > threshold flags exactly the k highest
    precision = tp[k] / k if k else math.nan
    recall = tp[k] / y.sum() if y.any() else math.nan
    return {"accuracy": float(accuracy[k]), "threshold": threshold, "precision": precision, "recall": recall}


def evaluate_maps(maps, masks, fpr_limit: float = 0.3, scores=None) -> dict:
    """All metrics at once, sorting the pixels only once.

    Returns {"pixel_auroc", "au_pro", "image_auroc", "image_auroc_max", "pixel_f1_max"}; image
    labels are mask.any(); image_auroc ranks `scores` (default: the map maxima, MVTec's protocol),
    image_auroc_max always the map maxima. A metric whose classes (or regions) are missing is NaN.
    """
    _check_fpr_limit(fpr_limit)
    pixels = _Pixels(maps, masks)
    labels = np.array([np.asarray(g).astype(bool, copy=False).any() for g in masks])
    maxima = image_scores(maps)
    return {
        "pixel_auroc": pixels.auroc(),
        "au_pro": pixels.au_pro(fpr_limit),
        "image_auroc": image_auroc(maxima if scores is None else np.asarray(scores, dtype=np.float64), labels),
        "image_auroc_max": image_auroc(maxima, labels),
        "pixel_f1_max": pixels.f1_max()[0],
    }
