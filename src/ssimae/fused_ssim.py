"""1 - SSIM for sliding-window inference on CUDA, in two fused kernels around the Gaussian filter.

ssim.ssim_map is written for autograd and for every device: about twenty element-wise torch operations,
each a kernel that reads and writes whole (N, C, 128, 128) images. At an inference batch of 1024 on a GPU
those passes over memory, not the arithmetic, made the map cost half as much as the network
(bench/README.md). Here the same formula (alpha = beta = gamma = 1, population moments, each image centred
on its mean first, as ssim._local_moments does) runs as:
  1. one kernel: the five centred moment images a, b, a^2, b^2, ab (a = x - mean x, b = y - mean y);
  2. the separable Gaussian filter of each, ssim._gaussian_filter (two banded-matrix products), in TF32
     when the caller allows it (inference at bf16 or tf32 precision);
  3. one kernel: the five filtered images -> 1 - SSIM.
Both kernels are compiled at first use by torch's jiterator (NVRTC, part of torch's CUDA build: nothing to
install). torch.compile fuses the same but takes 14 s or more to compile in every process (bench/README.md),
which predict would pay on every run. Inference only: no autograd.
"""

from __future__ import annotations

import logging

import torch

from .devices import tf32
from .ssim import _gaussian_filter, constants, ssim_residual

log = logging.getLogger(__name__)

MOMENTS_CODE = """
template <typename T> void centred_moments(T x, T y, T centre_x, T centre_y, T& a, T& b, T& aa, T& bb, T& ab) {
    a = x - centre_x;
    b = y - centre_y;
    aa = a * a;
    bb = b * b;
    ab = a * b;
}
"""

RESIDUAL_CODE = """
template <typename T> T one_minus_ssim(T mu_a, T mu_b, T aa, T bb, T ab, T centre_x, T centre_y, T c1, T c2) {
    T var_a = aa - mu_a * mu_a;
    T var_b = bb - mu_b * mu_b;
    var_a = var_a > T(0) ? var_a : T(0);
    var_b = var_b > T(0) ? var_b : T(0);
    T cov = ab - mu_a * mu_b;
    T mu_x = mu_a + centre_x;
    T mu_y = mu_b + centre_y;
    T numerator = (T(2) * mu_x * mu_y + c1) * (T(2) * cov + c2);
    T denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_a + var_b + c2);
    return T(1) - numerator / denominator;
}
"""

_kernels = None  # (moments, residual) once made; False after a failure: the plain path is used then
_verified: dict[torch.device, bool] = {}  # fused_available's answer per device, once checked


def _make_kernels():
    global _kernels
    if _kernels is None:
        from torch.cuda import jiterator

        _kernels = (jiterator._create_multi_output_jit_fn(MOMENTS_CODE, num_outputs=5),
                    jiterator._create_jit_fn(RESIDUAL_CODE, c1=0.0, c2=0.0))
    return _kernels


def fused_ssim_residual(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
                        data_range: float = 1.0, tf32_filter: bool = False) -> torch.Tensor:
    """1 - SSIM per pixel averaged over channels, (N, C, H, W) fp32 CUDA tensors x2 -> (N, 1, H, W): what
    ssim.ssim_residual computes (within float rounding; with `tf32_filter`, within TF32's, about 1e-3)."""
    moments_kernel, residual_kernel = _make_kernels()
    c1, c2, _ = constants(data_range)
    x, y = x.contiguous(), y.contiguous()
    centre_x = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1): see ssim._local_moments for why
    centre_y = y.mean(dim=(2, 3), keepdim=True)
    moments = moments_kernel(x, y, centre_x, centre_y)  # a, b, a^2, b^2, ab
    with tf32(tf32_filter):
        filtered = [_gaussian_filter(moment, window, sigma) for moment in moments]
    residual = residual_kernel(*filtered, centre_x, centre_y, c1=c1, c2=c2)  # (N, C, H, W)
    return residual if residual.shape[1] == 1 else residual.mean(dim=1, keepdim=True)


def fused_available(device: torch.device) -> bool:
    """Whether the fused kernels serve here: on CUDA, tried once per process (on `device`) on a few
    random patches, eagerly and replayed from a CUDA graph (as inference replays them), against the plain
    map. Any failure or disagreement logs why and leaves the plain path, which gives the same maps."""
    global _kernels
    device = torch.device(device)
    if device.type != "cuda" or _kernels is False:
        return False
    if _verified.get(device) is None:
        try:
            _verified[device] = _verify(device)
        except Exception as error:  # e.g. a torch build without NVRTC, or a driver that cannot record it
            log.info("fused 1 - SSIM kernels unavailable on %s (%s); using the plain path", device, error)
            _verified[device] = False
        if not _verified[device]:
            _kernels = False
    return _verified[device]


def _verify(device: torch.device) -> bool:
    with torch.cuda.device(device), torch.inference_mode(), tf32(False):
        generator = torch.Generator(device).manual_seed(0)
        x = torch.rand(4, 2, 32, 32, device=device, generator=generator)
        y = (x + 0.1 * torch.rand(x.shape, device=device, generator=generator)).clamp(0, 1)
        plain = ssim_residual(x, y)
        eager = fused_ssim_residual(x, y)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            recorded = fused_ssim_residual(x, y)
        graph.replay()
        torch.cuda.synchronize(device)
        worst = max((eager - plain).abs().max().item(), (recorded - plain).abs().max().item())
    if worst > 1e-4:
        log.warning("fused 1 - SSIM kernels differ from the plain map by %.2g on %s; using the plain path",
                    worst, device)
        return False
    return True
