"""Image reading and checks, colour and size conversion, dataset discovery, patch sampling."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssimae.config import parse_image_size
from ssimae.data import (
    check_test_masks,
    find_test_items,
    find_training_images,
    load_image,
    load_mask,
    read_image,
    resize_image,
    resize_map,
    sample_patches,
    target_size,
    to_color,
)
from ssimae.errors import SsimaeError

RNG = np.random.default_rng(0)
GRAY8 = (RNG.random((12, 17)) * 255).astype(np.uint8)
RGB8 = (RNG.random((12, 17, 3)) * 255).astype(np.uint8)


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


# --------------------------------------------------------------------------- read_image


@pytest.mark.parametrize("ext", ["png", "bmp", "tif", "tiff"])
def test_lossless_formats_gray_and_rgb(tmp_path, ext):
    gray = read_image(_save(tmp_path / f"g.{ext}", Image.fromarray(GRAY8)))
    rgb = read_image(_save(tmp_path / f"c.{ext}", Image.fromarray(RGB8)))
    assert gray.shape == (12, 17, 1) and gray.dtype == np.float32
    assert rgb.shape == (12, 17, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(gray[:, :, 0], GRAY8 / 255.0, atol=1e-6)
    np.testing.assert_allclose(rgb, RGB8 / 255.0, atol=1e-6)


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "JPG"])
def test_jpeg(tmp_path, ext):
    flat = np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8)
    array = read_image(_save(tmp_path / f"x.{ext}", Image.fromarray(flat), quality=95))
    assert array.shape == (16, 16, 3)
    np.testing.assert_allclose(array, flat / 255.0, atol=4 / 255)  # lossy, but a flat colour survives


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_gray_scales_by_65535(tmp_path, ext):
    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    array = read_image(_save(tmp_path / f"x.{ext}", Image.fromarray(values)))
    assert array.shape == (2, 2, 1)
    assert array[0, 1, 0] == 1.0 and array[0, 0, 0] == 0.0
    assert array[1, 0, 0] == pytest.approx(0.5, abs=1e-4)
    assert array[1, 1, 0] == pytest.approx(1000 / 65535, rel=1e-6)


def test_32_bit_integer_outside_16_bit_range_is_an_error(tmp_path):
    path = _save(tmp_path / "wide.tif", Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))
    with pytest.raises(SsimaeError, match="wide.tif"):
        read_image(path)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.dstack([RGB8, np.zeros((12, 17), dtype=np.uint8)])  # fully transparent
    rgba[0, 0, 3] = 255
    array = read_image(_save(tmp_path / "x.png", Image.fromarray(rgba, mode="RGBA")))
    assert array.shape == (12, 17, 3)
    np.testing.assert_allclose(array, RGB8 / 255.0, atol=1e-6)  # colours kept, not blended with a background


def test_la_keeps_the_gray_channel(tmp_path):
    la = Image.merge("LA", [Image.fromarray(GRAY8), Image.fromarray(np.zeros_like(GRAY8))])
    array = read_image(_save(tmp_path / "x.png", la))
    assert array.shape == (12, 17, 1)
    np.testing.assert_allclose(array[:, :, 0], GRAY8 / 255.0, atol=1e-6)


def test_palette_image(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    array = read_image(_save(tmp_path / "x.png", image))
    assert array.shape == (2, 2, 3)
    np.testing.assert_array_equal(array[0, 0], [1, 0, 0])
    np.testing.assert_array_equal(array[0, 1], [0, 1, 0])
    np.testing.assert_array_equal(array[1, 0], [0, 0, 1])


def test_bilevel_image(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    array = read_image(_save(tmp_path / "x.png", Image.fromarray(bits).convert("1")))
    assert array.shape == (2, 3, 1)
    np.testing.assert_array_equal(array[:, :, 0], bits.astype(np.float32))


def test_float_tiff_in_unit_interval(tmp_path):
    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    array = read_image(_save(tmp_path / "x.tiff", Image.fromarray(values, mode="F")))
    np.testing.assert_array_equal(array[:, :, 0], values)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_float_tiff_is_an_error_naming_the_file(tmp_path, bad):
    values = np.array([[0.0, bad], [0.5, 1.0]], dtype=np.float32)
    path = _save(tmp_path / "nonfinite.tiff", Image.fromarray(values, mode="F"))
    with pytest.raises(SsimaeError, match="nonfinite.tiff") as info:
        read_image(path)
    assert "non-finite" in str(info.value)


def test_float_tiff_out_of_range_is_an_error(tmp_path):
    path = _save(tmp_path / "big.tiff", Image.fromarray(np.array([[0.0, 3.0]], dtype=np.float32), mode="F"))
    with pytest.raises(SsimaeError, match="big.tiff.*outside"):
        read_image(path)


def _truncated_png(tmp_path: Path) -> Path:
    data = _save(tmp_path / "full.png", Image.fromarray(RGB8)).read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def _file(name: str, content: bytes):
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return make


@pytest.mark.parametrize(
    "make",
    [
        _file("empty.png", b""),
        _truncated_png,
        _file("text.png", b"not an image at all\n"),
        _file("header.png", b"\x89PNG\r\n\x1a\n\x00\x00"),
        lambda d: d / "missing.png",
    ],
    ids=["zero-byte", "truncated", "text", "header-only", "missing"],
)
def test_unreadable_files_are_errors_naming_the_file(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(SsimaeError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


# --------------------------------------------------------------------------- colour and size


def test_to_color_gray_and_rgb():
    rgb = RGB8 / np.float32(255)
    gray = to_color(rgb, "gray")
    assert gray.shape == (12, 17, 1) and gray.dtype == np.float32
    pil_gray = np.asarray(Image.fromarray(RGB8).convert("L")) / 255.0  # same ITU-R 601 weights
    np.testing.assert_allclose(gray[:, :, 0], pil_gray, atol=1 / 255 + 1e-6)
    again = to_color(gray, "rgb")
    assert again.shape == (12, 17, 3)
    for c in range(3):
        np.testing.assert_array_equal(again[:, :, c], gray[:, :, 0])
    assert to_color(gray, "gray") is gray and to_color(rgb, "rgb") is rgb


@pytest.mark.parametrize(
    "spec, shape, expected",
    [
        ("50", (100, 200), (50, 100)),
        ("50", (200, 100), (100, 50)),
        ("64", (100, 150), (64, 96)),
        ("60x40", (100, 200), (40, 60)),  # WxH
        (None, (33, 44), (33, 44)),
    ],
)
def test_resize(spec, shape, expected):
    size = parse_image_size(spec)
    assert target_size(*shape, size) == expected
    image = np.full(shape + (1,), 0.4, dtype=np.float32)
    image[: shape[0] // 2] = 0.9
    out = resize_image(image, size)
    assert out.shape == expected + (1,) and out.dtype == np.float32
    assert out.min() >= 0.4 - 1e-6 and out.max() <= 0.9 + 1e-6
    assert out[0, 0, 0] == pytest.approx(0.9, abs=1e-5) and out[-1, -1, 0] == pytest.approx(0.4, abs=1e-5)


def test_load_image_converts_and_resizes(tmp_path):
    path = _save(tmp_path / "c.png", Image.fromarray(RGB8))
    array = load_image(path, "gray", parse_image_size("40x36"))
    assert array.shape == (36, 40, 1)
    assert load_image(path, "rgb").shape == (12, 17, 3)


def test_resize_map_back_to_original_size():
    amap = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert resize_map(amap, 3, 4) is amap
    big = resize_map(amap, 6, 8)
    assert big.shape == (6, 8) and big.min() >= 0 and big.max() <= 11


# --------------------------------------------------------------------------- discovery


def _tiny_png(path: Path, value: int = 128) -> Path:
    return _save(path, Image.fromarray(np.full((8, 8), value, dtype=np.uint8)))


def _mvtec_train(root: Path, count: int, validation: int = 0) -> Path:
    for i in range(count):
        _tiny_png(root / "train" / "good" / f"{i:03d}.png")
    for i in range(validation):
        _tiny_png(root / "validation" / "good" / f"v{i:03d}.png")
    return root


def test_training_images_holdout_is_seeded_disjoint_and_complete(tmp_path):
    root = _mvtec_train(tmp_path / "cat", 20)
    first = find_training_images(root, 0.25, seed=3)
    again = find_training_images(root, 0.25, seed=3)
    assert first == again
    assert len(first.validation) == 5 and len(first.train) == 15
    assert not set(first.train) & set(first.validation)
    assert sorted(first.train + first.validation) == sorted((root / "train" / "good").glob("*.png"))
    splits = {tuple(find_training_images(root, 0.25, seed=s).validation) for s in range(6)}
    assert len(splits) > 1  # the seed matters


@pytest.mark.parametrize("count, fraction, kept, held", [(2, 0.9, 1, 1), (1, 0.5, 1, 0), (6, 0.1, 5, 1), (6, 0.0, 6, 0)])
def test_holdout_keeps_at_least_one_training_image(tmp_path, count, fraction, kept, held):
    split = find_training_images(_mvtec_train(tmp_path / "cat", count), fraction, seed=0)
    assert (len(split.train), len(split.validation)) == (kept, held)


def test_validation_folder_is_used_when_present(tmp_path):
    root = _mvtec_train(tmp_path / "cat", 4, validation=2)
    split = find_training_images(root, 0.5, seed=0)
    assert len(split.train) == 4 and [p.name for p in split.validation] == ["v000.png", "v001.png"]


def test_plain_folder_is_searched_recursively(tmp_path):
    root = tmp_path / "plain"
    _tiny_png(root / "a.png")
    _tiny_png(root / "sub" / "deeper" / "b.BMP")
    _tiny_png(root / "sub" / "c.tif")
    (root / "notes.txt").write_text("not an image")
    _tiny_png(root / ".hidden.png")
    split = find_training_images(root, 0.0, seed=0)
    assert sorted(p.name for p in split.train) == ["a.png", "b.BMP", "c.tif"]
    assert split.validation == []


def test_mvtec_fixture_discovery(mvtec_root):
    split = find_training_images(mvtec_root, 0.1, seed=0)
    assert len(split.train) == 5 and len(split.validation) == 1
    assert all(p.parent == mvtec_root / "train" / "good" for p in split.train + split.validation)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda d: d / "nowhere", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no images"),
        (lambda d: (d / "cat" / "train" / "good").mkdir(parents=True) or d / "cat", "no images"),
        (lambda d: _tiny_png(d / "file.png"), "not a folder"),
        (lambda d: (d / "cat2" / "test").mkdir(parents=True) or d / "cat2", "train/good"),
    ],
    ids=["missing", "empty", "empty-train-good", "file", "mvtec-without-train"],
)
def test_training_folder_errors(tmp_path, make, pattern):
    path = make(tmp_path)
    with pytest.raises(SsimaeError, match=pattern) as info:
        find_training_images(path, 0.1, seed=0)
    assert path.name in str(info.value)


def test_find_test_items_pairs_masks(mvtec_root):
    items = find_test_items(mvtec_root)
    assert [(i.defect_type, i.path.name) for i in items] == [
        ("good", "000.png"), ("good", "001.png"), ("scratch", "000.png"), ("scratch", "001.png"),
    ]
    for item in items:
        if item.defect_type == "good":
            assert item.mask_path is None
        else:
            assert item.mask_path == mvtec_root / "ground_truth" / "scratch" / f"{item.path.stem}_mask.png"
            height, width = read_image(item.path).shape[:2]
            mask = load_mask(item.mask_path, (height, width))
            assert mask.dtype == bool and mask.shape == (height, width) and 0 < mask.sum() < mask.size


def test_missing_mask_is_an_error_naming_the_image(tmp_path):
    root = tmp_path / "cat"
    _tiny_png(root / "test" / "good" / "000.png")
    _tiny_png(root / "test" / "crack" / "000.png")
    _tiny_png(root / "test" / "crack" / "001.png")
    _tiny_png(root / "ground_truth" / "crack" / "000_mask.png", 255)
    with pytest.raises(SsimaeError, match=r"crack[/\\]001\.png") as info:
        find_test_items(root)
    assert "001_mask.png" in str(info.value)


def test_find_test_items_errors(tmp_path):
    with pytest.raises(SsimaeError, match="does not exist"):
        find_test_items(tmp_path / "nothere")
    with pytest.raises(SsimaeError, match="no test folder"):
        find_test_items(tmp_path)
    (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(SsimaeError, match="no test images"):
        find_test_items(tmp_path)


def _category_with_masks(root: Path, masks: list[np.ndarray]) -> list:
    _tiny_png(root / "test" / "good" / "000.png")
    for i, mask in enumerate(masks):
        _tiny_png(root / "test" / "crack" / f"{i:03d}.png")
        _save(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", Image.fromarray(mask))
    return find_test_items(root)


def test_the_ground_truth_is_checked_before_an_evaluation(tmp_path, caplog):
    blank, spot = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    spot[2:4, 2:4] = 255
    check_test_masks(_category_with_masks(tmp_path / "fine", [spot, spot]))
    assert caplog.records == []
    with pytest.raises(SsimaeError, match="none of the 2 ground-truth masks marks a defect pixel"):
        check_test_masks(_category_with_masks(tmp_path / "blank", [blank, blank]))
    check_test_masks(_category_with_masks(tmp_path / "some", [blank, spot]))
    assert "1 of 2 defect images have an empty mask" in caplog.text
    caplog.clear()
    check_test_masks(_category_with_masks(tmp_path / "inverted", [255 - spot, 255 - spot]))
    assert "are they inverted?" in caplog.text


def test_load_mask_size_mismatch_names_mask_and_sizes(tmp_path):
    path = _save(tmp_path / "m_mask.png", Image.fromarray(np.zeros((10, 12), dtype=np.uint8)))
    with pytest.raises(SsimaeError) as info:
        load_mask(path, (20, 30))
    message = str(info.value)
    assert str(path) in message and "12x10" in message and "30x20" in message


def test_a_colour_or_palette_mask_counts_every_channel(tmp_path):
    # Annotation tools often paint defects green or blue: a mask whose defect colour has no red.
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[1:3, 2:5] = (0, 255, 0)
    rgb[4, 6] = (0, 0, 128)
    palette = Image.fromarray(np.where(rgb.any(axis=2), 1, 0).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    expected = rgb.any(axis=2)
    for name, image in [("rgb_mask.png", Image.fromarray(rgb)), ("p_mask.png", palette)]:
        mask = load_mask(_save(tmp_path / name, image), (6, 8))
        assert mask.dtype == bool and np.array_equal(mask, expected), name


# --------------------------------------------------------------------------- patch sampling


def _images():
    rng = np.random.default_rng(1)
    return [rng.random((h, w, 1), dtype=np.float32) for h, w in [(20, 24), (13, 30), (16, 16)]]


def _dihedral(patch: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        r = np.rot90(patch, k)
        out += [r, r[:, ::-1], r[::-1, :], r[::-1, ::-1]]
    return out


def _is_crop(patch: np.ndarray, images, transforms=lambda p: [p]) -> bool:
    size = patch.shape[0]
    for image in images:
        for y, x in itertools.product(range(image.shape[0] - size + 1), range(image.shape[1] - size + 1)):
            crop = image[y : y + size, x : x + size, 0]
            if any(np.array_equal(crop, t) for t in transforms(patch)):
                return True
    return False


@pytest.mark.parametrize("rotate, flip", [("none", False), ("none", True), ("90", False), ("90", True)])
def test_patches_are_crops_up_to_the_allowed_transforms(rotate, flip):
    images = _images()
    batch = sample_patches(images, 12, 8, np.random.default_rng(2), rotate=rotate, flip=flip)
    assert batch.shape == (12, 1, 8, 8) and batch.dtype == torch.float32
    transforms = (lambda p: [p]) if (rotate, flip) == ("none", False) else _dihedral
    for patch in batch[:, 0].numpy():
        assert _is_crop(patch, images, transforms)
    if (rotate, flip) != ("none", False):  # some patches are really transformed
        assert not all(_is_crop(p, images) for p in batch[:, 0].numpy())


def test_rotate_any_shapes_and_range():
    images = [np.random.default_rng(3).random((60, 70, 3), dtype=np.float32), np.full((50, 50, 3), 0.5, np.float32)]
    batch = sample_patches(images, 6, 32, np.random.default_rng(4), rotate="any", flip=True)
    assert batch.shape == (6, 3, 32, 32)
    assert float(batch.min()) >= 0 and float(batch.max()) <= 1
    flat = sample_patches([images[1]], 3, 32, np.random.default_rng(5), rotate="any")
    torch.testing.assert_close(flat, torch.full((3, 3, 32, 32), 0.5))  # rotation adds no border artefacts


@pytest.mark.parametrize("rotate", ["none", "90", "any"])
def test_images_smaller_than_the_crop_and_of_varying_sizes(rotate):
    rng = np.random.default_rng(6)
    images = [rng.random((h, w, 1), dtype=np.float32) for h, w in [(100, 90), (140, 150), (128, 200)]]
    batch = sample_patches(images, 4, 128, np.random.default_rng(7), rotate=rotate)
    assert batch.shape == (4, 1, 128, 128)
    assert float(batch.min()) >= 0 and float(batch.max()) <= 1 and torch.isfinite(batch).all()


@pytest.mark.parametrize("rotate", ["none", "90", "any"])
def test_sampling_is_deterministic_for_a_seeded_rng(rotate):
    images = _images()
    a = sample_patches(images, 5, 8, np.random.default_rng(8), rotate=rotate)
    b = sample_patches(images, 5, 8, np.random.default_rng(8), rotate=rotate)
    c = sample_patches(images, 5, 8, np.random.default_rng(9), rotate=rotate)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_images_are_drawn_in_proportion_to_their_area():
    small = np.zeros((10, 10, 1), dtype=np.float32)  # area 100
    large = np.ones((20, 20, 1), dtype=np.float32)  # area 400
    batch = sample_patches([small, large], 2000, 4, np.random.default_rng(10), rotate="none", flip=False)
    share = float(batch[:, 0, 0, 0].mean())
    assert share == pytest.approx(0.8, abs=0.04)


def test_a_32_bit_image_of_8_bit_values_is_read_as_16_bit_with_a_warning(tmp_path, caplog, monkeypatch):
    import ssimae.data

    monkeypatch.setattr(ssimae.data, "_warned", set())
    path = _save(tmp_path / "i32.tif", Image.fromarray(np.full((6, 6), 150, np.int32), mode="I"))
    assert read_image(path).max() == pytest.approx(150 / 65535)
    assert "holds values up to 150 only" in caplog.text


def test_an_empty_validation_folder_falls_back_to_the_holdout(tmp_path, caplog):
    root = _mvtec_train(tmp_path / "cat", 10)
    (root / "validation" / "good").mkdir(parents=True)
    split = find_training_images(root, 0.2, seed=0)
    assert len(split.validation) == 2 and len(split.train) == 8
    assert "has no images" in caplog.text
