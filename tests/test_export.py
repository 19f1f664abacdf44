"""ONNX export and the onnxruntime backend: metadata, equality with torch, the CLI paths."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import texture, texture_png, write_png
from PIL import Image

from ssimae.checkpoint import Checkpoint, Thresholds, build_network
from ssimae.cli import main
from ssimae.config import Config
from ssimae.detector import load_detector
from ssimae.errors import SsimaeError
from ssimae.export import METADATA_KEYS, PATCH_OUTPUTS, export_onnx
from ssimae.inference import torch_patch_fn
from ssimae.losses import SsimSettings
from ssimae.methods import METHODS
from ssimae.onnx_backend import load_onnx, make_session, onnxruntime_patch_fn, read_metadata


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder of small gray images and a 1-step ssim-ae checkpoint trained on it."""
    from ssimae.train import fit

    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(140, 150), (150, 140), (135, 160)]):
        write_png(root / "good" / f"{i}.png", texture_png(h, w, rng, period=6))
    config = Config(max_steps=1, batch_size=4, patches_per_epoch=4, latent_dim=8, stride=64, infer_batch_size=8,
                    device="cpu")
    result = fit(config, root / "good", root / "run", progress=False)
    images = root / "test"
    write_png(images / "a.png", texture_png(150, 170, rng, period=6))
    write_png(images / "sub" / "small.png", texture_png(100, 90, rng, period=6))  # smaller than the patch
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
    assert set(METADATA_KEYS) == set(meta)
    checkpoint = Checkpoint.load(tiny["checkpoint"])
    assert meta["method"] == "ssim-ae" and meta["color"] == "gray" and meta["kind"] == "reconstruction"
    assert int(meta["patch_size"]) == 128 and int(meta["stride"]) == 64 and int(meta["channels"]) == 1
    assert meta["image_size"] == ""  # None: images keep their size
    assert float(meta["threshold"]) == pytest.approx(checkpoint.thresholds.pixel)
    assert json.loads(meta["thresholds"])["pixel"] == pytest.approx(checkpoint.thresholds.pixel)
    assert json.loads(meta["config"])["latent_dim"] == 8
    assert [i.name for i in proto.graph.input] == ["patches"]
    assert [o.name for o in proto.graph.output] == list(PATCH_OUTPUTS)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a dynamic batch axis


def test_onnxruntime_patches_equal_torch_for_any_batch_size(tiny, exported):
    loaded = load_onnx(exported)
    network = Checkpoint.load(tiny["checkpoint"]).network()
    for n in (1, 3, 9):  # the export traced 2 patches
        x = torch.rand(n, 1, 128, 128)
        for outputs in PATCH_OUTPUTS:
            ours = onnxruntime_patch_fn(loaded.session, outputs)(x)
            expected = torch_patch_fn(network, "ssim", SsimSettings(), outputs=outputs)(x)
            assert ours.shape == expected.shape
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["onnx", "checkpoint"])
def test_onnxruntime_maps_equal_torch_maps(tiny, exported, source):
    torch_detector = load_detector(tiny["checkpoint"], overrides={"device": "cpu"})
    onnx_detector = load_detector(exported if source == "onnx" else tiny["checkpoint"], "onnxruntime",
                                  {"device": "cpu"})
    assert onnx_detector.threshold == pytest.approx(torch_detector.threshold)
    assert onnx_detector.config == torch_detector.config
    rng = np.random.default_rng(20)
    for h, w in [(150, 170), (100, 90), (300, 260)]:
        image = texture(h, w, rng, period=6)[:, :, None]
        expected = torch_detector.anomaly_map(image)
        ours = onnx_detector.anomaly_map(image)
        assert ours.shape == expected.shape == (h, w)
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def _checkpoint(tmp_path, method: str, color: str) -> Checkpoint:
    """An untrained checkpoint of any method (its module as built), saved to tmp_path/checkpoint.pt."""
    torch.manual_seed(0)
    channels = 3 if color == "rgb" else 1
    config = Config(method=method, color=color, latent_dim=8)
    checkpoint = Checkpoint(config, channels, build_network(config, channels).state_dict(), Thresholds(0.5, "test"))
    checkpoint.save(tmp_path / "checkpoint.pt")
    return checkpoint


@pytest.mark.parametrize("method,color", [("l2-ae", "rgb"), ("vae", "gray"), ("fm-ae", "gray"), ("ssim-ae", "rgb")])
def test_every_reconstruction_method_exports_and_matches_torch(tmp_path, method, color):
    checkpoint = _checkpoint(tmp_path, method, color)
    loaded = load_onnx(export_onnx(tmp_path / "checkpoint.pt", tmp_path / "model.onnx"))
    assert loaded.threshold == 0.5 and loaded.channels == checkpoint.channels
    x = torch.rand(3, checkpoint.channels, 128, 128)
    expected = torch_patch_fn(checkpoint.network(), METHODS[method].residual, SsimSettings())(x)
    torch.testing.assert_close(onnxruntime_patch_fn(loaded.session)(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,color", [("blur", "gray"), ("blur", "rgb")])
def test_memory_methods_export_with_dynamic_image_sizes_and_match_torch(tmp_path, method, color):
    _checkpoint(tmp_path, method, color)
    path = export_onnx(tmp_path / "checkpoint.pt", tmp_path / "model.onnx")
    torch_detector = load_detector(tmp_path / "checkpoint.pt", overrides={"device": "cpu"})
    onnx_detector = load_detector(path, "onnxruntime", {"device": "cpu"})
    rng = np.random.default_rng(1)
    for h, w in [(150, 170), (64, 90), (300, 41)]:  # none of them the traced size
        image = np.dstack([texture(h, w, rng) for _ in range(3 if color == "rgb" else 1)])
        np.testing.assert_allclose(onnx_detector.anomaly_map(image), torch_detector.anomaly_map(image), atol=1e-4,
                                   rtol=0)


def test_an_export_carries_the_input_normalization_and_its_targets(tmp_path):
    torch.manual_seed(0)
    config = Config(method="ssim-ae", latent_dim=8, input_normalization="standardize", input_mean=0.4, input_sd=0.1)
    Checkpoint(config, 1, build_network(config, 1).state_dict(), Thresholds(0.5, "test")).save(tmp_path / "checkpoint.pt")
    path = export_onnx(tmp_path / "checkpoint.pt", tmp_path / "model.onnx")
    onnx_detector = load_detector(path, "onnxruntime", {"device": "cpu"})
    assert (onnx_detector.config.input_normalization, onnx_detector.config.input_mean,
            onnx_detector.config.input_sd) == ("standardize", 0.4, 0.1)
    image = texture(150, 170, np.random.default_rng(1))[:, :, None]
    torch_map = load_detector(tmp_path / "checkpoint.pt", overrides={"device": "cpu"}).anomaly_map(image)
    np.testing.assert_allclose(onnx_detector.anomaly_map(image), torch_map, atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_detector.anomaly_map(0.2 + 0.5 * image), torch_map, atol=1e-4, rtol=0)


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
    session = make_session(str(foreign))  # a plain session still loads it
    assert [i.name for i in session.get_inputs()] == ["x"]


@pytest.mark.parametrize("key, value, message", [
    ("config", "{not json", "invalid metadata"),
    ("config", "[1, 2]", "invalid metadata"),
    ("config", '{"stride": 0}', "stride 0"),
    ("channels", "two", "invalid metadata"),
    ("thresholds", '{"pixel": "high", "pixel_rule": "x"}', "threshold 'high'"),
    ("config", None, "lacks the metadata entry 'config'"),
])
def test_onnx_files_with_bad_metadata_are_one_line_errors(exported, tmp_path, key, value, message):
    proto = onnx.load(str(exported))
    props = {p.key: p.value for p in proto.metadata_props}
    if value is None:
        del props[key]
    else:
        props[key] = value
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(SsimaeError, match=message) as info:
        load_onnx(bad)
    assert "bad.onnx" in str(info.value) and "\n" not in str(info.value)


def test_export_cli_errors(tiny, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "m.onnx")]) == 2
    assert main(["export", str(tiny["checkpoint"]), "--output", str(tmp_path / "m.onnx"), "--opset", "13"]) == 2
    assert "opset 13" in capsys.readouterr().err
    assert main(["export", str(tiny["checkpoint"]), "--output", str(tmp_path / "m.onnx"), "--opset", "99"]) == 2
    out, err = capsys.readouterr()
    assert "opset 99 is newer than this torch can export" in err and "Traceback" not in err
    assert out == ""  # refused before the exporter, which prints its whole graph when it fails
    assert main(["export", str(tiny["checkpoint"]), "--output", str(tmp_path / "m.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err  # predict tells a model from a checkpoint by it
    assert not (tmp_path / "m.txt").exists() and not (tmp_path / "m.onnx").exists()
    assert main(["export", str(tiny["checkpoint"]), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
