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

from .data import TestItem, check_test_masks, find_test_items, load_mask, read_image
from .files import atomic_write_text, json_safe, output_folder
from .metrics import best_accuracy, evaluate_maps
from .detector import Detector
from .predict import warn_about_input, write_tiff

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
        warn_about_input(image, detector, item.path, warned)
        amap = detector.anomaly_map(image)
        shape = image.shape[:2]
        masks.append(load_mask(item.mask_path, shape) if item.mask_path else np.zeros(shape, dtype=bool))
        maps.append(amap)
        if maps_dir is not None:
            write_tiff(maps_dir / item.path.relative_to(test_root).with_suffix(".tiff"), amap)
    return TestMaps(items, maps, masks)


def metrics_of(test: TestMaps, detector: Detector, fpr_limit: float = 0.3, threshold: float | None = None) -> dict:
    """Overall and per-defect-type metrics, and the decision figures at the detector's thresholds
    (or at `threshold`, a pixel threshold that replaces them)."""
    scores = [detector.image_score(m) for m in test.maps]
    result = {**evaluate_maps(test.maps, test.masks, fpr_limit, scores), **decision_figures(test, detector, threshold)}
    result["image_score"] = detector.config.image_score_kind
    result["image_score_margin"] = detector.config.image_margin
    good = [i for i, item in enumerate(test.items) if item.defect_type == "good"]
    per_type = {}
    for defect in sorted({item.defect_type for item in test.items} - {"good"}):
        chosen = good + [i for i, item in enumerate(test.items) if item.defect_type == defect]
        per_type[defect] = {"images": len(chosen) - len(good),
                            **evaluate_maps([test.maps[i] for i in chosen], [test.masks[i] for i in chosen], fpr_limit,
                                            [scores[i] for i in chosen])}
    result["per_defect_type"] = per_type
    result["images"] = len(test.items)
    result["good_images"] = len(good)
    return result


def decision_figures(test: TestMaps, detector: Detector, threshold: float | None = None) -> dict:
    """What the decisions a user acts on achieve: pixel precision/recall/F1 of the masks as predict
    writes them, image accuracy/precision/recall of the verdicts, the best accuracy any image
    threshold reaches, and the thresholds' figures on the validation images."""
    pixel = detector.threshold if threshold is None else threshold
    if pixel is None:
        return {"threshold": None}
    tp = fp = fn = 0
    verdicts, labels, scores = [], [], []
    for amap, truth in zip(test.maps, test.masks):
        prediction = detector.decide(amap, threshold)
        tp += int(np.count_nonzero(prediction.mask & truth))
        fp += int(np.count_nonzero(prediction.mask & ~truth))
        fn += int(np.count_nonzero(~prediction.mask & truth))
        verdicts.append(prediction.defective)
        labels.append(bool(truth.any()))
        scores.append(prediction.score)
    verdicts, labels = np.array(verdicts), np.array(labels)
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    image_tp = int(np.count_nonzero(verdicts & labels))
    best = best_accuracy(scores, labels)
    thresholds = detector.thresholds
    return {
        "threshold": pixel,
        "image_threshold": detector.image_threshold if threshold is None else None,
        "pixel_precision": precision, "pixel_recall": recall,
        "pixel_f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
        "image_accuracy": float(np.mean(verdicts == labels)),
        "image_precision": image_tp / verdicts.sum() if verdicts.any() else math.nan,
        "image_recall": image_tp / labels.sum() if labels.any() else math.nan,
        "good_images_flagged": float(verdicts[~labels].mean()) if (~labels).any() else math.nan,
        "image_accuracy_best": best["accuracy"], "image_precision_best": best["precision"],
        "image_recall_best": best["recall"],
        "validation": thresholds.validation if thresholds is not None and threshold is None else {},
    }


def format_table(metrics: dict) -> str:
    """A plain-text table of the headline figures, overall and per defect type."""
    header = f"{'subset':<16}{'images':>8}{'pixel AUROC':>13}{'AU-PRO@0.3':>12}{'image AUROC':>13}"
    lines = [header, "-" * len(header)]

    def row(name, images, m):
        figures = _text(m["pixel_auroc"]), _text(m["au_pro"]), _text(m["image_auroc"])
        return f"{name:<16}{images:>8}{figures[0]:>13}{figures[1]:>12}{figures[2]:>13}"

    lines.append(row("all", metrics["images"], metrics))
    for defect, m in metrics["per_defect_type"].items():
        lines.append(row(defect, m["images"], m))
    if metrics.get("threshold") is not None:
        m = metrics
        lines.append(f"pixels at threshold {m['threshold']:.5g}: F1 {m['pixel_f1']:.4f} "
                     f"(F1-max {_text(m['pixel_f1_max'])}), "
                     f"precision {_text(m['pixel_precision'])}, recall {_text(m['pixel_recall'])}")
        margin = f", without the outer {m['image_score_margin']:.3g} of the map" if m.get("image_score_margin") else ""
        lines.append(f"images ({m['image_score']} score{margin}): accuracy {m['image_accuracy']:.4f} "
                     f"(best reachable {m['image_accuracy_best']:.4f}), precision {_text(m['image_precision'])}, "
                     f"recall {_text(m['image_recall'])}; good images flagged {_text(m['good_images_flagged'])}")
        validation = m.get("validation") or {}
        if validation:
            lines.append(f"on {validation['images']} validation images: pixel FPR {validation['pixel_fpr']:.4f}, "
                         f"images with a false region {validation['images_with_false_region']:.2f}, "
                         f"image false alarms {validation['image_fpr']:.2f}")
    return "\n".join(lines)


def _text(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def write_metrics(metrics: dict, output_dir: str | os.PathLike) -> Path:
    path = Path(output_dir) / "metrics.json"
    atomic_write_text(path, json.dumps(json_safe(metrics), indent=2) + "\n")
    return path


def evaluate(detector: Detector, dataset: str | os.PathLike, output_dir: str | os.PathLike,
             progress: Callable | None = None, save_maps: bool = False, threshold: float | None = None) -> dict:
    """Evaluate a detector on a dataset's test split; write metrics.json (and maps/ if asked).
    `threshold` replaces the detector's for the figures at the threshold."""
    check_test_masks(find_test_items(dataset), detector.config.max_image_pixels)  # a bad layout or ground truth fails before any work
    made = not Path(output_dir).exists()
    output_dir = output_folder(output_dir)
    try:
        maps_dir = output_dir / "maps" if save_maps else None
        test = compute_test_maps(detector, dataset, progress, maps_dir)
        metrics = metrics_of(test, detector, threshold=threshold)
        write_metrics(metrics, output_dir)
    except BaseException:
        if made and not any(output_dir.iterdir()):  # a failed run leaves no empty folder it made
            output_dir.rmdir()
        raise
    return metrics
