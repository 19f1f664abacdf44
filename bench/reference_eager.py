"""A plain eager PyTorch reference: the baseline the speed figures in bench/speed.py are divided by.

Deliberately straightforward and independent of the package (no imports from ssimae): the Table 1
autoencoder as one nn.Sequential with PyTorch's default initialisation, NCHW, and a naive SSIM loss
that filters each of the five moment images with a full 11x11 2-D Gaussian window (F.conv2d, one
call per moment, 121 taps per pixel). No channels_last, no threading tweaks, no compilation.
This is "the 36 / 83 / 240 patches/s kind" of issue 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

C1, C2 = 0.01**2, 0.03**2


def reference_autoencoder(channels: int = 1, latent_dim: int = 100) -> nn.Sequential:
    """Table 1 for 128x128 patches, LeakyReLU(0.2) everywhere but the latent and the sigmoid output."""
    act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(channels, 32, 4, 2, 1), act(), nn.Conv2d(32, 32, 4, 2, 1), act(),
        nn.Conv2d(32, 32, 3, 1, 1), act(), nn.Conv2d(32, 64, 4, 2, 1), act(),
        nn.Conv2d(64, 64, 3, 1, 1), act(), nn.Conv2d(64, 128, 4, 2, 1), act(),
        nn.Conv2d(128, 64, 3, 1, 1), act(), nn.Conv2d(64, 32, 3, 1, 1), act(),
        nn.Conv2d(32, latent_dim, 8, 1, 0),
        nn.ConvTranspose2d(latent_dim, 32, 8, 1, 0), act(), nn.Conv2d(32, 64, 3, 1, 1), act(),
        nn.Conv2d(64, 128, 3, 1, 1), act(), nn.ConvTranspose2d(128, 64, 4, 2, 1), act(),
        nn.Conv2d(64, 64, 3, 1, 1), act(), nn.ConvTranspose2d(64, 32, 4, 2, 1), act(),
        nn.Conv2d(32, 32, 3, 1, 1), act(), nn.ConvTranspose2d(32, 32, 4, 2, 1), act(),
        nn.ConvTranspose2d(32, channels, 4, 2, 1), nn.Sigmoid(),
    )


def gaussian_window_2d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(1, 1, size, size) normalised 2-D Gaussian."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def naive_ssim_map(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM, (N, C, H, W) -> (N, 1, H, W): five full 2-D convolutions, reflect padding."""
    c = x.shape[1]
    window = gaussian_window_2d(size, sigma).to(x).expand(c, 1, size, size)
    pad = size // 2

    def blur(t):
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))
    return ssim.mean(dim=1, keepdim=True)


def naive_ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1 - naive_ssim_map(x, y)).mean()


def l2_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).pow(2).mean()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, loss_fn) -> float:
    model.train()
    loss = loss_fn(x, model(x))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def infer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction and the 1 - SSIM residual of a batch of patches, as a naive predictor would."""
    model.eval()
    x_hat = model(x)
    return 1 - naive_ssim_map(x, x_hat)


def window_starts(length: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def reference_anomaly_map(image: torch.Tensor, model: nn.Module, patch: int = 128, stride: int = 30,
                          batch: int = 128) -> torch.Tensor:
    """A plain sliding window over a (C, H, W) image: every window's 1 - SSIM map, averaged; (H, W)."""
    _, height, width = image.shape
    positions = [(y, x) for y in window_starts(height, patch, stride) for x in window_starts(width, patch, stride)]
    total = torch.zeros(height, width)
    count = torch.zeros(height, width)
    for first in range(0, len(positions), batch):
        chunk = positions[first : first + batch]
        patches = torch.stack([image[:, y : y + patch, x : x + patch] for y, x in chunk])
        residual = infer(model, patches)[:, 0]
        for (y, x), r in zip(chunk, residual):
            total[y : y + patch, x : x + patch] += r
            count[y : y + patch, x : x + patch] += 1
    return total / count
