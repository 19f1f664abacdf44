"""SSIM maps and loss with a separable Gaussian window.

SSIM(p, q) = l^alpha * c^beta * s^gamma with
    l = (2 mu_p mu_q + C1) / (mu_p^2 + mu_q^2 + C1)              luminance
    c = (2 sigma_p sigma_q + C2) / (sigma_p^2 + sigma_q^2 + C2)  contrast
    s = (sigma_pq + C3) / (sigma_p sigma_q + C3)                  structure, C3 = C2 / 2
With alpha = beta = gamma = 1 the product equals the closed formula of the paper,
(2 mu_p mu_q + C1)(2 sigma_pq + C2) / ((mu_p^2 + mu_q^2 + C1)(sigma_p^2 + sigma_q^2 + C2)),
which is what we compute on that path (it is cheaper and has no square roots).

The local statistics filter the five moment images x, y, x^2, y^2, xy of every channel with a
separable Gaussian (one 1-D pass per axis instead of 121 taps), reflect-padded at the border.
For images up to MATRIX_MAX_SIDE pixels a side (training and inference patches) each pass is one
matrix product with a precomputed (L, L) banded matrix that holds the taps and the reflect padding:
G_h @ M @ G_w^T. It does more multiply-adds than 11-tap convolutions, but runs at the matmul rate,
which depthwise convolutions (and their backward even more) do not: several times faster for the
loss (figures in bench/README.md). Larger images keep the grouped convolutions, whose cost
does not grow with the side. When only one input needs a gradient (the training loss:
the reconstruction does, the input patch does not), the other input's moments are filtered apart,
so the backward pass filters 3 moment images instead of 5. Statistics are population (biased)
moments, as in Wang et al. 2004 and skimage's use_sample_covariance=False.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

K1, K2 = 0.01, 0.03  # Wang et al. 2004: C1 = (K1 L)^2, C2 = (K2 L)^2, C3 = C2 / 2, L the data range
C1, C2 = K1**2, K2**2  # the constants for L = 1 (images in [0, 1])
MATRIX_MAX_SIDE = 256  # up to this side a filter pass is a banded-matrix product, above it a 1-D conv


class SsimComponents(NamedTuple):
    luminance: torch.Tensor  # (N, C, H, W)
    contrast: torch.Tensor  # (N, C, H, W)
    structure: torch.Tensor  # (N, C, H, W)


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, shape (size,)."""
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    taps = torch.exp(-(coords**2) / (2 * sigma**2))
    return taps / taps.sum()


def filter_matrix(length: int, window: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, length) matrix G with G @ v = v reflect-padded by window // 2, Gaussian-filtered, cropped.

    Row i holds the taps at the columns they read after reflection (torch 'reflect': no edge repeat),
    summed where two taps land on one column. Built in float64; cached (callers must not modify it).
    """
    # int(): under an ONNX trace a shape is a tensor; the matrix is a constant of the traced side anyway.
    return _filter_matrix(int(length), int(window), float(sigma), torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=32)
def _filter_matrix(length: int, window: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    pad = window // 2
    if pad >= length:
        raise ValueError(f"length {length} is too small for a {window}-tap reflect-padded window")
    # Built with numpy, not torch ops: a first call inside an ONNX/JIT trace then records a plain constant.
    taps = np.exp(-((np.arange(window) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    taps /= taps.sum()  # as gaussian_window, in float64
    rows = np.repeat(np.arange(length)[:, None], window, axis=1)  # (L, window)
    cols = np.abs(rows + np.arange(window)[None, :] - pad)  # reflect at the start
    cols = np.where(cols >= length, 2 * (length - 1) - cols, cols)  # reflect at the end
    matrix = np.zeros((length, length))
    np.add.at(matrix, (rows, cols), np.broadcast_to(taps, (length, window)))
    # The result is cached: a first call under torch.inference_mode() (sliding-window inference) must
    # not cache an inference tensor, which a later training step could not save for backward.
    with torch.inference_mode(False):
        return torch.from_numpy(matrix).to(device=device, dtype=dtype)


def _gaussian_filter(images: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of (N, K, H, W) images with reflect padding, same-size output."""
    n, k, h, w = images.shape
    if max(h, w) <= MATRIX_MAX_SIDE:
        g_h = filter_matrix(h, window, sigma, images.device, images.dtype)
        g_w = filter_matrix(w, window, sigma, images.device, images.dtype)
        return torch.matmul(g_h, torch.matmul(images, g_w.transpose(0, 1)))  # G_h @ M @ G_w^T per image
    taps = gaussian_window(window, sigma, images.device, images.dtype)
    kernel_h = taps.view(1, 1, 1, window).expand(k, 1, 1, window)
    kernel_v = taps.view(1, 1, window, 1).expand(k, 1, window, 1)
    pad = window // 2
    # Reflect padding (the edge pixel not repeated) keeps the map the size of the image. skimage's full map
    # mirrors with the edge repeated, so the outer 5 pixels differ from it (the interior agrees to 4e-7).
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel_h, groups=k), kernel_v, groups=k)


def _local_moments(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float):
    """Gaussian-weighted means, variances and covariance; inputs (N, C, H, W), same-size outputs."""
    c = x.shape[1]
    # Centre each image on its mean first: var = E[x^2] - E[x]^2 then subtracts small numbers. Without
    # it float32 cancellation left ~1e-7 variances on flat images, which moved SSIM by up to 1e-4.
    # The centres are constants to autograd; exact, since the filter's rows sum to 1 (shift-invariant).
    centre_x = x.detach().mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    centre_y = y.detach().mean(dim=(2, 3), keepdim=True)
    x, y = x - centre_x, y - centre_y
    if x.requires_grad == y.requires_grad:
        moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5C, H, W)
        mu_x, mu_y, xx, yy, xy = _gaussian_filter(moments, window, sigma).split(c, dim=1)  # each (N, C, H, W)
    else:
        # One side is constant (the input patch of a training step): filter its moments apart, so
        # autograd's backward filters only the 3 moment images that depend on the other side.
        a, b = (x, y) if not x.requires_grad else (y, x)
        mu_a, aa = _gaussian_filter(torch.cat([a, a * a], dim=1), window, sigma).split(c, dim=1)
        mu_b, bb, xy = _gaussian_filter(torch.cat([b, b * b, a * b], dim=1), window, sigma).split(c, dim=1)
        (mu_x, xx), (mu_y, yy) = ((mu_a, aa), (mu_b, bb)) if a is x else ((mu_b, bb), (mu_a, aa))
    var_x = (xx - mu_x * mu_x).clamp_min(0)
    var_y = (yy - mu_y * mu_y).clamp_min(0)
    cov = xy - mu_x * mu_y
    return mu_x + centre_x, mu_y + centre_y, var_x, var_y, cov


def constants(data_range: float = 1.0) -> tuple[float, float, float]:
    """C1, C2, C3 for images whose intensities span `data_range` (L in Wang et al. 2004)."""
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return c1, c2, c2 / 2


def ssim_components(
    x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> SsimComponents:
    """Luminance, contrast and structure maps per channel, (N, C, H, W) each."""
    c1, c2, c3 = constants(data_range)
    mu_x, mu_y, var_x, var_y, cov = _local_moments(x, y, window, sigma)
    # Floor before the square root: sqrt'(0) is inf, which made gradients NaN on flat regions
    # (variance exactly 0). A 1e-6 standard deviation is far below float32 variance noise.
    sd_x, sd_y = var_x.clamp_min(1e-12).sqrt(), var_y.clamp_min(1e-12).sqrt()
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast = (2 * sd_x * sd_y + c2) / (var_x + var_y + c2)
    structure = (cov + c3) / (sd_x * sd_y + c3)
    return SsimComponents(luminance, contrast, structure)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = 11,
    sigma: float = 1.5,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Per-pixel SSIM averaged over channels: (N, C, H, W) x2 -> (N, 1, H, W).

    data_range is L of the constants: 1 for the full [0, 1] range (the paper); the span of the
    images' actual intensities makes the constants small against their local contrast.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim_map needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) <= window // 2:
        raise ValueError(f"image {tuple(x.shape[-2:])} is too small for a {window}x{window} SSIM window")
    if alpha == beta == gamma == 1.0:
        c1, c2, _ = constants(data_range)
        mu_x, mu_y, var_x, var_y, cov = _local_moments(x, y, window, sigma)
        numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
        denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        per_channel = numerator / denominator
    else:
        l, c, s = ssim_components(x, y, window, sigma, data_range)
        # The structure term can be negative; a fractional exponent needs its sign kept.
        per_channel = l.pow(alpha) * c.pow(beta) * s.sign() * s.abs().pow(gamma)
    return per_channel.mean(dim=1, keepdim=True)


def ssim_residual(x: torch.Tensor, y: torch.Tensor, **ssim_kwargs) -> torch.Tensor:
    """Anomaly map 1 - SSIM per pixel, (N, 1, H, W)."""
    return 1.0 - ssim_map(x, y, **ssim_kwargs)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, **ssim_kwargs) -> torch.Tensor:
    """Mean of 1 - SSIM over pixels and batch: the training loss of the SSIM autoencoder."""
    return ssim_residual(x, y, **ssim_kwargs).mean()
