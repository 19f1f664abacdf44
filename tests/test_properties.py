"""Property-based tests (hypothesis): the sliding window, the metrics and the image loader on inputs
nobody wrote by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.metrics import roc_auc_score

from ssimae.data import read_image
from ssimae.errors import SsimaeError
from ssimae.inference import coverage, sliding_window, window_starts
from ssimae.metrics import au_pro, evaluate_maps, image_auroc, pixel_auroc

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def windows(draw):
    patch = draw(st.integers(2, 12))
    stride = draw(st.integers(1, patch))
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    channels = draw(st.sampled_from([1, 3]))
    return height, width, channels, patch, stride


@FAST
@given(windows(), st.integers(0, 2**31 - 1))
def test_sliding_window_covers_every_pixel_and_reproduces_the_image(case, seed):
    height, width, channels, patch, stride = case
    image = np.random.default_rng(seed).random((height, width, channels), dtype=np.float32)
    merged = sliding_window(image, lambda patches: patches, patch, stride, batch_size=7)
    assert merged.shape == (channels, height, width)
    # Up to patch^2 float32 additions per pixel (stride 1): a few ulps of rounding.
    np.testing.assert_allclose(merged, image.transpose(2, 0, 1), atol=1e-5, rtol=0)
    for length in (max(height, patch), max(width, patch)):
        starts = window_starts(length, patch, stride)
        assert starts[0] == 0 and starts[-1] == length - patch and np.all(np.diff(starts) <= stride)
        assert (coverage(length, patch, stride) >= 1).all()


@st.composite
def labelled_maps(draw):
    """1-3 maps of random sizes with a few quantised score levels (ties) and rectangular defects."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    levels = draw(st.sampled_from([3, 17, 1000]))
    maps, masks = [], []
    for _ in range(draw(st.integers(1, 3))):
        h, w = draw(st.integers(4, 24)), draw(st.integers(4, 24))
        masks.append(np.zeros((h, w), dtype=bool))
        if draw(st.booleans()):
            top, left = draw(st.integers(0, h - 2)), draw(st.integers(0, w - 2))
            masks[-1][top : top + draw(st.integers(1, h - top)), left : left + draw(st.integers(1, w - left))] = True
        maps.append((rng.integers(0, levels, (h, w)) / levels + 0.3 * masks[-1] * rng.random()).astype(np.float32))
    return maps, masks


def _both_classes(masks) -> bool:
    pixels = np.concatenate([m.ravel() for m in masks])
    return pixels.any() and not pixels.all()


@FAST
@given(labelled_maps())
def test_pixel_auroc_equals_sklearn_and_metrics_stay_in_bounds(case):
    maps, masks = case
    if not _both_classes(masks):
        assert np.isnan(pixel_auroc(maps, masks))
        return
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-9)
    for value in evaluate_maps(maps, masks).values():
        assert np.isnan(value) or 0.0 <= value <= 1.0


@FAST
@given(labelled_maps(), st.sampled_from(["affine", "exp", "cube"]))
def test_metrics_do_not_change_under_a_strictly_increasing_transform_of_the_map(case, transform):
    maps, masks = case
    if not _both_classes(masks):
        return
    f = {"affine": lambda m: 3.0 * m + 1.0, "exp": lambda m: np.exp(2 * m), "cube": lambda m: (m - 0.4) ** 3}[transform]
    moved = [f(m.astype(np.float64)) for m in maps]
    original = [m.astype(np.float64) for m in maps]
    assert pixel_auroc(moved, masks) == pytest.approx(pixel_auroc(original, masks), abs=1e-12)
    assert au_pro(moved, masks) == pytest.approx(au_pro(original, masks), abs=1e-9, nan_ok=True)
    labels = np.array([m.any() for m in masks])
    if 0 < labels.sum() < len(labels):
        assert image_auroc(np.array([m.max() for m in moved]), labels) == pytest.approx(
            image_auroc(np.array([m.max() for m in original]), labels), abs=1e-12)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, len(PNG) - 1), st.binary(min_size=1, max_size=8)).map(
                     lambda cut: PNG[: cut[0]] + cut[1] + PNG[cut[0] + len(cut[1]):])),
       st.sampled_from([".png", ".jpg", ".bmp", ".tiff"]))
def test_the_image_loader_gives_only_the_clean_error_on_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    try:
        image = read_image(path)
    except SsimaeError as error:
        assert str(path) in str(error) and "\n" not in str(error)
    else:  # some corruptions still decode: then the result must be a valid image
        assert image.ndim == 3 and image.shape[2] in (1, 3) and image.dtype == np.float32
        assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
