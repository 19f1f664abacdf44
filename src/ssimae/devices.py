"""Device and precision names -> what torch runs on. Shared by training and inference."""

from __future__ import annotations

import contextlib

import torch

from .errors import SettingError


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu', 'cuda', 'cuda:N' as asked (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("device", f"device {name!r} requested but CUDA is not available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingError("device", f"device {name!r} is unknown; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: not what training and inference were made for
        raise SettingError("device", f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SettingError("device", f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                                     "visible; use cuda:0 or auto")
    return device


PRECISIONS = ("auto", "fp32", "tf32", "bf16")

# What `--precision auto` runs, per device type and purpose. On CUDA, measured on an H200 (bench/gpu.py,
# bench/README.md, 2026-12-04) with a CUDA graph per training step and per inference batch (graphs.py):
# ssim-ae training at batch 128, sampling included, ran fastest under bf16 autocast (24,493 patches/s
# against 21,311 TF32 and 13,348 fp32; without graphs TF32 had won, as autocast's casts are more
# launches), and so did inference (121,884 patches/s at batch 1024 against 117,445 TF32 and 53,120 fp32).
# The loss and the maps are computed in fp32 either way; at the paper's budget bf16 and TF32 training gave
# the same quality within one seed. Steps without graphs ('train-eager': several processes under torchrun)
# stay TF32, which won there (the eager step at batch 128: 17,377-20,072 TF32 against 12,966-15,627 bf16).
# On CPU bf16 moves maps by up to 1e-2 and TF32 does not exist: fp32.
AUTO_PRECISION = {("cuda", "train"): "bf16", ("cuda", "train-eager"): "tf32", ("cuda", "infer"): "bf16"}


def resolve_precision(precision: str, device: torch.device | str, purpose: str = "infer") -> str:
    """'auto' -> the measured-fastest choice for the device and purpose: 'infer', 'train' (a CUDA graph per
    step on CUDA) or 'train-eager' (steps launched kernel by kernel)."""
    if precision not in PRECISIONS:
        raise SettingError("precision", f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return AUTO_PRECISION.get((torch.device(device).type, purpose), "fp32")
    return precision


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matrix products and convolutions on CUDA while inside (torch's process-wide switches), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextlib.contextmanager
def cudnn_autotune(device: torch.device | str):
    """On CUDA, while inside: cuDNN times its convolution algorithms for each new shape and keeps the
    fastest (torch.backends.cudnn.benchmark), restored after. The shapes of training and sliding-window
    inference repeat, so the timing is paid once per shape."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
