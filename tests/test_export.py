"""ONNX export and the onnxruntime backend: metadata, equality with torch, the CLI paths."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from ssimae.checkpoint import checkpoint_dict, save_checkpoint
from ssimae.cli import main
from ssimae.config import Config
from ssimae.errors import SsimaeError
from ssimae.export import OUTPUTS, export_onnx, load_onnx, make_session, onnxruntime_patch_fn, read_metadata
from ssimae.inference import torch_patch_fn
from ssimae.losses import METHODS, SsimSettings
from ssimae.models import build_model
from ssimae.predict import load_detector

REQUIRED_METADATA = ("format", "version", "method", "color", "image_size", "patch_size", "stride", "threshold",
                     "threshold_rule", "channels", "normalisation", "ssim_window", "ssim_sigma", "config")


def _gray(height, width, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.2 * np.sin((x + 0.5 * y) / 2 + rng.uniform(0, 6)) + 0.05 * rng.standard_normal((height, width))
    return (np.clip(base, 0, 1) * 200 + 20).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder of small gray images and a 1-step ssim-ae checkpoint trained on it."""
    from ssimae.train import fit

    root = tmp_path_factory.mktemp("export")
    data = root / "good"
    data.mkdir()
    for i, (h, w) in enumerate([(140, 150), (150, 140), (135, 160)]):
        Image.fromarray(_gray(h, w, i)).save(data / f"{i}.png")
    config = Config(max_steps=1, batch_size=4, patches_per_epoch=4, latent_dim=8, stride=64, infer_batch_size=8,
                    device="cpu")
    result = fit(config, data, root / "run", progress=False)
    images = root / "test"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(_gray(150, 170, 10)).save(images / "a.png")
    Image.fromarray(_gray(100, 90, 11)).save(images / "sub" / "small.png")  # smaller than the patch
    return {"checkpoint": result.checkpoint, "images": images, "root": root}


@pytest.fixture(scope="module")
def exported(tiny):
    path = tiny["root"] / "model.onnx"
    assert main(["export", str(tiny["checkpoint"]), "--output", str(path), "--quiet"]) == 0
    return path


def test_export_writes_a_valid_model_with_its_settings_in_the_metadata(tiny, exported):
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= 17
    meta = read_metadata(exported)
    assert set(REQUIRED_METADATA) <= set(meta)
    state = torch.load(tiny["checkpoint"], weights_only=True)
    assert meta["method"] == "ssim-ae" and meta["color"] == "gray" and meta["residual"] == "ssim"
    assert int(meta["patch_size"]) == 128 and int(meta["stride"]) == 64 and int(meta["channels"]) == 1
    assert meta["image_size"] == ""  # None: images keep their size
    assert float(meta["threshold"]) == pytest.approx(state["threshold"])
    assert json.loads(meta["config"])["latent_dim"] == 8
    assert [i.name for i in proto.graph.input] == ["patches"]
    assert [o.name for o in proto.graph.output] == list(OUTPUTS)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a dynamic batch axis


def test_onnxruntime_patches_equal_torch_for_any_batch_size(tiny, exported):
    loaded = load_onnx(exported)
    model = build_model("ae", 1, 8, 128)
    model.load_state_dict(torch.load(tiny["checkpoint"], weights_only=True)["model_state"])
    for n in (1, 3, 9):  # the export traced 2 patches
        x = torch.rand(n, 1, 128, 128)
        for outputs in OUTPUTS:
            ours = onnxruntime_patch_fn(loaded.session, outputs)(x)
            expected = torch_patch_fn(model, METHODS["ssim-ae"], SsimSettings(), outputs=outputs)(x)
            assert ours.shape == expected.shape
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["onnx", "checkpoint"])
def test_onnxruntime_maps_equal_torch_maps(tiny, exported, source):
    torch_detector = load_detector(tiny["checkpoint"], "cpu")
    onnx_detector = load_detector(exported if source == "onnx" else tiny["checkpoint"], "cpu", backend="onnxruntime")
    assert onnx_detector.threshold == pytest.approx(torch_detector.threshold)
    assert onnx_detector.config == torch_detector.config
    for seed, (h, w) in enumerate([(150, 170), (100, 90), (300, 260)]):
        image = (_gray(h, w, 20 + seed).astype(np.float32) / 255)[:, :, None]
        expected = torch_detector.anomaly_map(image)
        ours = onnx_detector.anomaly_map(image)
        assert ours.shape == expected.shape == (h, w)
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method,color", [("l2-ae", "rgb"), ("vae", "gray"), ("fm-ae", "gray"), ("ssim-ae", "rgb")])
def test_every_method_exports_and_matches_torch(tmp_path, method, color):
    torch.manual_seed(0)
    channels = 3 if color == "rgb" else 1
    config = Config(method=method, color=color, latent_dim=8)
    model = build_model(METHODS[method].model_kind, channels, 8, 128)
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint_dict(model, config, channels, None, None, {"step": 0}), checkpoint)
    loaded = load_onnx(export_onnx(checkpoint, tmp_path / "model.onnx"))
    assert loaded.threshold is None and loaded.channels == channels
    x = torch.rand(3, channels, 128, 128)
    expected = torch_patch_fn(model, METHODS[method], SsimSettings())(x)
    torch.testing.assert_close(onnxruntime_patch_fn(loaded.session)(x), expected, atol=1e-5, rtol=0)


def _maps(folder):
    return {p.relative_to(folder): np.asarray(Image.open(p)) for p in sorted((folder / "maps").rglob("*.tiff"))}


def test_predict_cli_with_the_onnxruntime_backend(tiny, exported, tmp_path, capsys):
    images = str(tiny["images"])
    runs = {
        "torch": ["predict", str(tiny["checkpoint"]), images, "-o", str(tmp_path / "torch")],
        "onnx-file": ["predict", str(exported), images, "-o", str(tmp_path / "onnx-file"), "--backend", "onnxruntime"],
        "onnx-ckpt": ["predict", str(tiny["checkpoint"]), images, "-o", str(tmp_path / "onnx-ckpt"),
                      "--backend", "onnxruntime"],
    }
    for args in runs.values():
        assert main(args + ["--quiet"]) == 0
    expected = _maps(tmp_path / "torch")
    assert len(expected) == 2
    for name in ("onnx-file", "onnx-ckpt"):
        ours = _maps(tmp_path / name)
        assert ours.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(ours[key], expected[key], atol=1e-4, rtol=0)
        with open(tmp_path / name / "scores.csv") as a, open(tmp_path / "torch" / "scores.csv") as b:
            for row_a, row_b in zip(csv.DictReader(a), csv.DictReader(b)):
                assert row_a["path"] == row_b["path"]
                assert float(row_a["score"]) == pytest.approx(float(row_b["score"]), abs=1e-4)


def test_evaluate_cli_accepts_the_onnx_file(exported, mvtec_root, tmp_path):
    assert main(["evaluate", str(exported), str(mvtec_root), "-o", str(tmp_path), "--backend", "onnxruntime",
                 "--quiet"]) == 0
    assert (tmp_path / "metrics.json").is_file()


def test_onnx_file_with_the_torch_backend_is_a_clear_error(tiny, exported, tmp_path, capsys):
    assert main(["predict", str(exported), str(tiny["images"]), "-o", str(tmp_path), "--quiet"]) == 2
    assert "--backend onnxruntime" in capsys.readouterr().err


def test_foreign_or_damaged_onnx_files_are_rejected(tmp_path):
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"\x00not an onnx model")
    with pytest.raises(SsimaeError, match="cannot read ONNX model"):
        load_onnx(damaged)
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(SsimaeError, match="not an ssimae ONNX export"):
        load_onnx(foreign)
    with pytest.raises(SsimaeError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")
    assert make_session(str(foreign)) is not None  # a plain session still loads it


def test_export_cli_errors(tiny, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", str(tiny["checkpoint"]), "--output", str(tmp_path / "m.onnx"), "--opset", "13"]) == 2
    assert "opset 13" in capsys.readouterr().err
