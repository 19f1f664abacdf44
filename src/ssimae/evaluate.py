"""Labelled test split -> anomaly maps -> MVTec-style metrics, overall and per defect type.

Per-defect-type figures use the good test images together with that type's images, so the
false-positive side of every figure is the same set of defect-free pixels.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .data import TestItem, find_test_items, load_mask, read_image
from .errors import SsimaeError
from .files import atomic_write_text, json_safe, output_folder
from .metrics import evaluate_maps
from .detector import Detector
from .predict import warn_colour_mismatch, write_tiff

log = logging.getLogger(__name__)


class TestMaps(NamedTuple):
    items: list[TestItem]
    maps: list[np.ndarray]  # (H, W) float32 each, at the original image size
    masks: list[np.ndarray]  # (H, W) bool each


def compute_test_maps(detector: Detector, dataset: str | os.PathLike, progress: Callable | None = None,
                      maps_dir: Path | None = None) -> TestMaps:
    """Anomaly maps and ground-truth masks of every test image; optionally saved as TIFF."""
    items = find_test_items(dataset)
    test_root = Path(dataset) / "test"
    maps, masks, warned = [], [], set()
    for item in progress(items) if progress else items:
        image = read_image(item.path, detector.config.max_image_pixels)
        warn_colour_mismatch(image, detector, item.path, warned)
        amap = detector.anomaly_map(image)
        shape = image.shape[:2]
        masks.append(load_mask(item.mask_path, shape) if item.mask_path else np.zeros(shape, dtype=bool))
        maps.append(amap)
        if maps_dir is not None:
            write_tiff(maps_dir / item.path.relative_to(test_root).with_suffix(".tiff"), amap)
    return TestMaps(items, maps, masks)


def metrics_of(test: TestMaps, threshold: float | None, fpr_limit: float = 0.3) -> dict:
    """Overall and per-defect-type metrics, plus segmentation figures at the stored threshold."""
    result = {**evaluate_maps(test.maps, test.masks, fpr_limit), **threshold_figures(test, threshold)}
    good = [i for i, item in enumerate(test.items) if item.defect_type == "good"]
    per_type = {}
    for defect in sorted({item.defect_type for item in test.items} - {"good"}):
        chosen = good + [i for i, item in enumerate(test.items) if item.defect_type == defect]
        subset = TestMaps([test.items[i] for i in chosen], [test.maps[i] for i in chosen], [test.masks[i] for i in chosen])
        per_type[defect] = {"images": len(chosen) - len(good), **evaluate_maps(subset.maps, subset.masks, fpr_limit)}
    result["per_defect_type"] = per_type
    result["images"] = len(test.items)
    result["good_images"] = len(good)
    return result


def threshold_figures(test: TestMaps, threshold: float | None) -> dict:
    """Pixel precision/recall/F1 and image accuracy when segmenting at the stored threshold."""
    if threshold is None:
        return {"threshold": None}
    tp = fp = fn = 0
    correct = 0
    for amap, mask in zip(test.maps, test.masks):
        predicted = amap > threshold
        tp += int(np.count_nonzero(predicted & mask))
        fp += int(np.count_nonzero(predicted & ~mask))
        fn += int(np.count_nonzero(~predicted & mask))
        correct += int(predicted.any() == mask.any())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"threshold": threshold, "pixel_precision": precision, "pixel_recall": recall, "pixel_f1": f1,
            "image_accuracy": correct / len(test.maps)}


def format_table(metrics: dict) -> str:
    """A plain-text table of the headline figures, overall and per defect type."""
    header = f"{'subset':<16}{'images':>8}{'pixel AUROC':>13}{'AU-PRO@0.3':>12}{'image AUROC':>13}"
    lines = [header, "-" * len(header)]

    def row(name, images, m):
        return f"{name:<16}{images:>8}{m['pixel_auroc']:>13.4f}{m['au_pro']:>12.4f}{m['image_auroc']:>13.4f}"

    lines.append(row("all", metrics["images"], metrics))
    for defect, m in metrics["per_defect_type"].items():
        lines.append(row(defect, m["images"], m))
    if metrics.get("threshold") is not None:
        lines.append(f"at threshold {metrics['threshold']:.5f}: pixel F1 {metrics['pixel_f1']:.4f}, "
                     f"image accuracy {metrics['image_accuracy']:.4f}")
    return "\n".join(lines)


def write_metrics(metrics: dict, output_dir: str | os.PathLike) -> Path:
    path = Path(output_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(json_safe(metrics), indent=2) + "\n")
    return path


def evaluate(detector: Detector, dataset: str | os.PathLike, output_dir: str | os.PathLike,
             progress: Callable | None = None, save_maps: bool = False, threshold: float | None = None) -> dict:
    """Evaluate a detector on a dataset's test split; write metrics.json (and maps/ if asked).
    `threshold` replaces the detector's for the figures at the threshold."""
    if not (Path(dataset) / "test").is_dir():
        raise SsimaeError(f"{dataset} has no test folder; evaluation needs the MVTec layout test/<defect>/<image>")
    output_dir = output_folder(output_dir)
    maps_dir = output_dir / "maps" if save_maps else None
    test = compute_test_maps(detector, dataset, progress, maps_dir)
    metrics = metrics_of(test, detector.threshold if threshold is None else threshold)
    write_metrics(metrics, output_dir)
    return metrics
