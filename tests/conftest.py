"""Shared fixtures and synthetic data: a tiny on-disk MVTec-layout category, a tiny trained checkpoint,
and the one texture generator every test draws its images from.

The fixtures are session-scoped: built once, reused read-only by every test that needs them.
Tests that write must copy or write to their own tmp_path.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ssimae.config import Config

# The test machine's 2 cores are shared: with 2 intra-op threads each torch op waits on a busy
# sibling thread, and the training tests ran 10-20x slower than with one.
torch.set_num_threads(1)

# (height, width) per image: sizes differ per image, all a little above the 128 patch.
TRAIN_SIZES = [(140, 150), (150, 140), (160, 170), (145, 165), (170, 155), (155, 160)]
GOOD_TEST_SIZES = [(144, 152), (150, 150)]
DEFECT_TEST_SIZES = [(148, 160), (160, 142)]


def texture(height: int, width: int, rng: np.random.Generator, period: float = 12.0, level: float = 0.5) -> np.ndarray:
    """A gray (H, W) float32 texture in (0, 1): a random-phase oblique grating plus noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    base = level + 0.2 * np.sin(2 * np.pi * (x + 0.5 * y) / period + phase)
    base += 0.05 * rng.standard_normal((height, width))
    return np.clip(base, 0.02, 0.98).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def texture_png(height: int, width: int, rng: np.random.Generator, **kwargs) -> np.ndarray:
    """texture() as 8-bit pixels, as saved to disk."""
    return to_uint8(texture(height, width, rng, **kwargs))


def texture_batch(count: int, channels: int = 1, size: int | tuple[int, int] = 128, seed: int = 0) -> torch.Tensor:
    """(count, channels, H, W) float32 patches of texture(), each with its own phase and level."""
    rng = np.random.default_rng(seed)
    height, width = (size, size) if isinstance(size, int) else size
    patches = [[texture(height, width, rng, period=8 + k, level=0.3 + 0.4 * (k % 2)) for _ in range(channels)]
               for k in range(count)]
    return torch.from_numpy(np.array(patches, dtype=np.float32))


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_good_folder(folder: Path, count: int = 3, size: tuple[int, int] = (140, 150), seed: int = 0) -> Path:
    """A plain folder of gray textured PNGs, good_<i>.png."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        write_png(folder / f"good_{i}.png", texture_png(*size, rng))
    return folder


def build_mvtec(root: Path, seed: int = 0, train_sizes=TRAIN_SIZES, good_sizes=GOOD_TEST_SIZES,
                defect_sizes=DEFECT_TEST_SIZES, defect: str = "scratch") -> Path:
    """train/good, test/good, test/<defect> (bright 3-px lines) and ground_truth/<defect> masks."""
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(train_sizes):
        write_png(root / "train" / "good" / f"{i:03d}.png", texture_png(h, w, rng))
    for i, (h, w) in enumerate(good_sizes):
        write_png(root / "test" / "good" / f"{i:03d}.png", texture_png(h, w, rng))
    for i, (h, w) in enumerate(defect_sizes):
        image = texture_png(h, w, rng)
        mask = np.zeros((h, w), dtype=np.uint8)
        row = 30 + 20 * i
        image[row : row + 3, 20 : w - 20] = 255
        mask[row : row + 3, 20 : w - 20] = 255
        write_png(root / "test" / defect / f"{i:03d}.png", image)
        write_png(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


def tiny_config(**overrides) -> Config:
    """Settings for a seconds-long CPU training: 2 steps of 4 patches, small latent, coarse stride, and
    no L2 warm-up, so that the steps train with the method's own loss."""
    values = dict(max_steps=2, batch_size=4, patches_per_epoch=8, latent_dim=8, infer_batch_size=8, stride=64,
                  device="cpu", l2_warmup_steps=0)
    values.update(overrides)
    return Config(**values)


# Flags equivalent to tiny_config() for `ssimae train`.
TINY_FLAGS = ["--max-steps", "2", "--batch-size", "4", "--patches-per-epoch", "8", "--latent-dim", "8",
              "--infer-batch-size", "8", "--stride", "64", "--device", "cpu", "--l2-warmup-steps", "0", "--quiet"]


def tmp_files(folder: Path) -> list[Path]:
    """Leftover temp files of atomic writes under a folder."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def restore_logging():
    """cli.main() points the 'ssimae' logger at the test's captured stderr; undo that afterwards."""
    import logging

    logger = logging.getLogger("ssimae")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(scope="session", autouse=True)
def _few_validation_patches():
    """Training computes a validation loss on 256 fixed patches per epoch: seconds of CPU per fit
    on this shared machine. 16 exercise the same code."""
    import ssimae.train

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ssimae.train, "VALIDATION_PATCHES", 16, raising=False)
        yield


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    """A read-only tiny MVTec AD category on disk."""
    return build_mvtec(tmp_path_factory.mktemp("mvtec") / "tiny")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mvtec_root) -> Path:
    """A run folder with a tiny trained ssim-ae checkpoint (2 steps); do not write into it."""
    from ssimae.train import fit

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    fit(tiny_config(), mvtec_root, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def checkpoint_path(trained_run) -> Path:
    return trained_run / "checkpoint.pt"


class FakeResNet(nn.Module):
    """Child layout of torchvision's ResNet, tiny, to test the torchvision paths without torchvision."""

    def __init__(self, weights=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Conv2d(4, 4, 3, 1, 1)
        self.layer2 = nn.Conv2d(4, 8, 3, 2, 1)
        self.layer3 = nn.Conv2d(8, 8, 3, 2, 1)
        self.layer4 = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 10)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """torchvision.models.resnet18 and wide_resnet50_2 are FakeResNet for the test."""
    fake = types.ModuleType("torchvision")
    fake.models = types.ModuleType("torchvision.models")
    fake.models.resnet18 = fake.models.wide_resnet50_2 = FakeResNet
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    return fake
