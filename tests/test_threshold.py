"""Threshold rules on hand-built validation maps. A pixel is defective when its score is > t."""

from __future__ import annotations

import numpy as np
import pytest

from ssimae.errors import SsimaeError
from ssimae.threshold import (ValidationSummary, drop_small_regions, fpr_threshold, largest_component,
                              min_area_threshold)


def _two_blobs() -> np.ndarray:
    """Background 0.1; a 30-px blob (5x6) at 0.9 and a 10-px blob (2x5) at 0.8, far apart."""
    m = np.full((30, 30), 0.1, dtype=np.float32)
    m[2:7, 2:8] = 0.9
    m[20:22, 20:25] = 0.8
    return m


def test_brief_case_two_blobs():
    maps = [_two_blobs()]
    # t = 0.8 still marks the 0.9 blob (0.9 > 0.8): 30 px, not under 20, so the smallest valid t is 0.9
    # (nothing marked). t = 0.1 marks both blobs: largest 30 px, valid once regions of 30 px are dropped
    # from masks no longer (min area 31).
    assert min_area_threshold(maps, 20) == pytest.approx(0.9)
    assert min_area_threshold(maps, 30) == pytest.approx(0.9)
    assert min_area_threshold(maps, 31) == pytest.approx(0.1)
    assert min_area_threshold(maps, 40) == pytest.approx(0.1)
    assert min_area_threshold(maps, 0) == pytest.approx(0.9)


def _three_levels() -> np.ndarray:
    """Background 0.1; blobs of 30 px at 0.5, 20 px at 0.8, 10 px at 0.9: bigger blobs score lower."""
    m = np.full((40, 40), 0.1, dtype=np.float32)
    m[2:7, 2:8] = 0.5  # 30 px
    m[15:19, 15:20] = 0.8  # 20 px
    m[30:32, 30:35] = 0.9  # 10 px
    return m


@pytest.mark.parametrize(
    "area, expected",
    [(100, 0.1), (31, 0.1), (30, 0.5), (21, 0.5), (20, 0.8), (11, 0.8), (10, 0.9), (1, 0.9), (0, 0.9)],
)
def test_min_area_threshold_levels(area, expected):
    # At t = 0.5 the 0.5 blob itself is not marked (0.5 is not > 0.5): largest component 20 px.
    assert min_area_threshold([_three_levels()], area) == pytest.approx(expected)


def _brute_force(maps, area):
    for t in np.unique(np.concatenate([m.ravel() for m in maps])):
        if max(largest_component(m > t) for m in maps) < max(area, 1):
            return float(t)
    raise AssertionError("the maximum always satisfies the rule")


@pytest.mark.parametrize("area", [0, 5, 20, 40, 400])
def test_min_area_threshold_on_noise_is_the_smallest_valid_value(area):
    rng = np.random.default_rng(area)
    maps = []
    for shape in [(24, 30), (28, 22)]:
        m = (rng.random(shape) * 0.1).astype(np.float32)
        m[3:8, 3:9] += 0.9  # a 30-px blob at ~0.9-1.0 in each map
        maps.append(m)
    t = min_area_threshold(maps, area)
    assert max(largest_component(m > t) for m in maps) < max(area, 1)
    candidates = np.unique(np.concatenate([m.ravel() for m in maps]))
    below = candidates[candidates < t]
    if below.size:  # the next smaller candidate violates the rule
        assert max(largest_component(m > below[-1]) for m in maps) >= max(area, 1)
    assert t == _brute_force(maps, area)


def test_components_are_eight_connected():
    m = np.zeros((8, 8), dtype=np.float32)
    for i in range(5):
        m[1 + i, 1 + i] = 0.9  # a diagonal line: one 8-connected component of 5, five 4-connected singles
    assert largest_component(m > 0) == 5
    assert min_area_threshold([m], 5) == pytest.approx(0.9)  # 4-connectivity would give 0.0
    assert min_area_threshold([m], 6) == pytest.approx(0.0)


@pytest.mark.parametrize("area", [0, 1, 2, 9, 25, 30, 31])
def test_the_min_area_threshold_leaves_every_validation_mask_empty(area):
    # The rule and the masks agree on the boundary: a validation region of exactly min_defect_area pixels
    # would survive drop_small_regions, so the rule must not allow it.
    rng = np.random.default_rng(area)
    maps = [_two_blobs(), _three_levels(), (rng.random((20, 26)) * 0.3).astype(np.float32)]
    t = min_area_threshold(maps, area)
    assert all(not drop_small_regions(m > t, area).any() for m in maps)


def test_components_do_not_join_across_maps():
    a = np.zeros((10, 10), dtype=np.float32)
    a[0:3, 5:10] = 1.0  # 15 px at the right edge
    b = np.zeros((10, 10), dtype=np.float32)
    b[0:3, 0:5] = 1.0  # 15 px at the left edge: 30 px if the maps were concatenated side by side
    assert min_area_threshold([a, b], 20) == pytest.approx(0.0)
    assert min_area_threshold([a, b], 14) == pytest.approx(1.0)


def test_largest_component_counts():
    assert largest_component(np.zeros((5, 5), dtype=bool)) == 0
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0:3] = True
    mask[4:6, 4:6] = True
    assert largest_component(mask) == 4


def _smallest_valid_fpr_threshold(values, fpr):
    for t in np.unique(values):
        if (values > t).mean() <= fpr:
            return float(t)


@pytest.mark.parametrize("n", [1000, 997, 10])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.9])
def test_fpr_threshold_on_a_uniform_ramp(n, fpr):
    ramp = np.arange(n, dtype=np.float64) / n
    maps = [ramp[: n // 2].reshape(1, -1), ramp[n // 2 :].reshape(1, -1)]  # split over two maps
    t = fpr_threshold(maps, fpr)
    assert (ramp > t).mean() <= fpr
    assert t == _smallest_valid_fpr_threshold(ramp, fpr)  # and one step lower exceeds the rate


def test_fpr_threshold_hand_case():
    ramp = [np.arange(100, dtype=np.float32).reshape(10, 10) / 100]
    assert fpr_threshold(ramp, 0.1) == pytest.approx(0.89)  # 10 pixels (0.90 .. 0.99) above
    assert fpr_threshold(ramp, 0.7) == pytest.approx(0.29)  # 70 pixels above


def test_fpr_threshold_with_ties():
    m = np.array([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert fpr_threshold([m], 0.1) == 1.0  # nothing is above the maximum
    assert fpr_threshold([m], 0.6) == 0.0  # 6 of 10 above 0


@pytest.mark.parametrize("rule", [lambda maps: min_area_threshold(maps, 25), lambda maps: fpr_threshold(maps, 0.01)])
def test_empty_map_list_is_a_user_error(rule):
    with pytest.raises(SsimaeError, match="validation"):
        rule([])


def test_bad_settings_are_user_errors():
    maps = [np.zeros((4, 4), dtype=np.float32)]
    with pytest.raises(SsimaeError, match="min_defect_area"):
        min_area_threshold(maps, -1)
    for fpr in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(SsimaeError, match="false-positive rate"):
            fpr_threshold(maps, fpr)


def test_the_summary_follows_the_configured_rule():
    def chosen(rule, fpr, area):
        summary = ValidationSummary(rule, fpr, area, _three_levels().size)
        summary.add(_three_levels(), 1.0)
        return summary.threshold(), summary.rule_text()

    t, rule = chosen("min-area", 0.01, 21)
    assert t == pytest.approx(0.5) and "area 21" in rule
    t, rule = chosen("pixel-fpr", 0.01, 20)  # at most 16 of 1600 px above: 0.8 leaves 10, 0.5 leaves 30
    assert t == pytest.approx(0.8) and "FPR" in rule
    with pytest.raises(SsimaeError, match="rule 'median'"):
        chosen("median", 0.01, 20)


def _min_area_by_definition(maps, area):
    """The smallest value of all maps at which no map has a component of `area` pixels or more."""
    for t in np.unique(np.concatenate([m.ravel() for m in maps])):
        if all(largest_component(m > t) < max(area, 1) for m in maps):
            return float(t)


@pytest.mark.parametrize("seed", range(6))
def test_the_rules_taken_map_by_map_equal_their_definitions_over_all_pixels(seed):
    # Maps of different sizes, coarse values (many ties), and a map smaller than the area, whose values
    # lie above the answer: it allows any threshold, so it must not raise the answer to its minimum.
    rng = np.random.default_rng(seed)
    maps = [np.round(rng.random(shape) * 8).astype(np.float32) / 8
            for shape in [(12, 17), (9, 9), (20, 6), (15, 15)]]
    maps.append(np.full((2, 2), 0.97 + seed, dtype=np.float32))
    pixels = np.concatenate([m.ravel() for m in maps])
    for fpr in (0.001, 0.01, 0.1, 0.3, 0.5):
        assert fpr_threshold(maps, fpr) == _smallest_valid_fpr_threshold(pixels, fpr)
    for area in (0, 1, 5, 6, 20, 60):
        assert min_area_threshold(maps, area) == _min_area_by_definition(maps, area)


def test_no_map_constrains_the_min_area_threshold_when_all_are_smaller_than_the_area():
    maps = [np.array([[0.5, 0.7]], dtype=np.float32), np.array([[0.2]], dtype=np.float32)]
    assert min_area_threshold(maps, 3) == pytest.approx(0.2)  # every region is dropped at any threshold
    assert min_area_threshold(maps, 2) == pytest.approx(0.5)
    assert fpr_threshold(maps, 0.5) == pytest.approx(0.5)  # one pixel of three above it; two above 0.2


@pytest.mark.parametrize("rule", ["pixel-fpr", "min-area"])
@pytest.mark.parametrize("seed", range(4))
def test_a_summary_taken_map_by_map_chooses_and_measures_as_the_maps_themselves(rule, seed):
    from ssimae.threshold import validation_figures

    rng = np.random.default_rng(seed)
    maps = [ndimage_smooth(rng.random(shape)).astype(np.float32)
            for shape in [(40, 50), (30, 30), (64, 20), (2, 2), (50, 45), (33, 61)]]
    scores = np.array([m.max() for m in maps])
    total = sum(m.size for m in maps)
    for fpr, area in [(0.001, 25), (0.02, 5), (0.3, 1), (0.01, 0)]:
        whole = ValidationSummary(rule, fpr, area, total)
        for amap, score in zip(maps, scores):
            whole.add(amap, score)
        parts = [ValidationSummary(rule, fpr, area, total) for _ in range(2)]  # two processes' shares
        for i, (amap, score) in enumerate(zip(maps, scores)):
            parts[i % 2].add(amap, score)
        merged = ValidationSummary.merge(parts)
        expected = fpr_threshold(maps, fpr) if rule == "pixel-fpr" else min_area_threshold(maps, area)
        figures = validation_figures(maps, expected, area, scores, float(np.median(scores)))
        for summary in (whole, merged):
            assert summary.threshold() == expected
            assert summary.figures(expected, float(np.median(scores))) == figures
        kept = sum(values.size for _, _, values in whole.kept)
        if rule == "pixel-fpr" and fpr <= 0.02:
            assert kept < total / 4  # the top pixels, not the maps


def ndimage_smooth(values):
    from scipy import ndimage

    return ndimage.gaussian_filter(values, 1.5)


def test_a_summary_announced_too_few_pixels_refuses_to_guess():
    summary = ValidationSummary("pixel-fpr", 0.1, 25, total_pixels=10)
    summary.add(np.arange(20, dtype=np.float32).reshape(4, 5), 1.0)
    with pytest.raises(RuntimeError, match="more than the 10 announced"):
        summary.threshold()


def test_merged_summaries_keep_the_validation_order_and_a_rate_near_one_gives_the_minimum():
    maps = [np.full((3, 3), float(i), dtype=np.float32) for i in range(7)]
    parts = [ValidationSummary("pixel-fpr", 0.1, 5, 63) for _ in range(3)]
    for i, amap in enumerate(maps):  # as distributed.shard deals them out: every third map
        parts[i % 3].add(amap, float(i))
    assert ValidationSummary.merge(parts).scores == [float(i) for i in range(7)]
    summary = ValidationSummary("pixel-fpr", 1 - 2**-53, 5, 4)  # allowed rounds up to every pixel
    summary.add(np.arange(4, dtype=np.float32).reshape(2, 2), 1.0)
    assert summary.threshold() == fpr_threshold([np.arange(4, dtype=np.float32).reshape(2, 2)], 1 - 2**-53) == 0.0
