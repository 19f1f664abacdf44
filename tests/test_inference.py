"""Sliding-window inference: exact tiling, coverage, averaging, padding of small images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssimae.errors import SsimaeError
from ssimae.inference import (WindowRun, coverage, cut_windows, sliding_window, smooth_map, torch_patch_fn,
                              window_runs, window_starts)
from ssimae.losses import SsimSettings, squared_error_map
from ssimae.models import ConvAutoencoder
from ssimae.ssim import ssim_residual

P = 8  # a small patch keeps these tests fast; the tiling logic does not depend on the size


def identity(patches: torch.Tensor) -> torch.Tensor:
    return patches


def _image(height, width, channels=1, seed=0):
    return np.random.default_rng(seed).random((height, width, channels), dtype=np.float32)


@pytest.mark.parametrize(
    "length, patch, stride, expected",
    [
        (10, 4, 3, [0, 3, 6]),  # the regular grid already ends at the edge
        (10, 4, 4, [0, 4, 6]),  # last window pulled back to the edge
        (4, 4, 1, [0]),  # exactly one patch
        (4, 4, 4, [0]),
        (7, 4, 1, [0, 1, 2, 3]),
        (9, 5, 5, [0, 4]),
        (11, 5, 3, [0, 3, 6]),
        (128, 128, 30, [0]),
        (200, 128, 30, [0, 30, 60, 72]),
        (256, 128, 128, [0, 128]),
    ],
)
def test_window_starts_hand_cases(length, patch, stride, expected):
    assert window_starts(length, patch, stride) == expected


@pytest.mark.parametrize("stride", [0, -1, 9, 100])
def test_bad_stride_raises_user_error(stride):
    with pytest.raises(SsimaeError, match="stride"):
        window_starts(20, P, stride)
    with pytest.raises(SsimaeError, match="stride"):
        sliding_window(_image(20, 20), identity, P, stride)


def test_window_starts_needs_padding_first():
    with pytest.raises(ValueError):
        window_starts(5, P, 2)


SIZES = [(8, 8), (9, 13), (17, 8), (20, 23), (31, 16)]
STRIDES = [1, 3, 5, 8]  # 1, non-divisors, the patch size


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("stride", STRIDES)
def test_identity_patch_fn_reproduces_the_image(height, width, stride):
    image = _image(height, width, channels=2, seed=height * 100 + width)
    merged = sliding_window(image, identity, P, stride, batch_size=7)
    assert merged.shape == (2, height, width) and merged.dtype == np.float32
    np.testing.assert_allclose(merged, image.transpose(2, 0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("stride", STRIDES)
def test_windows_cover_every_pixel_and_end_at_the_edges(height, width, stride):
    # Encode each pixel's index in the image, so the patch fn can tell where each window starts.
    index = np.arange(height * width, dtype=np.float32).reshape(height, width, 1)
    starts = []

    def record(patches):
        for patch in patches:
            flat = int(patch[0, 0, 0])
            starts.append(divmod(flat, width))
            # The window is a contiguous P x P block of the image.
            y, x = divmod(flat, width)
            assert torch.equal(patch[0], torch.from_numpy(index[y : y + P, x : x + P, 0]))
        return patches

    sliding_window(index, record, P, stride, batch_size=5)
    ys, xs = window_starts(height, P, stride), window_starts(width, P, stride)
    assert sorted(starts) == sorted((y, x) for y in ys for x in xs)  # each window once
    assert max(y for y, _ in starts) == height - P and max(x for _, x in starts) == width - P
    counts = np.zeros((height, width))
    for y, x in starts:
        counts[y : y + P, x : x + P] += 1
    assert counts.min() >= 1
    np.testing.assert_array_equal(counts, np.outer(coverage(height, P, stride), coverage(width, P, stride)))
    # Consecutive windows never leave a gap.
    assert all(b - a <= P for a, b in zip(ys, ys[1:])) and all(b - a <= P for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("height, width, stride", [(20, 23, 3), (17, 8, 5), (12, 12, 1), (9, 30, 8)])
def test_overlaps_are_averaged(height, width, stride, fold):
    """Each window outputs position-dependent values; the merge must be their per-pixel mean, whether
    the outputs are added one by one (the CPU's way) or by fold (the GPU's)."""

    def local_coordinates(patches):  # output: column within the patch, and the patch's top-left value
        n = patches.shape[0]
        columns = torch.arange(P, dtype=torch.float32).expand(n, 1, P, P)
        corner = patches[:, :1, :1, :1].expand(n, 1, P, P)
        return torch.cat([columns, corner], dim=1)  # (N, 2, P, P)

    image = np.arange(height * width, dtype=np.float32).reshape(height, width, 1)
    merged = sliding_window(image, local_coordinates, P, stride, batch_size=4, fold=fold)
    total, counts = np.zeros((2, height, width)), np.zeros((height, width))
    for y in window_starts(height, P, stride):
        for x in window_starts(width, P, stride):
            total[0, y : y + P, x : x + P] += np.arange(P)[None, :]
            total[1, y : y + P, x : x + P] += image[y, x, 0]
            counts[y : y + P, x : x + P] += 1
    expected = total / counts
    np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-4)
    if stride < P < width:
        assert not np.allclose(merged[0], np.arange(width)[None, :] % P)  # overlaps really mix values


def test_window_runs_group_windows_on_the_stride_s_pitch_within_a_row():
    positions = [(0, 0), (0, 3), (0, 6), (0, 7), (4, 0), (4, 3), (4, 7)]
    assert window_runs(positions, 3) == [WindowRun(0, 0, 3, 0), WindowRun(0, 7, 1, 3), WindowRun(4, 0, 2, 4),
                                         WindowRun(4, 7, 1, 6)]
    assert window_runs([], 3) == []


def test_cut_windows_are_the_slices_of_the_image():
    image = torch.from_numpy(_image(14, 17, seed=1)).permute(2, 0, 1)  # (C, H, W)
    positions = [(y, x) for y in window_starts(14, P, 3) for x in window_starts(17, P, 3)][2:11]
    cut = cut_windows(image, window_runs(positions, 3), P, 3)
    expected = torch.stack([image[:, y : y + P, x : x + P] for y, x in positions])
    torch.testing.assert_close(cut, expected, rtol=0, atol=0)


def test_batch_size_does_not_change_the_result():
    image = _image(21, 19, seed=3)

    def nonlinear(patches):
        return patches**2 + torch.arange(P, dtype=torch.float32)[None, None, :, None]

    results = [sliding_window(image, nonlinear, P, 3, batch_size=b) for b in (1, 4, 1000)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("height, width", [(5, 6), (3, 8), (8, 5), (5, 20), (1, 1)])
def test_images_smaller_than_the_patch_are_padded_and_cropped_back(height, width):
    image = _image(height, width, channels=3, seed=4)
    sizes = []

    def check(patches):
        sizes.append(tuple(patches.shape[-2:]))
        return patches

    merged = sliding_window(image, check, P, 3)
    assert set(sizes) == {(P, P)}
    assert merged.shape == (3, height, width)
    np.testing.assert_allclose(merged, image.transpose(2, 0, 1), atol=1e-6, rtol=0)
    amap = sliding_window(image, lambda p: p.mean(dim=1, keepdim=True), P, 3)[0]
    assert amap.shape == (height, width)
    np.testing.assert_allclose(amap, image.mean(axis=2), atol=1e-6, rtol=0)


def test_torch_patch_fn_residual_and_reconstruction():
    torch.manual_seed(0)
    model = ConvAutoencoder(channels=1, latent_dim=4)
    model.train()
    patches = torch.rand(2, 1, 128, 128)
    ssim_fn = torch_patch_fn(model, "ssim", SsimSettings(), "cpu")
    assert not model.training  # inference runs in eval mode
    residual = ssim_fn(patches)
    with torch.no_grad():
        x_hat = model(patches)
    assert residual.shape == (2, 1, 128, 128) and not residual.requires_grad
    torch.testing.assert_close(residual, ssim_residual(patches, x_hat))
    l2 = torch_patch_fn(model, "l2")(patches)
    torch.testing.assert_close(l2, squared_error_map(patches, x_hat))
    recon = torch_patch_fn(model, "ssim", outputs="reconstruction")(patches)
    torch.testing.assert_close(recon, x_hat)
    # A full-size anomaly map through the model has the image's size.
    image = _image(130, 150, seed=5)
    amap = sliding_window(image, ssim_fn, 128, 64, batch_size=8)[0]
    assert amap.shape == (130, 150) and np.isfinite(amap).all()


def test_smooth_map_is_scipy_gaussian_with_reflection_and_zero_is_identity():
    from scipy import ndimage

    amap = np.random.default_rng(3).random((40, 50), dtype=np.float32)
    assert smooth_map(amap, 0) is amap
    np.testing.assert_allclose(smooth_map(amap, 2.0), ndimage.gaussian_filter(amap.astype(np.float64), 2.0,
                                                                              mode="reflect"), atol=1e-6)


@pytest.mark.parametrize("precision, expected", [("fp32", False), ("tf32", True)])
def test_inference_sets_the_tf32_switches_its_precision_asks_for_and_restores_them(precision, expected):
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return x

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = not expected  # torch's default on CUDA is True for convolutions
    try:
        torch_patch_fn(Spy(), "l2", precision=precision)(torch.rand(2, 1, 16, 16))
        assert seen == [(expected, expected)]
        assert torch.backends.cudnn.allow_tf32 is (not expected)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
