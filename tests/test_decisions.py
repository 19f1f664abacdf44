"""Decisions a user acts on: thresholds from validation images, image scores, masks, verdicts, overlays."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import texture

from ssimae.checkpoint import Thresholds
from ssimae.config import Config
from ssimae.detector import Detector, choose_thresholds, summarise_maps
from ssimae.overlay import PANEL_MAX_SIDE, PANEL_MIN_SIDE, panel_size, verdict_overlay
from ssimae.scoring import image_score
from ssimae.threshold import drop_small_regions, fpr_threshold, image_threshold, images_needed, kept_regions, rate_threshold


# --------------------------------------------------------------------------- image scores, by hand


def test_max_and_top_mean_by_hand():
    amap = np.zeros((10, 10), dtype=np.float32)
    amap[0, :3] = [9.0, 5.0, 1.0]
    assert image_score(amap, "max") == 9.0
    assert image_score(amap, "top-mean", 0.01) == 9.0  # 1% of 100 pixels = the single highest
    assert image_score(amap, "top-mean", 0.02) == 7.0  # (9 + 5) / 2
    assert image_score(amap, "top-mean", 0.03) == 5.0  # (9 + 5 + 1) / 3
    assert image_score(amap, "top-mean", 0.001) == 9.0  # never fewer than one pixel
    with pytest.raises(ValueError, match="image score 'median'"):
        image_score(amap, "median")


def test_a_margin_leaves_the_map_border_out_of_the_image_score():
    amap = np.zeros((32, 64), dtype=np.float32)
    amap[0, 10] = 9.0  # on the border
    amap[:, 63] = 8.0  # the last column
    amap[16, 30] = 3.0  # inside
    assert image_score(amap, "max") == 9.0
    # 1/32 of 32 rows and of 64 columns: one row and two columns at each side are left out
    assert image_score(amap, "max", margin=1 / 32) == 3.0
    assert image_score(amap, "top-mean", 0.0005, margin=1 / 32) == 3.0  # 0.05% of the 30 x 60 interior: 1 px
    assert image_score(amap, "top-mean", 0.01, margin=1 / 32) == pytest.approx(3.0 / 18)  # 18 px: 3 and 17 zeros
    tiny = np.arange(9, dtype=np.float32).reshape(3, 3)
    assert image_score(tiny, "max", margin=0.49) == 4.0  # never less than the middle pixel


def test_the_image_score_margin_defaults_to_the_methods_own_and_older_saves_keep_none():
    from ssimae.config import config_from_dict, known_settings, preset_config
    from ssimae.errors import SettingError

    assert Config(method="patchcore").image_margin == 1 / 32
    assert [Config(method=m).image_margin for m in ("ssim-ae", "l2-ae", "vae", "fm-ae", "blur")] == [0.0] * 5
    assert Config(method="patchcore", image_score_margin=0.1).image_margin == 0.1
    assert config_from_dict({"method": "patchcore"}, preset_config("paper")).image_margin == 0.0
    saved = {k: v for k, v in Config(method="patchcore").to_dict().items() if k != "image_score_margin"}
    assert config_from_dict(known_settings(saved)).image_margin == 0.0  # its image threshold was chosen so
    with pytest.raises(SettingError, match="image_score_margin 0.5"):
        Config(image_score_margin=0.5).validate()


def test_thresholds_and_verdicts_use_the_margin():
    """The image threshold is chosen on validation scores with the margin, and the detector's score has it."""
    maps = [np.full((64, 64), 1.0, dtype=np.float32) for _ in range(30)]
    for amap in maps:
        amap[0, :] = 50.0  # a hot first row on every defect-free image
    config = Config(method="patchcore")
    thresholds = choose_thresholds(summarise_maps(maps, config), config)
    assert thresholds.image < 2.0  # chosen on the interior, which the hot row does not reach
    detector = Detector(config, lambda image: maps[0], thresholds, channels=1)
    assert detector.image_score(maps[0]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- thresholds on known distributions


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_rate_threshold_on_a_uniform_sample_sits_at_the_quantile(rate):
    values = np.random.default_rng(0).random(200_000)
    t = rate_threshold(values, rate)
    assert (values > t).mean() <= rate
    assert t == pytest.approx(1 - rate, abs=0.005)  # the (1 - rate) quantile of U(0, 1)


def test_pixel_fpr_threshold_on_gaussian_maps_matches_the_normal_quantile():
    rng = np.random.default_rng(1)
    maps = [rng.standard_normal((200, 250)) for _ in range(4)]  # 200,000 N(0, 1) pixels
    assert fpr_threshold(maps, 0.01) == pytest.approx(2.326, abs=0.03)  # z of the 99th percentile
    assert fpr_threshold(maps, 0.05) == pytest.approx(1.645, abs=0.02)


def test_choose_thresholds_records_what_they_achieve_on_validation():
    rng = np.random.default_rng(2)
    maps = [rng.random((50, 60)).astype(np.float32) for _ in range(40)]
    config = Config(threshold_fpr=0.02, image_fpr=0.1, image_score="max", min_defect_area=1)
    thresholds = choose_thresholds(summarise_maps(maps, config), config)
    assert thresholds.validation["images"] == 40
    assert thresholds.validation["pixel_fpr"] <= 0.02 and thresholds.validation["pixel_fpr"] > 0.015
    assert thresholds.validation["image_fpr"] == pytest.approx(4 / 40)  # 10% of 40 images above
    scores = sorted(m.max() for m in maps)
    assert thresholds.image == pytest.approx(scores[-5])
    assert "false-alarm rate 0.1" in thresholds.image_rule


def test_too_few_validation_images_warn_with_the_number_needed(caplog):
    maps = [np.random.default_rng(i).random((20, 20)) for i in range(5)]
    with caplog.at_level("WARNING"):
        thresholds = choose_thresholds(summarise_maps(maps, Config(image_fpr=0.05)), Config(image_fpr=0.05))
    assert "5 validation image(s) cannot resolve" in caplog.text and "at least 20" in caplog.text
    assert thresholds.image >= max(m.max() for m in maps) and "normal fit" in thresholds.image_rule
    assert images_needed(0.05) == 20 and images_needed(0.1) == 10 and images_needed(0.3) == 4


def test_image_threshold_from_few_images_is_a_normal_quantile_and_never_below_their_maximum():
    scores = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, sample std 1.291
    threshold, how = image_threshold(scores, 0.05)
    assert threshold == pytest.approx(2.5 + 1.6449 * 1.2910, abs=1e-3) and "normal fit" in how
    assert image_threshold(np.array([1.0] * 9 + [2.0]), 0.05)[0] == 2.0  # the fit (1.62) would fall below 2
    many = np.random.default_rng(0).normal(0, 1, 1000)
    threshold, how = image_threshold(many, 0.05)
    assert how == "empirical quantile" and (many > threshold).mean() <= 0.05


# --------------------------------------------------------------------------- masks and verdicts


def test_drop_small_regions_keeps_regions_of_the_minimum_area():
    mask = np.zeros((20, 20), dtype=bool)
    mask[1:3, 1:3] = True  # 4 px
    mask[10:15, 10:15] = True  # 25 px
    mask[18, 0] = True  # 1 px
    assert drop_small_regions(mask, 25).sum() == 25
    assert drop_small_regions(mask, 4).sum() == 29
    assert np.array_equal(drop_small_regions(mask, 0), mask)
    for min_area, count in ((25, 1), (4, 2), (2, 2), (1, 3), (0, 3), (26, 0)):
        kept, regions = kept_regions(mask, min_area)
        assert np.array_equal(kept, drop_small_regions(mask, min_area)) and regions == count
    assert kept_regions(np.zeros((5, 5), dtype=bool), 3)[1] == 0


def _planted(seed: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """A gray texture with, optionally, a bright 12x16 blob; (image (H, W, 1), ground-truth mask)."""
    image = texture(120, 140, np.random.default_rng(seed))
    truth = np.zeros(image.shape, dtype=bool)
    if defect:
        truth[50:62, 60:76] = True
        image[truth] = 1.0
    return image[:, :, None], truth


def _blur_detector(validation_images: list[np.ndarray], **settings) -> Detector:
    """The blur floor as a detector, thresholds chosen on the given defect-free images: no training."""
    import torch

    from ssimae.blur import BlurResidual
    from ssimae.detector import grid_map_fn

    config = Config(method="blur", **settings)
    module = BlurResidual(config.blur_sigma)
    map_fn = grid_map_fn(lambda x: module(x))
    detector = Detector(config, map_fn, None, 1)
    with torch.no_grad():
        maps = [detector.anomaly_map(image) for image in validation_images]
    return Detector(config, map_fn, choose_thresholds(summarise_maps(maps, config), config), 1)


def test_the_default_threshold_finds_a_planted_defect_and_leaves_clean_images_alone():
    detector = _blur_detector([_planted(seed, False)[0] for seed in range(30)])
    for seed in range(100, 105):
        image, truth = _planted(seed, True)
        prediction = detector.predict(image)
        assert prediction.defective and prediction.mask.any()
        assert (prediction.mask & truth).sum() / truth.sum() > 0.3  # the mask overlaps the blob
        assert (prediction.mask & ~truth).sum() < 4 * truth.sum()  # and does not spread far beyond it
    clean = [detector.predict(_planted(seed, False)[0]) for seed in range(200, 210)]
    assert sum(p.defective for p in clean) <= 1 and sum(p.mask.any() for p in clean) <= 1


def test_decide_applies_the_minimum_area_and_an_override_threshold():
    config = Config(min_defect_area=10)
    detector = Detector(config, lambda image: image[:, :, 0], Thresholds(0.5, "test", 0.8, "test"), 1)
    amap = np.zeros((30, 30), dtype=np.float32)
    amap[2:4, 2:4] = 0.7  # 4 px above the pixel threshold: too small for a region
    prediction = detector.decide(amap)
    assert not prediction.mask.any() and prediction.regions == 0 and not prediction.defective
    amap[10:14, 10:14] = 0.9  # 16 px and a score above the image threshold
    prediction = detector.decide(amap)
    assert prediction.regions == 1 and prediction.area == 16 and prediction.defective
    # An override threshold: the verdict follows the mask (the image threshold belonged to the old one).
    assert not detector.decide(amap, threshold=0.95).defective  # score 0.9 > 0.8, but no region above 0.95
    assert detector.decide(amap, threshold=0.1).area == 16  # the 4-px spot stays under the minimum area


# --------------------------------------------------------------------------- overlays


@pytest.mark.parametrize("shape", [(64, 90), (300, 260), (3000, 500)])
def test_panels_are_readable_and_bounded(shape):
    height, width = panel_size(*shape)
    assert max(height, width) <= PANEL_MAX_SIDE
    assert min(height, width) >= PANEL_MIN_SIDE or max(height, width) == PANEL_MAX_SIDE
    assert height / width == pytest.approx(shape[0] / shape[1], rel=0.02)


def test_verdict_overlay_has_three_panels_a_caption_and_the_contour_in_red():
    image = np.full((100, 120, 1), 0.5, dtype=np.float32)
    amap = np.zeros((100, 120), dtype=np.float32)
    mask = np.zeros((100, 120), dtype=bool)
    mask[40:60, 50:80] = True
    amap[mask] = 2.0
    overlay = verdict_overlay(image, amap, mask, 1.0, "DEFECTIVE score 2.00", True)
    height, width = panel_size(100, 120)
    assert overlay.shape[1] == 3 * width + 12 and overlay.shape[0] > height
    panels = overlay[-height:]
    first, heat, third = panels[:, :width], panels[:, width + 6 : 2 * width + 6], panels[:, -width:]
    assert np.all(first == 128)  # the input, enlarged, untouched
    assert tuple(heat[height // 2, width // 2]) != tuple(heat[5, 5])  # the defect is hot, the rest cold
    red = np.all(third == (255, 0, 0), axis=-1)
    assert red.any() and not red[:height // 3].any()  # a contour around the defect only
    caption = overlay[: overlay.shape[0] - height]
    assert (caption[:, :, 0] > caption[:, :, 1] + 100).any()  # red caption text for a defective verdict


def test_image_score_defaults_to_the_methods_own():
    """Unset, PatchCore scores images by the top-1% mean and the others by the map maximum; set, it is
    what was set; the paper preset keeps MVTec's maximum; a bad name is refused by name."""
    from ssimae.config import config_from_dict, preset_config
    from ssimae.errors import SettingError

    assert Config(method="patchcore").image_score_kind == "top-mean"
    assert [Config(method=m).image_score_kind for m in ("ssim-ae", "l2-ae", "vae", "fm-ae", "blur")] == ["max"] * 5
    assert Config(method="patchcore", image_score="max").image_score_kind == "max"
    assert config_from_dict({"method": "patchcore"}, preset_config("paper")).image_score_kind == "max"
    with pytest.raises(SettingError, match="image_score 'median'"):
        Config(image_score="median").validate()
