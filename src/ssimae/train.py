"""Training: fit(config, data_root, run_dir) and the loop functions it is made of.

fit = prepare the run folder -> fit the method (gradient training for reconstruction methods, a
memory bank for patchcore, nothing for blur) -> choose the threshold on validation maps -> save.

Run folder contents: checkpoint.pt (self-describing, rewritten atomically after every epoch and at
the end with the threshold), config.yaml (the resolved settings), train.log (the text log) and
training_log.jsonl (one JSON record per epoch: losses, throughput, reconstruction fidelity).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import Checkpoint, TrainingState, build_network
from .config import Config, save_config
from .data import (brightness_targets, find_training_images, image_pixels, load_image, load_working, pad_to_min_size,
                   sample_patches)
from .detector import choose_thresholds, summarise_validation, torch_detector
from .threshold import ValidationSummary
from .devices import cudnn_autotune, resolve_device, resolve_precision, tf32
from .distributed import Rank, any_rank, barrier, broadcast, device_for, gather, launched, shard
from .errors import SsimaeError
from .features import EFFICIENTNET_NAME
from .files import output_folder, remove_stale_temps
from .graphs import GraphedTrainStep, portable_optimizer_state
from .losses import LossFn, l2_loss, make_loss, reconstruction
from .models import VaeOutput

log = logging.getLogger(__name__)

# Patches per forward/backward pass on CPU; a step's gradient is accumulated over them (the
# activations of 128 patches overflow the L3 cache: 1.17x faster steps, bench/README.md).
TRAIN_MICRO_BATCH = 32
VALIDATION_PATCHES = 256  # fixed, seeded validation patches for the per-epoch validation loss
# Settings that change the model, its input or the validation split: a resumed run must keep them.
MODEL_SHAPING = ("method", "latent_dim", "patch_size", "color", "image_size", "val_fraction", "input_normalization")


class TrainResult(NamedTuple):
    checkpoint: Path
    threshold: float | None
    steps: int
    seconds: float
    history: list[dict]


# --------------------------------------------------------------------------- the loop


def train_one_epoch(
    model: torch.nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    device: torch.device,
    micro_batch: int | None = None,
    bf16: bool = False,
    progress: "TrainingProgress | None" = None,
    stop: Callable[[], bool] | None = None,
    graphed: GraphedTrainStep | None = None,
) -> tuple[float, int]:
    """One optimiser step per batch of `batches` (N, C, P, P); (mean loss, steps done).

    Stops early when `stop()` turns True (checked before each step: a time budget). Each step's
    gradient is accumulated over micro-batches of `micro_batch` patches (every loss is a mean over
    patches, so this is the batch's gradient up to float summation order); under
    DistributedDataParallel the gradients are averaged across processes once per step. bf16 runs
    the network under autocast; the loss is computed in fp32. `graphed` (CUDA, see graphs.py) runs
    each step instead, as one graph replay, with the same model, loss and optimizer.

    Each step's loss is read on the host only once the next step has been queued, so a GPU never
    waits for the host between steps; a loss that is not finite stops training one step late.
    """
    model.train()
    total, done = 0.0, 0
    pending: torch.Tensor | None = None  # the last step's loss, not yet read

    def read(loss_tensor: torch.Tensor) -> float:
        loss = loss_tensor.item()
        if not math.isfinite(loss):
            raise SsimaeError(f"training diverged (loss {loss}); lower --lr")
        if progress is not None:
            progress.step(loss)
        return loss

    for x in batches:
        if stop is not None and stop():
            break
        x = x.to(device, non_blocking=True)  # (N, C, P, P)
        if graphed is not None:
            loss = graphed(x)
        else:
            loss = eager_step(model, loss_fn, optimizer, x, micro_batch, bf16)
        if pending is not None:
            total += read(pending)
        pending = loss
        done += 1
    if pending is not None:
        total += read(pending)
    return total / max(done, 1), done


def eager_step(model: torch.nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               micro_batch: int | None = None, bf16: bool = False) -> torch.Tensor:
    """One optimiser step on the batch x, its gradient accumulated over micro-batches; the loss, on x's device."""
    optimizer.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=x.device)
    parts = x.split(micro_batch or len(x))  # (n, C, P, P) each
    for number, part in enumerate(parts):
        with _no_sync(model, number == len(parts) - 1):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):  # the network only
                output = model(part)
            part_loss = loss_fn(_fp32(output), part) * (len(part) / len(x))
            part_loss.backward()
        loss += part_loss.detach()
    optimizer.step()
    return loss


def graphed_step(model: torch.nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, device: torch.device,
                 bf16: bool = False) -> GraphedTrainStep:
    """A CUDA-graph training step (graphs.py) of `model` with `loss_fn`; the same step as eager_step."""

    def step(x: torch.Tensor) -> torch.Tensor:
        # autocast's weight-cast cache would keep tensors made during recording: off inside graphs
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            output = model(x)
        loss = loss_fn(_fp32(output), x)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return GraphedTrainStep(step, optimizer, device)


def _no_sync(model: torch.nn.Module, last: bool):
    """DistributedDataParallel averages gradients at every backward unless told not to: only the
    last micro-batch of a step synchronises."""
    if not last and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _fp32(output):
    """A model output with its tensors in float32 (no-op outside autocast)."""
    if isinstance(output, VaeOutput):
        return VaeOutput(*(t.float() for t in output))
    return output.float()


def patch_batches(images: list[np.ndarray], config: Config, rng: np.random.Generator,
                  batch_size: int | None = None) -> Iterator[torch.Tensor]:
    """Endless random training batches (batch_size, C, P, P) drawn with `rng` (on the CPU)."""
    while True:
        yield sample_patches(images, batch_size or config.batch_size, config.patch_size, rng, config.rotate, config.flip)


class BatchSource:
    """The training batches of one process, a fresh seeded stream per epoch (so a resume continues
    exactly). On CUDA the images are uploaded once and the patches cut on the device
    (sampling.PatchSampler); on the CPU data.sample_patches is faster (bench/README.md). Under
    torchrun each rank draws its own patches, batch_size / world of them per step."""

    def __init__(self, images: list[np.ndarray], config: Config, device: torch.device, rank: Rank):
        if config.batch_size % rank.world:
            raise SsimaeError(f"--batch-size {config.batch_size} is the batch of all {rank.world} processes together "
                              f"and must divide evenly among them; use a multiple of {rank.world}")
        self.images, self.config, self.rank = images, config, rank
        self.batch = config.batch_size // rank.world
        self.sampler = None
        if device.type == "cuda":
            from .sampling import PatchSampler

            self.sampler = PatchSampler(images, config.patch_size, config.rotate, config.flip, device)

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        seed = [self.config.seed, 0, epoch] + ([self.rank.rank] if self.rank.rank else [])
        if self.sampler is None:
            yield from patch_batches(self.images, self.config, np.random.default_rng(seed), self.batch)
        generator = self.sampler.generator(*seed)
        while True:
            yield self.sampler.sample(self.batch, generator)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loss_fn: LossFn, patches: torch.Tensor, device) -> dict:
    """Validation loss and reconstruction-fidelity figures on fixed patches.

    fidelity_corr: pixel correlation of input and reconstruction (near 0 for a collapsed model
    that outputs the same image for every input); detail_ratio: mean absolute neighbour
    difference of the reconstruction over that of the input (1 = as sharp as the input).
    """
    model.eval()
    losses, inputs, outputs = [], [], []
    for batch in patches.split(64):
        x = batch.to(device)
        output = model(x)
        losses.append(loss_fn(output, x).item() * len(x))
        inputs.append(x.cpu())
        outputs.append(reconstruction(output).cpu())
    x, x_hat = torch.cat(inputs), torch.cat(outputs)  # (N, C, P, P)
    centred_x, centred_y = x - x.mean(), x_hat - x_hat.mean()
    corr = (centred_x * centred_y).sum() / (centred_x.norm() * centred_y.norm() + 1e-12)
    detail = (x_hat.diff(dim=3).abs().mean() + x_hat.diff(dim=2).abs().mean()) / (
        x.diff(dim=3).abs().mean() + x.diff(dim=2).abs().mean() + 1e-12
    )
    return {"val_loss": sum(losses) / len(x), "fidelity_corr": corr.item(), "detail_ratio": detail.item()}


# --------------------------------------------------------------------------- fit


def load_images(paths: list[Path], config: Config) -> list[np.ndarray]:
    """Decode, convert and resize images for training, (H, W, C) float32 each."""
    images = [load_working(p, config) for p in paths]
    small = [p for p, im in zip(paths, images) if min(im.shape[:2]) < config.patch_size]
    if small and config.kind == "reconstruction":
        log.warning(
            "%d image(s) smaller than the %d px patch (e.g. %s) are reflect-padded; "
            "use --image-size to enlarge them instead",
            len(small), config.patch_size, small[0],
        )
    return images


class LazyImages(Sequence):
    """The training images of a memory method, decoded, converted and resized on each access."""

    def __init__(self, paths: list[Path], config: Config):
        self.paths, self.config = list(paths), config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return load_working(self.paths[index], self.config)


def fit(
    config: Config,
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fit `config.method` on the defect-free images of `data_root`; write the run folder."""
    config.validate()
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoint.pt"
    if run_dir.exists() and not run_dir.is_dir():
        raise SsimaeError(f"output {run_dir} is a file, not a folder; choose another --output")
    if resume and not checkpoint_path.exists() and not checkpoint_path.is_symlink():
        raise SsimaeError(f"nothing to resume: {checkpoint_path} does not exist; check --output, or drop --resume "
                          "to start a new run")
    previous = Checkpoint.load(checkpoint_path) if resume else None
    if previous is not None:
        check_resumable(previous, config, checkpoint_path)
    elif checkpoint_path.exists():
        raise SsimaeError(f"{checkpoint_path} exists; pass --resume to continue it or choose another --output")
    # The held-out split is the run's from its start: a seed changed on resume reseeds the sampling, not the split
    # (the images trained on would become validation images).
    first = previous.segments[0] if previous is not None and previous.segments else {}
    split_seed = first["config"]["seed"] if first else (config.seed if previous is None else previous.config.seed)
    split = find_training_images(data_root, config.val_fraction, split_seed)  # a bad folder fails before any file
    started_on = first.get("data")
    if started_on and split.root and Path(started_on) != split.root:
        log.warning("resuming a run that started on %s with the images of %s: it goes on training on other images",
                    started_on, split.root)
    rank = launched()
    with run_folder(run_dir, fresh=previous is None, active=rank.main):
        return _fit(config, split, run_dir, checkpoint_path, previous, progress and rank.main, rank)


def check_resumable(previous: Checkpoint, config: Config, path: Path) -> None:
    changed = [k for k in MODEL_SHAPING if getattr(previous.config, k) != getattr(config, k)]
    if changed:
        raise SsimaeError(f"cannot resume {path}: {', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} "
                          "from the checkpoint; "
                          "keep them or start a new run")
    if previous.training.complete and previous.config.kind != "reconstruction":
        raise SsimaeError(f"cannot resume {path}: {previous.method} has no training to continue; start a new run")


def changed_settings(before: Config, after: Config) -> dict[str, list]:
    """{setting: [before, after]} for every setting that differs."""
    old, new = before.to_dict(), after.to_dict()
    return {k: [old[k], new[k]] for k in new if old.get(k) != new[k]}


class run_folder:
    """The run folder for the duration of a fit: train.log attached to the 'ssimae' logger; a fresh
    run starts without leftover logs, and a fit that fails before its first checkpoint leaves no
    run files behind (nor the folder, if it made it). Only the main process (`active`) touches it."""

    FILES = ("train.log", "training_log.jsonl", "config.yaml")

    def __init__(self, run_dir: Path, fresh: bool, active: bool = True):
        self.run_dir, self.fresh, self.active = run_dir, fresh, active

    def __enter__(self):
        if not self.active:
            return self
        self.made = not self.run_dir.exists()
        output_folder(self.run_dir)
        if self.fresh:
            for name in self.FILES:
                (self.run_dir / name).unlink(missing_ok=True)
        remove_stale_temps(self.run_dir)  # a save killed mid-write (SIGKILL) leaves its temp file
        logger = logging.getLogger("ssimae")
        self.old_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # train.log gets the INFO records even when the caller is quiet
        try:
            self.handler = logging.FileHandler(self.run_dir / "train.log")
        except OSError as error:
            raise SsimaeError(f"cannot write to the run folder {self.run_dir}: {error.strerror or error}; "
                              "choose another --output") from None
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(self.handler)
        return self

    def __exit__(self, kind, error, trace):
        if not self.active:
            return False
        logger = logging.getLogger("ssimae")
        logger.removeHandler(self.handler)
        self.handler.close()
        logger.setLevel(self.old_level)
        if error is not None and self.fresh and not (self.run_dir / "checkpoint.pt").exists():
            for name in self.FILES:
                (self.run_dir / name).unlink(missing_ok=True)
            if self.made and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()
        return False


def _fit(config: Config, split, run_dir: Path, checkpoint_path: Path, previous: Checkpoint | None,
         progress: bool, rank: Rank) -> TrainResult:
    torch.manual_seed(config.seed)
    device = resolve_device(device_for(rank, config.device))
    log.info("fitting %s on %d images, validating on %d%s", config.method, len(split.train), len(split.validation),
             f" ({rank.world} processes)" if rank.distributed else "")
    if config.method == "patchcore":  # the defaults that depend on the images, fixed now so predict uses the same
        from .patchcore import DEFAULT_BLOCKS, DEFAULT_POOL, ImageDefaults, image_defaults

        efficientnet = config.feature_net.lower() == EFFICIENTNET_NAME
        # the small-image blocks and pool were measured with the small-image size only
        defaults = ImageDefaults(config.image_size, DEFAULT_BLOCKS, DEFAULT_POOL)
        if config.image_size is None:
            defaults = image_defaults(split.train)
            config = replace(config, image_size=defaults.size)
        if not config.patchcore_blocks and efficientnet:  # unset, or set empty
            config = replace(config, patchcore_blocks=defaults.blocks)
        if config.coreset_pool is None:
            config = replace(config, coreset_pool=defaults.pool if efficientnet else DEFAULT_POOL)
        log.info("patchcore: working size %s%s, coreset pool %d", config.image_size,
                 f", blocks {config.patchcore_blocks}" if efficientnet else "", config.coreset_pool)
    config = with_brightness_targets(config, split.train)
    # Gradient training samples patches from every image all the time, so it holds them; a memory method
    # reads each image as it needs it (decoding again beats holding them all at the working size: 4 MB
    # each for a 128x128 image at PatchCore's 8x, 4 GB for a thousand).
    train_images = load_images(split.train, config) if config.kind == "reconstruction" else \
        LazyImages(split.train, config)
    channels = train_images[0].shape[2]
    if rank.main:
        save_config(config, run_dir / "config.yaml")
    if config.kind == "reconstruction":
        checkpoint = train_network(config, train_images, split, channels, device, run_dir, previous, progress, rank)
    else:  # no gradient training: the main process fits, the others take its result
        checkpoint = broadcast(fit_memory(config, train_images, channels, device, progress) if rank.main else None)
    del train_images

    validation = split.validation or split.train  # tiny data sets: validate on training images, and say so
    if not split.validation:
        log.warning("no validation images: the threshold is chosen on training images")
    log.info("choosing the threshold on %d validation image(s)", len(validation))
    total_pixels = sum(image_pixels(path, config.max_image_pixels) for path in validation)
    shares = gather(summarise_validation(torch_detector(checkpoint, device), shard(validation, rank), total_pixels))
    if not rank.main:
        barrier()  # the main process chooses the thresholds and writes the checkpoint
        return TrainResult(checkpoint_path, None, checkpoint.training.step, checkpoint.training.seconds,
                           checkpoint.history)
    thresholds = choose_thresholds(ValidationSummary.merge(shares), config)
    figures = thresholds.validation
    log.info("pixel threshold %.5f (%s): %.4f of validation pixels above it, %.0f%% of validation images with a "
             "region of %d+ px", thresholds.pixel, thresholds.pixel_rule, figures["pixel_fpr"],
             100 * figures["images_with_false_region"], config.min_defect_area)
    log.info("image threshold %.5f (%s)", thresholds.image, thresholds.image_rule)
    checkpoint.thresholds = thresholds
    checkpoint.training.complete = True
    checkpoint.save(checkpoint_path)
    barrier()
    return TrainResult(checkpoint_path, thresholds.pixel, checkpoint.training.step, checkpoint.training.seconds,
                       checkpoint.history)


def with_brightness_targets(config: Config, paths: list[Path]) -> Config:
    """The config with input_normalization's targets measured on the training images where they are not set,
    so that predict moves every image onto the same ones."""
    if config.input_normalization == "none" or (config.input_mean is not None and config.input_sd is not None):
        return config
    mean, sd = brightness_targets((load_image(p, config.color, config.resize, config.max_image_pixels) for p in paths),
                                  config.input_normalization)
    config = replace(config, input_mean=mean if config.input_mean is None else config.input_mean,
                     input_sd=sd if config.input_sd is None else config.input_sd)
    level = "background level" if config.input_normalization == "background" else "mean"
    log.info("input normalization %s: each image's %s moved onto %.4f%s", config.input_normalization, level,
             config.input_mean, f", its deviation onto {config.input_sd:.4f}"
             if config.input_normalization == "standardize" else "")
    return config


def fit_memory(config: Config, images: Sequence[np.ndarray], channels: int, device: torch.device,
               progress: bool) -> Checkpoint:
    """The checkpoint of a method without gradient training (its module holds what it learned)."""
    started = time.monotonic()
    if config.method == "patchcore":
        from .patchcore import fit_patchcore

        network = fit_patchcore(config, images, channels, device, progress)
    else:
        network = build_network(config, channels)
    seconds = time.monotonic() - started
    weights = {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}  # CPU: broadcastable
    return Checkpoint(config, channels, weights, training=TrainingState(0, 0, seconds, False))


def train_network(config: Config, images: list[np.ndarray], split, channels: int, device: torch.device,
                  run_dir: Path, previous: Checkpoint | None, progress: bool, rank: Rank = Rank()) -> Checkpoint:
    """Gradient training of a reconstruction method, checkpointing after every epoch (the main process)."""
    batches = BatchSource(images, config, device, rank)
    model = build_network(config, channels)
    # channels_last (NHWC): faster with oneDNN on CPU and the layout CUDA tensor cores want; the same net.
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    checkpoint = Checkpoint(config, channels, {}, segments=[{"start_step": 0, "changed": {}, "config": config.to_dict(),
                                                             "data": str(split.root) if split.root else None}])
    if previous is not None:
        resume_from(previous, checkpoint, model, optimizer)
    if rank.rank:  # the VAE's sampling noise differs per process, and a resume does not replay the first segment's
        torch.manual_seed(rank_seed(config.seed, rank.rank, checkpoint.training.step))
    trained = model
    if rank.distributed:  # averages the gradients across processes; starts from the main process's weights
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    feature_extractor = None
    if config.method == "fm-ae":
        from .features import extractor_for  # the pretrained net is needed by fm-ae only

        feature_extractor = extractor_for(config).to(device)
    loss_fn = make_loss(config, feature_extractor)
    val_source = [load_working(p, config) for p in split.validation] or images
    val_patches = sample_patches(
        [pad_to_min_size(im, config.patch_size) for im in val_source],
        VALIDATION_PATCHES, config.patch_size, np.random.default_rng([config.seed, 1]), rotate="none", flip=False,
    )
    del val_source
    use_graphs = device.type == "cuda" and not rank.distributed
    precision = resolve_precision(config.precision, device, "train" if use_graphs else "train-eager")
    bf16 = precision == "bf16"
    if rank.main:
        log.info("training on %s in %s%s", device, precision, ", a CUDA graph per step" if use_graphs else "")
    micro = TRAIN_MICRO_BATCH if device.type == "cpu" else None
    state = checkpoint.training
    steps_per_epoch = math.ceil(config.patches_per_epoch / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    # One clock for the budget and state.seconds: the segment's wall time, validation and saves included, so a
    # resumed run gets only what is left of --max-minutes.
    segment_started, seconds_before = time.monotonic(), state.seconds
    deadline = None if config.max_minutes is None else segment_started + config.max_minutes * 60 - seconds_before

    def out_of_time() -> bool:  # every process stops at the same step
        return any_rank(deadline is not None and time.monotonic() >= deadline, device)

    # One CUDA graph per loss (the L2 warm-up's, then the method's), made on first use (graphs.py); a single
    # process only: DistributedDataParallel's gradient averaging keeps its own launches.
    graphed_steps: dict[LossFn, GraphedTrainStep] = {}

    def graphed(fn: LossFn) -> GraphedTrainStep | None:
        if not use_graphs:
            return None
        if fn is not l2_loss and state.step >= config.warmup_steps:
            graphed_steps.pop(l2_loss, None)  # the warm-up is over: free its graph's memory
        if fn not in graphed_steps:
            graphed_steps[fn] = graphed_step(trained, fn, optimizer, device, bf16)
        return graphed_steps[fn]

    with TrainingProgress(config, state.step, total_steps, deadline, progress) as bar, tf32(precision == "tf32"), \
            cudnn_autotune(device):
        while state.step < total_steps and not out_of_time():
            started = time.monotonic()
            epoch = itertools.islice(batches.epoch(state.epoch), min(steps_per_epoch, total_steps - state.step))
            # An L2 warm-up (config.warmup_steps) covers the first steps of the run, then the method's loss.
            warmup = max(0, config.warmup_steps - state.step)
            run = lambda fn, source: train_one_epoch(trained, fn, optimizer, source, device, micro, bf16, bar,
                                                     out_of_time, graphed(fn))
            warm_loss, warm_done = run(l2_loss, itertools.islice(epoch, warmup)) if warmup else (0.0, 0)
            loss, done = run(loss_fn, epoch)
            done += warm_done
            if done == 0:  # the time budget ran out before this epoch's first step
                break
            loss = (warm_loss * warm_done + loss * (done - warm_done)) / done
            elapsed = time.monotonic() - started
            state.step, state.epoch = state.step + done, state.epoch + 1
            state.seconds = seconds_before + time.monotonic() - segment_started
            if not rank.main:
                continue
            record = {"epoch": state.epoch, "step": state.step, "loss": loss,
                      **evaluate_loss(model, loss_fn, val_patches, device),
                      "patches_per_s": done * config.batch_size / max(elapsed, 1e-9), "seconds": state.seconds}
            checkpoint.history.append(record)
            _append_jsonl(run_dir / "training_log.jsonl", record)
            log.info("epoch %d step %d loss %.5f val_loss %.5f fidelity %.3f detail %.3f %.0f patches/s",
                     state.epoch, state.step, loss, record["val_loss"], record["fidelity_corr"],
                     record["detail_ratio"], record["patches_per_s"])
            state.seconds = seconds_before + time.monotonic() - segment_started  # the validation loss's time too
            keep_training_state(checkpoint, model, optimizer)
            checkpoint.save(run_dir / "checkpoint.pt")
    keep_training_state(checkpoint, model, optimizer)
    barrier()  # the other processes wait for the main one's last checkpoint
    return checkpoint


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of process `rank` > 0 (only the main process's generator state is saved), new at each
    resume: step is where the run (re)starts."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def keep_training_state(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy what a resume needs into the checkpoint: weights, optimizer and random generator states."""
    checkpoint.weights = model.state_dict()
    checkpoint.optimizer_state = portable_optimizer_state(optimizer)
    checkpoint.rng_state = {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def resume_from(previous: Checkpoint, checkpoint: Checkpoint, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> None:
    """Continue `previous`: weights, optimizer, random generators, counters and history. Settings that
    changed apply from now on (the learning rate and weight decay to the optimizer too) and start a
    new segment of the run record."""
    config = checkpoint.config
    model.load_state_dict(previous.weights)
    if previous.optimizer_state:
        optimizer.load_state_dict(previous.optimizer_state)
    for group in optimizer.param_groups:  # the restored state carries the old values
        group["lr"], group["weight_decay"] = config.lr, config.weight_decay
    if previous.rng_state:
        torch.set_rng_state(previous.rng_state["torch"])
        if previous.rng_state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(previous.rng_state["cuda"])
    checkpoint.training, checkpoint.history = previous.training, list(previous.history)
    checkpoint.training.complete = False
    checkpoint.segments = list(previous.segments) or [{"start_step": 0, "changed": {}, "config": previous.config.to_dict()}]
    changed = changed_settings(previous.config, config)
    if changed:
        checkpoint.segments.append({"start_step": checkpoint.training.step, "changed": changed,
                                    "config": config.to_dict()})
        log.info("settings changed from step %d: %s", checkpoint.training.step,
                 ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    log.info("resuming at epoch %d, step %d (%.0f s trained)", checkpoint.training.epoch,
             checkpoint.training.step, checkpoint.training.seconds)


class TrainingProgress:
    """A progress bar over patches whose total is what the budget will actually allow: the step budget,
    or, under --max-minutes, the steps the measured rate fits in the time left (so the ETA is the
    time the run will really stop)."""

    def __init__(self, config: Config, step: int, total_steps: int, deadline: float | None, enabled: bool):
        self.batch, self.step_now, self.total_steps, self.deadline = config.batch_size, step, total_steps, deadline
        self.started, self.first_step = time.monotonic(), step
        self.bar = tqdm(total=self._projected_steps() * self.batch, initial=step * self.batch, unit="patch",
                        unit_scale=True, desc=config.method, disable=not enabled, dynamic_ncols=True)

    def _projected_steps(self) -> int:
        done = self.step_now - self.first_step
        if self.deadline is None or done == 0:
            return self.total_steps
        rate = done / max(time.monotonic() - self.started, 1e-9)  # steps per second so far
        reachable = self.step_now + int(max(0.0, self.deadline - time.monotonic()) * rate)
        return max(self.step_now, min(self.total_steps, reachable))

    def step(self, loss: float) -> None:
        self.step_now += 1
        self.bar.total = self._projected_steps() * self.batch
        self.bar.update(self.batch)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def __enter__(self) -> "TrainingProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
