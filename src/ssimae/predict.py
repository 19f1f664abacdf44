"""Images -> anomaly maps, masks, overlays and scores, from a checkpoint (or ONNX export) alone.

Output layout for `predict_folder(..., output_dir)`, REL = the image path relative to the input
folder without its extension (with it, e.g. `a.png`, when two inputs would share a name):
    maps/REL.tiff      float32 anomaly map at the original image size (MVTec evaluation layout)
    masks/REL.png      0/255 segmentation (map > threshold)
    overlays/REL.png   the image with a heat map and the mask contour
    scores.csv         path, score (max of the map), defective (yes/no); one row per image, written
                       as each image is done, so an interrupted run keeps what it finished
    errors.csv         path, reason: images that could not be read (only when there were some)
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
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from .data import IMAGE_EXTENSIONS, list_images, read_image, to_color
from .detector import Detector, Prediction
from .errors import SsimaeError
from .files import atomic_path, atomic_write_text, output_folder, remove_stale_temps

log = logging.getLogger(__name__)


def input_images(source: str | os.PathLike, skip: Path | None = None) -> tuple[list[Path], Path]:
    """(image files, the folder their relative output paths start from) for a file or folder.

    Files under `skip` (the output folder, when it lies inside the input) are left out.
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise SsimaeError(f"{source} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [source], source.parent
    if source.is_dir():
        paths = list_images(source)
        if skip is not None:
            skip = skip.resolve()
            paths = [p for p in paths if not p.resolve().is_relative_to(skip)]
        if not paths:
            raise SsimaeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
        return paths, source
    raise SsimaeError(f"input {source} does not exist; pass an image file or a folder of images")


def output_names(paths: list[Path], base: Path) -> dict[Path, Path]:
    """Each input's output path stem, relative to the output folders: REL without its extension,
    or with it (a.png -> a.png) where two inputs would otherwise write the same files."""
    stems = collections.Counter(p.relative_to(base).with_suffix("") for p in paths)
    names = {}
    for path in paths:
        relative = path.relative_to(base)
        stem = relative.with_suffix("")
        names[path] = stem if stems[stem] == 1 else relative
    return names


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
    Computed in strips of OVERLAY_ROWS rows (pixel-for-pixel the same as in one piece), so an
    8192x8192 image does not need a whole-image float colour map.
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


def write_outputs(output_dir: Path, name: Path, image: np.ndarray, result: Prediction, threshold: float) -> None:
    """maps/NAME.tiff, masks/NAME.png and overlays/NAME.png of one image."""
    write_tiff(output_dir / "maps" / f"{name}.tiff", result.anomaly_map)
    write_png(output_dir / "masks" / f"{name}.png", result.mask.astype(np.uint8) * 255)
    write_png(output_dir / "overlays" / f"{name}.png", overlay_image(image, result.anomaly_map, result.mask, threshold))


class ScoresFile:
    """scores.csv, one row appended (and flushed) per finished image. The file is made with its first
    row (or by finish(), header only, when no image could be done), so a run that fails before any
    image leaves no scores.csv."""

    FIELDS = ("path", "score", "defective")

    def __init__(self, path: Path):
        self.path, self.handle, self.writer = path, None, None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w", newline="")
        self.writer = csv.writer(self.handle)
        self.writer.writerow(self.FIELDS)

    def add(self, row: dict) -> None:
        if self.handle is None:
            self._open()
        self.writer.writerow([row["path"], f"{row['score']:.6f}", row["defective"]])
        self.handle.flush()

    def finish(self) -> None:
        if self.handle is None:
            self._open()
        self.close()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class PredictResult(NamedTuple):
    rows: list[dict]  # path, score, defective: one per image done
    errors: list[tuple[str, str]]  # (path, reason) of images that could not be read


# Above this many pixels predict_folder reads, computes and writes one image at a time: three
# 8192x8192 images in flight would pass 2 GB. Below it the overlap's extra memory is small.
OVERLAP_MAX_PIXELS = 4096 * 4096
# Threads writing outputs: PNG encoding of an overlay can outlast the prediction (bench/README.md);
# Pillow's encoders release the GIL, so two writers overlap.
WRITERS = 2


def _read(path: Path, max_pixels: int):
    """(image, None) or (None, reason) for an unreadable file."""
    try:
        return read_image(path, max_pixels), None
    except SsimaeError as error:
        return None, str(error)


def predict_folder(
    detector: Detector,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    threshold: float | None = None,
    progress: Callable | None = None,
    overlap: bool = True,
    strict: bool = False,
) -> PredictResult:
    """Predict every readable image under `source`; write maps, masks, overlays, scores.csv and, if
    some images could not be read, errors.csv. With `strict`, the first unreadable image is an error.

    With overlap, a thread reads the next image and WRITERS threads write the previous images'
    outputs while the current one is computed (the same files; bench/speed.py measures the gain).
    Images over OVERLAP_MAX_PIXELS are done one at a time, so memory stays that of one image.
    """
    paths, base = input_images(source, skip=Path(output_dir))
    threshold = detector.threshold if threshold is None else threshold
    if threshold is None:
        raise SsimaeError("the checkpoint has no threshold (training did not finish); pass --threshold")
    output_dir = output_folder(output_dir)
    names = output_names(paths, base)
    remove_stale_temps(output_dir, recursive=True)  # left by a run killed mid-write
    limit = detector.config.max_image_pixels
    rows, errors, warned = [], [], set()
    scores = ScoresFile(output_dir / "scores.csv")
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="ssimae-read") as reader, \
                ThreadPoolExecutor(WRITERS, thread_name_prefix="ssimae-write") as writer:
            next_read, writing = reader.submit(_read, paths[0], limit), collections.deque()

            def finish_oldest() -> None:
                future, row = writing.popleft()
                future.result()  # re-raises write errors in order
                scores.add(row)
                rows.append(row)

            try:
                for index, path in enumerate(progress(paths) if progress else paths):
                    image, reason = next_read.result()
                    next_read = None
                    small = image is not None and overlap and image.shape[0] * image.shape[1] <= OVERLAP_MAX_PIXELS
                    if (small or image is None) and index + 1 < len(paths):
                        next_read = reader.submit(_read, paths[index + 1], limit)
                    if image is None:
                        if strict:
                            raise SsimaeError(f"{reason} (--strict stops at the first bad file)")
                        log.warning("skipped: %s", reason)
                        errors.append((str(path.relative_to(base)), reason))
                    else:
                        warn_colour_mismatch(image, detector, path, warned)
                        result = detector.predict(image, threshold)
                        while len(writing) >= (WRITERS if small else 1):  # bounded memory
                            finish_oldest()
                        row = {"path": str(path.relative_to(base)), "score": result.score,
                               "defective": "yes" if result.mask.any() else "no"}
                        writing.append((writer.submit(write_outputs, output_dir, names[path], image, result, threshold),
                                        row))
                        del image, result
                        if not small:  # a large image: finish its files before reading the next one
                            finish_oldest()
                    if next_read is None and index + 1 < len(paths):
                        next_read = reader.submit(_read, paths[index + 1], limit)
            except BaseException:  # keep the images already computed: finish their files and rows
                while writing:
                    try:
                        finish_oldest()
                    except Exception:
                        writing.clear()
                raise
            while writing:
                finish_oldest()
        scores.finish()
    finally:
        scores.close()
    errors_path = output_dir / "errors.csv"
    if errors:
        lines = [["path", "reason"], *errors]
        atomic_write_text(errors_path, "".join(_csv_line(line) for line in lines))
    else:
        errors_path.unlink(missing_ok=True)
    return PredictResult(rows, errors)


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()
