"""SSIM maps against skimage (an independent reference), the component form, loss and residual."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from ssimae.ssim import C1, C2, gaussian_window, ssim_components, ssim_loss, ssim_map, ssim_residual

BORDER = 6  # skimage pads with scipy 'reflect' (edge repeated), we with torch 'reflect': borders differ


def _pair(shape, seed=0, noise=0.15):
    rng = np.random.default_rng(seed)
    a = rng.random(shape).astype(np.float32)
    a = (a + np.roll(a, 1, axis=0) + np.roll(a, 1, axis=1)) / 3  # some spatial correlation
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return a, b


def _nchw(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]  # (1, C, H, W)


def _skimage_full(a, b, channel_axis=None):
    _, full = structural_similarity(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, full=True, channel_axis=channel_axis)
    return full


@pytest.mark.parametrize("shape", [(40, 50), (33, 27)])
def test_gray_matches_skimage_away_from_borders(shape):
    a, b = _pair(shape)
    ours = ssim_map(_nchw(a), _nchw(b))[0, 0].numpy()
    reference = _skimage_full(a, b)
    assert ours.shape == reference.shape == shape
    crop = (slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    np.testing.assert_allclose(ours[crop], reference[crop], atol=1e-4, rtol=0)
    assert np.abs(ours[crop] - reference[crop]).max() < 1e-4
    assert np.ptp(reference[crop]) > 0.3  # a varied map, so the comparison means something


def test_rgb_is_the_channel_mean_of_skimage_per_channel_maps():
    a, b = _pair((36, 44, 3), seed=1)
    b[:, :, 2] = a[:, :, 2]  # one channel identical: the channels must really be averaged, not pooled
    ours = ssim_map(_nchw(a), _nchw(b))
    assert ours.shape == (1, 1, 36, 44)
    full = _skimage_full(a, b, channel_axis=2)
    assert full.shape == (36, 44, 3)  # skimage returns one full map per channel on the channel axis
    crop = (slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    np.testing.assert_allclose(ours[0, 0].numpy()[crop], full.mean(axis=2)[crop], atol=1e-4, rtol=0)
    # and per-channel: each channel alone matches its gray SSIM
    for c in range(3):
        single = ssim_map(_nchw(a[:, :, c]), _nchw(b[:, :, c]))[0, 0].numpy()
        np.testing.assert_allclose(single[crop], full[:, :, c][crop], atol=1e-4, rtol=0)


def test_identical_images_give_one_everywhere():
    a, _ = _pair((2, 3, 24, 30), seed=2)
    x = torch.from_numpy(a)
    flat = torch.full((1, 1, 20, 20), 0.7)  # zero variance everywhere
    for image in (x, flat):
        torch.testing.assert_close(ssim_map(image, image.clone()), torch.ones(image.shape[0], 1, *image.shape[2:]),
                                   atol=1e-5, rtol=0)


def test_batch_items_are_independent():
    a, b = _pair((3, 1, 24, 24), seed=3)
    x, y = torch.from_numpy(a), torch.from_numpy(b)
    whole = ssim_map(x, y)
    for i in range(3):
        torch.testing.assert_close(whole[i : i + 1], ssim_map(x[i : i + 1], y[i : i + 1]))


def test_component_product_equals_closed_form():
    a, b = _pair((2, 3, 32, 32), seed=4, noise=0.3)
    x, y = torch.from_numpy(a), torch.from_numpy(b)
    closed = ssim_map(x, y)  # alpha = beta = gamma = 1: the closed formula
    general = ssim_map(x, y, alpha=1.0000001)  # forces the l^a c^b s^g path
    torch.testing.assert_close(general, closed, atol=1e-5, rtol=0)
    l, c, s = ssim_components(x, y)
    torch.testing.assert_close((l * c * s).mean(dim=1, keepdim=True), closed, atol=1e-5, rtol=0)
    # Components are bounded: l, c in (0, 1], s in [-1, 1] (up to rounding).
    assert float(l.min()) > 0 and float(l.max()) <= 1 + 1e-6
    assert float(c.min()) > 0 and float(c.max()) <= 1 + 1e-6
    assert float(s.abs().max()) <= 1 + 1e-5


def test_closed_form_by_hand_at_one_pixel():
    """Recompute SSIM at one interior pixel from the Gaussian-weighted window by hand (float64)."""
    a, b = _pair((25, 25), seed=5, noise=0.25)
    w1 = gaussian_window(11, 1.5, dtype=torch.float64).numpy()
    w = np.outer(w1, w1)
    p, q = a[7:18, 7:18].astype(np.float64), b[7:18, 7:18].astype(np.float64)  # window centred on (12, 12)
    mu_p, mu_q = (w * p).sum(), (w * q).sum()
    var_p, var_q = (w * p * p).sum() - mu_p**2, (w * q * q).sum() - mu_q**2
    cov = (w * p * q).sum() - mu_p * mu_q
    expected = (2 * mu_p * mu_q + C1) * (2 * cov + C2) / ((mu_p**2 + mu_q**2 + C1) * (var_p + var_q + C2))
    assert float(ssim_map(_nchw(a), _nchw(b))[0, 0, 12, 12]) == pytest.approx(expected, abs=1e-5)
    assert w1.sum() == pytest.approx(1.0) and w1.argmax() == 5


def test_non_default_exponents_change_the_result_as_the_formula_says():
    a, b = _pair((1, 1, 32, 32), seed=6, noise=0.3)
    x, y = torch.from_numpy(a), torch.from_numpy(b)
    l, c, s = ssim_components(x, y)
    default = ssim_map(x, y)
    for alpha, beta, gamma in [(2.0, 1.0, 1.0), (1.0, 0.5, 1.0), (1.0, 1.0, 3.0)]:
        changed = ssim_map(x, y, alpha=alpha, beta=beta, gamma=gamma)
        assert (changed - default).abs().max() > 1e-3, (alpha, beta, gamma)
        torch.testing.assert_close(changed, l**alpha * c**beta * s**gamma, atol=1e-5, rtol=1e-5)


def test_fractional_structure_exponent_keeps_the_sign():
    a, _ = _pair((1, 1, 32, 32), seed=7)
    x = torch.from_numpy(a)
    y = 1 - x  # anti-correlated: structure term negative
    _, _, s = ssim_components(x, y)
    out = ssim_map(x, y, gamma=0.5)
    assert torch.isfinite(out).all()
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    assert (s[inner] < 0).all() and (out[inner] < 0).all()


@pytest.mark.parametrize("exponents", [{}, {"gamma": 0.5}, {"alpha": 2.0, "beta": 2.0}])
def test_loss_gradient_is_finite_including_flat_regions(exponents):
    rng = np.random.default_rng(8)
    target = torch.from_numpy(rng.random((2, 1, 24, 24), dtype=np.float32))
    target[1] = 0.5  # a flat target: zero variance
    for start in (torch.rand(2, 1, 24, 24), target.clone(), torch.zeros(2, 1, 24, 24)):
        x = start.clone().requires_grad_(True)
        loss = ssim_loss(x, target, **exponents)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(x.grad).all(), f"non-finite gradient with {exponents}"
    # And the gradient points downhill: one small step lowers the loss.
    x = torch.rand(2, 1, 24, 24, requires_grad=True)
    loss = ssim_loss(x, target)
    loss.backward()
    with torch.no_grad():
        assert ssim_loss(x - 0.5 * x.grad / x.grad.abs().max(), target) < loss


def test_residual_is_in_zero_two():
    a, b = _pair((1, 3, 30, 30), seed=9, noise=0.4)
    x, y = torch.from_numpy(a), torch.from_numpy(b)
    for other in (y, x.clone(), 1 - x, torch.zeros_like(x), torch.ones_like(x)):
        r = ssim_residual(x, other)
        assert r.shape == (1, 1, 30, 30)
        assert float(r.min()) >= -1e-6 and float(r.max()) <= 2 + 1e-6
    assert float(ssim_residual(x, 1 - x).max()) > 1.5  # anti-correlated content scores near 2
    torch.testing.assert_close(ssim_loss(x, y), ssim_residual(x, y).mean())


def test_shape_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        ssim_map(torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 21))
    with pytest.raises(ValueError, match="too small"):
        ssim_map(torch.rand(1, 1, 4, 20), torch.rand(1, 1, 4, 20))


def test_training_after_inference_mode_works():
    """Anything cached during a first call under inference_mode must stay usable by autograd."""
    shape = (1, 1, 37, 43)  # a size no other test uses, so nothing is cached yet
    with torch.inference_mode():
        ssim_map(torch.rand(shape), torch.rand(shape), alpha=2.0)
        ssim_map(torch.rand(shape), torch.rand(shape))
    x = torch.rand(shape, requires_grad=True)
    ssim_loss(x, torch.rand(shape)).backward()
    ssim_loss(x, torch.rand(shape), gamma=0.5).backward()
    assert torch.isfinite(x.grad).all()


def test_data_range_scales_the_constants_as_skimage_does():
    """data_range L is the L of C1 = (0.01 L)^2, C2 = (0.03 L)^2: SSIM of (x, y) at range L equals SSIM of
    (x / L, y / L) at range 1, and matches skimage's data_range; low-contrast images score lower with a
    small L (the constants no longer dominate their variances)."""
    a, b = _pair((40, 50))
    a, b = 0.4 + 0.1 * a, 0.4 + 0.1 * b  # low contrast: intensities within [0.4, 0.5]
    ours = ssim_map(_nchw(a), _nchw(b), data_range=0.1)[0, 0].numpy()
    scaled = ssim_map(_nchw(a / 0.1), _nchw(b / 0.1))[0, 0].numpy()
    np.testing.assert_allclose(ours, scaled, atol=1e-5)
    _, reference = structural_similarity(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=0.1, full=True)
    crop = (slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    np.testing.assert_allclose(ours[crop], reference[crop], atol=1e-4)
    assert ours[crop].mean() < ssim_map(_nchw(a), _nchw(b))[0, 0].numpy()[crop].mean() - 0.1


def test_fused_map_is_declined_off_cuda_and_when_its_check_fails(monkeypatch, caplog):
    import ssimae.fused_ssim as fused

    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_verified", {})
    assert not fused.fused_available(torch.device("cpu"))  # the CPU keeps ssim.ssim_residual
    assert fused._kernels is None  # not even tried
    if torch.cuda.is_available():  # a GPU machine runs the check for real (tests/test_cuda.py)
        return
    with caplog.at_level("INFO", logger="ssimae.fused_ssim"):
        assert not fused.fused_available(torch.device("cuda"))  # the check fails: no CUDA here
    assert fused._kernels is False and "using the plain path" in caplog.text
    assert not fused.fused_available(torch.device("cuda:1"))  # decided once per process
