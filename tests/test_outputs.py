"""predict's picture outputs: the PNG encoder against Pillow's decoder, the contour against scipy."""

import io
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import ssimae.png
from ssimae.overlay import contour
from ssimae.png import encode_png


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (2, 3), (37, 53), (1, 1, 3), (5, 1, 3), (64, 48, 3)])
def test_png_decodes_to_the_array(shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)  # row differences wrap around 256
    decoded = Image.open(io.BytesIO(encode_png(array)))
    assert decoded.mode == ("L" if len(shape) == 2 else "RGB")
    assert np.array_equal(np.asarray(decoded), array)


def test_png_of_a_mask_and_an_overlay_like_picture():
    mask = np.zeros((200, 300), dtype=np.uint8)
    mask[50:90, 100:180] = 255
    picture = np.zeros((120, 160, 3), dtype=np.uint8)
    picture[..., 0] = np.arange(160, dtype=np.uint8)[None, :]
    picture[..., 2] = np.arange(120, dtype=np.uint8)[:, None]
    for array in (mask, picture, np.asfortranarray(picture), picture[::2, ::3]):  # non-contiguous inputs too
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(array)))), array)
    assert len(encode_png(mask)) < 1000  # the Up filter makes a flat mask compress to almost nothing


def test_png_is_deflated_by_isal_when_installed_and_by_zlib_without(monkeypatch):
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    assert ssimae.png.deflate is isal_zlib  # a dependency: installed with ssimae
    picture = np.random.default_rng(3).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    fast = encode_png(picture)
    monkeypatch.setattr(ssimae.png, "deflate", zlib)  # the fallback without the isal package
    plain = encode_png(picture)
    assert fast != plain  # two encoders, the same picture
    for data in (fast, plain):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), picture)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((0, 4), np.uint8), np.zeros(4, np.uint8)])
def test_png_refuses_what_it_cannot_encode(bad):
    with pytest.raises((TypeError, ValueError)):
        encode_png(bad)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (2, 2), (3, 3), (17, 23), (90, 70)])
@pytest.mark.parametrize("thick", [False, True])
def test_contour_matches_scipy_morphology(shape, thick):
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    for fill in (0.0, 0.2, 0.6, 0.95, 1.0):
        mask = rng.random(shape) < fill
        edge = mask & ~ndimage.binary_erosion(mask, iterations=1, border_value=0)
        expected = ndimage.binary_dilation(edge, iterations=1) if thick else edge
        assert np.array_equal(contour(mask, thick), expected)


def test_the_score_column_is_the_score_over_the_threshold_and_finite_for_a_zero_map():
    from ssimae.detector import Prediction
    from ssimae.predict import score_row

    clean = Prediction(np.zeros((4, 4), np.float32), np.zeros((4, 4), bool), 0.0, False, 0)
    hot = Prediction(np.full((4, 4), 0.3, np.float32), np.ones((4, 4), bool), 0.3, True, 1)
    assert score_row("a.png", hot, 0.1, 0.2)["score"] == pytest.approx(1.5)  # the image threshold's ratio
    assert score_row("a.png", hot, 0.1, None)["score"] == pytest.approx(3.0)  # no image threshold: the pixel one
    assert score_row("a.png", clean, 0.0, None)["score"] == 0.0  # a zero map at a zero threshold is not inf
    assert score_row("a.png", hot, 0.0, None)["score"] == float("inf")
