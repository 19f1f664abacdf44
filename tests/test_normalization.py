"""input_normalization: each working image's mean (and deviation) moved onto the training images' average."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import texture, tiny_config, to_uint8, write_png

from ssimae.checkpoint import Checkpoint
from ssimae.config import Config
from ssimae.data import (background_level, brightness_targets, find_training_images, normalize_brightness, read_image,
                         working_image)
from ssimae.detector import load_detector
from ssimae.errors import SettingError, SsimaeError
from ssimae.train import fit


def test_mean_moves_the_mean_and_keeps_the_differences():
    image = np.array([[0.1, 0.3], [0.2, 0.4]], np.float32)[:, :, None]  # mean 0.25
    out = normalize_brightness(image, "mean", 0.5, None)
    np.testing.assert_allclose(out[:, :, 0], [[0.35, 0.55], [0.45, 0.65]], atol=1e-6)


def test_standardize_sets_mean_and_deviation_by_hand():
    image = np.array([0.2, 0.4, 0.2, 0.4], np.float32).reshape(2, 2, 1)  # mean 0.3, deviation 0.1
    out = normalize_brightness(image, "standardize", 0.5, 0.05)
    np.testing.assert_allclose(out.ravel(), [0.45, 0.55, 0.45, 0.55], atol=1e-6)


def test_all_channels_move_together_so_colours_keep_their_balance():
    image = np.stack([np.full((4, 4), 0.2), np.full((4, 4), 0.4), np.full((4, 4), 0.6)], axis=-1).astype(np.float32)
    out = normalize_brightness(image, "mean", 0.5, 0.1)
    np.testing.assert_allclose(out[0, 0], [0.3, 0.5, 0.7], atol=1e-6)


def test_values_are_clipped_and_a_flat_image_is_moved_not_stretched():
    bright = np.array([0.0, 1.0], np.float32).reshape(1, 2, 1)
    out = normalize_brightness(bright, "mean", 0.9, None)
    assert out.min() >= 0 and out.max() == 1.0
    flat = np.full((3, 3, 1), 0.7, np.float32)
    np.testing.assert_allclose(normalize_brightness(flat, "standardize", 0.4, 0.1), 0.4, atol=1e-6)


def test_none_returns_the_image_itself_and_missing_targets_are_an_error():
    image = np.random.default_rng(0).random((4, 4, 1), dtype=np.float32)
    assert normalize_brightness(image, "none", None, None) is image
    with pytest.raises(SsimaeError, match="no targets.*measured when fitting"):
        normalize_brightness(image, "standardize", 0.5, None)


def test_background_moves_the_level_most_pixels_share_by_hand():
    """Nine pixels at 0.4, 0.41 and 0.42 beside a dark defect of four at 0.1. The defect pulls the median to 0.4;
    the median absolute deviation from it is 0.02, so the nine are kept (within 2 x 1.4826 x 0.02) and their
    median, 0.41, is the level. The next rounds keep the same nine. The mean is 0.3146."""
    values = np.array([0.4, 0.4, 0.4, 0.41, 0.41, 0.41, 0.42, 0.42, 0.42, 0.1, 0.1, 0.1, 0.1], np.float32)
    image = values.reshape(1, 13, 1)
    assert background_level(image) == pytest.approx(0.41, abs=1e-6)
    out = normalize_brightness(image, "background", 0.5, None)
    np.testing.assert_allclose(out.ravel(), values + 0.09, atol=1e-6)


def test_background_level_is_barely_moved_by_a_large_defect():
    """A textured image with a dark defect over a fifth of it: its level stays within 0.002 of the defect-free
    image's, where the mean moves by 0.06 and the median by more than the level."""
    rng = np.random.default_rng(0)
    clean = (0.5 + 0.05 * rng.standard_normal((100, 100))).astype(np.float32)
    damaged = clean.copy()
    damaged[:20] -= 0.3
    assert abs(background_level(damaged) - background_level(clean)) < 0.002
    assert abs(damaged.mean() - clean.mean()) > 0.05
    assert abs(np.median(damaged) - np.median(clean)) > abs(background_level(damaged) - background_level(clean))


def test_background_targets_are_the_training_images_average_level():
    first = np.array([0.3, 0.3, 0.3, 0.9], np.float32).reshape(2, 2, 1)  # level 0.3 (the 0.9 is left out)
    second = np.full((3, 3, 1), 0.5, np.float32)  # a flat image: level 0.5
    level, _ = brightness_targets([first, second], "background")
    assert level == pytest.approx(0.4, abs=1e-6)


def test_brightness_targets_weigh_each_image_alike_whatever_its_size():
    small = np.array([0.2, 0.4], np.float32).reshape(1, 2, 1)  # mean 0.3, deviation 0.1
    large = np.full((10, 10, 1), 0.7, np.float32)  # mean 0.7, deviation 0
    mean, sd = brightness_targets([small, large])
    assert mean == pytest.approx(0.5, abs=1e-6) and sd == pytest.approx(0.05, abs=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("input_normalization", "histogram", "none, mean, background, standardize"),
    ("input_mean", 1.5, r"\[0, 1\]"),
    ("input_sd", 0.0, r"\(0, 0.5\]"),
])
def test_bad_settings_are_refused(key, value, message):
    with pytest.raises(SettingError, match=message):
        Config(**{key: value}).validate()


def _lit_folder(root, rng, gains) -> None:
    """Good images of one texture under different lighting: gain and offset per image."""
    for i, (gain, offset) in enumerate(gains):
        write_png(root / f"good_{i}.png", to_uint8(offset + gain * texture(140, 150, rng, level=0.5)))


@pytest.mark.parametrize("method", ["blur", "patchcore", "ssim-ae"])  # no training, a memory bank, gradient training
def test_a_fit_records_the_targets_and_predict_sees_the_lighting_taken_out(tmp_path, method):
    rng = np.random.default_rng(0)
    _lit_folder(tmp_path / "good", rng, [(0.6, 0.05), (1.0, -0.1), (0.8, 0.1), (0.7, 0.0), (0.9, 0.05)])
    settings = dict(method=method, input_normalization="standardize", val_fraction=0.2)
    if method == "patchcore":
        settings.update(image_size="64x64", memory_bank_size=50)
    result = fit(tiny_config(**settings), tmp_path / "good", tmp_path / "run", progress=False)
    config = Checkpoint.load(result.checkpoint).config
    train = find_training_images(tmp_path / "good", config.val_fraction, config.seed).train  # the fit's own split
    kept = [working_image(read_image(p), Config(**{**settings, "input_normalization": "none"})) for p in train]
    assert (config.input_mean, config.input_sd) == pytest.approx(brightness_targets(kept), rel=1e-6)

    detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
    image = texture(140, 150, np.random.default_rng(5), level=0.5)[:, :, None]
    darker = 0.1 + 0.5 * image  # the same scene under other lighting, inside [0, 1]
    np.testing.assert_allclose(detector.anomaly_map(darker), detector.anomaly_map(image), atol=2e-4)


@pytest.mark.parametrize("how", ["background", "none"])
def test_a_background_fit_takes_out_a_shift_of_the_lighting_but_not_a_dark_defect(tmp_path, how):
    rng = np.random.default_rng(0)
    _lit_folder(tmp_path / "good", rng, [(1.0, 0.05), (1.0, -0.1), (1.0, 0.1), (1.0, 0.0)])
    settings = {"method": "patchcore", "image_size": "64x64", "memory_bank_size": 50}  # a shift changes its map
    result = fit(tiny_config(**settings, input_normalization=how), tmp_path / "good", tmp_path / "run", progress=False)
    if how == "none":  # the check below can fail
        detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
        image = 0.8 * texture(140, 150, np.random.default_rng(5), level=0.5)[:, :, None]
        assert np.abs(detector.anomaly_map(image + 0.15) - detector.anomaly_map(image)).max() > 0.1
        return
    config = Checkpoint.load(result.checkpoint).config
    train = find_training_images(tmp_path / "good", config.val_fraction, config.seed).train
    kept = [working_image(read_image(p), Config(**settings)) for p in train]
    assert config.input_mean == pytest.approx(brightness_targets(kept, "background")[0], rel=1e-6)

    detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
    image = 0.8 * texture(140, 150, np.random.default_rng(5), level=0.5)[:, :, None]  # 0.02-0.78
    np.testing.assert_allclose(detector.anomaly_map(image + 0.15), detector.anomaly_map(image), atol=2e-4)
    damaged = image.copy()
    damaged[66:74, 66:74] *= 0.3
    assert detector.anomaly_map(damaged)[60:80, 60:80].max() > 1.3 * detector.anomaly_map(image)[60:80, 60:80].max()


def test_without_normalization_the_lighting_changes_the_map(tmp_path):
    """The check above can fail: without input_normalization the darker copy's map differs."""
    rng = np.random.default_rng(0)
    _lit_folder(tmp_path / "good", rng, [(0.6, 0.05), (1.0, -0.1), (0.8, 0.1)])
    result = fit(tiny_config(method="blur"), tmp_path / "good", tmp_path / "run", progress=False)
    detector = load_detector(result.checkpoint, overrides={"device": "cpu"})
    image = texture(140, 150, np.random.default_rng(5), level=0.5)[:, :, None]
    assert np.abs(detector.anomaly_map(0.1 + 0.5 * image) - detector.anomaly_map(image)).max() > 0.01


def test_resume_with_another_normalization_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    _lit_folder(tmp_path / "good", rng, [(0.6, 0.05), (1.0, -0.1), (0.8, 0.1)])
    fit(tiny_config(max_steps=1), tmp_path / "good", tmp_path / "run", progress=False)
    with pytest.raises(SsimaeError, match="input_normalization differs"):
        fit(tiny_config(max_steps=2, input_normalization="mean"), tmp_path / "good", tmp_path / "run",
            resume=True, progress=False)
