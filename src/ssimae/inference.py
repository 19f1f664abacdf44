"""Sliding-window inference: pure functions from an image and a patch function to a full-size map.

Windows of the patch size step by `stride`; the last window of every row and column is aligned
to the image edge, so every pixel is covered. Overlapping outputs are averaged. Memory is the
image, one accumulator of its size and one batch of patches, whatever the image size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .data import pad_to_min_size
from .errors import SsimaeError
from .losses import Method, SsimSettings, reconstruction, residual_map

PatchFn = Callable[[torch.Tensor], torch.Tensor]  # (N, C, P, P) -> (N, K, P, P)


def window_starts(length: int, patch_size: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, 2*stride, ... and finally length - patch_size."""
    if stride < 1 or stride > patch_size:
        raise SsimaeError(f"stride {stride} > patch size {patch_size}: tiles would leave gaps; use a stride <= {patch_size}")
    if length < patch_size:
        raise ValueError(f"length {length} is smaller than the patch size {patch_size}; pad the image first")
    starts = list(range(0, length - patch_size + 1, stride))
    if starts[-1] != length - patch_size:
        starts.append(length - patch_size)
    return starts


def coverage(length: int, patch_size: int, stride: int) -> np.ndarray:
    """How many windows cover each position along one axis, (length,)."""
    counts = np.zeros(length, dtype=np.float32)
    for start in window_starts(length, patch_size, stride):
        counts[start : start + patch_size] += 1
    return counts


def sliding_window(
    image: np.ndarray,
    patch_fn: PatchFn,
    patch_size: int,
    stride: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Apply patch_fn to every window of an (H, W, C) image and average: (K, H, W) float32.

    Images smaller than the patch are reflect-padded at the bottom/right and the result cropped.
    """
    height, width = image.shape[:2]
    padded = pad_to_min_size(image, patch_size)
    tensor = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)  # (C, H', W')
    ys = window_starts(tensor.shape[1], patch_size, stride)
    xs = window_starts(tensor.shape[2], patch_size, stride)
    positions = [(y, x) for y in ys for x in xs]
    total: np.ndarray | None = None
    for first in range(0, len(positions), batch_size):
        chunk = positions[first : first + batch_size]
        patches = torch.stack([tensor[:, y : y + patch_size, x : x + patch_size] for y, x in chunk])  # (N, C, P, P)
        outputs = patch_fn(patches).float().cpu().numpy()  # (N, K, P, P)
        if total is None:
            total = np.zeros((outputs.shape[1],) + tensor.shape[1:], dtype=np.float32)  # (K, H', W')
        for (y, x), output in zip(chunk, outputs):
            total[:, y : y + patch_size, x : x + patch_size] += output
    # The window count at (y, x) is the product of the per-axis counts: divide in place, no H x W temp.
    total /= coverage(tensor.shape[1], patch_size, stride)[None, :, None]
    total /= coverage(tensor.shape[2], patch_size, stride)[None, None, :]
    return total[:, :height, :width]


def torch_patch_fn(
    model: torch.nn.Module,
    method: Method,
    ssim: SsimSettings = SsimSettings(),
    device: torch.device | str = "cpu",
    outputs: str = "residual",
) -> PatchFn:
    """A PatchFn running the model: outputs 'residual' (N, 1, P, P) or 'reconstruction' (N, C, P, P)."""
    model.eval()

    @torch.inference_mode()
    def patch_fn(patches: torch.Tensor) -> torch.Tensor:
        x = patches.to(device, non_blocking=True)
        x_hat = reconstruction(model(x))
        if outputs == "reconstruction":
            return x_hat
        return residual_map(method.residual, x, x_hat, ssim)

    return patch_fn


def anomaly_map(image: np.ndarray, patch_fn: PatchFn, patch_size: int, stride: int, batch_size: int = 64) -> np.ndarray:
    """(H, W, C) image -> (H, W) anomaly map, averaged over overlapping windows."""
    return sliding_window(image, patch_fn, patch_size, stride, batch_size)[0]
