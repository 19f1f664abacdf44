"""The no-network floor: |x - GaussianBlur(x, sigma)|, a detector without any training.

It flags whatever differs from its neighbourhood (spots, scratches, edges) and knows nothing of
what normal looks like, so every learned method should beat it; `compare` shows it beside them.
The map is the absolute difference averaged over channels; the Detector then smooths it with
map_smoothing (2 pixels by default for this method), which together reproduce the floor quoted in
the README: |x - G_8 * x| smoothed with sigma 2 (scipy.ndimage, mode 'reflect').

The Gaussian is written as two 1-D convolutions over a symmetric padding ('reflect' in scipy,
'symmetric' in numpy; torch's own 'reflect' leaves out the edge pixel) made of flipped slices, so the
module exports to ONNX with dynamic height and width and matches
scipy.ndimage.gaussian_filter(x, sigma, mode='reflect', truncate=4) to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TRUNCATE = 4.0  # scipy.ndimage's default: taps out to 4 standard deviations


def gaussian_taps(sigma: float) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian taps for `sigma` (radius int(4 * sigma + 0.5)), float64."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def symmetric_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Pad `dim` by `pad` on both sides, mirroring with the edge repeated (abc -> cba|abc|cba), also for an
    axis shorter than the pad (mirrored again and again: the indices fold with period 2n). Index arithmetic,
    no loop: an ONNX graph traced on one size then pads any size."""
    n = x.shape[dim]
    index = torch.remainder(torch.arange(-pad, n + pad, device=x.device), 2 * n)
    index = torch.where(index >= n, 2 * n - 1 - index, index)
    return x.index_select(dim, index)


class BlurResidual(nn.Module):
    """(1, C, H, W) image in [0, 1] -> (1, 1, H, W) map |x - G_sigma * x|, averaged over channels."""

    def __init__(self, sigma: float = 8.0):
        super().__init__()
        self.sigma = float(sigma)
        taps = gaussian_taps(self.sigma)
        self.radius = (len(taps) - 1) // 2
        self.register_buffer("taps", torch.from_numpy(taps).float(), persistent=False)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        planes = x.reshape(n * c, 1, h, w)  # one plane per channel: a kernel of fixed shape, exportable
        padded = symmetric_pad(symmetric_pad(planes, self.radius, 2), self.radius, 3)  # (NC, 1, H + 2r, W + 2r)
        blurred = F.conv2d(F.conv2d(padded, self.taps.view(1, 1, 1, -1)), self.taps.view(1, 1, -1, 1))
        return blurred.reshape(n, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.blur(x)).abs().mean(dim=1, keepdim=True)  # (N, 1, H, W)
