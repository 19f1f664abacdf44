"""Images -> anomaly maps, masks, overlays and scores, from a checkpoint alone.

Output layout for `predict_folder(..., output_dir)`, REL = the image path relative to the input
folder without its extension:
    maps/REL.tiff      float32 anomaly map at the original image size (MVTec evaluation layout)
    masks/REL.png      0/255 segmentation (map > threshold)
    overlays/REL.png   the image with a heat map and the mask contour
    scores.csv         path, score (max of the map), defective (yes/no)
"""

from __future__ import annotations

import collections
import csv
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from .checkpoint import load_model
from .config import Config, parse_image_size
from .data import IMAGE_EXTENSIONS, list_images, read_image, resize_image, resize_map, to_color
from .errors import SsimaeError
from .files import atomic_path, atomic_write_text
from .inference import PatchFn, anomaly_map, torch_patch_fn
from .losses import METHODS
from .train import resolve_device, ssim_settings

log = logging.getLogger(__name__)


class Prediction(NamedTuple):
    anomaly_map: np.ndarray  # (H, W) float32 at the original image size
    mask: np.ndarray  # (H, W) bool, map > threshold
    score: float  # image score: the maximum of the map


class Detector(NamedTuple):
    """A loaded checkpoint: the patch function and the settings that go with it."""

    patch_fn: PatchFn
    config: Config
    threshold: float | None
    channels: int

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) as read -> the model's colour and size."""
        return resize_image(to_color(image, self.config.color), parse_image_size(self.config.image_size))

    def anomaly_map(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) image as read -> (H, W) map at the same size."""
        height, width = image.shape[:2]
        cfg = self.config
        processed = self.preprocess(image)
        amap = anomaly_map(processed, self.patch_fn, cfg.patch_size, cfg.stride, cfg.infer_batch_size, cfg.map_smoothing)
        return resize_map(amap, height, width)

    def predict(self, image: np.ndarray, threshold: float | None = None) -> Prediction:
        amap = self.anomaly_map(image)
        threshold = self.threshold if threshold is None else threshold
        if threshold is None:
            raise SsimaeError("the checkpoint has no threshold (training did not finish); pass --threshold")
        return Prediction(amap, amap > threshold, float(amap.max()))


BACKENDS = ("torch", "onnxruntime")


def load_detector(checkpoint: str | os.PathLike, device: str = "auto", stride: int | None = None,
                  batch_size: int | None = None, backend: str = "torch", precision: str | None = None) -> Detector:
    """A Detector from a checkpoint (or, with backend 'onnxruntime', an exported .onnx file),
    optionally with another stride, inference batch size or precision (torch backend only).

    Both backends feed the same sliding window; their maps agree within 1e-4 (tests/test_export.py).
    """
    if backend not in BACKENDS:
        raise SsimaeError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    is_onnx = Path(checkpoint).suffix.lower() == ".onnx"
    if is_onnx and backend != "onnxruntime":
        raise SsimaeError(f"{checkpoint} is an ONNX model; run it with --backend onnxruntime, or pass the checkpoint")
    torch_device = resolve_device(device)
    if backend == "onnxruntime":
        from .export import load_onnx, onnx_from_checkpoint, onnxruntime_patch_fn

        loaded = load_onnx(checkpoint, torch_device) if is_onnx else onnx_from_checkpoint(checkpoint, torch_device)
        config, threshold, channels = loaded.config, loaded.threshold, loaded.channels
        patch_fn = onnxruntime_patch_fn(loaded.session)
    else:
        model, config, state = load_model(checkpoint)
        threshold, channels = state["threshold"], state["model_kwargs"]["channels"]
        patch_fn = None
    if stride is not None:
        config.stride = stride
    if batch_size is not None:
        config.infer_batch_size = batch_size
    if precision is not None:
        config.precision = precision
    config.validate()
    if patch_fn is None:
        patch_fn = torch_patch_fn(model.to(torch_device), METHODS[config.method], ssim_settings(config), torch_device,
                                  precision=config.precision)
    return Detector(patch_fn, config, threshold, channels)


def input_images(source: str | os.PathLike) -> tuple[list[Path], Path]:
    """(image files, the folder their relative output paths start from) for a file or folder."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise SsimaeError(f"{source} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [source], source.parent
    if source.is_dir():
        paths = list_images(source)
        if not paths:
            raise SsimaeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
        return paths, source
    raise SsimaeError(f"input {source} does not exist; pass an image file or a folder of images")


def warn_colour_mismatch(image: np.ndarray, detector: Detector, path: Path, warned: set) -> None:
    native = "rgb" if image.shape[2] == 3 else "gray"
    if native != detector.config.color and native not in warned:
        warned.add(native)
        log.warning("%s is %s but the model is %s: converting %s images to %s", path, native,
                    detector.config.color, native, detector.config.color)


OVERLAY_ROWS = 256  # rows per overlay strip: float temporaries stay ~100 MB even for 8192-px-wide images


def overlay_image(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, threshold: float | None) -> np.ndarray:
    """(H, W, 3) uint8: the image, a jet heat map blended by anomaly score, the mask contour in red.

    The heat map is scaled to [0, 2 * threshold] so colours mean the same thing on every image.
    Computed in strips of OVERLAY_ROWS rows (pixel-for-pixel the same as in one piece): the
    whole-image float64 colour map alone took 2 GB for an 8192x8192 image.
    """
    top = 2 * threshold if threshold else float(amap.max()) or 1.0
    thick = min(mask.shape) >= 256
    height = mask.shape[0]
    halo = 2  # the contour (erosion, then dilation) of a row depends on 2 rows either side
    out = np.empty(mask.shape + (3,), dtype=np.uint8)  # (H, W, 3)
    for start in range(0, height, OVERLAY_ROWS):
        stop = min(start + OVERLAY_ROWS, height)
        low, high = max(0, start - halo), min(height, stop + halo)
        part = mask[low:high]
        contour = part & ~ndimage.binary_erosion(part, iterations=1, border_value=0)
        contour = ndimage.binary_dilation(contour, iterations=1) if thick else contour
        rgb = to_color(image[start:stop], "rgb")
        heat = colormaps["jet"](np.clip(amap[start:stop] / top, 0, 1))[:, :, :3].astype(np.float32)  # (h, W, 3)
        blended = 0.6 * rgb + 0.4 * heat
        blended[contour[start - low : stop - low]] = (1.0, 0.0, 0.0)
        out[start:stop] = (np.clip(blended, 0, 1) * 255).round().astype(np.uint8)
    return out


def write_tiff(path: Path, amap: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(amap, dtype=np.float32), mode="F").save(tmp, format="TIFF")  # no extra copy


def write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_outputs(output_dir: Path, relative: Path, image: np.ndarray, result: Prediction, threshold: float) -> None:
    """maps/REL.tiff, masks/REL.png and overlays/REL.png of one image."""
    write_tiff(output_dir / "maps" / relative.with_suffix(".tiff"), result.anomaly_map)
    write_png(output_dir / "masks" / relative.with_suffix(".png"), result.mask.astype(np.uint8) * 255)
    write_png(output_dir / "overlays" / relative.with_suffix(".png"),
              overlay_image(image, result.anomaly_map, result.mask, threshold))


# Above this many pixels predict_folder reads, computes and writes one image at a time: three
# 8192x8192 images in flight would pass 2 GB. Below it the overlap's extra memory is small.
OVERLAP_MAX_PIXELS = 4096 * 4096
# Threads writing outputs: encoding one 1024x1024 overlay PNG alone took 140 ms, longer than the
# prediction at --image-size 256 (80 ms); Pillow's encoders release the GIL, so two writers overlap.
WRITERS = 2


def predict_folder(
    detector: Detector,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    threshold: float | None = None,
    progress: Callable | None = None,
    overlap: bool = True,
) -> list[dict]:
    """Predict every image under `source`; write maps, masks, overlays and scores.csv.

    With overlap, a thread reads the next image and WRITERS threads write the previous images'
    outputs while the current one is computed (the same files; bench/speed.py measures the gain).
    Images over OVERLAP_MAX_PIXELS are done one at a time, so memory stays that of one image.
    """
    paths, base = input_images(source)
    threshold = detector.threshold if threshold is None else threshold
    if threshold is None:
        raise SsimaeError("the checkpoint has no threshold (training did not finish); pass --threshold")
    output_dir = Path(output_dir)
    rows, warned = [], set()
    with ThreadPoolExecutor(1, thread_name_prefix="ssimae-read") as reader, \
            ThreadPoolExecutor(WRITERS, thread_name_prefix="ssimae-write") as writer:
        next_read, writing = reader.submit(read_image, paths[0]), collections.deque()
        for index, path in enumerate(progress(paths) if progress else paths):
            image = next_read.result()  # (H, W, C); re-raises a read error in order
            small = overlap and image.shape[0] * image.shape[1] <= OVERLAP_MAX_PIXELS
            next_read = None
            if small and index + 1 < len(paths):
                next_read = reader.submit(read_image, paths[index + 1])
            warn_colour_mismatch(image, detector, path, warned)
            result = detector.predict(image, threshold)
            while len(writing) >= (WRITERS if small else 1):  # bounded memory; re-raises write errors in order
                writing.popleft().result()
            relative = path.relative_to(base).with_suffix("")
            writing.append(writer.submit(write_outputs, output_dir, relative, image, result, threshold))
            if not small:  # a large image: finish its files before reading the next one
                writing.popleft().result()
            if next_read is None and index + 1 < len(paths):
                next_read = reader.submit(read_image, paths[index + 1])
            rows.append({"path": str(path.relative_to(base)), "score": result.score,
                         "defective": "yes" if result.mask.any() else "no"})
        while writing:
            writing.popleft().result()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["path", "score", "defective"])
    writer.writeheader()
    writer.writerows({**r, "score": f"{r['score']:.6f}"} for r in rows)
    atomic_write_text(output_dir / "scores.csv", buffer.getvalue())
    return rows
