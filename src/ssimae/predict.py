"""Images -> anomaly maps, masks, overlays and scores, from a checkpoint (or ONNX export) alone.

Output layout for `predict_folder(..., output_dir)`, REL = the image path relative to the input
folder without its extension (with it, e.g. `a.png`, when two inputs would share a name):
    maps/REL.tiff      float32 anomaly map at the original image size (MVTec evaluation layout)
    masks/REL.png      0/255 segmentation: map > pixel threshold, regions under min_defect_area dropped
    overlays/REL.png   input | heat map | mask contour, side by side, with the verdict and score
    scores.csv         path, score (1.0 = the threshold), raw_score, image_threshold, pixel_threshold,
                       defective (yes/no), regions, defect_area_px, defect_area_percent; one row per
                       image, written as each image is done, so an interrupted run keeps what it finished
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
from PIL import Image

from .data import IMAGE_EXTENSIONS, list_images, read_image, target_size
from .detector import Detector, Prediction, load_detector  # noqa: F401  (load_detector: the 0.1.0 import path)
from .distributed import Rank, barrier, gather, shard
from .errors import SettingError, SsimaeError
from .overlay import verdict_overlay
from .png import encode_png
from .files import atomic_path, atomic_write_text, output_folder, remove_stale_temps

log = logging.getLogger(__name__)
# predict's per-image output folders (maps/NAME.tiff, masks/NAME.png, overlays/NAME.png)
OUTPUT_FOLDERS = ("maps", "masks", "overlays")


def parse_outputs(text: str | None) -> tuple[str, ...]:
    """--outputs: a comma-separated subset of OUTPUT_FOLDERS, or 'none' (scores.csv alone); None: all."""
    if text is None:
        return OUTPUT_FOLDERS
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in OUTPUT_FOLDERS]
    if unknown or not names:
        raise SettingError("outputs", f"--outputs {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                                      f"use a comma-separated subset of {', '.join(OUTPUT_FOLDERS)}, or none")
    return tuple(name for name in OUTPUT_FOLDERS if name in names)


def input_images(source: str | os.PathLike, skip: Path | None = None) -> tuple[list[Path], Path]:
    """(image files, the folder their relative output paths start from) for a file or folder.

    Files under `skip` (the output folder, when it lies inside the input) are left out, and so are the
    maps, masks and overlays of earlier predict runs inside the input (a folder with a scores.csv).
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise SsimaeError(f"{source} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [source], source.parent
    if source.is_dir():
        found = list_images(source)
        outputs = [found_csv.parent / name for found_csv in source.rglob("scores.csv")
                   for name in OUTPUT_FOLDERS if (found_csv.parent / name).is_dir()]
        if skip is not None:
            outputs.append(skip)
        outputs = [folder.resolve() for folder in outputs]
        paths = [p for p in found if not any(p.resolve().is_relative_to(folder) for folder in outputs)]
        if len(paths) < len(found):
            log.info("left out %d file(s) of predict's outputs inside %s", len(found) - len(paths), source)
        if not paths:
            outside = f" outside predict's outputs ({len(found)} image(s) there)" if found else ""
            raise SsimaeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}{outside}; "
                              "pass the folder of the images to check, and an --output folder beside it")
        return paths, source
    raise SsimaeError(f"input {source} does not exist; pass an image file or a folder of images")


def output_names(paths: list[Path], base: Path) -> dict[Path, Path]:
    """Each input's output path stem, relative to the output folders: REL without its extension, or with
    it (a.png -> a.png) where that could write another input's files (a.png and a.jpg; a.png.png beside
    a.png); names that still coincide, also by case alone (a file system may ignore it), get -2, -3..."""
    relative = {path: path.relative_to(base) for path in paths}

    def key(name: Path) -> str:
        return str(name).casefold()

    stems = collections.Counter(key(name.with_suffix("")) for name in relative.values())
    full = collections.Counter(key(name) for name in relative.values())
    names, taken = {}, set()
    for path in paths:
        name = relative[path].with_suffix("")
        if stems[key(name)] > 1 or full[key(name)]:
            name = relative[path]
        unique, number = name, 2
        while key(unique) in taken:
            unique, number = name.with_name(f"{name.name}-{number}"), number + 1
        taken.add(key(unique))
        names[path] = unique
    return names


def warn_about_input(image: np.ndarray, detector: Detector, path: Path, warned: set) -> None:
    """Warn once per run about what the model changes in its input: the colour, or (a reconstruction
    method) an image smaller than the patch, which is reflect-padded."""
    native = "rgb" if image.shape[2] == 3 else "gray"
    if native != detector.config.color and native not in warned:
        warned.add(native)
        log.warning("%s is %s but the model is %s: converting %s images to %s", path, native,
                    detector.config.color, native, detector.config.color)
    config = detector.config
    if config.kind == "reconstruction" and "small" not in warned:
        height, width = target_size(*image.shape[:2], config.resize)
        if min(height, width) < config.patch_size:
            warned.add("small")
            log.warning("%s is %dx%d, smaller than the %d px patch: it is reflect-padded, which the model never saw "
                        "whole; its map is less reliable", path, width, height, config.patch_size)


def write_tiff(path: Path, amap: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(amap, dtype=np.float32), mode="F").save(tmp, format="TIFF")  # no extra copy


def write_png(path: Path, array: np.ndarray) -> None:
    """A uint8 gray or RGB array as a PNG (png.py: faster than Pillow's encoder, which limits predict)."""
    data = encode_png(array)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def score_row(path: str, result: Prediction, pixel_threshold: float, image_threshold: float | None) -> dict:
    """One scores.csv row. `score` is normalised so that 1.0 is the threshold the verdict used: the
    image threshold, or the pixel threshold when there is none (a --threshold override)."""
    reference = image_threshold if image_threshold is not None else pixel_threshold
    if reference > 0:
        score = result.score / reference
    else:  # a threshold of 0 (--threshold 0, or all-zero validation maps): no ratio, only above or not
        score = float("inf") if result.score > reference else 0.0
    return {"path": path, "score": score,
            "raw_score": result.score, "image_threshold": image_threshold, "pixel_threshold": pixel_threshold,
            "defective": "yes" if result.defective else "no", "regions": result.regions,
            "defect_area_px": result.area, "defect_area_percent": 100.0 * result.area / result.mask.size}


def caption(row: dict) -> str:
    verdict = "DEFECTIVE" if row["defective"] == "yes" else "good"
    return (f"{verdict}   score {row['score']:.2f} (1.00 = threshold)   {row['regions']} region(s), "
            f"{row['defect_area_percent']:.2f}% of the image")


def write_outputs(output_dir: Path, name: Path, image: np.ndarray | None, result: Prediction, row: dict,
                  outputs: tuple[str, ...] = OUTPUT_FOLDERS) -> None:
    """maps/NAME.tiff, masks/NAME.png and overlays/NAME.png of one image, those of `outputs` (the image is
    needed for the overlay only)."""
    if "maps" in outputs:
        write_tiff(output_dir / "maps" / f"{name}.tiff", result.anomaly_map)
    if "masks" in outputs:
        write_png(output_dir / "masks" / f"{name}.png", result.mask.astype(np.uint8) * 255)
    if "overlays" in outputs:
        write_png(output_dir / "overlays" / f"{name}.png",
                  verdict_overlay(image, result.anomaly_map, result.mask, row["pixel_threshold"], caption(row),
                                  result.defective))


class ScoresFile:
    """scores.csv, one row appended (and flushed) per finished image. The file is made with its first
    row (or by finish(), header only, when no image could be done), so a run that fails before any
    image leaves no scores.csv."""

    FIELDS = ("path", "score", "raw_score", "image_threshold", "pixel_threshold", "defective", "regions",
              "defect_area_px", "defect_area_percent")

    def __init__(self, path: Path):
        self.path, self.handle, self.writer = path, None, None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.handle)
        self.writer.writerow(self.FIELDS)

    def add(self, row: dict) -> None:
        if self.handle is None:
            self._open()
        self.writer.writerow([_csv_value(row[field]) for field in self.FIELDS])
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
# Pillow's encoders release the GIL, so the writers run in parallel: half the cores, 2 to 8.
WRITERS = min(8, max(2, (os.cpu_count() or 2) // 2))


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
    rank: Rank = Rank(),
    outputs: tuple[str, ...] = OUTPUT_FOLDERS,
) -> PredictResult:
    """Predict every readable image under `source`; write the `outputs` (maps, masks, overlays: all by
    default), scores.csv and, if some images could not be read, errors.csv. With `strict`, the first
    unreadable image is an error.

    Under torchrun each process takes every world-th image and writes its rows to scores.rank<R>.csv;
    the main process merges them into scores.csv in input order (the same file one process writes).
    """
    paths, base = input_images(source, skip=Path(output_dir))
    if Path(source).is_file():  # one image asked for by name: failing to read it is an error, not a skip
        _, reason = _read(paths[0], detector.config.max_image_pixels)
        if reason is not None:
            raise SsimaeError(reason)
    override = threshold
    threshold = detector.threshold if override is None else override
    if threshold is None:
        raise SsimaeError("the checkpoint has no threshold (training did not finish); pass --threshold")
    image_threshold = detector.image_threshold if override is None else None
    output_dir = output_folder(output_dir)
    names = output_names(paths, base)  # from every input: collisions across processes count too
    if rank.main:
        remove_stale_temps(output_dir)  # left by a run killed mid-write: scores.csv, errors.csv
        for folder in OUTPUT_FOLDERS:  # only predict's own folders: the output folder may hold other files
            remove_stale_temps(output_dir / folder, recursive=True)
    barrier()
    scores = ScoresFile(output_dir / ("scores.csv" if not rank.distributed else f"scores.rank{rank.rank}.csv"))

    def map_and_job(path: Path, image: np.ndarray) -> Callable[[], dict]:
        """The anomaly map of one image, computed here, and the job that decides on it (mask, score,
        verdict), writes its files and returns its score row, to run beside the next image's map."""
        amap = detector.anomaly_map(image)
        kept = image if "overlays" in outputs else None  # the overlay alone needs the image

        def job() -> dict:
            result = detector.decide(amap, override)
            row = score_row(str(path.relative_to(base)), result, threshold, image_threshold)
            write_outputs(output_dir, names[path], kept, result, row, outputs)
            return row

        return job

    try:
        rows, errors = _run(shard(paths, rank), base, detector, map_and_job, scores, progress, overlap, strict)
        scores.finish()
    finally:
        scores.close()
    if rank.distributed:
        rows, errors = _merge(output_dir, paths, base, rank, rows, errors)
    if rank.main:
        errors_path = output_dir / "errors.csv"
        if errors:
            atomic_write_text(errors_path, "".join(_csv_line(line) for line in [["path", "reason"], *errors]))
        else:
            errors_path.unlink(missing_ok=True)
    return PredictResult(rows, errors)


def _run(paths: list[Path], base: Path, detector: Detector, map_and_job, scores: ScoresFile, progress, overlap: bool,
         strict: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    """The loop over images: a reader thread reads the next image and WRITERS threads decide on and
    write the previous images' files while the current one's map is computed (bench/speed.py measures
    the gain).
    Images over OVERLAP_MAX_PIXELS are done one at a time, so memory stays that of one image."""
    rows, errors, warned = [], [], set()
    if not paths:
        return rows, errors
    limit = detector.config.max_image_pixels
    with ThreadPoolExecutor(1, thread_name_prefix="ssimae-read") as reader, \
            ThreadPoolExecutor(WRITERS, thread_name_prefix="ssimae-write") as writer:
        next_read, writing = reader.submit(_read, paths[0], limit), collections.deque()

        def finish_oldest() -> None:
            row = writing.popleft().result()  # re-raises write errors in order
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
                    warn_about_input(image, detector, path, warned)
                    job = map_and_job(path, image)
                    del image
                    while len(writing) >= (WRITERS if small else 1):  # bounded memory
                        finish_oldest()
                    writing.append(writer.submit(job))
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
    return rows, errors


def _merge(output_dir: Path, paths: list[Path], base: Path, rank: Rank, rows: list[dict],
           errors: list[tuple[str, str]]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every process's rows and errors on the main process, in input order; scores.csv merged there
    from the per-process files, which are then removed."""
    shares = gather((rows, errors))
    if not rank.main:
        barrier()
        return rows, errors
    order = {str(path.relative_to(base)): index for index, path in enumerate(paths)}
    rows = sorted((row for part, _ in shares for row in part), key=lambda row: order[row["path"]])
    errors = sorted((error for _, part in shares for error in part), key=lambda error: order[error[0]])
    parts = [output_dir / f"scores.rank{r}.csv" for r in range(rank.world)]
    lines = {}
    for part in parts:
        with open(part, newline="", encoding="utf-8") as handle:
            for line in list(csv.reader(handle))[1:]:
                lines[line[0]] = line
    ordered = [ScoresFile.FIELDS] + [lines[row["path"]] for row in rows]
    atomic_write_text(output_dir / "scores.csv", "".join(_csv_line(line) for line in ordered))
    for part in parts:
        part.unlink()
    barrier()
    return rows, errors


def _csv_value(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()
