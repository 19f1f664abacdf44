"""PatchCore's nearest-neighbour search on the CPU: the k-d tree against the distance matrices.

Fits PatchCore on the bundled example (its small-image defaults: 8x the image size, 1024x1024,
block 0, 16-dimension features; bench/README.md also has figures from the 4x default then, 512x512),
embeds its test images and times both search paths on the same queries and bank, interleaved, best
of the rounds. Prints seconds per image, the ratio, and the largest difference.

    python bench/nearest.py [--dataset examples/paper_bdp01] [--images 4] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import ssimae.patchcore as patchcore
from ssimae.checkpoint import Checkpoint
from ssimae.config import Config
from ssimae.data import find_test_items, load_image
from ssimae.train import fit

ROOT = Path(__file__).resolve().parents[1]


def best_seconds(function, rounds: int) -> tuple[float, torch.Tensor]:
    best, result = float("inf"), None
    for _ in range(rounds):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT / "examples" / "paper_bdp01")
    parser.add_argument("--images", type=int, default=4, help="test images to search")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as run:
        result = fit(Config(method="patchcore", device="cpu"), args.dataset, Path(run), progress=False)
        checkpoint = Checkpoint.load(result.checkpoint)
    model = checkpoint.network().eval()
    size = checkpoint.config.resize
    items = find_test_items(args.dataset)[: args.images]
    with torch.inference_mode():
        queries = [model.embed(torch.from_numpy(load_image(item.path, checkpoint.config.color, size))
                               .permute(2, 0, 1)[None]) for item in items]
        queries = [q[0].flatten(1).T.contiguous() for q in queries]
        print(f"{len(queries)} images, {queries[0].shape[0]} queries of {queries[0].shape[1]} dimensions each, "
              f"bank {tuple(model.bank.shape)}, {args.threads} thread(s)")
        tree_total = matrix_total = 0.0
        difference = 0.0
        for q in queries:
            tree_seconds, tree = best_seconds(lambda: patchcore.nearest_distances(q, model.bank), args.rounds)
            saved = patchcore.KDTREE_MAX_DIM
            patchcore.KDTREE_MAX_DIM = 0  # the distance matrices
            try:
                matrix_seconds, matrix = best_seconds(lambda: patchcore.nearest_distances(q, model.bank), args.rounds)
            finally:
                patchcore.KDTREE_MAX_DIM = saved
            tree_total, matrix_total = tree_total + tree_seconds, matrix_total + matrix_seconds
            difference = max(difference, float((tree - matrix).abs().max()))
    n = len(queries)
    print(f"k-d tree:          {tree_total / n:.3f} s per image")
    print(f"distance matrices: {matrix_total / n:.3f} s per image")
    print(f"ratio: {matrix_total / tree_total:.1f}x; largest difference {difference:.2e} "
          f"(median distance {float(tree.median()):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
