"""Device and precision names -> what torch runs on. Shared by training and inference."""

from __future__ import annotations

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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SettingError("device", f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                                     "visible; use cuda:0 or auto")
    return device


# What `--precision auto` runs, per device type and purpose. On CUDA, measured on an H200 (issue 11):
# training steps ran faster in fp32 than under bf16 autocast (12,693 vs 10,076 patches/s: the small
# net is bound by kernel launches, and autocast adds casts), inference faster in bf16 (114,130 vs
# 94,783 patches/s). On CPU bf16 moves maps by up to 1e-2, so fp32 stays the default there.
AUTO_PRECISION = {("cuda", "train"): "fp32", ("cuda", "infer"): "bf16"}


def resolve_precision(precision: str, device: torch.device | str, purpose: str = "infer") -> str:
    """'auto' -> the measured-fastest choice for the device and purpose ('train' or 'infer')."""
    if precision not in ("auto", "fp32", "bf16"):
        raise SettingError("precision", f"precision {precision!r} is not one of auto, fp32, bf16")
    if precision == "auto":
        return AUTO_PRECISION.get((torch.device(device).type, purpose), "fp32")
    return precision
