"""`ssimae compare` and `ssimae report` on a tiny MVTec-layout fixture: files, metrics, figures, HTML, errors."""

import csv
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ssimae.train
from conftest import build_mvtec
from ssimae.cli import main
from ssimae.compare import pro_up_to, thin_curve
from ssimae.methods import COMPARED
from ssimae.metrics import image_auroc

METHOD_NAMES = COMPARED  # what `compare` runs by default

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
TINY = ["--max-steps", "2", "--batch-size", "2", "--patches-per-epoch", "2", "--latent-dim", "8", "--stride", "64",
        "--infer-batch-size", "8", "--device", "cpu", "--quiet"]

pytestmark = pytest.mark.slow  # trains every method through the CLI


def make_dataset(root: Path) -> Path:
    """MVTec layout: train/good (4), test/good (2), test/scratch (3), all 136x150, with masks."""
    return build_mvtec(root, train_sizes=[(136, 150)] * 4, good_sizes=[(136, 150)] * 2,
                       defect_sizes=[(136, 150)] * 3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("compare") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ssimae.train, "VALIDATION_PATCHES", 4)  # keep the per-epoch validation tiny
        assert main(["compare", str(dataset), "--output", str(output), *TINY]) == 0
    return output


def read_results(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_compare_writes_every_output(run):
    for name in ("metrics.md", "metrics.csv", "metrics.json", "curves.npz", "roc.png", "pro.png", "report.html"):
        assert (run / name).is_file(), name
    for method in METHOD_NAMES:
        assert (run / "runs" / method / "checkpoint.pt").is_file()
    results = read_results(run)
    figures = sorted(run.glob("examples/*.png"))
    assert 1 <= len(figures) <= 3
    assert sorted(run / e["figure"] for e in results["examples"]) == figures
    with Image.open(run / "roc.png") as roc:
        assert roc.width > 2 * roc.height  # the linear and log-FPR panels side by side


def test_metrics_json_has_every_method_and_defect_type(run):
    results = read_results(run)
    assert results["methods"] == list(METHOD_NAMES)
    for method in METHOD_NAMES:
        entry = results["results"][method]
        for key in ("pixel_auroc", "au_pro", "image_auroc", "pixel_f1_max"):
            assert 0 <= entry["metrics"][key] <= 1, (method, key)
            assert 0 <= entry["metrics"]["per_defect_type"]["scratch"][key] <= 1
        for key in ("pixel_f1", "image_accuracy", "image_accuracy_best", "image_recall"):
            assert 0 <= entry["metrics"][key] <= 1, (method, key)
        precision = entry["metrics"]["image_precision"]  # undefined (null) when no image was called defective
        assert (precision is None and entry["metrics"]["image_recall"] == 0) or 0 <= precision <= 1
        assert entry["metrics"]["image_accuracy"] <= entry["metrics"]["image_accuracy_best"]
        assert entry["metrics"]["image_score_margin"] == (1 / 32 if method == "patchcore" else 0.0)
        assert 0 <= entry["metrics"]["validation"]["pixel_fpr"] <= 0.01  # the default rule's target
        assert entry["training"]["steps"] == (2 if method not in ("patchcore", "blur") else 0)
        assert entry["training"]["seconds"] > 0
        assert entry["training"]["reused"] is False
        assert len(entry["per_image"]) == 5
        labels = [row["defect_type"] != "good" for row in entry["per_image"]]  # the method's own image score
        assert image_auroc([row["score"] for row in entry["per_image"]], labels) == \
            pytest.approx(entry["metrics"]["image_auroc"])
        assert entry["picks"]["best"] and entry["picks"]["worst"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [(r["method"], r["subset"]) for r in rows] == [(m, s) for m in METHOD_NAMES for s in ("all", "scratch")]
    markdown = (run / "metrics.md").read_text()
    assert all(f"| {m} |" in markdown for m in METHOD_NAMES) and "AU-PRO@0.3" in markdown


def test_saved_curves_are_monotone_and_pro_stops_at_the_limit(run):
    with np.load(run / "curves.npz") as curves:
        for method in METHOD_NAMES:
            fpr, tpr = curves[f"{method}.roc_fpr"], curves[f"{method}.roc_tpr"]
            assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
            assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
            pro_fpr = curves[f"{method}.pro_fpr"]
            assert pro_fpr[-1] == pytest.approx(0.3) and (np.diff(pro_fpr) >= 0).all()


def test_examples_hold_the_l2_and_ssim_columns_and_ssim_components(run):
    results = read_results(run)
    example = results["examples"][0]
    assert example["ranked_by"] == "ssim-ae" and example["rank"] == "best"
    with np.load(run / example["file"]) as arrays:
        for key in ("input", "ground_truth", "l2_reconstruction", "l2_residual", "l2_segmentation",
                    "ssim_reconstruction", "ssim_residual", "ssim_segmentation",
                    "ssim_luminance", "ssim_contrast", "ssim_structure"):
            assert key in arrays.files, key
        assert arrays["ssim_residual"].shape == arrays["ground_truth"].shape == (136, 150)


def test_html_is_self_contained(run):
    page = (run / "report.html").read_text()
    sources = re.findall(r'\ssrc="([^"]*)"', page)
    assert len(sources) >= 2 + len(read_results(run)["examples"])
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page and "url(" not in page
    for method in METHOD_NAMES:
        assert method in page
    assert "<h2>Decisions</h2>" in page and "validation pixel FPR" in page


def test_report_regenerates_from_saved_results(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("runs"))  # no checkpoints: saved results only
    original = (copy / "report.html").read_text()
    for name in ("report.html", "roc.png", "pro.png", "metrics.md", "metrics.csv"):
        (copy / name).unlink()
    for figure in copy.glob("examples/*.png"):
        figure.unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").read_text() == original
    assert (copy / "roc.png").is_file() and len(list(copy.glob("examples/*.png"))) == len(read_results(copy)["examples"])


def test_compare_reuses_a_checkpoint_and_draws_what_exists(run, dataset, tmp_path):
    output = tmp_path / "reuse"
    checkpoint = run / "runs" / "ssim-ae" / "checkpoint.pt"
    assert main(["compare", str(dataset), "--methods", "ssim-ae", "--checkpoints", f"ssim-ae={checkpoint}",
                 "--output", str(output), *TINY]) == 0
    assert not (output / "runs").exists()
    results = read_results(output)
    assert results["results"]["ssim-ae"]["training"]["reused"] is True
    assert results["results"]["ssim-ae"]["training"]["steps"] == 2
    with np.load(output / results["examples"][0]["file"]) as arrays:
        assert "ssim_reconstruction" in arrays.files and "l2_reconstruction" not in arrays.files
    assert (output / "report.html").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--methods", "ssim-ae,cnn-fd"], "unknown method 'cnn-fd'"),
    (["--methods", "ssim-ae", "--checkpoints", "ssim-ae=/nonexistent/model.pt"], "/nonexistent/model.pt does not exist"),
    (["--methods", "ssim-ae", "--checkpoints", "vae=x.pt"], "'vae' is not in --methods"),
    (["--feature-net", "resnet18", "--feature-weights", "/nonexistent/w.pth"], "/nonexistent/w.pth"),  # before training
])
def test_bad_methods_and_checkpoints_are_one_line_errors(extra, message, dataset, tmp_path, capsys):
    assert main(["compare", str(dataset), "--output", str(tmp_path / "out"), *extra, *TINY]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("ssimae: error:") and message in error and "\n" not in error
    assert not (tmp_path / "out").exists()  # nothing trained


def test_a_checkpoint_of_another_method_is_refused(run, dataset, tmp_path, capsys):
    l2 = run / "runs" / "l2-ae" / "checkpoint.pt"
    assert main(["compare", str(dataset), "--methods", "ssim-ae", "--checkpoints", f"ssim-ae={l2}",
                 "--output", str(tmp_path / "out"), *TINY]) == 2
    error = capsys.readouterr().err
    assert "trained with l2-ae, not ssim-ae" in error and f"l2-ae={l2}" in error


def test_an_existing_run_is_not_overwritten(run, dataset, capsys):
    assert main(["compare", str(dataset), "--methods", "l2-ae", "--output", str(run), *TINY]) == 2
    assert "--checkpoints l2-ae=" in capsys.readouterr().err


def test_report_without_saved_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "has no saved comparison results" in error and "ssimae compare" in error and "\n" not in error


def test_thin_curve_keeps_the_shape_of_a_long_curve():
    fpr = np.sort(np.random.default_rng(0).random(1_000_000))
    fpr[0], fpr[-1] = 0.0, 1.0
    tpr = np.sqrt(fpr)  # steep near 0: a log-FPR panel needs points there
    thin_fpr, thin_tpr = thin_curve(fpr, tpr, points=2000)
    assert thin_fpr.size < 5000
    assert thin_fpr[0] == 0 and thin_fpr[-1] == 1 and np.isin(thin_fpr, fpr).all()
    assert (thin_fpr < 1e-4).sum() >= 10
    assert np.abs(np.interp(fpr, thin_fpr, thin_tpr) - tpr).max() < 0.01


def test_pro_up_to_interpolates_at_the_limit():
    fpr, pro = pro_up_to(np.array([0.0, 0.1, 0.2, 0.4, 1.0]), np.array([0.0, 0.5, 0.6, 0.8, 1.0]), 0.3)
    assert fpr.tolist() == [0.0, 0.1, 0.2, 0.3] and pro[-1] == pytest.approx(0.7)


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(run, tmp_path):
    spec = importlib.util.spec_from_file_location("render_report", ROOT / "bench" / "render_report.py")
    render_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_report)
    shot = render_report.render(run / "report.html", tmp_path / "shot.png", str(CHROMIUM))
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 10  # text, tables and figures, not a blank or error page
