"""Images on disk -> float arrays; dataset discovery; training patch sampling.

Images are (H, W, C) float32 arrays in [0, 1] with C = 1 (gray) or 3 (RGB) throughout the package.
Layouts understood:
  MVTec AD category: train/good, optional validation/good, test/<defect>/<stem>.<ext>,
                     ground_truth/<defect>/<stem>_mask.png (good test images have no mask)
  plain folder:      any folder of images (searched recursively), defect-free, for training;
                     a file or folder (recursive) for prediction
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import SsimaeError

log = logging.getLogger(__name__)
_warned: set[str] = set()  # warnings given once per process

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Images larger than this are refused before decoding (a file whose header claims 30000x30000 would
# need 3.6 GB as float32 gray); Config.max_image_pixels raises it. It replaces Pillow's own
# decompression-bomb check, which would otherwise stop any image over 179 MP with a traceback.
DEFAULT_MAX_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = None
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's convert("L")


# --------------------------------------------------------------------------- image files


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file as float32 (H, W, C) in [0, 1], C = 1 or 3; alpha is dropped.

    8-bit, 16-bit and float images; gray, gray+alpha, RGB, RGBA, palette and bilevel modes. An image
    of more than `max_pixels` pixels is refused from its header, before any decoding.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise SsimaeError(f"image {path} is a broken link (to {os.readlink(path)}); fix or remove it")
    if not path.is_file():
        raise SsimaeError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise SsimaeError(f"image {path} is an empty (zero-byte) file; replace or remove it")
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise SsimaeError(
                    f"image {path} is {image.width}x{image.height} = {image.width * image.height:,} pixels, more than "
                    f"the limit of {max_pixels:,} (a guard against decompression bombs); if the image is genuine, "
                    "raise the limit with --max-image-pixels"
                )
            image.load()
            array = _pil_to_array(image, path)
    except SsimaeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise SsimaeError(f"cannot read image {path}: {error}; replace or remove the file") from None
    if not np.isfinite(array).all():
        raise SsimaeError(f"image {path} has non-finite pixel values (NaN or inf); fix or remove the file")
    return array


def image_pixels(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Width x height of an image file, from its header where Pillow can read one (read_image's size)."""
    size = header_size(path)
    if size is None:  # read_image names what is wrong with the file, or reads what the header did not tell
        size = read_image(path, max_pixels).shape[:2]
    return size[0] * size[1]


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(H, W) of an image file from its header, without decoding; None where Pillow cannot tell
    (read_image then names what is wrong when the image is read)."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except Exception:
        return None


def _pil_to_array(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGBA" if mode in ("P", "PA") else ("L" if mode == "1" else "RGB"))
        mode = image.mode
    if mode == "LA":
        image, mode = image.getchannel("L"), "L"
    if mode == "RGBA":
        image, mode = image.convert("RGB"), "RGB"
    array = np.asarray(image)
    if mode in ("L", "RGB"):
        array = array.astype(np.float32) / 255.0
    elif mode.startswith("I;16") or mode == "I":
        if array.size and (array.min() < 0 or array.max() > 65535):  # mode I is also 32-bit signed
            raise SsimaeError(
                f"integer image {path} has values in [{array.min()}, {array.max()}], outside the 16-bit range "
                "0..65535; save it as 8/16-bit or as float in [0, 1]"
            )
        if mode == "I" and array.size and array.max() <= 255 and "8-bit values" not in _warned:
            _warned.add("8-bit values")  # once per process: a folder of such images would repeat it
            log.warning("integer image %s holds values up to %d only, and is read as 16-bit (0..65535), so it looks "
                        "almost black; if it is an 8-bit image stored as 32-bit, save it as 8-bit", path, array.max())
        array = array.astype(np.float32) / 65535.0
    elif mode == "F":
        array = array.astype(np.float32)
        if np.isfinite(array).all() and (array.min() < 0 or array.max() > 1):
            raise SsimaeError(
                f"float image {path} has values in [{array.min():.3g}, {array.max():.3g}], outside [0, 1]; "
                "rescale it to [0, 1] or save it as 8/16-bit"
            )
    else:
        raise SsimaeError(f"image {path} has an unsupported mode {mode}; save it as 8-bit gray or RGB")
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W, 1)
    return np.ascontiguousarray(array, dtype=np.float32)


def to_color(array: np.ndarray, color: str) -> np.ndarray:
    """(H, W, C) -> (H, W, 1) for 'gray' (luma) or (H, W, 3) for 'rgb' (gray repeated)."""
    channels = array.shape[2]
    if color == "gray":
        return array if channels == 1 else (array @ GRAY_WEIGHTS)[:, :, None].astype(np.float32)
    return array if channels == 3 else np.repeat(array, 3, axis=2)


def load_image(path: str | os.PathLike, color: str, image_size=None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """read_image + colour conversion + optional resize, (H, W, C) float32."""
    return resize_image(to_color(read_image(path, max_pixels), color), image_size)


def working_image(array: np.ndarray, config) -> np.ndarray:
    """An (H, W, C) image as read -> what the methods see: the configured colour, working size and
    input_normalization (a Config's color, resize, input_normalization, input_mean and input_sd)."""
    resized = resize_image(to_color(array, config.color), config.resize)
    return normalize_brightness(resized, config.input_normalization, config.input_mean, config.input_sd)


def load_working(path: str | os.PathLike, config) -> np.ndarray:
    """read_image + working_image."""
    return working_image(read_image(path, config.max_image_pixels), config)


def target_size(height: int, width: int, image_size) -> tuple[int, int]:
    """(height, width) after resizing by a parsed image-size spec (None, shorter side, or (W, H))."""
    if image_size is None:
        return height, width
    if isinstance(image_size, tuple):
        return image_size[1], image_size[0]
    scale = image_size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_array(array: np.ndarray, height: int, width: int, antialias: bool = True) -> np.ndarray:
    """Bilinear resize of an (H, W) or (H, W, C) float array (antialiased when shrinking, if asked)."""
    if array.shape[:2] == (height, width):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor[None, None] if array.ndim == 2 else tensor.permute(2, 0, 1)[None]  # (1, C, H, W)
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)[0]
    return (resized[0] if array.ndim == 2 else resized.permute(1, 2, 0)).contiguous().numpy()


def resize_image(array: np.ndarray, image_size) -> np.ndarray:
    """An (H, W, C) image resized by a parsed image-size spec (None keeps it), values kept in [0, 1]."""
    height, width = target_size(array.shape[0], array.shape[1], image_size)
    if (height, width) == array.shape[:2]:
        return array
    return np.clip(resize_array(array, height, width), 0, 1)


# How input_normalization moves each working image's intensities (all channels together, so colours keep their
# balance) before any method sees it: lighting that varies from image to image otherwise reaches the features
# as if it were content. Measured in bench/README.md ("Each image's brightness"): on magnetic_tile "standardize"
# raised every PatchCore figure; on PIPED, where one large impurity sets its image's mean and deviation, it lost,
# and "background" (a level that defects barely move) lifted PA_GLA01_TL above the blur floor but lost on
# PA_BRG03_TL, whose defect-free test images are darker than its training images.
_FLAT = 1e-6  # a deviation below this is a flat image: it is moved, not stretched


_BACKGROUND_STEPS = 3  # background_level's trimming rounds: a fourth moved the level by at most 3e-5 on PIPED's
# test images and 1.1e-4 on magnetic_tile's (intensities in [0, 1]); 35 ms for a 1024x1024 image on one core
_BACKGROUND_WIDTH = 2.0  # ... and the pixels it keeps: within this many robust deviations of the level


def background_level(array: np.ndarray) -> float:
    """The intensity most of an image's pixels lie around: the median, then, three times over, the median of the
    pixels within two robust deviations (1.4826 x the median absolute deviation) of it. A defect moves it far
    less than it moves the mean or even the median: on the defective test images of PA_GLA01_TL the level was off
    by 0.0011 from that of the defect-free pixels alone (the mean by 0.0156, the median by 0.0046), on PA_BRG03_TL,
    whose impurities cover up to 23% of an image, by 0.0046 (0.0131, 0.0074)."""
    values = array.ravel()
    level = float(np.median(values))
    for _ in range(_BACKGROUND_STEPS):
        distance = np.abs(values - np.float32(level))
        width = _BACKGROUND_WIDTH * 1.4826 * float(np.median(distance))
        level = float(np.median(values[distance <= width]))  # never empty: half the pixels lie within one deviation
    return level


def image_level(array: np.ndarray, how: str) -> float:
    """The intensity input_normalization moves: background_level for "background", the mean otherwise."""
    return background_level(array) if how == "background" else float(array.mean())


def brightness_targets(images, how: str = "mean") -> tuple[float, float]:
    """The level and deviation working images are moved onto: the averages, over the training images, of each
    one's own level (image_level) and deviation (an image is weighed alike whatever its size)."""
    stats = np.array([(image_level(image, how), float(image.std())) for image in images], dtype=np.float64)
    if not len(stats):
        raise SsimaeError("no training images to measure input_normalization's targets on")
    return float(stats[:, 0].mean()), float(stats[:, 1].mean())


def normalize_brightness(array: np.ndarray, how: str, mean: float | None, sd: float | None) -> np.ndarray:
    """An (H, W, C) image with its mean moved onto `mean` ("mean"), and its deviation scaled to `sd` too
    ("standardize"); "none" returns it as it is. Values are clipped to [0, 1], as every image here is."""
    if how == "none":
        return array
    if mean is None or (how == "standardize" and sd is None):
        raise SsimaeError(f"input_normalization {how!r} has no targets: they are measured when fitting; refit, or "
                          "set input_mean (and input_sd)")
    moved = array - np.float32(image_level(array, how))
    if how == "standardize":
        deviation = float(array.std())
        if deviation > _FLAT:
            moved *= np.float32(sd / deviation)
    return np.clip(moved + np.float32(mean), 0, 1).astype(np.float32, copy=False)


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D anomaly map back to an image's original size. Not antialiased: the maps are
    smoothed before, and on PIPED (PatchCore's maps shrunk 8x) antialiasing blurred the small impurities further,
    so pixel F1 at the default threshold fell on 11 of 12 types for +0.002 AU-PRO on average (bench/README.md)."""
    return resize_array(anomaly_map, height, width, antialias=False)


def read_mask(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask file as bool (H, W); nonzero in any channel = defect (a colour mask's defect may
    have no red)."""
    return (read_image(path, max_pixels) > 0).any(axis=2)


def load_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask (read_mask) that must match its image's (H, W)."""
    mask = read_mask(path, max(DEFAULT_MAX_PIXELS, shape[0] * shape[1]))
    check_mask_size(path, mask.shape, shape)
    return mask


def check_mask_size(path: str | os.PathLike, mask_shape: tuple[int, int], image_shape: tuple[int, int]) -> None:
    """A mask of another (H, W) than its image's is a SsimaeError naming the mask."""
    if tuple(mask_shape) != tuple(image_shape):
        raise SsimaeError(
            f"mask {path} is {mask_shape[1]}x{mask_shape[0]} but its image is {image_shape[1]}x{image_shape[0]} "
            "(WxH); masks must have their image's size"
        )


def pad_to_min_size(array: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (H, W, C) at the bottom/right so both sides are at least `size`."""
    pad_h, pad_w = max(0, size - array.shape[0]), max(0, size - array.shape[1])
    if not pad_h and not pad_w:
        return array
    return np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")


# --------------------------------------------------------------------------- dataset discovery


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under a folder, recursively, sorted; hidden files skipped. A broken link with an image's
    name is listed too, so that reading it reports it instead of the file silently missing."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink() and not p.exists())
        and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def is_mvtec_category(root: str | os.PathLike) -> bool:
    return (Path(root) / "train" / "good").is_dir() or (Path(root) / "test").is_dir()


class TrainingImages(NamedTuple):
    train: list[Path]
    validation: list[Path]
    root: Path | None = None  # the folder they were found in, resolved


def find_training_images(root: str | os.PathLike, val_fraction: float, seed: int) -> TrainingImages:
    """Defect-free images for training and validation from an MVTec category or a plain folder."""
    root = Path(root)
    if not root.exists():
        raise SsimaeError(f"training data {root} does not exist; pass an MVTec category folder or a folder of good images")
    if not root.is_dir():
        raise SsimaeError(f"training data {root} is not a folder; pass an MVTec category folder or a folder of good images")
    if is_mvtec_category(root):
        good = root / "train" / "good"
        if not good.is_dir():
            raise SsimaeError(f"{root} looks like an MVTec category but has no train/good folder")
        train = list_images(good)
        where = good
        validation = list_images(root / "validation" / "good") if (root / "validation" / "good").is_dir() else None
        if validation == []:
            log.warning("%s has no images: the validation images are held out of train/good instead (--val-fraction)",
                        root / "validation" / "good")
            validation = None
    else:
        train, where, validation = list_images(root), root, None
    if not train:
        raise SsimaeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}; add defect-free images there")
    if validation is None:
        train, validation = split_holdout(train, val_fraction, seed)
    return TrainingImages(train, validation, root.resolve())


def split_holdout(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded random split into (kept, held out); at least one image is kept for training."""
    count = min(len(paths) - 1, round(len(paths) * fraction)) if fraction > 0 else 0
    if count <= 0:
        return list(paths), []
    order = np.random.default_rng(seed).permutation(len(paths))
    held = set(order[:count].tolist())
    return [p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held]


class TestItem(NamedTuple):
    path: Path
    defect_type: str  # "good" or the defect folder name
    mask_path: Path | None  # None for good images: an all-zero mask


def find_test_items(root: str | os.PathLike) -> list[TestItem]:
    """Labelled test images of an MVTec category: test/<defect>/*, masks in ground_truth/<defect>/."""
    root = Path(root)
    test = root / "test"
    if not root.is_dir():
        raise SsimaeError(f"data set {root} does not exist or is not a folder; pass an MVTec category folder")
    if not test.is_dir():
        raise SsimaeError(f"{root} has no test folder; evaluation needs the MVTec layout test/<defect>/<image>")
    items: list[TestItem] = []
    for defect_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        for path in list_images(defect_dir):
            if defect_dir.name == "good":
                items.append(TestItem(path, "good", None))
                continue
            relative = path.relative_to(defect_dir).with_suffix("")
            mask = root / "ground_truth" / defect_dir.name / relative.parent / f"{relative.name}_mask.png"
            if not mask.is_file():
                raise SsimaeError(f"test image {path} has no mask {mask}; add it (MVTec layout) or move the image")
            items.append(TestItem(path, defect_dir.name, mask))
    if not items:
        raise SsimaeError(f"no test images found under {test}")
    return items


def check_test_masks(items: list[TestItem], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The ground truth before an evaluation: an error when no mask marks a defect pixel (the metrics
    would all be undefined), a warning when defect images have empty masks (their image label comes from
    the mask, so they count as good) or when the masks mark most of their images (inverted masks)."""
    defective = [item for item in items if item.mask_path is not None]
    if not defective:
        log.warning("the test split has only good images: pixel AUROC, AU-PRO and image AUROC need defect images "
                    "(test/<defect>/ with masks in ground_truth/<defect>/) and are n/a; the false alarms on good "
                    "images are measured")
        return
    empty, coverage = [], []
    for item in defective:
        mask = read_mask(item.mask_path, max_pixels)
        size = header_size(item.path)
        if size is not None:  # found now, not after a training
            check_mask_size(item.mask_path, mask.shape, size)
        coverage.append(float(mask.mean()))
        if not mask.any():
            empty.append(item.mask_path)
    if len(empty) == len(defective):
        raise SsimaeError(f"none of the {len(defective)} ground-truth masks marks a defect pixel (e.g. {empty[0]}); "
                          "a mask is nonzero (white) where the defect is and zero elsewhere")
    if empty:
        log.warning("%d of %d defect images have an empty mask (e.g. %s): they count as good images in the image "
                    "metrics; a mask is nonzero (white) where the defect is", len(empty), len(defective), empty[0])
    if np.mean(coverage) > 0.5:
        log.warning("the ground-truth masks mark %.0f%% of their images as defect on average: are they inverted? "
                    "A mask is nonzero (white) where the defect is and zero elsewhere", 100 * np.mean(coverage))


# --------------------------------------------------------------------------- training patches


def sample_patches(
    images: list[np.ndarray],
    count: int,
    patch_size: int,
    rng: np.random.Generator,
    rotate: str = "any",
    flip: bool = True,
) -> torch.Tensor:
    """`count` random crops, (count, C, P, P) float32, from images of any sizes (each >= the crop).

    Images are drawn with probability proportional to their area, so every pixel is equally likely.
    rotate='any' crops a square large enough to hold the patch at any angle, rotates it by a
    uniform random angle (bilinear) and keeps the centre; rotate='90' uses multiples of 90 degrees.
    """
    crop = math.ceil(patch_size * math.sqrt(2)) + 2 if rotate == "any" else patch_size
    areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
    choice = rng.choice(len(images), size=count, p=areas / areas.sum())
    crops = []
    for index in choice:
        image = images[index]
        if image.shape[0] < crop or image.shape[1] < crop:
            image = pad_to_min_size(image, crop)
        top = rng.integers(0, image.shape[0] - crop + 1)
        left = rng.integers(0, image.shape[1] - crop + 1)
        crops.append(image[top : top + crop, left : left + crop])
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()  # (N, C, crop, crop)
    if rotate == "any":
        batch = _rotate_and_center_crop(batch, rng.uniform(0, 2 * math.pi, size=count), patch_size)
    elif rotate == "90":
        turns = rng.integers(0, 4, size=count)
        batch = torch.stack([torch.rot90(p, int(k), dims=(1, 2)) for p, k in zip(batch, turns)])
    if flip:
        flip_h = torch.from_numpy(rng.random(count) < 0.5)
        flip_v = torch.from_numpy(rng.random(count) < 0.5)
        batch[flip_h] = batch[flip_h].flip(3)
        batch[flip_v] = batch[flip_v].flip(2)
    return batch.contiguous()


def _rotate_and_center_crop(batch: torch.Tensor, angles: np.ndarray, patch_size: int) -> torch.Tensor:
    """Rotate each (C, S, S) crop about its centre and keep the central P x P, (N, C, P, P)."""
    n, _, size, _ = batch.shape
    cos, sin = torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()
    scale = patch_size / size  # the output grid covers only the central P x P of the crop
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * scale, -sin * scale
    theta[:, 1, 0], theta[:, 1, 1] = sin * scale, cos * scale
    grid = F.affine_grid(theta, (n, batch.shape[1], patch_size, patch_size), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
