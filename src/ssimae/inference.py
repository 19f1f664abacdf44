"""Sliding-window inference: pure functions from an image and a patch function to a full-size map.

Windows of the patch size step by `stride`; the last window of every row and column is aligned
to the image edge, so every pixel is covered. Overlapping outputs are averaged. Memory is the
image, one accumulator of its size and one batch of patches, whatever the image size.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy import ndimage

from .data import pad_to_min_size
from .devices import cudnn_autotune, resolve_precision, tf32
from .errors import SsimaeError
from .fused_ssim import fused_available, fused_ssim_residual
from .graphs import GraphedBatches
from .losses import SsimSettings, reconstruction, residual_map

PatchFn = Callable[[torch.Tensor], torch.Tensor]  # (N, C, P, P) -> (N, K, P, P)


def window_starts(length: int, patch_size: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, 2*stride, ... and finally length - patch_size."""
    if stride < 1 or stride > patch_size:
        raise SsimaeError(f"stride {stride} is outside 1..{patch_size} (the patch size): tiles would leave gaps; "
                          f"use a stride from 1 to {patch_size}")
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
    device: torch.device | str = "cpu",
    fold: bool | None = None,
) -> np.ndarray:
    """Apply patch_fn to every window of an (H, W, C) image and average: (K, H, W) float32.

    Images smaller than the patch are reflect-padded at the bottom/right and the result cropped.
    The image is moved to `device` once; windows are cut and their outputs added up there, so on a
    GPU only the finished map comes back (one synchronisation per image, not per batch). `fold` picks how
    the outputs are added up (add_by_fold or add_one_by_one); by default by fold on CUDA only.
    """
    height, width = image.shape[:2]
    device = torch.device(device)
    padded = pad_to_min_size(image, patch_size)
    tensor = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1).to(device)  # (C, H', W')
    ys = window_starts(tensor.shape[1], patch_size, stride)
    xs = window_starts(tensor.shape[2], patch_size, stride)
    positions = [(y, x) for y in ys for x in xs]
    total: torch.Tensor | None = None
    by_fold = fold if fold is not None else device.type == "cuda"
    for first in range(0, len(positions), batch_size):
        runs = window_runs(positions[first : first + batch_size], stride)
        patches = cut_windows(tensor, runs, patch_size, stride)  # (N, C, P, P)
        outputs = patch_fn(patches).float().to(device)  # (N, K, P, P)
        if total is None:
            total = torch.zeros((outputs.shape[1],) + tuple(tensor.shape[1:]), dtype=torch.float32, device=device)
        (add_by_fold if by_fold else add_one_by_one)(total, runs, outputs, patch_size, stride)
    # The window count at (y, x) is the product of the per-axis counts: divide in place, no H x W temp.
    total /= torch.from_numpy(coverage(tensor.shape[1], patch_size, stride)).to(device)[None, :, None]
    total /= torch.from_numpy(coverage(tensor.shape[2], patch_size, stride)).to(device)[None, None, :]
    return total[:, :height, :width].cpu().numpy()


class WindowRun(NamedTuple):
    """Windows side by side on one row, each `stride` right of the one before: the first's (top, left),
    their count, and where they start in the batch."""

    top: int
    left: int
    count: int
    first: int


def window_runs(positions: list[tuple[int, int]], stride: int) -> list[WindowRun]:
    """A batch's window positions (row-major) as runs; a window off the stride's pitch (the last of a row,
    aligned to the image edge) starts a run of its own."""
    runs: list[WindowRun] = []
    for index, (y, x) in enumerate(positions):
        last = runs[-1] if runs else None
        if last is not None and last.top == y and x == last.left + last.count * stride:
            runs[-1] = last._replace(count=last.count + 1)
        else:
            runs.append(WindowRun(y, x, 1, index))
    return runs


def cut_windows(tensor: torch.Tensor, runs: list[WindowRun], patch_size: int, stride: int) -> torch.Tensor:
    """The windows of `runs` from a (C, H, W) image: (N, C, P, P), one strided view per run instead of one
    slice per window (each slice is a Python call, which a GPU's launch loop pays for)."""
    parts = []
    for run in runs:
        band = tensor[:, run.top : run.top + patch_size, run.left : run.left + patch_size + (run.count - 1) * stride]
        parts.append(band.unfold(2, patch_size, stride).permute(2, 0, 1, 3))  # (n, C, P, P)
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def add_one_by_one(total: torch.Tensor, runs: list[WindowRun], outputs: torch.Tensor, patch_size: int,
                   stride: int) -> None:
    """Add the windows' outputs (N, K, P, P) into `total` (K, H, W) at their positions, one at a time.
    The CPU's way: a slice addition is faster there than torch's fold (bench/README.md)."""
    for run in runs:
        for k in range(run.count):
            x = run.left + k * stride
            total[:, run.top : run.top + patch_size, x : x + patch_size] += outputs[run.first + k]


def add_by_fold(total: torch.Tensor, runs: list[WindowRun], outputs: torch.Tensor, patch_size: int,
                stride: int) -> None:
    """add_one_by_one in two operations per run instead of one per window: the GPU's way, where every
    operation is a kernel launch (961 windows on a 1024x1024 image at stride 30). A run's windows are
    summed into a band by one fold (torch's col2im, which sums each pixel's windows in a fixed order, so
    the map is the same from run to run), and the band is added to the total."""
    for run in runs:
        part = outputs[run.first : run.first + run.count]  # (n, K, P, P)
        width = patch_size + (run.count - 1) * stride
        if run.count == 1:
            band = part[0]
        else:
            columns = part.reshape(run.count, -1).T[None]  # (1, K * P * P, n)
            band = torch.nn.functional.fold(columns, (patch_size, width), patch_size, stride=(1, stride))[0]
        total[:, run.top : run.top + patch_size, run.left : run.left + width] += band


def torch_patch_fn(
    model: torch.nn.Module,
    residual: str,
    ssim: SsimSettings = SsimSettings(),
    device: torch.device | str = "cpu",
    outputs: str = "residual",
    precision: str = "fp32",
    graph_batch: int | None = None,
) -> PatchFn:
    """A PatchFn running the model: outputs 'residual' (N, 1, P, P) or 'reconstruction' (N, C, P, P).

    `residual` is 'ssim' or 'l2'. Puts `model` in eval mode and channels_last (NHWC) memory format,
    in place (NHWC is faster with oneDNN and what CUDA tensor cores want; bench/README.md).
    precision 'bf16' runs the network under bf16 autocast; the residual is computed in fp32. On CUDA the
    1 - SSIM map runs as two fused kernels (fused_ssim.py), its Gaussian filter in TF32 unless precision
    is fp32.
    On CPU the patches go through in micro-batches of INFER_MICRO_BATCH. On CUDA, with `graph_batch`,
    batches of up to that many patches replay one CUDA graph (graphs.GraphedBatches; the network is small
    enough that launching its kernels one by one costs more than running them), and cuDNN picks its
    fastest algorithms (devices.cudnn_autotune).
    """
    model.eval()
    model.to(memory_format=torch.channels_last)
    device = torch.device(device)
    resolved = resolve_precision(precision, device, "infer")
    bf16 = resolved == "bf16"
    fused = residual == "ssim" and ssim.alpha == ssim.beta == ssim.gamma == 1.0 and fused_available(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        # no autocast weight-cast cache: nothing is reused within one call, and a graph may not keep it
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            output = model(x.contiguous(memory_format=torch.channels_last))
        x_hat = reconstruction(output).float().contiguous()  # (n, C, P, P), fp32, NCHW
        if outputs == "reconstruction":
            return x_hat
        if fused:  # CUDA: the same map in two kernels around the filter, TF32 products unless fp32 is asked
            return fused_ssim_residual(x, x_hat, ssim.window, ssim.sigma, ssim.data_range, resolved != "fp32")
        return residual_map(residual, x, x_hat, ssim)

    graphed = GraphedBatches(run, graph_batch, device) if graph_batch and device.type == "cuda" else None

    @torch.inference_mode()
    def patch_fn(patches: torch.Tensor) -> torch.Tensor:
        x = patches.to(device, non_blocking=True)  # (N, C, P, P)
        # fp32 is strict fp32 on CUDA (torch's default lets convolutions use TF32)
        with tf32(resolved == "tf32"), cudnn_autotune(device):
            if graphed is not None:
                return graphed(x)
            return in_micro_batches(run, x, INFER_MICRO_BATCH if device.type == "cpu" else len(x))

    return patch_fn


# Patches per forward pass on CPU, whatever the caller's batch: the activations of 128 patches overflow
# the L3 cache (bench/README.md). The caller's batch size still sets how many windows are cut at a time.
INFER_MICRO_BATCH = 32


def in_micro_batches(fn: PatchFn, patches: torch.Tensor, size: int) -> torch.Tensor:
    """fn applied to consecutive slices of at most `size` patches, results concatenated."""
    if len(patches) <= size:
        return fn(patches)
    return torch.cat([fn(part) for part in patches.split(size)])


def smooth_map(amap: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian of std `sigma` pixels over a 2-D map (reflect at the border); sigma 0 = unchanged."""
    if sigma <= 0:
        return amap
    return ndimage.gaussian_filter(amap, sigma, mode="reflect", output=np.float32)
