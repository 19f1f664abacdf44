"""Detector: image -> anomaly map -> mask -> score, the same for every method.

A Detector holds the settings, the thresholds and one function `map_fn` from an image at working
colour and size to an anomaly map of the same size. How map_fn is made depends on the method's kind
(methods.py):
    reconstruction  a sliding window of patches through the network, each patch's residual map
                    averaged over the overlapping windows (inference.sliding_window)
    memory          the whole image through the method's module at once, which returns a grid of
                    scores; the grid is upsampled bilinearly to the image
and on the backend that runs the network: PyTorch, or ONNX Runtime (onnx_backend.py). Everything
around map_fn (colour, resize, smoothing, resizing the map back, threshold) is shared.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint, Thresholds
from .config import BACKENDS, INFERENCE_SETTINGS, Config, config_from_dict
from .data import read_image, resize_map, working_image
from .devices import resolve_device, resolve_precision, tf32
from .errors import SettingError, SsimaeError
from .inference import PatchFn, sliding_window, smooth_map, torch_patch_fn
from .scoring import image_score
from .threshold import ValidationSummary, image_threshold, images_needed, kept_regions
from .losses import SsimSettings
from .methods import METHODS

log = logging.getLogger(__name__)

MapFn = Callable[[np.ndarray], np.ndarray]  # (H, W, C) working image -> (H, W) float32 map
GridFn = Callable[[torch.Tensor], torch.Tensor]  # (1, C, H, W) image -> (1, 1, h, w) score grid


class Prediction(NamedTuple):
    anomaly_map: np.ndarray  # (H, W) float32 at the original image size
    mask: np.ndarray  # (H, W) bool: map > pixel threshold, regions under min_defect_area dropped
    score: float  # image score (config.image_score_kind of the map)
    defective: bool  # the verdict: score > image threshold (without one: the mask has a region)
    regions: int  # connected regions of the mask

    @property
    def area(self) -> int:
        """Defect area in pixels."""
        return int(np.count_nonzero(self.mask))


@dataclass(frozen=True)
class Detector:
    config: Config
    map_fn: MapFn
    thresholds: Thresholds | None
    channels: int
    reconstruct: MapFn | None = None  # reconstruction methods: working image -> (C, H, W) reconstruction

    @property
    def threshold(self) -> float | None:
        return self.thresholds.pixel if self.thresholds else None

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) as read -> the model's colour, working size and input normalization."""
        return working_image(image, self.config)

    def working_map(self, working: np.ndarray) -> np.ndarray:
        """Anomaly map of an image already at working colour and size, smoothed; (H, W) float32."""
        return smooth_map(self.map_fn(working), self.config.smoothing)

    def anomaly_map(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) image as read -> (H, W) map at the same size."""
        height, width = image.shape[:2]
        return resize_map(self.working_map(self.preprocess(image)), height, width)

    @property
    def image_threshold(self) -> float | None:
        return self.thresholds.image if self.thresholds else None

    def image_score(self, amap: np.ndarray) -> float:
        return configured_image_score(amap, self.config)

    def decide(self, amap: np.ndarray, threshold: float | None = None) -> Prediction:
        """The mask, score and verdict of an anomaly map. `threshold` replaces the pixel threshold
        (the image verdict then follows the mask, as the image threshold belongs to the old one)."""
        pixel = self.threshold if threshold is None else threshold
        if pixel is None:
            raise SsimaeError("the checkpoint has no threshold (training did not finish); pass --threshold")
        mask, regions = kept_regions(amap > pixel, self.config.min_defect_area)
        score = self.image_score(amap)
        image = self.image_threshold if threshold is None else None
        defective = score > image if image is not None else bool(regions)
        return Prediction(amap, mask, score, defective, int(regions))

    def predict(self, image: np.ndarray, threshold: float | None = None) -> Prediction:
        return self.decide(self.anomaly_map(image), threshold)


def summarise_maps(maps: Iterable[np.ndarray], config: Config, total_pixels: int | None = None) -> ValidationSummary:
    """Validation maps, one at a time, into the summary the thresholds are chosen from (with each map's
    image score). `total_pixels`: all validation maps' pixels, those of other processes' shares too;
    None: `maps` is a list of all of them."""
    if total_pixels is None:
        maps = list(maps)
        total_pixels = sum(m.size for m in maps)
    summary = ValidationSummary(config.threshold_rule, config.threshold_fpr, config.min_defect_area, total_pixels)
    for amap in maps:
        summary.add(amap, configured_image_score(amap, config))
    return summary


def summarise_validation(detector: Detector, paths: list[Path], total_pixels: int) -> ValidationSummary:
    """The maps of defect-free validation images, through the same path as predict, summarised as they are
    made: no more than one is held (threshold.ValidationSummary)."""
    limit = detector.config.max_image_pixels
    return summarise_maps((detector.anomaly_map(read_image(path, limit)) for path in paths), detector.config,
                          total_pixels)


def configured_image_score(amap: np.ndarray, config: Config) -> float:
    """The image score the settings ask for (kind, fraction, margin): verdicts and thresholds share it."""
    return image_score(amap, config.image_score_kind, config.image_score_fraction, config.image_margin)


def choose_thresholds(summary: ValidationSummary, config: Config) -> Thresholds:
    """Pixel and image thresholds from the summarised maps of defect-free validation images (threshold.py
    rules), with what they achieve on those images. Warns when there are too few images for the image rule."""
    pixel = summary.threshold()
    scores = np.array(summary.scores)
    image, how = image_threshold(scores, config.image_fpr)
    needed = images_needed(config.image_fpr)
    if len(scores) < needed:
        log.warning("%d validation image(s) cannot resolve an image false-alarm rate of %g, so the image threshold "
                    "comes from a normal fit to their scores; use at least %d validation images for a measured one "
                    "(more train/good images, a validation/good folder, or a larger --val-fraction)",
                    len(scores), config.image_fpr, needed)
    return Thresholds(pixel, summary.rule_text(), image, f"image false-alarm rate {config.image_fpr:g} on "
                      f"{len(scores)} validation images ({config.image_score_kind} score, {how})",
                      summary.figures(pixel, image))


# --------------------------------------------------------------------------- building


def reconstruction_map_fn(patch_fn: PatchFn, config: Config, device: torch.device | str = "cpu") -> MapFn:
    def map_fn(image: np.ndarray) -> np.ndarray:
        return sliding_window(image, patch_fn, config.patch_size, config.stride, config.infer_batch_size, device)[0]

    return map_fn


def grid_stride(config: Config) -> int:
    """Image pixels per cell of a memory method's score grid (1: a map at full size)."""
    if config.method == "patchcore":
        from .patchcore import grid_stride as patchcore_stride

        return patchcore_stride(config)
    return 1


def grid_map_fn(grid_fn: GridFn, stride: int = 1) -> MapFn:
    """A MapFn from a whole-image scoring function. Its score grid has a cell per `stride` x `stride`
    image pixels from the top left (ceil(H / stride) rows): it is upsampled bilinearly by the stride
    and cropped to the image."""

    def map_fn(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, C, H, W)
        grid = grid_fn(x).float().cpu()  # (1, 1, h, w)
        height, width = x.shape[-2:]
        if grid.shape[-2:] != (height, width):
            size = (grid.shape[-2] * stride, grid.shape[-1] * stride)
            grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[..., :height, :width]
        return grid[0, 0].numpy().astype(np.float32, copy=False)

    return map_fn


def torch_detector(checkpoint: Checkpoint, device: torch.device, config: Config | None = None) -> Detector:
    """A Detector running the checkpoint's network with PyTorch on `device`."""
    config = config or checkpoint.config
    method = METHODS[config.method]
    network = checkpoint.network().to(device)
    if method.kind == "reconstruction":
        ssim = SsimSettings.from_config(config)
        patch_fn = torch_patch_fn(network, method.residual, ssim, device, precision=config.precision,
                                  graph_batch=config.infer_batch_size)
        rebuild = torch_patch_fn(network, method.residual, ssim, device, outputs="reconstruction",
                                 precision=config.precision)

        def reconstruct(image: np.ndarray) -> np.ndarray:
            return sliding_window(image, rebuild, config.patch_size, config.stride, config.infer_batch_size, device)

        return Detector(config, reconstruction_map_fn(patch_fn, config, device), checkpoint.thresholds,
                        checkpoint.channels, reconstruct)
    precision = resolve_precision(config.precision, device, "infer")

    @torch.inference_mode()
    def grid_fn(x: torch.Tensor) -> torch.Tensor:
        with tf32(precision == "tf32"), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return network(x.to(device))

    return Detector(config, grid_map_fn(grid_fn, grid_stride(config)), checkpoint.thresholds, checkpoint.channels)


def apply_overrides(config: Config, overrides: dict | None, source: str = "command line") -> Config:
    """The checkpoint's settings with inference-time overrides (INFERENCE_SETTINGS) applied and checked."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(INFERENCE_SETTINGS))
    if unknown:
        raise SsimaeError(f"{', '.join(unknown)} cannot change after training; only {', '.join(INFERENCE_SETTINGS)} can")
    return config_from_dict(overrides, config, source=source).validate()


def check_stride(trained: Config, config: Config, threshold: float | None) -> None:
    """Refuse a stride other than the training one unless the user sets the threshold too: the
    threshold was chosen on maps made at the training stride, and other strides give other maps."""
    if config.kind != "reconstruction" or config.stride == trained.stride or threshold is not None:
        return
    raise SettingError("stride", f"stride {config.stride} differs from the stride {trained.stride} the threshold was "
                                 f"chosen at, and maps at another stride do not match that threshold; predict at "
                                 f"stride {trained.stride}, retrain with --stride {config.stride}, or also pass "
                                 "--threshold")


def load_detector(source: str | os.PathLike, backend: str = "torch", overrides: dict | None = None,
                  threshold: float | None = None) -> Detector:
    """A Detector from a checkpoint (or, with backend 'onnxruntime', also an exported .onnx file).

    `overrides` may change INFERENCE_SETTINGS (stride, infer_batch_size, device, precision); the
    device is 'auto' unless overridden, whatever the training device was. A stride other than the
    training one needs an explicit `threshold` (check_stride).
    """
    overrides = {"device": "auto", **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if threshold is not None and not math.isfinite(threshold):
        raise SettingError("threshold", f"threshold {threshold} is not a finite number; pass a number such as 0.5")
    if backend not in BACKENDS:
        raise SettingError("backend", f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    is_onnx = Path(source).suffix.lower() == ".onnx"
    if is_onnx and backend != "onnxruntime":
        raise SsimaeError(f"{source} is an ONNX model; run it with --backend onnxruntime, or pass the checkpoint")
    torch_device = resolve_device(overrides["device"])
    if backend == "onnxruntime":
        from .onnx_backend import onnx_detector

        if overrides.get("precision") not in (None, "auto", "fp32"):
            log.warning("--precision %s applies to the torch backend only; ONNX Runtime runs the graph in fp32",
                        overrides["precision"])

        return onnx_detector(source, torch_device, overrides, threshold)
    checkpoint = Checkpoint.load(source)
    config = apply_overrides(checkpoint.config, overrides)
    check_stride(checkpoint.config, config, threshold)
    return torch_detector(checkpoint, torch_device, config)
