"""Training: fit(config, data_root, run_dir) and the loop functions it is made of.

Run folder contents: checkpoint.pt (self-describing, rewritten atomically after every epoch and at
the end with the threshold), config.yaml (the resolved settings), train.log (the text log) and
training_log.jsonl (one JSON record per epoch: losses, throughput, reconstruction fidelity).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import checkpoint_dict, read_checkpoint, save_checkpoint
from .config import Config, parse_image_size, save_config
from .data import find_training_images, load_image, pad_to_min_size, sample_patches
from .errors import SsimaeError
from .inference import anomaly_map, resolve_precision, torch_patch_fn
from .losses import METHODS, Method, SsimSettings, compute_loss, reconstruction
from .models import VaeOutput, build_model
from .threshold import choose_threshold

log = logging.getLogger(__name__)

# With a pure SSIM loss the Table 1 net drops all output variance within ~25 steps (a flat image
# maximises SSIM's structure term against an uncorrelated reconstruction) and needs hundreds of
# steps to leave that state; a short L2 warm-up first teaches it brightness and coarse structure.
L2_WARMUP = METHODS["l2-ae"]
# Patches per forward/backward pass on CPU; a step's gradient is accumulated over them. Measured on
# the 2-core CPU (bench/speed.py, train section, batch 128): micro-batches of 32 made an ssim-ae step
# 1.17x and an l2-ae step 1.04x faster than one pass (the activations of 128 patches, 64 MB in the
# outer layers, overflow the 32 MB L3 cache; the SSIM's moment maps as well), and brought the
# ssim-ae / l2-ae step-time ratio from 1.27 to 1.12. Also measured and not used: sampling the next
# batch in a background thread (0.90x: it competes with oneDNN's two threads), torch.compile of the
# step (1.5x slower, 32 s to compile), of the SSIM loss alone (1.25x faster, but 15 s to compile in
# every process), chunking the SSIM or hand-fusing its backward (no gain: the filter matmuls dominate).
TRAIN_MICRO_BATCH = 32
VALIDATION_PATCHES = 256  # fixed, seeded validation patches for the per-epoch validation loss
# Settings that change the model or its input: a resumed run must keep them.
MODEL_SHAPING = ("method", "latent_dim", "patch_size", "color", "image_size")


class TrainResult(NamedTuple):
    checkpoint: Path
    threshold: float | None
    steps: int
    seconds: float
    history: list[dict]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SsimaeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SsimaeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def ssim_settings(config: Config) -> SsimSettings:
    return SsimSettings(config.ssim_window, config.ssim_sigma, config.ssim_alpha, config.ssim_beta, config.ssim_gamma)


def load_images(paths: list[Path], config: Config) -> list[np.ndarray]:
    """Decode, convert and resize images for training, (H, W, C) float32 each."""
    size = parse_image_size(config.image_size)
    images = [load_image(p, config.color, size) for p in paths]
    small = [p for p, im in zip(paths, images) if min(im.shape[:2]) < config.patch_size]
    if small:
        log.warning(
            "%d image(s) smaller than the %d px patch (e.g. %s) are reflect-padded; "
            "use --image-size to enlarge them instead",
            len(small), config.patch_size, small[0],
        )
    return images


def build_feature_extractor_for(config: Config, device: torch.device) -> torch.nn.Module | None:
    if METHODS[config.method].loss != "fm":
        return None
    from .features import build_feature_extractor  # the pretrained net is needed by fm-ae only

    kwargs = {"name": config.feature_net, "weights_path": config.feature_weights}
    if config.feature_cut is not None:
        kwargs["cut"] = config.feature_cut
    return build_feature_extractor(**kwargs).to(device)


def loss_kwargs(config: Config, feature_extractor) -> dict:
    return {
        "ssim": ssim_settings(config),
        "vae_beta": config.vae_beta,
        "fm_lambda": config.fm_lambda,
        "feature_extractor": feature_extractor,
    }


def train_one_epoch(
    model: torch.nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    images: list[np.ndarray],
    steps: int,
    config: Config,
    rng: np.random.Generator,
    device: torch.device,
    loss_args: dict,
    progress: tqdm | None = None,
    deadline: float | None = None,
    first_step: int = 0,
) -> tuple[float, int]:
    """Up to `steps` optimiser steps on fresh random patches; (mean loss, steps done).

    Stops early when time.monotonic() passes `deadline`. On CPU each step's gradient is
    accumulated over micro-batches of TRAIN_MICRO_BATCH patches (every loss is a mean over
    patches, so this is the batch's gradient up to float summation order). config.precision
    'bf16' (or 'auto' on CUDA) runs the model under bf16 autocast.
    """
    model.train()
    device = torch.device(device)
    bf16 = resolve_precision(config.precision, device) == "bf16"
    micro = TRAIN_MICRO_BATCH if device.type == "cpu" else config.batch_size
    total, done = 0.0, 0
    for _ in range(steps):
        if deadline is not None and time.monotonic() >= deadline:
            break
        x = sample_patches(images, config.batch_size, config.patch_size, rng, config.rotate, config.flip)
        x = x.to(device, non_blocking=True)  # (N, C, P, P)
        step_method = L2_WARMUP if first_step + done < config.l2_warmup_steps else method
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part in x.split(micro):  # (n, C, P, P) each
            # bf16 autocast covers the network only; the loss (SSIM's variances) is computed in fp32.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                output = model(part)
            part_loss = compute_loss(step_method, _fp32(output), part, **loss_args) * (len(part) / len(x))
            if not torch.isfinite(part_loss):
                raise SsimaeError(f"training diverged (loss {part_loss.item()}); lower --lr (now {config.lr})")
            part_loss.backward()
            loss += part_loss.item()
        optimizer.step()
        total += loss
        done += 1
        if progress is not None:
            progress.update(config.batch_size)
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
    return total / max(done, 1), done


def _fp32(output):
    """A model output with its tensors in float32 (no-op outside autocast)."""
    if isinstance(output, VaeOutput):
        return VaeOutput(*(t.float() for t in output))
    return output.float()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, method: Method, patches: torch.Tensor, loss_args: dict, device) -> dict:
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
        losses.append(compute_loss(method, output, x, **loss_args).item() * len(x))
        inputs.append(x.cpu())
        outputs.append(reconstruction(output).cpu())
    x, x_hat = torch.cat(inputs), torch.cat(outputs)  # (N, C, P, P)
    centred_x, centred_y = x - x.mean(), x_hat - x_hat.mean()
    corr = (centred_x * centred_y).sum() / (centred_x.norm() * centred_y.norm() + 1e-12)
    detail = (x_hat.diff(dim=3).abs().mean() + x_hat.diff(dim=2).abs().mean()) / (
        x.diff(dim=3).abs().mean() + x.diff(dim=2).abs().mean() + 1e-12
    )
    return {"val_loss": sum(losses) / len(x), "fidelity_corr": corr.item(), "detail_ratio": detail.item()}


def validation_maps(model, method: Method, images: list[np.ndarray], config: Config, device) -> list[np.ndarray]:
    patch_fn = torch_patch_fn(model, method, ssim_settings(config), device, precision=config.precision)
    return [anomaly_map(im, patch_fn, config.patch_size, config.stride, config.infer_batch_size, config.map_smoothing)
            for im in images]


def _setup_run_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("ssimae").addHandler(handler)
    return handler


def fit(
    config: Config,
    data_root: str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train `config.method` on the defect-free images of `data_root`; write the run folder."""
    config.validate()
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoint.pt"
    previous = _resume_state(checkpoint_path, config) if resume else None
    if not resume and checkpoint_path.exists():
        raise SsimaeError(f"{checkpoint_path} exists; pass --resume to continue it or choose another --output")
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("ssimae")
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # train.log gets the INFO records even when the caller is quiet
    handler = _setup_run_logging(run_dir)
    try:
        return _fit(config, Path(data_root), run_dir, checkpoint_path, previous, progress)
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)


def _resume_state(checkpoint_path: Path, config: Config) -> dict:
    state = read_checkpoint(checkpoint_path)
    changed = [k for k in MODEL_SHAPING if state["config"].get(k) != getattr(config, k)]
    if changed:
        raise SsimaeError(
            f"cannot resume {checkpoint_path}: {', '.join(changed)} differ from the checkpoint; "
            "keep them or start a new run"
        )
    return state


def _fit(config: Config, data_root: Path, run_dir: Path, checkpoint_path: Path, previous, progress: bool) -> TrainResult:
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    method = METHODS[config.method]
    split = find_training_images(data_root, config.val_fraction, config.seed)
    log.info("training %s on %d images, validating on %d (%s)", config.method, len(split.train), len(split.validation), data_root)
    train_images = load_images(split.train, config)
    val_images = load_images(split.validation, config)
    channels = train_images[0].shape[2]
    save_config(config, run_dir / "config.yaml")

    # channels_last (NHWC): oneDNN's NHWC kernels trained the Table 1 net 1.06-1.10x faster than NCHW
    # on the 2-core CPU (bench/speed.py) and NHWC is the layout CUDA tensor cores want; the same net.
    model = build_model(method.model_kind, channels, config.latent_dim, config.patch_size)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, epoch, seconds, history = 0, 0, 0.0, []
    if previous is not None:
        model.load_state_dict(previous["model_state"])
        if previous.get("optimizer_state"):
            optimizer.load_state_dict(previous["optimizer_state"])
        step, epoch = previous["training"]["step"], previous["training"]["epoch"]
        seconds, history = previous["training"]["seconds"], list(previous["history"])
        log.info("resuming at epoch %d, step %d (%.0f s trained)", epoch, step, seconds)
    feature_extractor = build_feature_extractor_for(config, device)
    loss_args = loss_kwargs(config, feature_extractor)

    val_source = val_images or train_images  # tiny data sets: validate on training images, and say so
    if not val_images:
        log.warning("no validation images: validation loss and threshold use training images")
    val_patches = sample_patches(
        [pad_to_min_size(im, config.patch_size) for im in val_source],
        VALIDATION_PATCHES, config.patch_size, np.random.default_rng([config.seed, 1]), rotate="none", flip=False,
    )

    steps_per_epoch = math.ceil(config.patches_per_epoch / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    deadline = None if config.max_minutes is None else time.monotonic() + config.max_minutes * 60 - seconds
    bar = tqdm(total=total_steps * config.batch_size, initial=step * config.batch_size, unit="patch",
               unit_scale=True, desc=config.method, disable=not progress, dynamic_ncols=True)
    with bar:
        while step < total_steps and (deadline is None or time.monotonic() < deadline):
            started = time.monotonic()
            rng = np.random.default_rng([config.seed, 0, epoch])  # per-epoch stream: resumable
            steps = min(steps_per_epoch, total_steps - step)
            loss, done = train_one_epoch(model, method, optimizer, train_images, steps, config, rng, device,
                                         loss_args, bar, deadline, first_step=step)
            if done == 0:  # the time budget ran out before this epoch's first step
                break
            step += done
            elapsed = time.monotonic() - started
            seconds += elapsed
            epoch += 1
            record = {"epoch": epoch, "step": step, "loss": loss, **evaluate_loss(model, method, val_patches, loss_args, device),
                      "patches_per_s": done * config.batch_size / max(elapsed, 1e-9), "seconds": seconds}
            history.append(record)
            _append_jsonl(run_dir / "training_log.jsonl", record)
            log.info("epoch %d step %d loss %.5f val_loss %.5f fidelity %.3f detail %.3f %.0f patches/s",
                     epoch, step, loss, record["val_loss"], record["fidelity_corr"], record["detail_ratio"],
                     record["patches_per_s"])
            save_checkpoint(checkpoint_dict(model, config, channels, None, None,
                                            {"step": step, "epoch": epoch, "seconds": seconds, "complete": False},
                                            optimizer, history), checkpoint_path)

    log.info("choosing the threshold on %d validation image(s)", len(val_source))
    maps = validation_maps(model, method, val_source, config, device)
    threshold, rule = choose_threshold(maps, config.min_defect_area, config.threshold_fpr)
    log.info("threshold %.5f (%s)", threshold, rule)
    save_checkpoint(checkpoint_dict(model, config, channels, threshold, rule,
                                    {"step": step, "epoch": epoch, "seconds": seconds, "complete": True},
                                    optimizer, history), checkpoint_path)
    return TrainResult(checkpoint_path, threshold, step, seconds, history)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
