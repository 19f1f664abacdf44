"""One flat dataclass of settings. Defaults follow the paper and the MVTec AD protocol.

Precedence: dataclass defaults < YAML file (--config) < command-line flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import SsimaeError
from .files import atomic_write_text

METHOD_NAMES = ("ssim-ae", "l2-ae", "vae", "fm-ae")  # the methods of losses.METHODS

# Named bundles of settings, applied over the defaults and under a YAML file and flags.
# "paper" is the paper's and the MVTec protocol's settings (the defaults). "tuned" adds what helped
# short CPU budgets (README, Results): an L2 warm-up, without which the SSIM-trained net sat in a
# flat-output state (input/reconstruction correlation 0.01 after 400 steps on magnetic_tile, 0.91
# with it), and a sigma-2 Gaussian on the maps (sigma 2 raised pixel ROC AUC and AU-PRO of both
# paper-preset models there; sigma 4 and 8 lowered AU-PRO).
PRESETS: dict[str, dict] = {
    "paper": {},
    "tuned": {"l2_warmup_steps": 100, "map_smoothing": 2.0},
}


@dataclass
class Config:
    # --- method and model
    method: str = "ssim-ae"  # ssim-ae | l2-ae | vae | fm-ae
    latent_dim: int = 100  # d of Table 1; MVTec found larger gave no gain
    patch_size: int = 128  # 128, or 256 for the extra-layer variant
    color: str = "gray"  # gray | rgb; the MVTec protocol ran the SSIM-AE on gray images
    # --- images
    image_size: str | None = None  # None keeps the size; "256" resizes the shorter side; "320x240" is WxH
    # --- training data
    patches_per_epoch: int = 10_000  # random crops per epoch
    rotate: str = "any"  # none | 90 | any: random rotation of each training crop
    flip: bool = True  # random horizontal and vertical flips
    val_fraction: float = 0.1  # share of train/good held out when there is no validation/good
    # --- optimisation
    epochs: int = 200
    batch_size: int = 128
    lr: float = 2e-4  # Adam
    weight_decay: float = 1e-5
    max_steps: int | None = None  # stop after this many optimiser steps
    max_minutes: float | None = None  # stop after this much wall-clock training time
    l2_warmup_steps: int = 0  # train the first steps with an L2 loss (0 = off, as in the paper)
    seed: int = 0
    # --- losses
    ssim_window: int = 11  # Gaussian window side
    ssim_sigma: float = 1.5
    ssim_alpha: float = 1.0  # exponents of luminance, contrast, structure
    ssim_beta: float = 1.0
    ssim_gamma: float = 1.0
    vae_beta: float = 1.0  # weight of the KL term
    fm_lambda: float = 1.0  # weight of the feature-matching term
    feature_net: str = "efficientnet-lite0"  # or a torchvision model name with feature_weights
    feature_cut: int | None = None  # layers of the feature net kept; None = its default
    feature_weights: str | None = None  # local weights file for a torchvision feature net
    # --- inference and threshold
    stride: int = 30  # sliding-window stride in pixels (MVTec used 30)
    infer_batch_size: int = 64  # patches per forward pass at inference
    map_smoothing: float = 0.0  # std (pixels) of a Gaussian applied to anomaly maps; 0 = off, as in the paper
    min_defect_area: int = 25  # MVTec rule: threshold so no validation blob is larger than this (pixels)
    threshold_fpr: float | None = None  # instead: pixel false-positive rate on validation images
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16: auto = bf16 autocast (+ channels_last) on CUDA, fp32 on CPU

    def validate(self) -> "Config":
        if self.method not in METHOD_NAMES:
            raise SsimaeError(f"unknown method {self.method!r}; use one of {', '.join(METHOD_NAMES)}")
        if self.color not in ("gray", "rgb"):
            raise SsimaeError(f"color {self.color!r} is not gray or rgb")
        if self.patch_size not in (128, 256):
            raise SsimaeError(f"patch size {self.patch_size} is not supported; use 128 or 256")
        if self.rotate not in ("none", "90", "any"):
            raise SsimaeError(f"rotate {self.rotate!r} is not none, 90 or any")
        if self.stride < 1 or self.stride > self.patch_size:
            raise SsimaeError(
                f"stride {self.stride} is outside 1..{self.patch_size}: tiles would leave gaps; "
                f"use a stride <= the patch size {self.patch_size}"
            )
        for name in ("latent_dim", "patches_per_epoch", "epochs", "batch_size", "infer_batch_size"):
            if getattr(self, name) < 1:
                raise SsimaeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise SsimaeError(f"val_fraction {self.val_fraction} must be in [0, 1)")
        if self.threshold_fpr is not None and not 0 < self.threshold_fpr < 1:
            raise SsimaeError(f"threshold_fpr {self.threshold_fpr} must be in (0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise SsimaeError(f"precision {self.precision!r} is not auto, fp32 or bf16")
        if self.ssim_window % 2 == 0 or self.ssim_window < 3:
            raise SsimaeError(f"ssim_window {self.ssim_window} must be odd and >= 3")
        positive = {"lr": self.lr, "ssim_sigma": self.ssim_sigma, "ssim_alpha": self.ssim_alpha,
                    "ssim_beta": self.ssim_beta, "ssim_gamma": self.ssim_gamma}
        if self.max_minutes is not None:
            positive["max_minutes"] = self.max_minutes
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise SsimaeError(f"{name} must be a positive number, got {value}")
        for name in ("weight_decay", "vae_beta", "fm_lambda", "min_defect_area", "map_smoothing", "l2_warmup_steps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SsimaeError(f"{name} must be >= 0, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise SsimaeError(f"max_steps must be at least 1, got {self.max_steps}")
        parse_image_size(self.image_size)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_image_size(text: str | int | None) -> int | tuple[int, int] | None:
    """None | shorter-side int | (width, height) from '256' or '320x240'."""
    if text is None or text == "" or str(text).lower() in ("none", "keep"):
        return None
    value = str(text).lower()
    try:
        if "x" in value:
            width, height = (int(v) for v in value.split("x"))
            if width < 1 or height < 1:
                raise ValueError
            return width, height
        side = int(value)
        if side < 1:
            raise ValueError
        return side
    except ValueError:
        raise SsimaeError(f"image size {text!r} is not a positive integer or WxH (e.g. 256 or 320x240)") from None


def config_from_dict(values: dict, base: Config | None = None, source: str = "settings") -> Config:
    """A Config with the given keys replaced; unknown keys are an error naming the source."""
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SsimaeError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {name: _coerce(name, value, source) for name, value in values.items()}
    return dataclasses.replace(base or Config(), **values)


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(name: str, value, source: str):
    """A setting converted to its field's type, e.g. YAML's string '1e-3' (PyYAML reads it so) to a float."""
    hint = typing.get_type_hints(Config)[name]
    options = typing.get_args(hint)
    optional = type(None) in options
    kind = next((t for t in options if t is not type(None)), hint)
    if value is None or (optional and kind is not str and str(value).lower() in ("none", "null")):
        if optional:
            return None
    elif kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _BOOLEANS:
            return _BOOLEANS[str(value).lower()]
    elif kind is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str and isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise SsimaeError(f"{source}: {name} must be {'' if not optional else 'empty or '}{kind.__name__}, got {value!r}")


def preset_config(name: str | None) -> Config:
    """The defaults with a named preset applied."""
    if name is None:
        return Config()
    if name not in PRESETS:
        raise SsimaeError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return config_from_dict(PRESETS[name], source=f"preset {name}")


def load_config(path: str | os.PathLike, base: Config | None = None) -> Config:
    """Config from a YAML file of flat key: value pairs (dashes or underscores in keys)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SsimaeError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise SsimaeError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise SsimaeError(f"config file {path} must hold key: value pairs")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    return config_from_dict(values, base, source=str(path))


def save_config(config: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
