"""The device-side patch sampler draws from the same distribution as data.sample_patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from ssimae.data import sample_patches
from ssimae.sampling import PatchSampler

PATCH = 32


def _ramps() -> list[np.ndarray]:
    """Images of different sizes and levels, each a ramp along x: a patch's mean tells which image
    and where it came from, its mean gradient tells how it was rotated and flipped."""
    shapes, levels = [(60, 90), (120, 70), (200, 150)], [0.1, 0.4, 0.7]
    images = []
    for (h, w), level in zip(shapes, levels):
        x = np.arange(w, dtype=np.float32)[None, :].repeat(h, 0)
        images.append((level + 0.001 * x)[:, :, None])
    return images


def _features(patches: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(patch means, angles of the mean gradient) of (N, 1, P, P) patches."""
    p = patches[:, 0].double().numpy()
    gy, gx = np.diff(p, axis=1).mean(axis=(1, 2)), np.diff(p, axis=2).mean(axis=(1, 2))
    return p.mean(axis=(1, 2)), np.arctan2(gy, gx)


@pytest.mark.parametrize("rotate", ["any", "90", "none"])
@pytest.mark.parametrize("flip", [True, False])
def test_same_distribution_as_the_numpy_sampler(rotate, flip):
    images = _ramps()
    reference = sample_patches(images, 3000, PATCH, np.random.default_rng(0), rotate, flip)
    sampler = PatchSampler(images, PATCH, rotate, flip)
    ours = sampler.sample(3000, sampler.generator(1))
    assert ours.shape == reference.shape == (3000, 1, PATCH, PATCH) and ours.dtype == torch.float32
    (mean_a, angle_a), (mean_b, angle_b) = _features(reference), _features(ours)
    # Image choice by area and crop position: the distribution of patch means.
    assert stats.ks_2samp(mean_a, mean_b).pvalue > 1e-3
    # Rotation and flips: the distribution of gradient directions.
    assert stats.ks_2samp(angle_a, angle_b).pvalue > 1e-3
    if rotate != "any":  # whole-pixel reads: every patch is an exact (turned, flipped) crop
        values = set(np.round(np.concatenate([im.ravel() for im in images]), 6))
        assert set(np.round(ours.numpy().ravel(), 6)) <= values


def test_seeded_generators_repeat_and_differ():
    sampler = PatchSampler(_ramps(), PATCH, "any", True)
    a = sampler.sample(8, sampler.generator(0, 0, 5))
    assert torch.equal(a, sampler.sample(8, sampler.generator(0, 0, 5)))
    assert not torch.equal(a, sampler.sample(8, sampler.generator(0, 1, 5)))  # another rank: other patches


def test_small_images_are_padded_like_the_numpy_sampler():
    images = [np.random.default_rng(0).random((20, 25, 3), dtype=np.float32)]  # smaller than any crop
    sampler = PatchSampler(images, PATCH, "any", True)
    patches = sampler.sample(4, sampler.generator(0))
    assert patches.shape == (4, 3, PATCH, PATCH)
    assert 0 <= float(patches.min()) and float(patches.max()) <= 1
