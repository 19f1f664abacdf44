"""Run by tests/test_distributed.py under torchrun: `ssimae train` whose every process also saves the
weights it ended with (weights.rank<R>.pt in the run folder's parent), to compare them across ranks."""

import os
import sys
from pathlib import Path

import torch

import ssimae.train
from ssimae.cli import main

original = ssimae.train.train_network


def train_and_keep_weights(*args, **kwargs):
    checkpoint = original(*args, **kwargs)
    out = Path(sys.argv[sys.argv.index("--output") + 1]).parent
    torch.save(checkpoint.weights, out / f"weights.rank{os.environ['RANK']}.pt")
    return checkpoint


ssimae.train.train_network = train_and_keep_weights
sys.exit(main(sys.argv[1:]))
