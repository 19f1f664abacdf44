"""The command line end to end: train -> predict -> evaluate, and one-line user errors (exit code 2)."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_FLAGS, texture_png, tmp_files, write_png
from PIL import Image

import ssimae
from ssimae.checkpoint import Checkpoint
from ssimae.threshold import drop_small_regions
from ssimae.cli import main

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _restore_logging(restore_logging):
    """main() points the 'ssimae' logger at this test's captured stderr; conftest undoes that."""


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, args, *fragments) -> str:
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ssimae: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, mvtec_root) -> Path:
    """`ssimae train` with a YAML --config (min-defect-area 30, stride 32) and tiny flags (--stride 64 wins)."""
    folder = tmp_path_factory.mktemp("cli")
    settings = folder / "settings.yaml"
    settings.write_text("min-defect-area: 30\nstride: 32\nthreshold-rule: min-area\n")
    run = folder / "run"
    logger = logging.getLogger("ssimae")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        assert main(["train", str(mvtec_root), "--output", str(run), "--config", str(settings), *TINY_FLAGS]) == 0
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    return run


def test_train_writes_the_run_and_merges_yaml_and_flags(cli_run):
    saved = yaml.safe_load((cli_run / "config.yaml").read_text())
    assert saved["min_defect_area"] == 30  # from the YAML file
    assert saved["stride"] == 64  # the flag overrides the YAML's 32
    assert saved["latent_dim"] == 8 and saved["max_steps"] == 2
    checkpoint = Checkpoint.load(cli_run / "checkpoint.pt")
    assert checkpoint.config.stride == 64 and "min defect area 30" in checkpoint.thresholds.pixel_rule
    assert (cli_run / "train.log").read_text().strip()  # the file log is written even with --quiet
    assert tmp_files(cli_run) == []


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


def test_predict_writes_maps_masks_overlays_and_scores(cli_run, mvtec_root, tmp_path, capsys):
    out = tmp_path / "pred"
    code, stdout, err = run_cli(capsys, "predict", cli_run / "checkpoint.pt", mvtec_root / "test", "--output", out, "--quiet")
    assert code == 0, err
    assert "4 image(s)" in stdout
    thresholds = Checkpoint.load(cli_run / "checkpoint.pt").thresholds
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "score", "raw_score", "image_threshold", "pixel_threshold", "defective", "regions",
                             "defect_area_px", "defect_area_percent"]
    assert [r["path"] for r in rows] == ["good/000.png", "good/001.png", "scratch/000.png", "scratch/001.png"]
    for row in rows:
        rel = row["path"]
        image = mvtec_root / "test" / rel
        stem = Path(rel).with_suffix("")
        size = _image_size(image)
        with Image.open(out / "maps" / f"{stem}.tiff") as tiff:
            assert tiff.mode == "F"
            amap = np.asarray(tiff)
        assert amap.dtype == np.float32 and amap.shape == size  # the ORIGINAL image size
        assert np.isfinite(amap).all() and amap.min() >= -1e-6
        with Image.open(out / "masks" / f"{stem}.png") as png:
            mask = np.asarray(png)
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, drop_small_regions(amap > thresholds.pixel, 30))
        with Image.open(out / "overlays" / f"{stem}.png") as png:  # three panels, each >= 256 px on its short side
            assert png.mode == "RGB" and png.width > 3 * 256 and png.height > 256
        raw = float(row["raw_score"])
        assert raw == pytest.approx(float(amap.max()), rel=1e-5)  # the max image score of this run
        assert float(row["score"]) == pytest.approx(raw / thresholds.image, rel=1e-5)
        assert float(row["image_threshold"]) == pytest.approx(thresholds.image, rel=1e-5)
        assert row["defective"] == ("yes" if raw > thresholds.image else "no")
        assert int(row["defect_area_px"]) == int((mask == 255).sum())
    assert tmp_files(out) == []


def test_predict_writes_only_the_outputs_asked_for(checkpoint_path, mvtec_root, tmp_path, capsys):
    full, some, none = tmp_path / "full", tmp_path / "some", tmp_path / "none"
    images = mvtec_root / "test" / "scratch"
    assert run_cli(capsys, "predict", checkpoint_path, images, "--output", full, "--quiet")[0] == 0
    code, stdout, err = run_cli(capsys, "predict", checkpoint_path, images, "--output", some, "--outputs",
                                "overlays,masks", "--quiet")
    assert code == 0, err
    assert "masks, overlays and scores.csv" in stdout
    assert sorted(p.name for p in some.iterdir()) == ["masks", "overlays", "scores.csv"]
    for name in ("masks/000.png", "overlays/001.png", "scores.csv"):
        assert (some / name).read_bytes() == (full / name).read_bytes(), name
    code, stdout, err = run_cli(capsys, "predict", checkpoint_path, images, "--output", none, "--outputs", "none",
                                "--quiet")
    assert code == 0 and "defective; scores.csv in" in stdout, err
    assert [p.name for p in none.iterdir()] == ["scores.csv"]
    assert (none / "scores.csv").read_bytes() == (full / "scores.csv").read_bytes()
    for bad, named in (("maps,mapz", "unknown mapz"), (",", "empty"), ("none,maps", "unknown none")):
        assert_user_error(capsys, ["predict", checkpoint_path, images, "--output", tmp_path / "o", "--outputs", bad],
                          named, "maps, masks, overlays, or none")
    assert not (tmp_path / "o").exists()  # refused before any work


def test_predict_threshold_override(checkpoint_path, mvtec_root, tmp_path, capsys):
    out = tmp_path / "pred"
    code, _, err = run_cli(capsys, "predict", checkpoint_path, mvtec_root / "test" / "good" / "000.png",
                           "--output", out, "--threshold", "-1", "--quiet")
    assert code == 0, err
    assert (np.asarray(Image.open(out / "masks" / "000.png")) == 255).all()  # every score is > -1
    row = next(csv.DictReader(open(out / "scores.csv", newline="")))
    assert row["defective"] == "yes" and row["image_threshold"] == ""  # the verdict follows the override
    assert "000.png" in (out / "scores.csv").read_text()


def test_evaluate_writes_metrics(cli_run, mvtec_root, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = run_cli(capsys, "evaluate", cli_run / "checkpoint.pt", mvtec_root, "--output", out,
                                "--save-maps", "--quiet")
    assert code == 0, err
    assert "pixel AUROC" in stdout and "metrics.json" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("pixel_auroc", "au_pro", "image_auroc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert set(metrics["per_defect_type"]) == {"scratch"}
    assert metrics["per_defect_type"]["scratch"]["images"] == 2
    assert metrics["images"] == 4 and metrics["good_images"] == 2
    for rel in ("good/000", "scratch/001"):
        with Image.open(out / "maps" / f"{rel}.tiff") as tiff:
            assert tiff.mode == "F" and (tiff.height, tiff.width) == _image_size(mvtec_root / "test" / f"{rel}.png")
    assert tmp_files(out) == []


@pytest.mark.slow
def test_python_m_help_and_version():
    help_run = subprocess.run([sys.executable, "-m", "ssimae", "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    for command in ("train", "predict", "evaluate"):
        assert command in help_run.stdout
    exe = BIN / "ssimae"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"ssimae {ssimae.__version__}"


def test_train_help_lists_settings_with_their_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--latent-dim" in out and "--ssim-window" in out and "(default: 100)" in out


# --------------------------------------------------------------------------- user errors


def test_missing_training_folder(tmp_path, capsys):
    assert_user_error(capsys, ["train", tmp_path / "nowhere", "--output", tmp_path / "run", "--quiet"],
                      "nowhere", "does not exist")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_empty_training_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_user_error(capsys, ["train", tmp_path / "empty", "--output", tmp_path / "run", "--quiet"], "no images")


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--method", "gan"], ["--method 'gan' is not one of", "ssim-ae"]),
        (["--stride", "200"], ["stride 200", "128"]),
        (["--image-size", "big"], ["--image-size 'big'"]),
        (["--image-size", "320x0"], ["--image-size '320x0'"]),
        (["--patch-size", "64"], ["--patch-size 64"]),
        (["--lr", "-1"], ["--lr must be a positive number"]),
        (["--latent-dim", "eight"], ["--latent-dim: 'eight' is not a valid int"]),
        (["--max-stepz", "5"], ["unrecognized arguments: --max-stepz"]),
        (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], ["cuda"]),
    ],
)
def test_bad_training_settings(mvtec_root, tmp_path, capsys, flags, fragments):
    assert_user_error(capsys, ["train", mvtec_root, "--output", tmp_path / "run", "--quiet", "--max-steps", "1",
                               *flags], *fragments)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_config_file_errors(mvtec_root, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("latent-dim: 8\nlearning-rate: 0.1\n")
    assert_user_error(capsys, ["train", mvtec_root, "--output", tmp_path / "run", "--config", bad, "--quiet"],
                      "bad.yaml", "learning_rate")
    assert_user_error(capsys, ["train", mvtec_root, "--output", tmp_path / "run", "--config", tmp_path / "no.yaml",
                               "--quiet"], "no.yaml")


def test_nonexistent_checkpoint(mvtec_root, tmp_path, capsys):
    assert_user_error(capsys, ["predict", tmp_path / "none.pt", mvtec_root / "test", "--output", tmp_path / "o"],
                      "none.pt", "does not exist")
    assert_user_error(capsys, ["evaluate", tmp_path / "none.pt", mvtec_root, "--output", tmp_path / "o"], "none.pt")


def _text_file(path: Path) -> Path:
    path.write_text("this is not a checkpoint\n")
    return path


def _foreign_torch_file(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    return path


def _image_file(path: Path) -> Path:
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(path, format="PNG")
    return path


def _plain_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    return path


def _empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _truncated_checkpoint(source: Path):
    def make(path: Path) -> Path:
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    return make


@pytest.mark.parametrize("kind", ["text", "foreign-torch", "png", "pickle", "empty", "truncated"])
def test_non_checkpoint_file(checkpoint_path, mvtec_root, tmp_path, capsys, kind):
    make = {"text": _text_file, "foreign-torch": _foreign_torch_file, "png": _image_file, "pickle": _plain_pickle,
            "empty": _empty_file, "truncated": _truncated_checkpoint(checkpoint_path)}[kind]
    fake = make(tmp_path / "fake.pt")
    line = assert_user_error(capsys, ["predict", fake, mvtec_root / "test", "--output", tmp_path / "o", "--quiet"],
                             "fake.pt")
    assert "weights_only" not in line  # torch's advice to load untrusted files unsafely is not passed on
    assert not (tmp_path / "o").exists()


def test_checkpoint_directory_instead_of_file(cli_run, mvtec_root, tmp_path, capsys):
    assert_user_error(capsys, ["predict", cli_run, mvtec_root / "test", "--output", tmp_path / "o", "--quiet"],
                      str(cli_run), "is a folder", "checkpoint.pt")


def test_predict_missing_input(checkpoint_path, tmp_path, capsys):
    assert_user_error(capsys, ["predict", checkpoint_path, tmp_path / "nothing", "--output", tmp_path / "o"],
                      "nothing", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(capsys, ["predict", checkpoint_path, tmp_path / "empty", "--output", tmp_path / "o"], "no images")
    (tmp_path / "notes.txt").write_text("x")
    assert_user_error(capsys, ["predict", checkpoint_path, tmp_path / "notes.txt", "--output", tmp_path / "o"],
                      "notes.txt")


def test_predict_bad_inference_flags(checkpoint_path, mvtec_root, tmp_path, capsys):
    image = mvtec_root / "test" / "good" / "000.png"
    assert_user_error(capsys, ["predict", checkpoint_path, image, "--output", tmp_path / "o", "--stride", "500"],
                      "stride 500")
    assert_user_error(capsys, ["predict", checkpoint_path, image, "--output", tmp_path / "o", "--batch-size", "0"],
                      "--batch-size must be at least 1")
    assert_user_error(capsys, ["predict", checkpoint_path, image, "--output", tmp_path / "o", "--infer-batch-size",
                               "0"], "--infer-batch-size must be at least 1")


def test_evaluate_without_a_test_split(checkpoint_path, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert_user_error(capsys, ["evaluate", checkpoint_path, tmp_path / "plain", "--output", tmp_path / "o"],
                      "no test folder")


def test_gray_checkpoint_on_an_rgb_image_converts_and_says_so(checkpoint_path, tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgb = np.dstack([texture_png(131, 157, rng) for _ in range(3)])
    source = tmp_path / "in" / "colour.png"
    source.parent.mkdir()
    Image.fromarray(rgb).save(source)
    out = tmp_path / "pred"
    code, _, err = run_cli(capsys, "predict", checkpoint_path, source, "--output", out, "--quiet")
    assert code == 0, err
    assert "Traceback" not in err
    assert "colour.png is rgb but the model is gray" in err and "converting" in err
    with Image.open(out / "maps" / "colour.tiff") as tiff:
        assert (tiff.height, tiff.width) == (131, 157)


def _folder_with_a_bad_image(mvtec_root: Path, folder: Path) -> Path:
    folder.mkdir()
    good = mvtec_root / "test" / "good" / "000.png"
    (folder / "a_good.png").write_bytes(good.read_bytes())
    data = good.read_bytes()
    (folder / "b_cut.png").write_bytes(data[: len(data) // 2])
    (folder / "c_good.png").write_bytes(good.read_bytes())
    return folder


def test_a_bad_image_is_skipped_listed_and_makes_the_exit_code_1(checkpoint_path, mvtec_root, tmp_path, capsys):
    folder = _folder_with_a_bad_image(mvtec_root, tmp_path / "in")
    out = tmp_path / "pred"
    code, stdout, err = run_cli(capsys, "predict", checkpoint_path, folder, "--output", out, "--quiet")
    assert code == 1, err
    assert "Traceback" not in err and "1 image(s) could not be read" in err and "b_cut.png" in err
    assert "2 image(s)" in stdout
    with open(out / "scores.csv", newline="") as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == ["a_good.png", "c_good.png"]
    with open(out / "errors.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["path"] == "b_cut.png" and "b_cut.png" in row["reason"]
    assert [p for p in out.rglob("*") if "b_cut" in p.name] == []  # no map, mask or overlay for the bad image
    assert tmp_files(out) == []


def test_strict_stops_at_the_first_bad_image(checkpoint_path, mvtec_root, tmp_path, capsys):
    folder = _folder_with_a_bad_image(mvtec_root, tmp_path / "in")
    out = tmp_path / "pred"
    line = assert_user_error(capsys, ["predict", checkpoint_path, folder, "--output", out, "--quiet", "--strict"],
                             "b_cut.png", "--strict")
    assert "could not" not in line
    with open(out / "scores.csv", newline="") as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == ["a_good.png"]  # what finished is kept
    assert not (out / "maps" / "c_good.tiff").exists() and tmp_files(out) == []


@pytest.mark.slow
def test_ssimae_error_never_prints_a_traceback_from_a_subprocess(tmp_path):
    result = subprocess.run([str(BIN / "ssimae"), "predict", str(tmp_path / "none.pt"), str(tmp_path),
                             "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("ssimae: error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "none.pt" in result.stderr


@pytest.mark.slow
def test_resize_and_smoothing_end_to_end(mvtec_root, tmp_path, capsys):
    """--image-size and --map-smoothing through train and predict: maps at the original size, equal to
    the working-size map smoothed, then resized back."""
    from ssimae.data import read_image, resize_map
    from ssimae.detector import load_detector
    from ssimae.inference import smooth_map

    run = tmp_path / "run"
    flags = [f for f in TINY_FLAGS if f != "--quiet"]
    code, _, err = run_cli(capsys, "train", mvtec_root, "--output", run, *flags, "--image-size", "200x180",
                           "--map-smoothing", "3", "--quiet")
    assert code == 0, err
    out = tmp_path / "pred"
    assert run_cli(capsys, "predict", run / "checkpoint.pt", mvtec_root / "test" / "scratch", "--output", out,
                   "--quiet")[0] == 0
    detector = load_detector(run / "checkpoint.pt", overrides={"device": "cpu"})
    assert detector.config.smoothing == 3.0 and detector.config.resize == (200, 180)
    for name in ("000", "001"):
        image = read_image(mvtec_root / "test" / "scratch" / f"{name}.png")
        working = detector.preprocess(image)
        assert working.shape[:2] == (180, 200)
        expected = resize_map(smooth_map(detector.map_fn(working), 3.0), *image.shape[:2])
        with Image.open(out / "maps" / f"{name}.tiff") as tiff:
            written = np.asarray(tiff)
        assert written.shape == image.shape[:2]
        np.testing.assert_allclose(written, expected, atol=1e-6)
        assert np.abs(written - resize_map(detector.map_fn(working), *image.shape[:2])).max() > 1e-3  # smoothed


def test_one_unreadable_image_asked_for_by_name_is_an_error(checkpoint_path, tmp_path, capsys):
    bad = tmp_path / "cut.png"
    write_png(bad, texture_png(140, 150, np.random.default_rng(0)))
    bad.write_bytes(bad.read_bytes()[:80])
    assert_user_error(capsys, ["predict", checkpoint_path, bad, "--output", tmp_path / "o", "--quiet"], "cut.png")
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_predict_warns_once_about_images_smaller_than_the_patch(checkpoint_path, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        write_png(tmp_path / "in" / name, texture_png(60, 70, rng))
    code, _, err = run_cli(capsys, "predict", checkpoint_path, tmp_path / "in", "--output", tmp_path / "o", "--quiet")
    assert code == 0 and err.count("smaller than the 128 px patch") == 1, err


def test_a_broken_link_in_the_input_is_listed_as_an_error(checkpoint_path, mvtec_root, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.png").write_bytes((mvtec_root / "test" / "good" / "000.png").read_bytes())
    (folder / "b_gone.png").symlink_to(tmp_path / "nowhere.png")
    code, _, err = run_cli(capsys, "predict", checkpoint_path, folder, "--output", tmp_path / "o", "--quiet")
    assert code == 1 and "Traceback" not in err
    with open(tmp_path / "o" / "errors.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["path"] == "b_gone.png" and "broken link" in row["reason"]
