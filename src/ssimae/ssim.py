"""SSIM maps and loss with a separable Gaussian window.

SSIM(p, q) = l^alpha * c^beta * s^gamma with
    l = (2 mu_p mu_q + C1) / (mu_p^2 + mu_q^2 + C1)              luminance
    c = (2 sigma_p sigma_q + C2) / (sigma_p^2 + sigma_q^2 + C2)  contrast
    s = (sigma_pq + C3) / (sigma_p sigma_q + C3)                  structure, C3 = C2 / 2
With alpha = beta = gamma = 1 the product equals the closed formula of the paper,
(2 mu_p mu_q + C1)(2 sigma_pq + C2) / ((mu_p^2 + mu_q^2 + C1)(sigma_p^2 + sigma_q^2 + C2)),
which is what we compute on that path (it is cheaper and has no square roots).

The local statistics come from one grouped convolution with a 1-D Gaussian along each axis
(11 + 11 taps instead of 121): the five moment images x, y, x^2, y^2, xy of every channel are
filtered together in a single call per axis. Statistics are population (biased) moments, as in
Wang et al. 2004 and skimage's use_sample_covariance=False.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

C1 = 0.01**2  # (K1 L)^2 with L = 1 for images in [0, 1]
C2 = 0.03**2  # (K2 L)^2
C3 = C2 / 2


class SsimComponents(NamedTuple):
    luminance: torch.Tensor  # (N, C, H, W)
    contrast: torch.Tensor  # (N, C, H, W)
    structure: torch.Tensor  # (N, C, H, W)


def gaussian_window(size: int = 11, sigma: float = 1.5, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, shape (size,)."""
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    taps = torch.exp(-(coords**2) / (2 * sigma**2))
    return taps / taps.sum()


def _local_moments(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float):
    """Gaussian-weighted means, variances and covariance; inputs (N, C, H, W), same-size outputs."""
    n, c, h, w = x.shape
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5C, H, W)
    taps = gaussian_window(window, sigma, x.device, x.dtype)
    groups = 5 * c
    kernel_h = taps.view(1, 1, 1, window).expand(groups, 1, 1, window)
    kernel_v = taps.view(1, 1, window, 1).expand(groups, 1, window, 1)
    pad = window // 2
    # Reflect padding keeps the map the size of the image; skimage also reflects at the border.
    moments = F.pad(moments, (pad, pad, pad, pad), mode="reflect")
    filtered = F.conv2d(F.conv2d(moments, kernel_h, groups=groups), kernel_v, groups=groups)
    mu_x, mu_y, xx, yy, xy = filtered.split(c, dim=1)  # each (N, C, H, W)
    var_x = (xx - mu_x * mu_x).clamp_min(0)
    var_y = (yy - mu_y * mu_y).clamp_min(0)
    cov = xy - mu_x * mu_y
    return mu_x, mu_y, var_x, var_y, cov


def ssim_components(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> SsimComponents:
    """Luminance, contrast and structure maps per channel, (N, C, H, W) each."""
    mu_x, mu_y, var_x, var_y, cov = _local_moments(x, y, window, sigma)
    sd_x, sd_y = var_x.sqrt(), var_y.sqrt()
    luminance = (2 * mu_x * mu_y + C1) / (mu_x**2 + mu_y**2 + C1)
    contrast = (2 * sd_x * sd_y + C2) / (var_x + var_y + C2)
    structure = (cov + C3) / (sd_x * sd_y + C3)
    return SsimComponents(luminance, contrast, structure)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = 11,
    sigma: float = 1.5,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Per-pixel SSIM averaged over channels: (N, C, H, W) x2 -> (N, 1, H, W)."""
    if x.shape != y.shape:
        raise ValueError(f"ssim_map needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) <= window // 2:
        raise ValueError(f"image {tuple(x.shape[-2:])} is too small for a {window}x{window} SSIM window")
    if alpha == beta == gamma == 1.0:
        mu_x, mu_y, var_x, var_y, cov = _local_moments(x, y, window, sigma)
        numerator = (2 * mu_x * mu_y + C1) * (2 * cov + C2)
        denominator = (mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2)
        per_channel = numerator / denominator
    else:
        l, c, s = ssim_components(x, y, window, sigma)
        # The structure term can be negative; a fractional exponent needs its sign kept.
        per_channel = l.pow(alpha) * c.pow(beta) * s.sign() * s.abs().pow(gamma)
    return per_channel.mean(dim=1, keepdim=True)


def ssim_residual(x: torch.Tensor, y: torch.Tensor, **ssim_kwargs) -> torch.Tensor:
    """Anomaly map 1 - SSIM per pixel, (N, 1, H, W)."""
    return 1.0 - ssim_map(x, y, **ssim_kwargs)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, **ssim_kwargs) -> torch.Tensor:
    """Mean of 1 - SSIM over pixels and batch: the training loss of the SSIM autoencoder."""
    return ssim_residual(x, y, **ssim_kwargs).mean()
