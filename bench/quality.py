"""Quality benchmark: fit every method on real data sets with a fixed budget, evaluate, and write the
results table, with the figures a user acts on and what each fit cost.

Budgets: the reconstruction methods get a number of optimiser steps (400 on magnetic_tile, 150 on each
PIPED type, batch 128) and at most --max-fit-minutes of fit; PatchCore and the blur floor have no
training to budget. Every run's test and validation maps are saved (float16) under
OUTPUT/maps/<data set>-<method>.npz, so image scores and threshold rules can be compared offline
(bench/decisions.py) without refitting.

    python bench/quality.py                                         # everything: hours on 2 cores
    python bench/quality.py --datasets PA_BDP01_TL --methods blur,patchcore

Each run rewrites OUTPUT/results.md, the table of every run so far. The README's results tables are
curated from it (grouped per data set, with notes on what limits each figure), so the bench does not
write the README itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ssimae.checkpoint import Checkpoint
from ssimae.config import config_from_dict, preset_config
from ssimae.data import find_training_images, read_image
from ssimae.detector import load_detector
from ssimae.evaluate import compute_test_maps, metrics_of
from ssimae.files import json_safe
from ssimae.methods import COMPARED
from ssimae.train import TrainResult, fit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PIPED_TYPES = ("PA_BDP01_TL", "PA_BFT01_TL", "PA_BRG01_RL", "PA_BRG02_RL", "PA_BRG03_TL", "PA_BTN01_RL",
               "PA_FLR01_TL", "PA_FLR02_TL", "PA_FVN01_TL", "PA_FVN02_RL", "PA_GLA01_TL", "PA_ZPB01_RL")
KEYS = ("pixel_auroc", "au_pro", "image_auroc", "image_auroc_max", "pixel_f1", "pixel_f1_max", "image_accuracy",
        "image_accuracy_best", "image_precision", "image_recall", "good_images_flagged")


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
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def run_one(dataset: Path, method: str, preset: str | None, steps: int, minutes: float, overrides: dict,
            run_dir: Path, maps_file: Path, trained: Path | None = None) -> dict:
    values = {"method": method, **overrides}
    if method not in ("patchcore", "blur"):
        values.update(max_steps=steps, max_minutes=minutes)
    config = config_from_dict(values, preset_config(preset)).validate()
    if trained is not None:  # fitted elsewhere (e.g. on a GPU): evaluate its checkpoint here
        checkpoint = Checkpoint.load(trained)
        if checkpoint.thresholds is None:
            sys.exit(f"quality.py: {trained} has no thresholds (its fit did not finish); fit it again")
        result = TrainResult(trained, checkpoint.thresholds.pixel, checkpoint.training.step,
                             checkpoint.training.seconds, checkpoint.history)
        fit_seconds, config = checkpoint.training.seconds, checkpoint.config
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        started = time.monotonic()
        result = fit(config, dataset, run_dir, progress=False)
        fit_seconds = time.monotonic() - started
        if method not in ("patchcore", "blur") and result.steps < steps:
            print(f"quality.py: {dataset.name} {method} stopped at {result.steps} of {steps} steps "
                  f"(--max-fit-minutes {minutes:g}); its figures are not at the bench budget", file=sys.stderr)
    detector = load_detector(result.checkpoint)
    started = time.monotonic()
    test = compute_test_maps(detector, dataset)
    metrics = metrics_of(test, detector)
    eval_seconds = time.monotonic() - started
    validation = find_training_images(dataset, config.val_fraction, config.seed).validation
    validation_maps = [detector.anomaly_map(read_image(p)) for p in validation]
    maps_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(maps_file, **{f"test_{i}": m.astype(np.float16) for i, m in enumerate(test.maps)},
                        **{f"mask_{i}": m for i, m in enumerate(test.masks)},
                        **{f"val_{i}": m.astype(np.float16) for i, m in enumerate(validation_maps)},
                        kinds=np.array([item.defect_type for item in test.items]),
                        thresholds=np.array([detector.threshold, detector.image_threshold], dtype=np.float64))
    last = result.history[-1] if result.history else {}
    return {
        **{key: metrics.get(key) for key in KEYS},
        "validation": metrics.get("validation"),
        "per_defect_type": metrics["per_defect_type"],
        "steps": result.steps,
        "fit_minutes": fit_seconds / 60,
        "eval_minutes": eval_seconds / 60,
        "eval_seconds_per_image": eval_seconds / len(test.items),
        "fidelity_corr": last.get("fidelity_corr"),
        "detail_ratio": last.get("detail_ratio"),
        "settings": {**overrides, "preset": preset},
        "image_score": config.image_score_kind,
        "fitted_on": "elsewhere" if trained is not None else "GPU" if torch.cuda.is_available() else "CPU",
    }


def gpu(record: dict) -> str:
    return {"GPU": " (GPU)", "elsewhere": " (elsewhere)"}.get(record.get("fitted_on"), "")


def _n(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: list[dict], machine_text: str) -> str:
    lines = [
        "| data set | method | budget | fit min | pixel ROC AUC | AU-PRO@0.3 | image AUROC (max) | pixel F1 / F1-max "
        "| image accuracy / best | good flagged | fidelity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        budget = f"{r['steps']} steps" if r["steps"] else "no training"
        lines.append(
            f"| {r['dataset']} | {r['method']} | {budget} | {r['fit_minutes']:.1f}{gpu(r)} | {_n(r['pixel_auroc'])} | "
            f"{_n(r['au_pro'])} | {_n(r['image_auroc'])} ({_n(r['image_auroc_max'])}) | "
            f"{_n(r['pixel_f1'])} / {_n(r['pixel_f1_max'])} | {_n(r['image_accuracy'])} / "
            f"{_n(r['image_accuracy_best'])} | {_n(r['good_images_flagged'], 2)} | {_n(r['fidelity_corr'], 2)} |")
    lines += ["", f"Machine: {machine_text}."]
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        overrides[key.replace("-", "_")] = value
    return overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=DATA)
    parser.add_argument("--datasets", default=",".join(("magnetic_tile",) + PIPED_TYPES))
    parser.add_argument("--methods", default=",".join(COMPARED))
    parser.add_argument("--preset", default=None, help="a preset for every run (e.g. paper); default: the defaults")
    parser.add_argument("--steps-magnetic", type=int, default=400, help="optimiser steps on magnetic_tile")
    parser.add_argument("--steps-piped", type=int, default=150, help="optimiser steps on each PIPED type")
    parser.add_argument("--max-fit-minutes", type=float, default=60.0, help="time cap of each fit")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Config setting for every run (repeatable), e.g. --set rotate=none")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "quality")
    parser.add_argument("--tag", default="", help="suffix of the run and map names (several configurations side by side)")
    parser.add_argument("--trained", type=Path, default=None,
                        help="evaluate TRAINED/<data set>-<method>[-<preset>][-<tag>]/checkpoint.pt where it exists "
                             "instead of fitting (checkpoints fitted on another machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = parse_overrides(args.set)
    datasets = dataset_paths(args.datasets.split(","), args.data_root)
    args.output.mkdir(parents=True, exist_ok=True)
    results_path = args.output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    label = lambda method: method + (f" ({args.preset})" if args.preset else "") + (f" [{args.tag}]" if args.tag else "")
    for name, path in datasets.items():
        for method in args.methods.split(","):
            steps = args.steps_magnetic if name == "magnetic_tile" else args.steps_piped
            key = f"{name}-{method}{'-' + args.preset if args.preset else ''}{'-' + args.tag if args.tag else ''}"
            trained = args.trained / key / "checkpoint.pt" if args.trained else None
            record = {"dataset": name, "method": label(method),
                      **run_one(path, method, args.preset, steps, args.max_fit_minutes, overrides,
                                args.output / "runs" / key, args.output / "maps" / f"{key}.npz",
                                trained if trained is not None and trained.exists() else None)}
            results = [r for r in results if (r["dataset"], r["method"]) != (name, record["method"])] + [record]
            results_path.write_text(json.dumps(json_safe(results), indent=2))
            print(f"{name:14s} {record['method']:22s} pixel {_n(record['pixel_auroc'])} pro {_n(record['au_pro'])} "
                  f"image {_n(record['image_auroc'])} (max {_n(record['image_auroc_max'])}) F1 {_n(record['pixel_f1'])}/"
                  f"{_n(record['pixel_f1_max'])} acc {_n(record['image_accuracy'])}/{_n(record['image_accuracy_best'])} "
                  f"fit {record['fit_minutes']:.1f} min eval {record['eval_minutes']:.1f} min "
                  f"fidelity {_n(record['fidelity_corr'], 2)}", flush=True)
    order = {name: i for i, name in enumerate(("magnetic_tile",) + PIPED_TYPES)}
    results.sort(key=lambda r: (order.get(r["dataset"], 99), r["method"]))
    table = markdown_table(results, machine())
    (args.output / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
