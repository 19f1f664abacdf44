"""Random training patches drawn on the training device from images uploaded once.

The images (each reflect-padded to at least the crop size, as data.sample_patches does) live in one
flat buffer per channel, (C, total pixels), with each image's offset, height and width. A batch is
one gather from that buffer: for every output pixel the source position is computed from the
patch's image, crop corner, rotation angle and flips, and read with bilinear interpolation
(rotate='any') or directly (rotate 'none' and '90', whose positions are whole pixels). A ragged
buffer instead of grid_sample over a padded stack: images of different sizes (magnetic_tile: 100 to
600 px a side) would waste most of a padded stack.

The distribution is that of data.sample_patches: images drawn in proportion to their area (every
pixel equally likely), a uniform crop position, a uniform angle in [0, 2 pi) about the crop's
centre ('any'; the crop side ceil(P sqrt 2) + 2 holds the patch at any angle) or a uniform multiple
of 90 degrees, and independent horizontal and vertical flips. tests/test_sampling.py compares the
statistics of both.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data import pad_to_min_size


def crop_side(patch_size: int, rotate: str) -> int:
    """Side of the square cut before rotation: large enough to hold the patch at any angle."""
    return math.ceil(patch_size * math.sqrt(2)) + 2 if rotate == "any" else patch_size


class PatchSampler:
    def __init__(self, images: list[np.ndarray], patch_size: int, rotate: str = "any", flip: bool = True,
                 device: torch.device | str = "cpu"):
        self.patch, self.rotate, self.flip = patch_size, rotate, flip
        self.device = torch.device(device)
        self.crop = crop_side(patch_size, rotate)
        padded = [pad_to_min_size(image, self.crop) for image in images]
        self.channels = padded[0].shape[2]
        # (C, total pixels): every image row-major after the previous one
        self.pixels = torch.cat([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).reshape(self.channels, -1)
                                 for im in padded], dim=1).to(self.device)
        heights = torch.tensor([im.shape[0] for im in padded], dtype=torch.int64)
        widths = torch.tensor([im.shape[1] for im in padded], dtype=torch.int64)
        offsets = torch.cumsum(heights * widths, 0) - heights * widths
        self.heights, self.widths, self.offsets = heights.to(self.device), widths.to(self.device), offsets.to(self.device)
        self.weights = (heights * widths).double().to(self.device)  # draw images by area
        steps = torch.arange(patch_size, dtype=torch.float32, device=self.device) - (patch_size - 1) / 2
        self.grid_y, self.grid_x = torch.meshgrid(steps, steps, indexing="ij")  # (P, P) offsets from the centre

    def generator(self, *seed: int) -> torch.Generator:
        """A generator on the sampler's device, seeded from integers (e.g. seed, rank, epoch)."""
        mixed = int(np.random.SeedSequence(list(seed)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        return torch.Generator(device=self.device).manual_seed(mixed)

    def _uniform(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(count, generator=generator, device=self.device)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` random patches, (count, C, P, P) float32 on the sampler's device."""
        index = torch.multinomial(self.weights, count, replacement=True, generator=generator)  # (N,)
        height, width, offset = self.heights[index], self.widths[index], self.offsets[index]
        top = (self._uniform(count, generator) * (height - self.crop + 1)).floor()  # (N,)
        left = (self._uniform(count, generator) * (width - self.crop + 1)).floor()
        if self.rotate == "any":
            angle = self._uniform(count, generator) * (2 * math.pi)
        elif self.rotate == "90":
            angle = torch.randint(0, 4, (count,), generator=generator, device=self.device).float() * (math.pi / 2)
        else:
            angle = torch.zeros(count, device=self.device)
        sign_x = sign_y = torch.ones(count, device=self.device)
        if self.flip:
            sign_x = torch.where(self._uniform(count, generator) < 0.5, -1.0, 1.0)
            sign_y = torch.where(self._uniform(count, generator) < 0.5, -1.0, 1.0)
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]  # (N, 1, 1)
        dy = self.grid_y[None] * sign_y[:, None, None]  # (N, P, P) flipped offsets, then rotated
        dx = self.grid_x[None] * sign_x[:, None, None]
        centre = (self.crop - 1) / 2
        y = top[:, None, None] + centre + sin * dx + cos * dy  # (N, P, P) source rows in the image
        x = left[:, None, None] + centre + cos * dx - sin * dy
        h, w, base = height[:, None, None], width[:, None, None], offset[:, None, None]
        if self.rotate != "any":  # whole pixels (up to float rounding): read them directly
            rows, cols = y.round().long().clamp(min=0).minimum(h - 1), x.round().long().clamp(min=0).minimum(w - 1)
            return self._read(base + rows * w + cols)
        y0, x0 = y.floor(), x.floor()
        fy, fx = (y - y0)[:, None], (x - x0)[:, None]  # (N, 1, P, P) interpolation weights
        r0, c0 = y0.long().clamp(min=0).minimum(h - 1), x0.long().clamp(min=0).minimum(w - 1)
        r1, c1 = (r0 + 1).minimum(h - 1), (c0 + 1).minimum(w - 1)
        top_row = self._read(base + r0 * w + c0) * (1 - fx) + self._read(base + r0 * w + c1) * fx
        bottom_row = self._read(base + r1 * w + c0) * (1 - fx) + self._read(base + r1 * w + c1) * fx
        return top_row * (1 - fy) + bottom_row * fy

    def _read(self, flat_index: torch.Tensor) -> torch.Tensor:
        """Pixels at (N, P, P) flat indices -> (N, C, P, P)."""
        n, p, _ = flat_index.shape
        values = self.pixels[:, flat_index.reshape(-1)]  # (C, N * P * P)
        return values.reshape(self.channels, n, p, p).permute(1, 0, 2, 3).contiguous()
