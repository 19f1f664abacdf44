"""Compare methods on one dataset: train (or reuse) each, evaluate it, save what the report is drawn from.

Output folder (report.write_report draws the rest from these files, without any model):
    runs/<method>/         training runs (checkpoint.pt, config.yaml, logs) of the methods trained here
    metrics.json           per method: metrics overall and per defect type, training and evaluation time,
                           per-image scores and picks; the chosen example images
    curves.npz             per method: thinned pixel ROC curve and PRO curve up to FPR 0.3
    examples/data/*.npz    arrays behind the example figures and the HTML thumbnails
    metrics.md, metrics.csv, roc.png, pro.png, examples/*.png, report.html   (report.write_report)
Every method gets the same settings and the same training budget (epochs, max_steps, max_minutes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import __version__
from .checkpoint import Checkpoint
from .config import METHOD_NAMES, Config
from .data import (check_test_masks, find_test_items, load_mask, normalize_brightness, read_image, resize_array,
                   resize_map, to_color)
from .detector import load_detector
from .errors import SsimaeError
from .evaluate import TestMaps, compute_test_maps, metrics_of
from .files import atomic_path, atomic_write_text, json_safe
from .methods import COMPARED
from .metrics import pixel_auroc, pixel_roc_curve, pro_curve
from .overlay import blend_overlay
from .report import FORMAT, write_report
from .ssim import ssim_components
from .train import fit

log = logging.getLogger(__name__)

FPR_LIMIT = 0.3  # AU-PRO integration limit and the x range of the PRO figure
CURVE_POINTS = 2000  # grid size for thinning curves (the saved curves have a few thousand points)
EXAMPLE_SIDE = 512  # longest side of the saved comparison-example arrays
THUMB_SIDE = 200  # longest side of the per-method HTML thumbnails
PICKS = 2  # best and worst segmented images per method in the HTML
EXAMPLE_METHODS = ("l2-ae", "ssim-ae")  # the columns of the paper's comparison figure, in its order


# --------------------------------------------------------------------------- user input


def parse_methods(text: str) -> list[str]:
    """'ssim-ae,l2-ae' -> ['ssim-ae', 'l2-ae']; unknown or repeated names are an error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise SsimaeError(f"--methods {text!r} names no method; use a comma-separated list of {','.join(METHOD_NAMES)}")
    for name in names:
        if name not in METHOD_NAMES:
            raise SsimaeError(f"unknown method {name!r} in --methods; use a comma-separated list of {','.join(METHOD_NAMES)}")
    if len(set(names)) != len(names):
        raise SsimaeError(f"--methods {text!r} names a method twice; list each method once")
    return names


def parse_checkpoints(text: str | None, methods: list[str]) -> dict[str, Path]:
    """'ssim-ae=a.pt,l2-ae=b.pt' -> {method: path}, each file checked to exist and hold that method."""
    result: dict[str, Path] = {}
    for entry in (e.strip() for e in (text or "").split(",") if e.strip()):
        method, sep, path_text = (part.strip() for part in entry.partition("="))
        if not sep or not method or not path_text:
            raise SsimaeError(f"--checkpoints entry {entry!r} is not method=path (e.g. ssim-ae=runs/ssim/checkpoint.pt)")
        if method in result:
            raise SsimaeError(f"--checkpoints names {method} twice; give one checkpoint per method")
        result[method] = Path(path_text)
    check_checkpoints(result, methods)
    return result


def check_checkpoints(checkpoints: dict[str, Path], methods: list[str]) -> None:
    """Every reused checkpoint must be a listed method's, exist, and have been trained with that method."""
    for method, path in checkpoints.items():
        entry = f"{method}={path}"
        if method not in methods:
            raise SsimaeError(f"--checkpoints entry {entry!r}: {method!r} is not in --methods {','.join(methods)}; "
                              "add it to --methods or drop the entry")
        if not Path(path).is_file():
            raise SsimaeError(f"--checkpoints entry {entry!r}: checkpoint {path} does not exist; fix the path or drop the entry")
        trained = Checkpoint.load(path).method
        if trained != method:
            raise SsimaeError(f"--checkpoints entry {entry!r}: {path} was trained with {trained}, not {method}; "
                              f"pass it as {trained}={path}")


# --------------------------------------------------------------------------- curves and per-image scores


def thin_curve(fpr: np.ndarray, value: np.ndarray, points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """A subset of the points of a monotone curve that keeps its shape on linear and log-FPR axes.

    Keeps the points around evenly spaced FPR values, log-spaced FPR values (down to 1e-7) and
    evenly spaced values of the y axis, plus the ends: at most about 2 * points points.
    """
    n = fpr.size
    if n <= points:
        return fpr, value
    targets_x = np.concatenate([np.linspace(0, 1, points // 2), np.logspace(-7, 0, points // 4)])
    targets_y = np.linspace(value[0], value[-1], points // 4)
    idx = np.concatenate([np.searchsorted(fpr, targets_x), np.searchsorted(value, targets_y), [0, n - 1]])
    idx = np.unique(np.clip(np.concatenate([idx, idx - 1]), 0, n - 1))
    return fpr[idx], value[idx]


def pro_up_to(fpr: np.ndarray, pro: np.ndarray, limit: float = FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve for FPR <= limit, ending with a point interpolated at exactly `limit`."""
    keep = fpr <= limit
    if keep.all() or not keep.any():
        return fpr[keep], pro[keep]
    end = int(np.argmax(~keep))  # the first point beyond the limit
    at_limit = np.interp(limit, fpr[end - 1 : end + 1], pro[end - 1 : end + 1])
    return np.append(fpr[keep], limit), np.append(pro[keep], at_limit)


def method_curves(test: TestMaps, method: str) -> dict[str, np.ndarray]:
    """Thinned ROC and PRO arrays of one method, keyed '<method>.roc_fpr' etc. for curves.npz."""
    fpr, tpr, _ = pixel_roc_curve(test.maps, test.masks)
    roc_fpr, roc_tpr = thin_curve(fpr, tpr)
    del fpr, tpr
    pro = pro_curve(test.maps, test.masks)
    pro_fpr, pro_value = thin_curve(*pro_up_to(pro.fpr, pro.value))
    return {f"{method}.roc_fpr": roc_fpr, f"{method}.roc_tpr": roc_tpr,
            f"{method}.pro_fpr": pro_fpr, f"{method}.pro_value": pro_value}


def per_image_scores(test: TestMaps, threshold: float | None, test_root: Path,
                     score: Callable[[np.ndarray], float] = lambda amap: float(amap.max())) -> list[dict]:
    """Per test image: path, defect type, image score (the detector's own, which its image AUROC and verdicts
    use), and for defective images pixel AUROC and IoU."""
    rows = []
    for item, amap, mask in zip(test.items, test.maps, test.masks):
        row = {"path": item.path.relative_to(test_root).as_posix(), "defect_type": item.defect_type,
               "score": float(score(amap)), "pixel_auroc": None, "iou": None}
        if mask.any():
            auroc = pixel_auroc([amap], [mask])
            row["pixel_auroc"] = None if math.isnan(auroc) else auroc
            if threshold is not None:
                predicted = amap > threshold
                row["iou"] = float(np.count_nonzero(predicted & mask) / np.count_nonzero(predicted | mask))
        rows.append(row)
    return rows


def ranked_defective(rows: list[dict]) -> list[int]:
    """Indices of defective images by per-image pixel AUROC, best first (ties by path): deterministic."""
    scored = [i for i, r in enumerate(rows) if r["pixel_auroc"] is not None]
    return sorted(scored, key=lambda i: (-rows[i]["pixel_auroc"], rows[i]["path"]))


# --------------------------------------------------------------------------- arrays for figures


def shrink(array: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (H, W) or (H, W, C) so the longest side is at most max_side; bool stays bool (any overlap)."""
    height, width = array.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return array
    small = resize_array(array, max(1, round(height * scale)), max(1, round(width * scale)))
    if array.dtype == bool:
        return small > 0  # a small defect stays visible when shrunk
    return small.astype(array.dtype)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def method_picks(test: TestMaps, rows: list[dict], threshold: float | None, method: str, data_dir: Path,
                 max_pixels: int) -> dict:
    """Save input/overlay/ground-truth thumbnails of the best and worst segmented defective images."""
    order = ranked_defective(rows)
    chosen = {"best": order[:PICKS], "worst": [i for i in order[::-1][:PICKS] if i not in order[:PICKS]]}
    picks: dict[str, list[dict]] = {"best": [], "worst": []}
    for kind, indices in chosen.items():
        for rank, i in enumerate(indices, 1):
            image, amap, mask = read_image(test.items[i].path, max_pixels), test.maps[i], test.masks[i]
            top = threshold if threshold is not None else float(np.quantile(amap, 0.99))
            small = shrink(to_color(image, "rgb"), THUMB_SIDE)
            overlay = blend_overlay(small, shrink(amap, THUMB_SIDE), shrink(amap > top, THUMB_SIDE), 2 * top)
            name = f"{method}_{kind}_{rank}.npz"
            save_npz(data_dir / name, input=to_uint8(small), overlay=overlay, ground_truth=shrink(mask, THUMB_SIDE))
            picks[kind].append({**rows[i], "file": f"examples/data/{name}"})
    return picks


def example_arrays(image: np.ndarray, mask: np.ndarray, checkpoints: dict[str, Path], config: Config) \
        -> dict[str, np.ndarray]:
    """The arrays of one comparison row: input, and per paper method its reconstruction, residual and
    segmentation; for ssim-ae also the luminance, contrast and structure maps of input vs reconstruction."""
    height, width = image.shape[:2]
    arrays = {"input": to_uint8(shrink(to_color(image, "rgb"), EXAMPLE_SIDE)), "ground_truth": shrink(mask, EXAMPLE_SIDE)}
    for method in EXAMPLE_METHODS:
        if method not in checkpoints:
            continue
        detector = load_detector(checkpoints[method], overrides=_inference_overrides(config))
        cfg = detector.config
        residual = detector.anomaly_map(image)  # (H, W): the map the metrics were computed on
        recon = detector.reconstruct(detector.preprocess(image))  # (C, H', W'): averaged patch reconstructions
        recon = np.stack([resize_map(channel, height, width) for channel in recon], axis=-1)  # (H, W, C)
        short = "ssim" if method == "ssim-ae" else "l2"
        arrays[f"{short}_reconstruction"] = to_uint8(shrink(recon, EXAMPLE_SIDE))
        arrays[f"{short}_residual"] = shrink(residual, EXAMPLE_SIDE).astype(np.float16)
        threshold = detector.threshold if detector.threshold is not None else float(np.quantile(residual, 0.99))
        arrays[f"{short}_segmentation"] = shrink(residual > threshold, EXAMPLE_SIDE)
        if method == "ssim-ae":
            seen = normalize_brightness(to_color(image, cfg.color), cfg.input_normalization, cfg.input_mean, cfg.input_sd)
            x = torch.from_numpy(np.ascontiguousarray(seen)).permute(2, 0, 1)[None]  # (1, C, H, W): what the model saw
            y = torch.from_numpy(np.ascontiguousarray(recon)).permute(2, 0, 1)[None]  # (1, C, H, W)
            components = ssim_components(x, y, cfg.ssim_window, cfg.ssim_sigma, cfg.ssim_data_range)  # the model's SSIM
            for name, values in components._asdict().items():
                arrays[f"ssim_{name}"] = shrink(values.mean(dim=1)[0].numpy(), EXAMPLE_SIDE).astype(np.float16)
    return arrays


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


# --------------------------------------------------------------------------- the comparison


def _inference_overrides(config: Config) -> dict:
    """The compare settings that apply to every method's detector, trained here or reused."""
    return {"device": config.device, "infer_batch_size": config.infer_batch_size}


def compare(
    config: Config,
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    methods: Sequence[str] = COMPARED,
    checkpoints: dict[str, Path] | None = None,
    progress: bool = False,
    image_progress: Callable[[str], Callable | None] | None = None,
) -> dict:
    """Train (or reuse) and evaluate every method with the same settings; save results; write the report.

    Returns the saved metrics.json content. `progress` shows training bars; `image_progress(desc)`
    may return a wrapper for the evaluation loop over test images.
    """
    dataset, output = Path(dataset), Path(output_dir)
    config = config.validate()
    methods = parse_methods(",".join(methods))
    checkpoints = {method: Path(path) for method, path in (checkpoints or {}).items()}
    check_checkpoints(checkpoints, methods)
    test_root = dataset / "test"
    check_test_masks(find_test_items(dataset), config.max_image_pixels)  # a bad layout or ground truth fails first
    if output.exists() and not output.is_dir():
        raise SsimaeError(f"output {output} is a file, not a folder; choose another --output")
    for method in methods:
        existing = output / "runs" / method / "checkpoint.pt"
        if method not in checkpoints and existing.exists():
            raise SsimaeError(f"{existing} exists from an earlier run; reuse it with --checkpoints {method}={existing} "
                              "or choose another --output")
    if "fm-ae" in methods and "fm-ae" not in checkpoints:  # a bad --feature-net fails now, not after the others train
        from .features import extractor_for

        extractor_for(config)
    data_dir = output / "examples" / "data"

    results, curves = {}, {}
    for method in methods:
        training = train_or_reuse(config, method, dataset, output, checkpoints, progress)
        detector = load_detector(checkpoints[method], overrides=_inference_overrides(config))
        log.info("evaluating %s on %s", method, test_root)
        started = time.monotonic()
        test = compute_test_maps(detector, dataset, image_progress(method) if image_progress else None)
        metrics = metrics_of(test, detector, FPR_LIMIT)
        curves.update(method_curves(test, method))
        rows = per_image_scores(test, detector.threshold, test_root, detector.image_score)
        picks = method_picks(test, rows, detector.threshold, method, data_dir, config.max_image_pixels)
        results[method] = {"metrics": metrics, "training": training,
                           "evaluation_seconds": time.monotonic() - started, "per_image": rows, "picks": picks}
        del test

    examples = choose_examples(results, methods)
    items = {item.path.relative_to(test_root).as_posix(): item for item in find_test_items(dataset)}
    for number, example in enumerate(examples, 1):
        item = items[example["path"]]
        image = read_image(item.path, config.max_image_pixels)
        mask = load_mask(item.mask_path, image.shape[:2]) if item.mask_path else np.zeros(image.shape[:2], dtype=bool)
        example["file"] = f"examples/data/example_{number}_{example['rank']}.npz"
        example["figure"] = f"examples/{number}_{example['rank']}_{item.path.stem}.png"
        save_npz(output / example["file"], **example_arrays(image, mask, checkpoints, config))

    settings = {k: v for k, v in config.to_dict().items() if k != "method"}
    saved = {"format": FORMAT, "version": __version__, "dataset": str(dataset), "methods": methods,
             "fpr_limit": FPR_LIMIT, "settings": settings, "results": results, "examples": examples}
    atomic_write_text(output / "metrics.json", json.dumps(json_safe(saved), indent=2) + "\n")
    save_npz(output / "curves.npz", **curves)
    write_report(output)
    return json_safe(saved)


def train_or_reuse(config: Config, method: str, dataset: Path, output: Path, checkpoints: dict[str, Path],
                   progress: bool) -> dict:
    """Train `method` into output/runs/<method> unless a checkpoint is given; record it in `checkpoints`."""
    reused = method in checkpoints
    if reused:
        log.info("reusing %s checkpoint %s", method, checkpoints[method])
    else:
        run_dir = output / "runs" / method
        log.info("training %s into %s", method, run_dir)
        checkpoints[method] = fit(dataclasses.replace(config, method=method), dataset, run_dir,
                                  progress=progress).checkpoint
    checkpoint = Checkpoint.load(checkpoints[method])
    training = checkpoint.training
    last = checkpoint.history[-1] if checkpoint.history else {}
    return {"seconds": training.seconds, "steps": training.step, "epochs": training.epoch,
            "checkpoint": str(checkpoints[method]), "reused": reused,
            "threshold": checkpoint.thresholds.pixel if checkpoint.thresholds else None,
            "fidelity_corr": last.get("fidelity_corr"), "detail_ratio": last.get("detail_ratio")}


def choose_examples(results: dict, methods: list[str]) -> list[dict]:
    """Best, median and worst defective test image by the per-image pixel AUROC of ssim-ae (or l2-ae)."""
    ranker = next((m for m in ("ssim-ae", "l2-ae") if m in methods), None)
    if ranker is None:
        return []
    rows = results[ranker]["per_image"]
    order = ranked_defective(rows)
    if not order:
        return []
    chosen: list[tuple[str, int]] = []
    for rank, position in (("best", 0), ("median", len(order) // 2), ("worst", len(order) - 1)):
        if all(order[position] != i for _, i in chosen):
            chosen.append((rank, order[position]))
    return [{"rank": rank, "ranked_by": ranker, "path": rows[i]["path"], "defect_type": rows[i]["defect_type"],
             "pixel_auroc": rows[i]["pixel_auroc"]} for rank, i in chosen]
