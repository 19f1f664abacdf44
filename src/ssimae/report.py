"""Tables, figures and a self-contained HTML page from the saved results of `compare` (no model needed).

write_report(run_dir) reads metrics.json, curves.npz and examples/data/*.npz and writes
    metrics.md, metrics.csv   headline and per-defect-type metrics, training time
    roc.png                   pixel ROC curves of all methods, linear and log-FPR panels, AUC in the legend
    pro.png                   PRO curves up to FPR 0.3, AU-PRO in the legend
    examples/*.png            the paper's L2-vs-SSIM comparison rows, with SSIM's luminance/contrast/structure
    report.html               one page, images embedded as data URIs, inline CSS, no external resources
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .errors import SsimaeError
from .files import atomic_path, atomic_write_text

FORMAT = "ssimae-compare-1"  # the "format" of a compare metrics.json
COLORS = {"ssim-ae": "tab:blue", "l2-ae": "tab:orange", "vae": "tab:green", "fm-ae": "tab:red",
          "patchcore": "tab:purple", "blur": "tab:gray"}
LINESTYLES = {"blur": "--"}  # the no-network floor, dashed: the line every method should be above
LOW_FIDELITY = 0.3  # below this input/reconstruction correlation the report flags a likely collapsed model
HEADLINE = (  # metrics key, column title
    ("pixel_auroc", "pixel ROC AUC"),
    ("au_pro", "AU-PRO@0.3"),
    ("image_auroc", "image AUROC"),
    ("pixel_f1_max", "F1-max (pixel)"),
)
DECISIONS = (  # metrics key, column title: what the thresholds chosen on validation images achieve
    ("pixel_f1", "pixel F1 at threshold"),
    ("pixel_f1_max", "pixel F1-max"),
    ("image_accuracy", "image accuracy"),
    ("image_accuracy_best", "best reachable"),
    ("image_precision", "image precision"),
    ("image_recall", "image recall"),
    ("good_images_flagged", "good images flagged"),
)


# --------------------------------------------------------------------------- loading


def load_results(run_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(metrics.json content, curves.npz arrays) of a compare run folder."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    fix = f"run `ssimae compare DATASET --output {run_dir}` first"
    if not run_dir.is_dir():
        raise SsimaeError(f"{run_dir} does not exist or is not a folder; pass the --output folder of `ssimae compare`")
    if not path.is_file():
        raise SsimaeError(f"{run_dir} has no saved comparison results ({path.name} is missing); {fix}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = error if isinstance(error, json.JSONDecodeError) else "not UTF-8 text"
        raise SsimaeError(f"{path} is not valid JSON ({reason}); {fix}") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise SsimaeError(f"{path} is not the result of `ssimae compare` (format {FORMAT}); {fix}")
    curves_path = run_dir / "curves.npz"
    if not curves_path.is_file():
        raise SsimaeError(f"{run_dir} has no {curves_path.name} (the saved curves); {fix}")
    return results, read_npz(curves_path, fix)


def read_npz(path: Path, fix: str) -> dict[str, np.ndarray]:
    """The arrays of a saved .npz file; a damaged file is a SsimaeError naming it."""
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # numpy's advice to pass allow_pickle=True is wrong for a damaged or foreign file: keep the reason only
        reason = str(error).split(". ")[0] if "allow_pickle" in str(error) else str(error)
        raise SsimaeError(f"{path} is damaged ({error.__class__.__name__}: {reason}); {fix}") from None


def load_arrays(run_dir: Path, relative: str) -> dict[str, np.ndarray]:
    path = run_dir / relative
    if not path.is_file():
        raise SsimaeError(f"saved example {path} is missing; rerun `ssimae compare` into {run_dir}")
    return read_npz(path, f"rerun `ssimae compare` into {run_dir}")


# --------------------------------------------------------------------------- tables


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def metrics_markdown(results: dict) -> str:
    """Markdown tables: headline metrics per method, then per defect type."""
    titles = [title for _, title in HEADLINE]
    lines = [f"# Comparison on {results['dataset']}", "",
             "| method | " + " | ".join(titles) + " | training | steps |",
             "|---" * (len(titles) + 3) + "|"]
    for method in results["methods"]:
        entry = results["results"][method]
        values = [_number(entry["metrics"].get(key)) for key, _ in HEADLINE]
        lines.append(f"| {method} | " + " | ".join(values) +
                     f" | {_duration(entry['training']['seconds'])} | {entry['training']['steps']} |")
    if floor_sentence(results):
        lines += ["", floor_sentence(results)]
    lines += ["", "## Decisions at the thresholds chosen on defect-free validation images", "",
              "| method | " + " | ".join(title for _, title in DECISIONS) + " | validation pixel FPR |",
              "|---" * (len(DECISIONS) + 2) + "|"]
    for method in results["methods"]:
        metrics = results["results"][method]["metrics"]
        validation = metrics.get("validation") or {}
        lines.append(f"| {method} | " + " | ".join(_number(metrics.get(key)) for key, _ in DECISIONS) +
                     f" | {_number(validation.get('pixel_fpr'))} |")
    lines += ["", "## Per defect type (each with all good test images)", "",
              "| defect type | images | method | " + " | ".join(titles) + " |", "|---" * (len(titles) + 3) + "|"]
    for defect in _defect_types(results):
        for method in results["methods"]:
            metrics = results["results"][method]["metrics"]["per_defect_type"][defect]
            values = [_number(metrics.get(key)) for key, _ in HEADLINE]
            lines.append(f"| {defect} | {metrics['images']} | {method} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def metrics_csv(results: dict) -> str:
    """One row per method and subset ('all' or a defect type)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    decisions = [key for key, _ in DECISIONS if key != "pixel_f1_max"]
    writer.writerow(["method", "subset", "images", *(key for key, _ in HEADLINE), *decisions, "training_seconds",
                     "steps"])
    for method in results["methods"]:
        entry = results["results"][method]
        metrics = entry["metrics"]
        writer.writerow([method, "all", metrics["images"], *(_csv_value(metrics.get(k)) for k, _ in HEADLINE),
                         *(_csv_value(metrics.get(k)) for k in decisions), f"{entry['training']['seconds']:.1f}",
                         entry["training"]["steps"]])
        for defect, values in metrics["per_defect_type"].items():
            writer.writerow([method, defect, values["images"], *(_csv_value(values.get(k)) for k, _ in HEADLINE),
                             *([""] * len(decisions)), "", ""])
    return buffer.getvalue()


def _csv_value(value) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else f"{value:.6f}"


def _defect_types(results: dict) -> list[str]:
    return sorted({d for m in results["methods"] for d in results["results"][m]["metrics"]["per_defect_type"]})


# --------------------------------------------------------------------------- figures


def plot_roc(results: dict, curves: dict[str, np.ndarray]) -> Figure:
    """Pixel ROC curves of all methods: linear FPR (left) and log FPR (right)."""
    figure = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    linear, logarithmic = figure.subplots(1, 2)
    smallest = 1.0
    for method in results["methods"]:
        fpr, tpr = curves[f"{method}.roc_fpr"], curves[f"{method}.roc_tpr"]
        label = f"{method} (AUC {_number(results['results'][method]['metrics']['pixel_auroc'], 3)})"
        for axes in (linear, logarithmic):
            axes.plot(fpr, tpr, color=COLORS.get(method), label=label, linewidth=1.5,
                      linestyle=LINESTYLES.get(method, "-"))
        if (fpr > 0).any():
            smallest = min(smallest, float(fpr[fpr > 0].min()))
    linear.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
    linear.set(xlim=(0, 1), ylim=(0, 1.01), title="Pixel-level ROC", xlabel="false-positive rate", ylabel="true-positive rate")
    logarithmic.set_xscale("log")
    logarithmic.set(xlim=(max(smallest, 1e-7), 1), ylim=(0, 1.01), title="Pixel-level ROC, log FPR",
                    xlabel="false-positive rate (log)", ylabel="true-positive rate")
    for axes in (linear, logarithmic):
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right")
    return figure


def plot_pro(results: dict, curves: dict[str, np.ndarray]) -> Figure:
    """PRO curves up to the FPR limit of AU-PRO."""
    limit = results["fpr_limit"]
    figure = Figure(figsize=(6.5, 5), dpi=100, layout="constrained")
    axes = figure.subplots()
    for method in results["methods"]:
        label = f"{method} (AU-PRO {_number(results['results'][method]['metrics']['au_pro'], 3)})"
        axes.plot(curves[f"{method}.pro_fpr"], curves[f"{method}.pro_value"], color=COLORS.get(method),
                  label=label, linewidth=1.5, linestyle=LINESTYLES.get(method, "-"))
    axes.plot([0, limit], [0, limit], color="gray", linestyle=":", linewidth=1, label="random map")
    axes.set(xlim=(0, limit), ylim=(0, 1.01), title=f"Per-region overlap up to FPR {limit}",
             xlabel="false-positive rate", ylabel="per-region overlap (PRO)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return figure


def _show(axes, array: np.ndarray, title: str) -> None:
    axes.set_axis_off()
    axes.set_title(title, fontsize=9)
    if array.dtype == bool:
        axes.imshow(array, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    elif array.dtype == np.uint8:
        axes.imshow(array[:, :, 0] if array.shape[2] == 1 else array, cmap="gray", vmin=0, vmax=255)
    else:  # a float map
        values = array.astype(np.float32)
        axes.imshow(values, cmap="inferno", vmin=0, vmax=max(float(values.max()), 1e-12))


def plot_example(arrays: dict[str, np.ndarray], example: dict) -> Figure:
    """The paper's comparison row (input, per method reconstruction/residual/segmentation, ground truth),
    and under the SSIM columns its luminance, contrast and structure maps."""
    columns = [("input", "input")]
    for short, name in (("l2", "L2"), ("ssim", "SSIM")):
        if f"{short}_reconstruction" in arrays:
            columns += [(f"{short}_reconstruction", f"{name} reconstruction"), (f"{short}_residual", f"{name} residual"),
                        (f"{short}_segmentation", f"{name} segmentation")]
    columns.append(("ground_truth", "ground truth"))
    has_components = "ssim_structure" in arrays
    rows = 2 if has_components else 1
    aspect = arrays["input"].shape[0] / arrays["input"].shape[1]
    figure = Figure(figsize=(2.0 * len(columns), 2.0 * aspect * rows + 0.8), dpi=100, layout="constrained")
    grid = figure.subplots(rows, len(columns), squeeze=False)
    for axes, (key, title) in zip(grid[0], columns):
        if key.endswith("_residual"):
            title += f"\n0 to {float(arrays[key].max()):.3g}"
        _show(axes, arrays[key], title)
    if has_components:
        for axes in grid[1]:
            axes.set_axis_off()
        first = [key for key, _ in columns].index("ssim_reconstruction")
        ranges = {"luminance": (0, 1), "contrast": (0, 1), "structure": (-1, 1)}
        for offset, (name, (low, high)) in enumerate(ranges.items()):
            axes = grid[1][first + offset]
            axes.imshow(arrays[f"ssim_{name}"].astype(np.float32), cmap="gray", vmin=low, vmax=high)
            axes.set_title(f"SSIM {name}\n(dark = differs; {low} to {high})", fontsize=9)
    auroc = _number(example.get("pixel_auroc"), 3)
    figure.suptitle(f"{example['path']} ({example['defect_type']}): {example['rank']} defective image by "
                    f"{example['ranked_by']} per-image pixel AUROC ({auroc})", fontsize=10)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1240px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; text-align: center; } td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #eef6ee; }
td.warn { color: #b00; font-weight: bold; }
td.name { text-align: left; vertical-align: top; }
img.figure { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
.note { color: #555; font-size: 0.88em; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin-bottom: 0.8em; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 0.4em; font-size: 0.82em; }
.card img { width: 128px; height: auto; margin-right: 2px; image-rendering: pixelated; }
.card .labels { display: flex; justify-content: space-between; color: #666; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(array: np.ndarray) -> bytes:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _img(png: bytes, css_class: str, alt: str) -> str:
    return f'<img class="{css_class}" src="{_data_uri(png)}" alt="{html.escape(alt)}">'


FLOOR = "blur"


def floor_margins(results: dict) -> dict[str, float | None]:
    """Each method's AU-PRO minus the no-network floor's (None without the floor in the comparison)."""
    if FLOOR not in results["methods"]:
        return {}
    floor = results["results"][FLOOR]["metrics"].get("au_pro")
    return {m: None if floor is None or results["results"][m]["metrics"].get("au_pro") is None
            else results["results"][m]["metrics"]["au_pro"] - floor for m in results["methods"] if m != FLOOR}


def floor_sentence(results: dict) -> str:
    """Which methods stay below the no-network floor's AU-PRO, in words ('' without the floor)."""
    margins = floor_margins(results)
    if not margins:
        return ""
    below = [m for m, d in margins.items() if d is not None and d < 0]
    floor = results["results"][FLOOR]["metrics"]["au_pro"]
    if not below:
        known = [m for m, d in margins.items() if d is not None]
        if not known:  # no AU-PRO to compare (e.g. no defect pixels in the masks)
            return ""
        if len(known) < len(margins):
            return f"Above the no-network floor (blur, AU-PRO {_number(floor, 3)}): {', '.join(known)}."
        return f"Every method is above the no-network floor (blur, AU-PRO {_number(floor, 3)})."
    sentence = (f"Below the no-network floor (blur, AU-PRO {_number(floor, 3)}): {', '.join(below)}. Their maps find "
                "less than a filter residual does on these images.")
    explanation = ssim_ae_explanation(results, below)
    return sentence + (" " + explanation if explanation else "")


# Why an SSIM-AE can stay below the floor, measured on PIPED and magnetic_tile (bench/README.md, "SSIM-AE").
FLAT_SSIM_AE = (
    "The ssim-ae's output is near-flat (reconstruction fidelity below "
    f"{LOW_FIDELITY}), so its 1 - SSIM map is a local-contrast map of the input alone. On low-contrast "
    "texture SSIM's constants make a flat output the loss's optimum; with smaller constants the network "
    "reconstructs, but 1 - SSIM then saturates on the fine texture no 100-dimension code reproduces, and the "
    "map stops separating defects (bench/README.md, \"SSIM-AE\").")


# ... and with an output that reconstructs: measured on the bundled PIPED example (bench/README.md, "SSIM-AE").
RECONSTRUCTING_SSIM_AE = (
    "The ssim-ae reconstructs its input (fidelity at least "
    f"{LOW_FIDELITY}), and its 1 - SSIM map still separates defects less than the filter residual: where this "
    "was measured, more training reconstructed more and made the maps worse (on the bundled PIPED example "
    "AU-PRO 0.940 at 600 steps, 0.812 at 1,200, 0.700 at the paper's 2 million patches; bench/README.md, "
    "\"SSIM-AE\").")


def ssim_ae_explanation(results: dict, below: list[str]) -> str:
    """Why the ssim-ae is below the floor, from its fidelity: FLAT_SSIM_AE, RECONSTRUCTING_SSIM_AE, or ''
    (above the floor, or no fidelity recorded)."""
    if "ssim-ae" not in below:
        return ""
    fidelity = results["results"]["ssim-ae"].get("training", {}).get("fidelity_corr")
    if fidelity is None:
        return ""
    return FLAT_SSIM_AE if is_low_fidelity(fidelity) else RECONSTRUCTING_SSIM_AE


def is_low_fidelity(value: float | None) -> bool:
    """A reconstruction fidelity so low that the model likely outputs one image for every input."""
    return value is not None and value < LOW_FIDELITY


def _summary_table(results: dict) -> str:
    methods = results["methods"]
    margins = floor_margins(results)
    best = {}
    for key, _ in HEADLINE:
        values = [results["results"][m]["metrics"].get(key) for m in methods]
        known = [v for v in values if v is not None]
        best[key] = max(known) if len(known) > 1 else None
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in HEADLINE)
    rows = []
    for method in methods:
        entry = results["results"][method]
        cells = [_cell(entry["metrics"].get(key), best[key]) for key, _ in HEADLINE]
        training = entry["training"]
        origin = "reused" if training["reused"] else "trained"
        swatch = f'<span class="swatch" style="background:{_css_color(method)}"></span>'
        rows.append(f"<tr><td>{swatch}{html.escape(method)}</td>{''.join(cells)}"
                    f"<td>{_duration(training['seconds'])} ({origin})</td><td>{training['steps']}</td>"
                    f"<td{_fidelity_class(training.get('fidelity_corr'))}>{_number(training.get('fidelity_corr'), 3)}</td>"
                    f"<td>{_number(training.get('threshold'), 5)}</td>"
                    + (f"<td{_margin_class(margins.get(method))}>{_signed(margins.get(method))}</td>" if margins else "")
                    + "</tr>")
    floor_head = "<th>AU-PRO vs floor</th>" if margins else ""
    return (f"<table><tr><th>method</th>{head}<th>training</th><th>steps</th><th>recon. fidelity</th>"
            f"<th>threshold</th>{floor_head}</tr>{''.join(rows)}</table>")


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}"


def _margin_class(value: float | None) -> str:
    return ' class="warn"' if value is not None and value < 0 else ""


def _decision_table(results: dict) -> str:
    """What each method's thresholds, chosen on defect-free validation images, achieve on the test images."""
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in DECISIONS)
    rows = []
    for method in results["methods"]:
        metrics = results["results"][method]["metrics"]
        validation = metrics.get("validation") or {}
        cells = "".join(f"<td>{_number(metrics.get(key), 3)}</td>" for key, _ in DECISIONS)
        rows.append(f"<tr><td>{html.escape(method)}</td>{cells}<td>{_number(validation.get('pixel_fpr'))}</td>"
                    f"<td>{_number(validation.get('images_with_false_region'), 2)}</td>"
                    f"<td>{_number(validation.get('image_fpr'), 2)}</td></tr>")
    return (f"<table><tr><th>method</th>{head}<th>validation pixel FPR</th><th>validation images with a false "
            f"region</th><th>validation image false alarms</th></tr>{''.join(rows)}</table>")


def _fidelity_class(value: float | None) -> str:
    """Flag a reconstruction fidelity so low that the model likely outputs one image for every input."""
    return ' class="warn"' if is_low_fidelity(value) else ""


def _css_color(method: str) -> str:
    from matplotlib.colors import to_hex

    return to_hex(COLORS.get(method, "gray"))


def _defect_table(results: dict) -> str:
    """One row per defect type and method (narrow however many methods), best value per defect in bold."""
    methods = results["methods"]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in HEADLINE)
    rows = []
    for defect in _defect_types(results):
        per_method = [results["results"][m]["metrics"]["per_defect_type"].get(defect, {}) for m in methods]
        best = {key: max((p[key] for p in per_method if p.get(key) is not None), default=None) for key, _ in HEADLINE}
        images = next((p["images"] for p in per_method if p), 0)
        for number, (method, values) in enumerate(zip(methods, per_method)):
            cells = "".join(_cell(values.get(key), best[key] if len(methods) > 1 else None) for key, _ in HEADLINE)
            lead = (f'<td rowspan="{len(methods)}" class="name">{html.escape(defect)}</td><td rowspan="{len(methods)}">{images}</td>'
                    if number == 0 else "")
            rows.append(f'<tr>{lead}<td class="name">{html.escape(method)}</td>{cells}</tr>')
    return f"<table><tr><th>defect type</th><th>images</th><th>method</th>{head}</tr>{''.join(rows)}</table>"


def _cell(value: float | None, best: float | None) -> str:
    mark = ' class="best"' if value is not None and value == best else ""
    return f"<td{mark}>{_number(value)}</td>"


def _cards(run_dir: Path, picks: list[dict], kind: str) -> str:
    cards = []
    for pick in picks:
        arrays = load_arrays(run_dir, pick["file"])
        images = "".join(_img(_png(arrays[key]), "thumb", f"{key} of {pick['path']}")
                         for key in ("input", "overlay", "ground_truth"))
        caption = (f"{kind}: {html.escape(pick['path'])}<br>pixel AUROC {_number(pick['pixel_auroc'], 3)}, "
                   f"IoU {_number(pick.get('iou'), 3)}")
        cards.append(f'<div class="card">{images}<div class="labels"><span>input</span><span>overlay</span>'
                     f"<span>ground truth</span></div>{caption}</div>")
    return "".join(cards)


def html_page(results: dict, run_dir: Path, figures: dict[str, bytes]) -> str:
    """The whole report as one HTML string; `figures` maps saved figure paths to their PNG bytes."""
    settings = results["settings"]
    first = results["results"][results["methods"][0]]["metrics"]
    budget = ", ".join(f"{k.replace('_', '-')} {settings[k]}" for k in ("epochs", "max_steps", "max_minutes")
                       if settings.get(k) is not None)
    shown = ("patch_size", "stride", "latent_dim", "color", "image_size", "batch_size", "lr", "patches_per_epoch",
             "vae_beta", "fm_lambda", "feature_net", "seed")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ssimae comparison: {html.escape(Path(results['dataset']).name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Method comparison on {html.escape(results['dataset'])}</h1>",
        f"<p>{first['images']} test images ({first['good_images']} good). Methods: "
        f"{html.escape(', '.join(results['methods']))}. Each trained with the same budget ({html.escape(budget)}) "
        f"and settings: {html.escape(', '.join(f'{k}={settings.get(k)}' for k in shown))}. "
        f"ssimae {html.escape(str(results.get('version', '')))}.</p>",
        "<h2>Results</h2>", _summary_table(results),
        f"<p>{html.escape(floor_sentence(results))}</p>" if floor_sentence(results) else "",
        '<p class="note">Pixel ROC AUC, AU-PRO (area under the per-region-overlap curve up to FPR '
        f"{results['fpr_limit']}, divided by {results['fpr_limit']}) and F1-max pool all pixels of all test images; "
        "image AUROC ranks the images by each method's image score (MVTec's protocol, the map maximum, is in "
        "metrics.json as image_auroc_max). Recon. fidelity: pixel correlation of validation "
        "patches with their reconstructions at the end of training; near 0 means the model outputs the same image for "
        f"every input, and its scores then reflect intensity alone (shown in red below {LOW_FIDELITY}). "
        "Threshold: chosen on defect-free validation images (used for segmentations and IoU only).</p>",
        "<h2>Decisions</h2>", _decision_table(results),
        '<p class="note">Each method\'s pixel and image thresholds were chosen on its defect-free validation '
        "images only. Pixel F1 is that of the masks `ssimae predict` writes (regions smaller than the minimum "
        "defect area dropped), beside the best F1 any single threshold reaches on the test pixels; image accuracy, "
        "precision and recall are those of its verdicts, beside the best accuracy any image threshold reaches. "
        "The last columns: what the thresholds give on the validation images themselves.</p>",
        "<h2>Curves</h2>", _img(figures["roc.png"], "figure", "pixel ROC curves"),
        _img(figures["pro.png"], "figure", "PRO curves"),
        "<h2>Per defect type</h2>", '<p class="note">Each row uses the images of that defect type together with all '
        "good test images.</p>", _defect_table(results),
    ]
    if results["examples"]:
        parts.append("<h2>L2 versus SSIM on example test images</h2>")
        parts.append('<p class="note">Reconstructions are sliding-window averages of patch reconstructions; '
                     "segmentation = residual above the method's threshold. The second row shows SSIM's luminance, "
                     "contrast and structure maps between the input and the SSIM-AE reconstruction.</p>")
        for example in results["examples"]:
            parts.append(_img(figures[example["figure"]], "figure", f"comparison on {example['path']}"))
    parts.append("<h2>Best and worst segmented images per method</h2>")
    parts.append('<p class="note">Ranked by per-image pixel AUROC among defective test images. Overlay: heat map '
                 "scaled to twice the threshold, red contour = segmentation.</p>")
    for method in results["methods"]:
        picks = results["results"][method]["picks"]
        parts.append(f"<h3>{html.escape(method)}</h3>")
        if not picks["best"]:
            parts.append('<p class="note">No defective test image with a ground-truth mask.</p>')
            continue
        parts.append(f'<div class="cards">{_cards(run_dir, picks["best"], "best")}</div>')
        if picks["worst"]:
            parts.append(f'<div class="cards">{_cards(run_dir, picks["worst"], "worst")}</div>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | os.PathLike) -> Path:
    """(Re)write metrics.md, metrics.csv, roc.png, pro.png, examples/*.png and report.html; returns the HTML path.

    Everything is rendered before anything is written, so saved results that turn out incomplete
    leave the earlier report as it was."""
    run_dir = Path(run_dir)
    results, curves = load_results(run_dir)
    try:
        files = render_report(results, curves, run_dir)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        what = f"missing {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise SsimaeError(f"the saved results in {run_dir} (metrics.json, curves.npz) are incomplete or damaged "
                          f"({what}); rerun `ssimae compare DATASET --output {run_dir}`") from None
    for name, content in files.items():
        if isinstance(content, str):
            atomic_write_text(run_dir / name, content)
        else:
            with atomic_path(run_dir / name) as tmp:
                tmp.write_bytes(content)
    return run_dir / "report.html"


def render_report(results: dict, curves: dict[str, np.ndarray], run_dir: Path) -> dict[str, str | bytes]:
    """Every file of the report, by name relative to run_dir: text for tables and HTML, bytes for figures."""
    files: dict[str, str | bytes] = {"metrics.md": metrics_markdown(results), "metrics.csv": metrics_csv(results)}
    figures = {"roc.png": png_bytes(plot_roc(results, curves)), "pro.png": png_bytes(plot_pro(results, curves))}
    for example in results["examples"]:
        arrays = load_arrays(run_dir, example["file"])
        figures[example["figure"]] = png_bytes(plot_example(arrays, example))
    files.update(figures)
    files["report.html"] = html_page(results, run_dir, figures)
    return files
