"""One flat dataclass of settings. The model and training defaults follow the paper and the MVTec AD protocol;
the decision defaults (pixel-FPR threshold, each method's image score) and the SSIM-AE's L2 warm-up were
measured better (bench/README.md). `--preset paper` restores the paper's exact protocol.

Precedence: dataclass defaults < preset < YAML file (--config) < command-line flags. Every setting is
parsed and checked here, once; the rest of the package reads typed values (e.g. `config.resize`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .devices import PRECISIONS
from .errors import SettingError, SsimaeError
from .files import atomic_write_text
from .methods import METHODS
from .scoring import IMAGE_SCORES

METHOD_NAMES = tuple(METHODS)
BACKENDS = ("torch", "onnxruntime")
# The allowed values of every enumerated setting: validation, --help and the CLI read them here.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHOD_NAMES,
    "color": ("gray", "rgb"),
    "rotate": ("none", "90", "any"),
    "precision": PRECISIONS,
    "threshold_rule": ("pixel-fpr", "min-area"),
    "image_score": IMAGE_SCORES,
    "input_normalization": ("none", "mean", "background", "standardize"),
    "patchcore_scoring": ("joint", "per-block"),
}
# The map smoothing of each method when map_smoothing is not set: PatchCore's paper smooths with
# sigma 4; the blur floor is defined with sigma 2 (README); the autoencoders' maps are not smoothed.
METHOD_SMOOTHING = {"patchcore": 4.0, "blur": 2.0}
# The L2 warm-up of each method when l2_warmup_steps is not set. SSIM training starts on a plateau
# where the output is flat (on magnetic_tile fidelity ~0 for 450 steps, then 0.96 by step 1,000);
# 100 L2 steps start it past the plateau (fidelity 0.91 after 400 steps). bench/README.md.
METHOD_WARMUP = {"ssim-ae": 100}
# The image score of each method when image_score is not set (the others: the map's maximum). PatchCore's
# top-1% mean ranked magnetic_tile's images better than its maximum (bench/README.md, issue 9).
METHOD_IMAGE_SCORE = {"patchcore": "top-mean"}
# The margin the image score leaves out at each side of the map when image_score_margin is not set (the
# others: none). PatchCore's maps score high near the border on good images too (scoring.py, bench/README.md).
METHOD_IMAGE_SCORE_MARGIN = {"patchcore": 1 / 32}
# The working size of each method when image_size is not set (the others keep each image's size):
# PatchCore's features were measured best on magnetic_tile with images resized to 256x256 (bench/README.md);
# a PatchCore fit on small images enlarges them 8x instead (patchcore.image_defaults).
METHOD_IMAGE_SIZE = {"patchcore": "256x256"}
# Enumerated settings that may be left empty for the method's own default.
METHOD_DEFAULTED = ("image_score",)
# Settings that may differ at inference time from training (predict/evaluate flags).
INFERENCE_SETTINGS = ("stride", "infer_batch_size", "device", "precision", "max_image_pixels")

# Named bundles of settings, applied over the defaults and under a YAML file and flags.
# "paper" is the paper's and the MVTec protocol's settings: no L2 warm-up, the min-area threshold rule,
# the map maximum (all of it) as image score. "tuned" adds an L2 warm-up for every method and a sigma-2 Gaussian
# on the maps.
PRESETS: dict[str, dict] = {
    "paper": {"threshold_rule": "min-area", "image_score": "max", "image_score_margin": 0.0, "l2_warmup_steps": 0},
    "tuned": {"l2_warmup_steps": 100, "map_smoothing": 2.0},
}


@dataclass
class Config:
    # --- method and model
    method: str = "ssim-ae"  # ssim-ae | l2-ae | vae | fm-ae | patchcore | blur
    latent_dim: int = 100  # d of Table 1; MVTec found larger gave no gain
    patch_size: int = 128  # 128, or 256 for the extra-layer variant
    color: str = "gray"  # gray | rgb; the MVTec protocol ran the SSIM-AE on gray images
    # --- images
    image_size: str | None = None  # "keep" the size, "256" resizes the shorter side, "320x240" is WxH; empty = the method's (keep; 256x256 for patchcore, 8x for images <= 128 px)
    max_image_pixels: int = 16384 * 16384  # larger images are refused before decoding (decompression-bomb guard)
    input_normalization: str = "none"  # none | mean | background | standardize: each working image's mean (background: its background level; standardize: its mean and deviation) moved onto the training images' average first, against lighting that varies between images
    input_mean: float | None = None  # input_normalization's target mean (background: level), in [0, 1]; empty = measured on the training images (the fit records it)
    input_sd: float | None = None  # its target deviation (standardize); empty = measured on the training images (the fit records it)
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
    l2_warmup_steps: int | None = None  # train the first steps with an L2 loss; empty = the method's (100 ssim-ae, else 0; paper: 0)
    seed: int = 0
    # --- losses
    ssim_window: int = 11  # Gaussian window side
    ssim_sigma: float = 1.5
    ssim_alpha: float = 1.0  # exponents of luminance, contrast, structure
    ssim_beta: float = 1.0
    ssim_gamma: float = 1.0
    ssim_data_range: float = 1.0  # L of the SSIM constants (0.01 L)^2, (0.03 L)^2: the span of the intensities
    vae_beta: float = 1.0  # weight of the KL term
    fm_lambda: float = 1.0  # weight of the feature-matching term
    feature_net: str = "efficientnet-lite0"  # or a torchvision model name with feature_weights
    feature_cut: int | None = None  # layers of the feature net kept; None = its default
    feature_weights: str | None = None  # local weights file for a torchvision feature net
    # --- patchcore
    patchcore_blocks: str | None = None  # EfficientNet-Lite0 blocks whose outputs are the patch features; empty = 4,10,14, or 0 where image_size is empty too and the training images are at most 128 px (the fit records which)
    patchcore_neighbourhood: int = 3  # each feature averaged over its k x k neighbourhood
    patchcore_scoring: str = "joint"  # joint | per-block: the distance in all blocks' features together (the paper's), or each block's own over its typical value, averaged (bench/README.md)
    memory_bank_size: int = 16384  # upper bound of the memory bank (the greedy coreset's size)
    coreset_projection: int = 128  # dimensions of the random projection the coreset distances use
    coreset_pool: int | None = None  # at most this many patch features (a random sample) enter the greedy coreset; empty = 250000, or 50000 for efficientnet-lite0 where image_size is empty too and the training images are at most 128 px (the fit records which)
    # its time grows with pool x bank size (magnetic_tile's 700k features took ~25 CPU minutes; bench/README.md)
    # --- blur (the no-network floor)
    blur_sigma: float = 8.0  # std (pixels) of the Gaussian each image is compared with
    # --- inference and threshold
    stride: int = 30  # sliding-window stride in pixels (MVTec used 30)
    infer_batch_size: int = 64  # patches per forward pass at inference
    map_smoothing: float | None = None  # std (pixels) of a Gaussian on the anomaly maps; empty = the method's (0 = off, as in the paper, for the autoencoders; 4 patchcore; 2 blur)
    threshold_rule: str = "pixel-fpr"  # pixel-fpr | min-area: how the pixel threshold is chosen on validation images
    threshold_fpr: float = 0.001  # pixel-fpr rule: share of validation pixels allowed above the threshold (bench/README.md)
    min_defect_area: int = 25  # smallest defect in pixels: smaller mask regions are dropped; the min-area rule keeps validation regions below it, so validation masks are empty
    image_score: str | None = None  # max | top-mean: how a map becomes one image score; empty = the method's (top-mean patchcore, else max)
    image_score_fraction: float = 0.01  # top-mean: share of the map's pixels averaged
    image_score_margin: float | None = None  # share of the map's height and width at each side the image score leaves out; empty = the method's (1/32 patchcore, else 0)
    image_fpr: float = 0.05  # share of defect-free validation images allowed above the image threshold
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | tf32 | bf16: auto = bf16 on CUDA (TF32 for training under torchrun), fp32 on CPU

    @property
    def resize(self) -> int | tuple[int, int] | None:
        """The parsed image_size (or the method's default): None, a shorter side, or (width, height)."""
        return parse_image_size(METHOD_IMAGE_SIZE.get(self.method) if self.image_size is None else self.image_size)

    @property
    def image_score_kind(self) -> str:
        """image_score, or the method's own default when it is not set."""
        return METHOD_IMAGE_SCORE.get(self.method, "max") if self.image_score is None else self.image_score

    @property
    def image_margin(self) -> float:
        """image_score_margin, or the method's own default when it is not set."""
        if self.image_score_margin is None:
            return METHOD_IMAGE_SCORE_MARGIN.get(self.method, 0.0)
        return self.image_score_margin

    @property
    def warmup_steps(self) -> int:
        """l2_warmup_steps, or the method's own default when it is not set."""
        return METHOD_WARMUP.get(self.method, 0) if self.l2_warmup_steps is None else self.l2_warmup_steps

    @property
    def smoothing(self) -> float:
        """map_smoothing, or the method's own default when it is not set."""
        return METHOD_SMOOTHING.get(self.method, 0.0) if self.map_smoothing is None else self.map_smoothing

    @property
    def kind(self) -> str:
        """The method's kind: 'reconstruction' or 'memory'."""
        return METHODS[self.method].kind

    def validate(self) -> "Config":
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed and not (value is None and name in METHOD_DEFAULTED):
                raise SettingError(name, f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.patch_size not in (128, 256):
            raise SettingError("patch_size", f"patch size {self.patch_size} is not supported; use 128 or 256")
        if self.stride < 1 or self.stride > self.patch_size:
            raise SettingError(
                "stride",
                f"stride {self.stride} is outside 1..{self.patch_size}: tiles would leave gaps; "
                f"use a stride <= the patch size {self.patch_size}",
            )
        for name in ("latent_dim", "patches_per_epoch", "epochs", "batch_size", "infer_batch_size", "max_image_pixels",
                     "patchcore_neighbourhood", "memory_bank_size", "coreset_projection", "coreset_pool"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingError(name, f"{name} must be at least 1, got {getattr(self, name)}")
        if self.latent_dim > MAX_LATENT_DIM:
            raise SettingError("latent_dim", f"latent_dim {self.latent_dim} is larger than {MAX_LATENT_DIM:,}; "
                               "the paper uses 100")
        if self.patchcore_neighbourhood % 2 == 0:  # an even window has no centre cell: it would shift the features
            raise SettingError("patchcore_neighbourhood",
                               f"patchcore_neighbourhood {self.patchcore_neighbourhood} must be odd, e.g. 3")
        if self.seed < 0:
            raise SettingError("seed", f"seed must be >= 0, got {self.seed}")
        if self.seed >= 2**63:
            raise SettingError("seed", f"seed must be below 2**63, got {self.seed}")
        if not 0 <= self.val_fraction < 1:
            raise SettingError("val_fraction", f"val_fraction {self.val_fraction} must be in [0, 1)")
        if self.image_score_margin is not None and not 0 <= self.image_score_margin < 0.5:
            raise SettingError("image_score_margin", f"image_score_margin {self.image_score_margin} must be in [0, 0.5)")
        for name in ("threshold_fpr", "image_fpr", "image_score_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise SettingError(name, f"{name} {value} must be in (0, 1)")
        if self.ssim_window % 2 == 0 or self.ssim_window < 3:
            raise SettingError("ssim_window", f"ssim_window {self.ssim_window} must be odd and >= 3")
        if self.ssim_window > self.patch_size // 2:
            raise SettingError("ssim_window", f"ssim_window {self.ssim_window} must be at most half the patch size "
                               f"({self.patch_size // 2}); use a smaller window or a larger --patch-size")
        positive = {"lr": self.lr, "ssim_sigma": self.ssim_sigma, "ssim_alpha": self.ssim_alpha,
                    "ssim_beta": self.ssim_beta, "ssim_gamma": self.ssim_gamma, "blur_sigma": self.blur_sigma}
        if self.max_minutes is not None:
            positive["max_minutes"] = self.max_minutes
        positive["ssim_data_range"] = self.ssim_data_range
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise SettingError(name, f"{name} must be a positive number, got {value}")
        for name in ("weight_decay", "vae_beta", "fm_lambda", "min_defect_area", "map_smoothing", "l2_warmup_steps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise SettingError(name, f"{name} must be >= 0, got {value}")
        if self.input_mean is not None and not (math.isfinite(self.input_mean) and 0 <= self.input_mean <= 1):
            raise SettingError("input_mean", f"input_mean {self.input_mean} must be in [0, 1], the range of the images")
        if self.input_sd is not None and not (math.isfinite(self.input_sd) and 0 < self.input_sd <= 0.5):
            raise SettingError("input_sd", f"input_sd {self.input_sd} must be in (0, 0.5], a deviation of values in [0, 1]")
        if self.max_steps is not None and self.max_steps < 1:
            raise SettingError("max_steps", f"max_steps must be at least 1, got {self.max_steps}")
        try:
            size = self.resize
        except SsimaeError as error:
            raise SettingError("image_size", str(error)) from None
        if size is not None:
            width, height = (size, size) if isinstance(size, int) else size  # a shorter side: at least its square
            if width * height > self.max_image_pixels:
                raise SettingError("image_size", f"image_size {self.image_size} makes images of at least {width * height:,} "
                                   f"pixels, more than max_image_pixels {self.max_image_pixels:,}; use a smaller size")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The largest latent size: at 16,384 each layer next to the code holds 134 MB of fp32 weights (32 x 8 x 8 x d),
# and training with Adam triples that; a typo such as 1000000000 fails here, not in an allocation.
MAX_LATENT_DIM = 16_384

# The smallest working side image_size may ask for: the deepest PatchCore features have a stride of 32, and
# a smaller image says nothing any method here can read.
MIN_IMAGE_SIDE = 32


def parse_image_size(text: str | int | None) -> int | tuple[int, int] | None:
    """None (keep) | shorter-side int | (width, height) from 'keep', '256' or '320x240'."""
    if text is None or text == "" or str(text).lower() in ("none", "keep"):
        return None
    value = str(text).lower()
    try:
        sides = tuple(int(v) for v in value.split("x")) if "x" in value else (int(value),)
        if len(sides) > 2 or min(sides) < 1:
            raise ValueError
    except ValueError:
        raise SsimaeError(f"image size {text!r} is not a positive integer or WxH (e.g. 256 or 320x240)") from None
    if min(sides) < MIN_IMAGE_SIDE:
        raise SsimaeError(f"image size {text!r} is too small: use at least {MIN_IMAGE_SIDE} pixels a side, "
                          "or 'keep' for the images' own size")
    return sides if len(sides) == 2 else sides[0]


# Settings added since the first release, with the value that reproduces how a checkpoint or export
# saved without them was fitted (its thresholds were chosen so).
SAVED_BEFORE = {"image_score_margin": 0.0}


def known_settings(values: dict) -> dict:
    """The settings of this version in a saved config (a checkpoint's or an export's): retired ones are
    dropped, and those it predates get the value it was fitted with (SAVED_BEFORE)."""
    known = {f.name for f in fields(Config)}
    return {**SAVED_BEFORE, **{k: v for k, v in values.items() if k in known}}


def config_from_dict(values: dict, base: Config | None = None, source: str = "settings") -> Config:
    """A Config with the given keys replaced; unknown keys are an error naming the source."""
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SsimaeError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {name: _coerce(name, value, source) for name, value in values.items()}
    return dataclasses.replace(base or Config(), **values)


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def setting_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a Config field, e.g. (float, True) for `float | None`."""
    hint = typing.get_type_hints(Config)[name]
    options = typing.get_args(hint)
    kind = next((t for t in options if t is not type(None)), hint)
    return kind, type(None) in options


def _coerce(name: str, value, source: str):
    """A setting converted to its field's type, e.g. YAML's string '1e-3' (PyYAML reads it so) to a float."""
    kind, optional = setting_type(name)
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
    raise SettingError(name, f"{source}: {name} must be {'' if not optional else 'empty or '}{kind.__name__}, "
                             f"got {value!r}", source=None if source == "command line" else source)


def preset_config(name: str | None) -> Config:
    """The defaults with a named preset applied."""
    if name is None:
        return Config()
    if name not in PRESETS:
        raise SsimaeError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return config_from_dict(PRESETS[name], source=f"preset {name}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last
    silently, so a setting edited in one place could be overridden by a forgotten copy further down)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            name = str(key).replace("-", "_")
            if name in seen:
                raise SsimaeError(f"line {key_node.start_mark.line + 1}: setting {key!r} is given twice; keep one")
            seen.add(name)
        return super().construct_mapping(node, deep)


def load_config(path: str | os.PathLike, base: Config | None = None) -> Config:
    """Config from a YAML file of flat key: value pairs (dashes or underscores in keys)."""
    path = Path(path)
    if path.is_dir():
        raise SsimaeError(f"config file {path} is a folder; pass a YAML file of settings")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except SsimaeError as error:
        raise SsimaeError(f"config file {path}, {error}") from None
    except FileNotFoundError:
        raise SsimaeError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise SsimaeError(f"config file {path} is not UTF-8 text; save it as a UTF-8 YAML file") from None
    except OSError as error:
        raise SsimaeError(f"cannot read config file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SsimaeError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise SsimaeError(f"config file {path} must hold key: value pairs")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    return config_from_dict(values, base, source=f"config file {path}")


def save_config(config: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
