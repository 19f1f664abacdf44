"""Offline comparison of image scores and threshold rules on the maps bench/quality.py saved.

For every saved run (OUTPUT/maps/<data set>-<method>.npz: test maps, masks, validation maps) it
prints, without refitting anything:
  * image AUROC of each image-score candidate, beside the map maximum's;
  * pixel F1 at a threshold chosen on the validation maps by each pixel-FPR target, beside F1-max;
  * image accuracy and share of good images flagged at each image false-alarm target;
  * AU-PRO over all ground-truth regions and over those of at least MIN_AREA pixels (the masks ssimae
    writes drop smaller regions; on PIPED most regions are specks of a few pixels, and AU-PRO weighs
    every region alike).
The defaults of ssimae (threshold_fpr, image_score, image_fpr) are chosen from this table
(bench/README.md says which figures decided them).

    python bench/decisions.py [--maps bench/results/quality/maps] [--json decisions.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from ssimae.metrics import au_pro, best_accuracy, f1_max, image_auroc
from ssimae.scoring import image_score
from ssimae.config import METHOD_NAMES, Config
from ssimae.threshold import EIGHT_CONNECTED, drop_small_regions, fpr_threshold, min_area_threshold, rate_threshold

ROOT = Path(__file__).resolve().parents[1]
SCORES = {"max": ("max", 0.0, 0.0), "top-mean 0.1%": ("top-mean", 0.001, 0.0), "top-mean 0.5%": ("top-mean", 0.005, 0.0),
          "top-mean 1%": ("top-mean", 0.01, 0.0), "top-mean 2%": ("top-mean", 0.02, 0.0), "top-mean 5%": ("top-mean", 0.05, 0.0),
          "top-mean 1% m1/64": ("top-mean", 0.01, 1 / 64), "top-mean 1% m1/32": ("top-mean", 0.01, 1 / 32),
          "top-mean 1% m1/16": ("top-mean", 0.01, 1 / 16)}  # m: the margin left out at each side
PIXEL_FPRS = tuple(sorted({0.001, 0.003, 0.01, 0.03, Config().threshold_fpr}))  # always the default too
IMAGE_FPRS = (0.01, 0.05, 0.1)
MIN_AREA = 25


def load(path: Path) -> dict:
    with np.load(path) as data:
        count = sum(1 for k in data.files if k.startswith("test_"))
        val = sum(1 for k in data.files if k.startswith("val_"))
        return {"test": [data[f"test_{i}"].astype(np.float32) for i in range(count)],
                "masks": [data[f"mask_{i}"] for i in range(count)],
                "val": [data[f"val_{i}"].astype(np.float32) for i in range(val)],
                "kinds": data["kinds"].tolist()}


def pixel_f1(maps, masks, threshold: float) -> float:
    tp = fp = fn = 0
    for amap, truth in zip(maps, masks):
        predicted = drop_small_regions(amap > threshold, MIN_AREA)
        tp += int(np.count_nonzero(predicted & truth))
        fp += int(np.count_nonzero(predicted & ~truth))
        fn += int(np.count_nonzero(~predicted & truth))
    return 2 * tp / max(1, 2 * tp + fp + fn)


def region_sizes(mask: np.ndarray) -> np.ndarray:
    """Pixel counts of the connected regions of a mask (the connectivity drop_small_regions uses)."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return np.bincount(labels.ravel(), minlength=count + 1)[1:]


def analyse(run: dict) -> dict:
    labels = np.array([m.any() for m in run["masks"]])
    out = {"images": len(labels), "validation_images": len(run["val"]), "image_auroc": {}, "pixel": {}, "image": {}}
    for name, (kind, fraction, margin) in SCORES.items():
        scores = np.array([image_score(m, kind, fraction or 0.01, margin) for m in run["test"]])
        out["image_auroc"][name] = image_auroc(scores, labels)
        val_scores = np.array([image_score(m, kind, fraction or 0.01, margin) for m in run["val"]])
        for rate in IMAGE_FPRS:
            threshold = rate_threshold(val_scores, rate)
            verdicts = scores > threshold
            out["image"][f"{name} @ {rate}"] = {"accuracy": float(np.mean(verdicts == labels)),
                                                "good_flagged": float(verdicts[~labels].mean()),
                                                "best": best_accuracy(scores, labels)["accuracy"]}
    large = [drop_small_regions(mask, MIN_AREA) for mask in run["masks"]]
    regions = [region_sizes(mask) for mask in run["masks"]]
    sizes = np.concatenate(regions) if regions else np.zeros(0)
    out["regions"] = {"count": int(sizes.size), "small_share": float(np.mean(sizes < MIN_AREA)) if sizes.size else 0.0,
                      "au_pro": au_pro(run["test"], run["masks"]), "au_pro_large": au_pro(run["test"], large)}
    out["pixel"]["f1_max"] = f1_max(run["test"], run["masks"])[0]
    out["pixel"]["f1 @ min-area"] = pixel_f1(run["test"], run["masks"], min_area_threshold(run["val"], MIN_AREA))
    for fpr in PIXEL_FPRS:
        out["pixel"][f"f1 @ fpr {fpr}"] = pixel_f1(run["test"], run["masks"], fpr_threshold(run["val"], fpr))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=Path, default=ROOT / "bench" / "results" / "quality" / "maps")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the before/after table (paper rules against the defaults) to this file")
    args = parser.parse_args()
    files = sorted(args.maps.glob("*.npz"))
    if not files:
        sys.exit(f"decisions.py: no saved maps in {args.maps}; run bench/quality.py first")
    everything = {}
    for path in files:
        result = analyse(load(path))
        everything[path.stem] = result
        aurocs = " ".join(f"{k.replace('top-mean ', 't')}={v:.3f}" for k, v in result["image_auroc"].items())
        pixels = " ".join(f"{k.replace('f1 @ fpr ', 'fpr')}={v:.3f}" for k, v in result["pixel"].items())
        print(f"{path.stem:32s} image AUROC {aurocs}\n{'':32s} pixel F1 {pixels}", flush=True)
        regions = result["regions"]
        print(f"{'':32s} AU-PRO {regions['au_pro']:.3f}, over regions >= {MIN_AREA} px {regions['au_pro_large']:.3f} "
              f"({regions['small_share']:.0%} of {regions['count']} regions are smaller)")
        for name in ("max", "top-mean 1%", "top-mean 1% m1/32"):
            row = " ".join(f"@{rate}: acc {result['image'][f'{name} @ {rate}']['accuracy']:.3f} good "
                           f"{result['image'][f'{name} @ {rate}']['good_flagged']:.2f}" for rate in IMAGE_FPRS)
            print(f"{'':32s} {name:12s} {row} (best {result['image'][f'{name} @ 0.05']['best']:.3f}, "
                  f"{result['validation_images']} validation images)")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2))
    if args.markdown:
        args.markdown.write_text(before_after(everything) + "\n")
    return 0


def before_after(everything: dict) -> str:
    """The README's table: decision figures under the paper's rules (min-area threshold, map maximum)
    and under ssimae's defaults (pixel FPR target, the method's image score), at an image FPR of 0.05;
    "best" is the best accuracy any image threshold reaches with the method's own score."""
    defaults = Config()
    lines = ["| run | pixel F1: min-area / default / F1-max | image score | image accuracy: max / default / best "
             "| good flagged: max / default |", "|---|---|---|---|---|"]
    for stem, r in everything.items():
        rest = stem.split("-", 1)[1]  # data set names hold no "-"
        method = next((m for m in METHOD_NAMES if rest == m or rest.startswith(m + "-")), None)
        config = Config(method=method) if method else None
        kind, margin = (config.image_score_kind, config.image_margin) if config else ("max", 0.0)
        name = "max" if kind == "max" else f"top-mean {defaults.image_score_fraction:.0%}"
        if margin:
            name += f" m1/{round(1 / margin)}"
            kind += f", margin 1/{round(1 / margin)}"
        before, after = r["image"]["max @ 0.05"], r["image"][f"{name} @ 0.05"]
        pixel = r["pixel"]
        lines.append(f"| {stem} | {pixel['f1 @ min-area']:.3f} / {pixel[f'f1 @ fpr {defaults.threshold_fpr:g}']:.3f} / "
                     f"{pixel['f1_max']:.3f} | {kind} | {before['accuracy']:.3f} / {after['accuracy']:.3f} / "
                     f"{after['best']:.3f} | {before['good_flagged']:.2f} / {after['good_flagged']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
