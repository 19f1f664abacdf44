"""Quality benchmark: train each method with one fixed step budget on real data sets, evaluate,
and write the results table (pixel ROC AUC, AU-PRO@0.3, image AUROC, training time, machine).

The budget is a number of optimiser steps, not minutes, so results do not depend on machine load;
the training time is reported beside it. A detector with no network at all is evaluated too, so a
reader can see how much the autoencoder adds on each data set:
  blur-diff: |x - GaussianBlur(x, sigma=8)| smoothed with sigma 2 (the blur method).

    python bench/quality.py                       # all data sets, ssim-ae and l2-ae
    python bench/quality.py --datasets PA_BDP01_TL --steps-piped 50 --update-readme
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ssimae.config import config_from_dict, preset_config
from ssimae.data import find_test_items, load_mask, read_image, to_color
from ssimae.evaluate import compute_test_maps, metrics_of
from ssimae.metrics import evaluate_maps
from ssimae.predict import load_detector
from ssimae.train import fit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PIPED_TYPES = ("PA_BDP01_TL", "PA_BRG03_TL", "PA_FVN02_RL")
README_START, README_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def dataset_paths(names: list[str], data_root: Path) -> dict[str, Path]:
    paths = {}
    for name in names:
        path = data_root / name if name == "magnetic_tile" else data_root / "piped" / name
        if not (path / "train" / "good").is_dir():
            sys.exit(f"quality.py: {path} is not an MVTec-layout data set; pass --data-root")
        paths[name] = path
    return paths


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def blur_diff_metrics(dataset: Path) -> dict:
    """The no-network baseline on the test split."""
    maps, masks = [], []
    for item in find_test_items(dataset):
        image = to_color(read_image(item.path), "gray")[:, :, 0]
        residual = np.abs(image - ndimage.gaussian_filter(image, 8, mode="reflect"))
        maps.append(ndimage.gaussian_filter(residual, 2, mode="reflect"))
        masks.append(load_mask(item.mask_path, image.shape) if item.mask_path else np.zeros(image.shape, bool))
    return evaluate_maps(maps, masks)


def smoothing_sweep(maps: list[np.ndarray], masks: list[np.ndarray], sigmas=(2, 4, 8)) -> dict:
    """Metrics of the same maps after Gaussian smoothing: how much is residual-map noise."""
    return {sigma: evaluate_maps([ndimage.gaussian_filter(m, sigma) for m in maps], masks) for sigma in sigmas}


def run_one(dataset: Path, method: str, preset: str, steps: int, overrides: dict, run_dir: Path,
            sweep: bool = False) -> dict:
    config = config_from_dict({"method": method, "max_steps": steps, **overrides}, preset_config(preset)).validate()
    started = time.monotonic()
    result = fit(config, dataset, run_dir, progress=False)
    train_seconds = time.monotonic() - started
    detector = load_detector(result.checkpoint)
    started = time.monotonic()
    test = compute_test_maps(detector, dataset)
    metrics = metrics_of(test, detector)
    eval_seconds = time.monotonic() - started
    last = result.history[-1]
    return {
        **{k: metrics[k] for k in ("pixel_auroc", "au_pro", "image_auroc", "pixel_f1_max")},
        "per_defect_type": metrics["per_defect_type"],
        "steps": result.steps,
        "patches": result.steps * config.batch_size,
        "train_minutes": train_seconds / 60,
        "eval_minutes": eval_seconds / 60,
        "fidelity_corr": last["fidelity_corr"],
        "detail_ratio": last["detail_ratio"],
        "val_loss": last["val_loss"],
        "settings": {**overrides, "preset": preset},
        "smoothing_sweep": smoothing_sweep(test.maps, test.masks) if sweep else None,
    }


def markdown_table(results: list[dict], machine_text: str) -> str:
    lines = [
        "| data set | method | steps x batch | train min | pixel ROC AUC | AU-PRO@0.3 | image AUROC | fidelity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["method"] == "blur-diff":
            budget, minutes, fidelity = "no training", "-", "-"
        else:
            budget = f"{r['steps']} x {r['patches'] // max(r['steps'], 1)}"
            minutes, fidelity = f"{r['train_minutes']:.1f}", f"{r['fidelity_corr']:.2f}"
        lines.append(f"| {r['dataset']} | {r['method']} | {budget} | {minutes} | {r['pixel_auroc']:.3f} | "
                     f"{r['au_pro']:.3f} | {r['image_auroc']:.3f} | {fidelity} |")
    lines.append("")
    lines.append(f"Machine: {machine_text}. fidelity = pixel correlation of input and reconstruction on "
                 "held-out good patches (near 0 means a collapsed model).")
    return "\n".join(lines)


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text:
        sys.exit(f"quality.py: README.md has no {README_START} marker")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{table}\n{README_END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=DATA)
    parser.add_argument("--datasets", default=",".join(("magnetic_tile",) + PIPED_TYPES))
    parser.add_argument("--methods", default="ssim-ae,l2-ae")
    parser.add_argument("--presets", default="paper", help="presets run on every data set")
    parser.add_argument("--tuned-on", default="magnetic_tile",
                        help="data sets that also get the 'tuned' preset (comma-separated, or empty)")
    parser.add_argument("--smoothing-sweep", action="store_true",
                        help="also report each run's metrics after smoothing its maps (sigma 2, 4, 8)")
    parser.add_argument("--steps-magnetic", type=int, default=400, help="optimiser steps on magnetic_tile")
    parser.add_argument("--steps-piped", type=int, default=150, help="optimiser steps on each PIPED type")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Config setting for every run (repeatable), e.g. --set rotate=none")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "quality")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()

    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key.replace("-", "_")] = value if not value.replace(".", "").isdigit() else (
            float(value) if "." in value else int(value))
    datasets = dataset_paths(args.datasets.split(","), args.data_root)
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    for name, path in datasets.items():
        results.append({"dataset": name, "method": "blur-diff", **blur_diff_metrics(path)})
        print(f"{name:14s} blur-diff  pixel {results[-1]['pixel_auroc']:.3f} pro {results[-1]['au_pro']:.3f}", flush=True)
        presets = args.presets.split(",") + (["tuned"] if name in args.tuned_on.split(",") else [])
        for preset, method in [(p, m) for p in dict.fromkeys(presets) for m in args.methods.split(",")]:
            steps = args.steps_magnetic if name == "magnetic_tile" else args.steps_piped
            label = method if preset == "paper" else f"{method} ({preset})"
            run_dir = args.output / "runs" / f"{name}-{method}-{preset}"
            if (run_dir / "checkpoint.pt").exists():
                (run_dir / "checkpoint.pt").unlink()
            record = {"dataset": name, "method": label,
                      **run_one(path, method, preset, steps, overrides, run_dir, args.smoothing_sweep)}
            results.append(record)
            if record["smoothing_sweep"]:
                for sigma, m in record["smoothing_sweep"].items():
                    print(f"    maps smoothed sigma {sigma}: pixel {m['pixel_auroc']:.3f} pro {m['au_pro']:.3f} "
                          f"image {m['image_auroc']:.3f}", flush=True)
            print(f"{name:14s} {label:18s} pixel {record['pixel_auroc']:.3f} pro {record['au_pro']:.3f} "
                  f"image {record['image_auroc']:.3f} train {record['train_minutes']:.1f} min "
                  f"fidelity {record['fidelity_corr']:.2f} detail {record['detail_ratio']:.2f}", flush=True)
            (args.output / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown_table(results, machine())
    (args.output / "results.md").write_text(table + "\n")
    print(table)
    if args.update_readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
