"""Tests for ssimae.metrics against sklearn and brute-force references."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from ssimae.errors import SsimaeError
from ssimae.metrics import (
    best_accuracy,
    au_pro,
    evaluate_maps,
    f1_max,
    image_auroc,
    image_scores,
    pixel_auroc,
    pixel_roc_curve,
    pro_curve,
    trapezoid_area,
)

SHAPES = [(7, 9), (12, 5), (10, 10), (4, 13), (8, 8)]


def _dataset(seed, levels=None, shapes=SHAPES, good=(1,)):
    """Maps (integer levels -> many ties when ``levels`` is set) and blob masks; images in ``good`` are defect-free."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i, (h, w) in enumerate(shapes):
        m = rng.integers(0, levels, (h, w)).astype(np.float32) if levels else rng.random((h, w), dtype=np.float32)
        g = np.zeros((h, w), dtype=bool)
        if i not in good:
            g = rng.random((h, w)) < 0.25
            m = m + 2.0 * g * rng.random((h, w)) * (levels or 1)  # make defects score higher on average
            m = np.round(m) if levels else m
        maps.append(m.astype(np.float32))
        masks.append(g)
    return maps, masks


def _flat(maps, masks):
    return np.concatenate([m.ravel() for m in maps]), np.concatenate([np.asarray(g).ravel() != 0 for g in masks])


def _brute_pro(maps, masks):
    """Reference PRO curve: loop over distinct thresholds, recount every region each time."""
    regions, ok_scores = [], []
    for m, g in zip(maps, masks):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [m[lab == k] for k in range(1, n + 1)]
        ok_scores.append(m[lab == 0])
    ok = np.concatenate(ok_scores)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fprs.append(np.mean(ok >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    return np.array(fprs), np.array(pros)


# ------------------------------------------------------------------ ROC / AUROC


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 5), (2, 3), (3, 20)])
def test_pixel_auroc_matches_sklearn(seed, levels):
    maps, masks = _dataset(seed, levels)
    s, y = _flat(maps, masks)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-9)


@pytest.mark.parametrize("seed,levels", [(4, None), (5, 4)])
def test_pixel_roc_curve_matches_sklearn(seed, levels):
    maps, masks = _dataset(seed, levels)
    s, y = _flat(maps, masks)
    fpr, tpr, thr = pixel_roc_curve(maps, masks)
    ref_fpr, ref_tpr, ref_thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1


def test_pixel_auroc_keeps_float64_resolution():
    # 1 and 1 + 1e-12 are distinct in float64 but equal in float32: the order must survive.
    maps = [np.array([[1.0, 1.0 + 1e-12, 0.5, 0.2]])]
    masks = [np.array([[0, 1, 0, 0]])]
    assert pixel_auroc(maps, masks) == pytest.approx(1.0)


def test_mask_formats_agree():
    maps, masks = _dataset(6, 6)
    r_bool = evaluate_maps(maps, masks)
    r_255 = evaluate_maps(maps, [g.astype(np.uint8) * 255 for g in masks])
    r_01 = evaluate_maps(maps, [g.astype(np.int64) for g in masks])
    assert r_bool == r_255 == r_01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    scores = rng.integers(0, 6, 40) + labels * rng.integers(0, 3, 40)  # heavy ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(scores.astype(float), labels.astype(bool)) == pytest.approx(roc_auc_score(labels, scores))


def test_image_auroc_one_class_is_nan():
    assert math.isnan(image_auroc([0.1, 0.5, 0.3], [1, 1, 1]))
    assert math.isnan(image_auroc([0.1, 0.5, 0.3], [0, 0, 0]))


def test_image_scores_are_map_maxima():
    maps = [np.array([[0.0, 3.0], [1.0, 2.0]]), np.full((3, 5), -1.5, dtype=np.float32)]
    np.testing.assert_array_equal(image_scores(maps), [3.0, -1.5])


# ------------------------------------------------------------------ PRO


def _two_region_case():
    """Regions of 2 and 4 pixels; at threshold 1 region A is fully and B half covered, 1 of 19 normal pixels fires."""
    m = np.zeros((5, 5))
    g = np.zeros((5, 5), dtype=bool)
    g[0, 0:2] = True  # region A, 2 pixels
    g[3:5, 2:4] = True  # region B, 4 pixels (not 8-adjacent to A)
    m[0, 0:2] = 1.0
    m[3, 2:4] = 1.0  # half of B
    m[2, 4] = 1.0  # one false positive out of 19 normal pixels
    return [m], [g]


def test_pro_two_regions_hand_computed():
    maps, masks = _two_region_case()
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0.0, 1 / 19, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.75, 1.0])
    # Integral to 0.3: triangle to (1/19, 0.75), then a trapezoid to 0.3 with y interpolated on the last segment.
    x1 = 1 / 19
    y_at = 0.75 + 0.25 * (0.3 - x1) / (1 - x1)
    expected = (0.5 * 0.75 * x1 + 0.5 * (0.75 + y_at) * (0.3 - x1)) / 0.3
    assert au_pro(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_pro_regions_weigh_equally_across_images():
    # A 1-pixel region (image 0) and a 9-pixel region (image 1); only the small one is found.
    m0, g0 = np.zeros((4, 4)), np.zeros((4, 4), bool)
    g0[1, 1], m0[1, 1] = True, 1.0
    m1, g1 = np.zeros((6, 6)), np.zeros((6, 6), bool)
    g1[0:3, 0:3] = True
    fpr, pro = pro_curve([m0, m1], [g0, g1])
    np.testing.assert_allclose(pro, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])


def test_pro_eight_connectivity():
    # (1,1) and (2,2) touch only diagonally: ONE region of 2 pixels; plus a lone pixel at (5,5).
    m, g = np.zeros((7, 7)), np.zeros((7, 7), bool)
    g[1, 1] = g[2, 2] = g[5, 5] = True
    m[1, 1] = m[5, 5] = 1.0
    fpr, pro = pro_curve([m], [g])
    # 8-connectivity: (1/2 + 1) / 2 = 0.75; 4-connectivity would give (1 + 0 + 1) / 3.
    assert pro[1] == pytest.approx(0.75)
    assert fpr[1] == 0.0


def test_au_pro_perfect_inverted_constant():
    maps, masks = _dataset(7)
    perfect = [g.astype(np.float32) for g in masks]
    inverted = [1.0 - p for p in perfect]
    constant = [np.full(g.shape, 0.5) for g in masks]
    assert au_pro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert au_pro(inverted, masks) == pytest.approx(0.0, abs=1e-12)
    # A constant map gives the single segment (0,0)-(1,1): area 0.3**2 / 2, normalised -> 0.15.
    assert au_pro(constant, masks) == pytest.approx(0.15, abs=1e-12)
    assert au_pro(perfect, masks, fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


def test_au_pro_random_level_and_bounds():
    rng = np.random.default_rng(8)
    maps, masks = [], []
    for _ in range(12):
        h, w = rng.integers(40, 70, 2)
        g = np.zeros((h, w), bool)
        for _ in range(rng.integers(0, 4)):
            r, c = rng.integers(0, h - 8), rng.integers(0, w - 8)
            g[r : r + rng.integers(1, 8), c : c + rng.integers(1, 8)] = True
        maps.append(rng.random((h, w)))
        masks.append(g)
    v = au_pro(maps, masks)
    assert 0.1 < v < 0.2
    fpr, pro = pro_curve(maps, masks)
    for limit in (0.01, 0.05, 0.3, 0.7, 1.0, float(fpr[len(fpr) // 3])):
        v = au_pro(maps, masks, fpr_limit=limit)
        assert 0.0 <= v <= 1.0
        assert v == pytest.approx(trapezoid_area(fpr, pro, limit) / limit, abs=1e-14)  # full curve gives the same
    # Maps good on defects: still never above 1, whatever the limit.
    good = [m * 0.1 + g for m, g in zip(maps, masks)]
    for limit in (0.001, 0.3, 1.0):
        assert 0.9 < au_pro(good, masks, fpr_limit=limit) <= 1.0


@pytest.mark.parametrize("seed,levels", [(9, None), (10, 4), (11, 10)])
def test_pro_curve_matches_brute_force(seed, levels):
    maps, masks = _dataset(seed, levels)
    fpr, pro = pro_curve(maps, masks)
    ref_fpr, ref_pro = _brute_pro(maps, masks)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    ref_area = trapezoid_area(ref_fpr, ref_pro, 0.3) / 0.3
    assert au_pro(maps, masks) == pytest.approx(ref_area, abs=1e-12)


def test_pro_curve_max_steps():
    maps, masks = _dataset(12)
    full = pro_curve(maps, masks)
    thin = pro_curve(maps, masks, max_steps=10)
    assert len(thin.fpr) == 10
    assert thin.fpr[0] == full.fpr[0] and thin.fpr[-1] == full.fpr[-1] and thin.value[-1] == full.value[-1]


def test_pro_without_regions_is_nan():
    maps = [np.random.default_rng(0).random((5, 5))]
    masks = [np.zeros((5, 5), bool)]
    assert math.isnan(au_pro(maps, masks))


# ------------------------------------------------------------------ trapezoid


def test_trapezoid_area_hand_checked():
    x, y = [0.0, 1.0, 2.0], [0.0, 1.0, 1.0]
    assert trapezoid_area(x, y, 1.0) == pytest.approx(0.5)  # x_max on a point
    assert trapezoid_area(x, y, 1.5) == pytest.approx(1.0)  # 0.5 + 0.5 * 1
    assert trapezoid_area(x, y, 0.5) == pytest.approx(0.125)  # y interpolated to 0.5
    assert trapezoid_area(x, y, 3.0) == pytest.approx(1.5)  # beyond the end: whole curve
    assert trapezoid_area(x, y, None) == pytest.approx(1.5)
    assert trapezoid_area(x, y, -1.0) == 0.0
    # Vertical step at x = 0 (repeated x): the order of y decides, as in the official function.
    assert trapezoid_area([0.0, 0.0, 0.4, 1.0], [0.0, 1.0, 1.0, 1.0], 0.3) == pytest.approx(0.3)


# ------------------------------------------------------------------ F1


@pytest.mark.parametrize("seed,levels", [(13, None), (14, 5)])
def test_f1_max_matches_brute_force(seed, levels):
    maps, masks = _dataset(seed, levels)
    s, y = _flat(maps, masks)
    best, best_t = -1.0, None
    for t in np.unique(s):
        f = f1_score(y, s >= t)
        if f > best:
            best, best_t = f, t
    f, t = f1_max(maps, masks)
    assert f == pytest.approx(best, abs=1e-12)
    assert f1_score(y, s >= t) == pytest.approx(best, abs=1e-12)


# ------------------------------------------------------------------ evaluate_maps / errors


def test_evaluate_maps_consistent():
    maps, masks = _dataset(15, 8)
    r = evaluate_maps(maps, masks)
    assert set(r) == {"pixel_auroc", "au_pro", "image_auroc", "image_auroc_max", "pixel_f1_max"}
    assert r["image_auroc"] == r["image_auroc_max"]  # without scores, the map maxima rank the images
    assert r["pixel_auroc"] == pixel_auroc(maps, masks)
    assert r["au_pro"] == au_pro(maps, masks)
    assert r["pixel_f1_max"] == f1_max(maps, masks)[0]
    labels = [g.any() for g in masks]
    assert r["image_auroc"] == pytest.approx(roc_auc_score(labels, [m.max() for m in maps]))


def test_evaluate_maps_ranks_the_given_image_scores():
    maps, masks = _dataset(15, 8)
    labels = [g.any() for g in masks]
    scores = [float(m.mean()) for m in maps]
    r = evaluate_maps(maps, masks, scores=scores)
    assert r["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert r["image_auroc_max"] == pytest.approx(roc_auc_score(labels, [m.max() for m in maps]))


@pytest.mark.parametrize("seed", range(5))
def test_best_accuracy_is_the_best_of_every_cut(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40).astype(float)  # ties: a cut may not split equal scores
    labels = rng.random(40) < 0.4
    best = best_accuracy(scores, labels)
    brute = max(((scores > t) == labels).mean() for t in np.concatenate([[-1.0], np.unique(scores)]))
    assert best["accuracy"] == pytest.approx(brute)
    flagged = scores > best["threshold"]
    assert (flagged == labels).mean() == pytest.approx(best["accuracy"])
    assert best["recall"] == pytest.approx((flagged & labels).sum() / labels.sum())
    assert best_accuracy([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == {
        "accuracy": 1.0, "threshold": 0.2, "precision": 1.0, "recall": 1.0}


def test_evaluate_maps_all_good_images():
    rng = np.random.default_rng(16)
    maps = [rng.random((6, 7)), rng.random((5, 5))]
    masks = [np.zeros((6, 7), bool), np.zeros((5, 5), bool)]
    r = evaluate_maps(maps, masks)
    assert all(math.isnan(v) for v in r.values())


def test_shape_mismatch_names_index():
    maps = [np.zeros((4, 4)), np.zeros((5, 6))]
    masks = [np.zeros((4, 4)), np.zeros((6, 5))]
    with pytest.raises(SsimaeError, match=r"image 1.*\(5, 6\).*\(6, 5\)"):
        pixel_auroc(maps, masks)
    with pytest.raises(SsimaeError, match="image 1"):
        evaluate_maps(maps, masks)


def test_input_errors():
    with pytest.raises(SsimaeError, match="2 anomaly maps but 1 masks"):
        au_pro([np.zeros((2, 2))] * 2, [np.zeros((2, 2))])
    bad = np.zeros((3, 3))
    bad[1, 1] = np.nan
    with pytest.raises(SsimaeError, match="image 1.*NaN"):
        f1_max([np.zeros((3, 3)), bad], [np.zeros((3, 3))] * 2)
    with pytest.raises(SsimaeError, match="fpr_limit"):
        au_pro([np.zeros((2, 2))], [np.ones((2, 2))], fpr_limit=0.0)
    with pytest.raises(SsimaeError):
        image_auroc([0.1, 0.2], [1])
