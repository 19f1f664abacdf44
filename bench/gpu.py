"""GPU benchmark (issue 11): what one card does with ssimae, in one run of a few minutes.

Prints, with the card's name:
  step      one ssim-ae / l2-ae optimiser step on data already on the card, patches/s, for fp32, TF32,
            bf16 autocast, channels_last or not, batch 128/256/512, Adam's fused kernel, and torch.compile
            (reduce-overhead = CUDA graphs, max-autotune), compile time counted separately
  sample    the device-side patch sampler alone (rotate=any), patches/s
  train     train_one_epoch end to end with the sampler, at the settings --precision auto picks
            (target >= 20,000 patches/s: the paper's 2 million patches in under 2 minutes)
  infer     the network + 1 - SSIM map, patches/s, fp32 and bf16 (target >= 150,000)
  predict   `predict_folder` over 1024x1024 PNGs at full size, stride 30, every output written
            (target >= 20 images/s), at infer batch 64 (the default) and 512; then the main thread's
            share per image: the map alone, and cutting and adding up the windows alone
  patchcore fit on magnetic_tile, if ../shared/data/magnetic_tile exists (target < 30 s)

    python bench/gpu.py                      # on the first CUDA device
    python bench/gpu.py --device cpu --quick # a smoke test of the script itself, anywhere
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssimae.checkpoint import Checkpoint, Thresholds, TrainingState
from ssimae.config import Config
from ssimae.distributed import Rank
from ssimae.inference import torch_patch_fn
from ssimae.losses import SsimSettings, l2_loss, make_loss
from ssimae.models import ConvAutoencoder, build_model
from ssimae.sampling import PatchSampler
from ssimae.train import BatchSource, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC = ROOT.parent / "shared" / "data" / "magnetic_tile"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, count: int, device: torch.device, seconds: float) -> float:
    """Items per second of fn() (each call handles `count` items), after a warm-up, over ~`seconds`."""
    fn()
    synchronize(device)
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls >= 3 and time.perf_counter() - started > seconds:
            break
    synchronize(device)
    return calls * count / (time.perf_counter() - started)


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<52s} {value:>16s}  {note}", flush=True)


def textures(count: int, side: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    return [(0.5 + 0.2 * np.sin((x + 0.5 * y) / 6 + rng.uniform(0, 6)) + 0.05 * rng.standard_normal((side, side)))
            .clip(0, 1).astype(np.float32)[:, :, None] for _ in range(count)]


def step_rate(device: torch.device, batch: int, method: str, layout: str, precision: str, seconds: float,
              fused: bool = False) -> float:
    """Patches/s of one optimiser step (train_one_epoch on one batch already on the device)."""
    torch.manual_seed(0)
    model = ConvAutoencoder(1, 100).to(device)
    if layout == "nhwc":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 2e-4, fused=fused or None)
    x = torch.rand(batch, 1, 128, 128, device=device)
    loss_fn = make_loss(Config()) if method == "ssim-ae" else l2_loss
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return rate(lambda: train_one_epoch(model, loss_fn, optimizer, iter([x]), device, None, precision == "bf16"),
                batch, device, seconds)


def section_step(device: torch.device, batches: tuple[int, ...], seconds: float, compile_modes: tuple[str, ...],
                 compile_batch: int = 128):
    """Every batch, loss, layout and precision; then Adam's fused kernel (one launch for all parameters
    instead of a few per group: the step is launch-bound) at the first batch; then torch.compile."""
    print("\n== step: one optimiser step on data already on the device, patches/s", flush=True)
    ssim = make_loss(Config())
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    results = {}
    for batch, method, layout, precision in itertools.product(batches, ("ssim-ae", "l2-ae"), ("nhwc", "nchw"),
                                                              precisions):
        results[(batch, method, layout, precision)] = value = step_rate(device, batch, method, layout, precision,
                                                                        seconds)
        row(f"{method} batch {batch} {layout} {precision}", f"{value:,.0f}")
    for precision in precisions if batches else ():
        results[(batches[0], "ssim-ae", "nhwc", precision, "fused")] = value = step_rate(
            device, batches[0], "ssim-ae", "nhwc", precision, seconds, fused=True)
        row(f"ssim-ae batch {batches[0]} nhwc {precision}, fused Adam", f"{value:,.0f}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for mode in compile_modes:
        torch.manual_seed(0)
        model = ConvAutoencoder(1, 100).to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), 2e-4)
        x = torch.rand(compile_batch, 1, 128, 128, device=device)
        compiled = torch.compile(model, mode=mode)
        started = time.perf_counter()
        train_one_epoch(compiled, ssim, optimizer, iter([x]), device)
        synchronize(device)
        compile_seconds = time.perf_counter() - started
        value = rate(lambda: train_one_epoch(compiled, ssim, optimizer, iter([x]), device), compile_batch, device, seconds)
        results[("compile", mode)] = value
        row(f"ssim-ae batch {compile_batch} nhwc fp32, torch.compile {mode}", f"{value:,.0f}",
            f"compile {compile_seconds:.0f} s")
    return results


def section_sample(device: torch.device, seconds: float, batch: int) -> float:
    print("\n== sample: device-side patch sampler, rotate=any, patches/s", flush=True)
    sampler = PatchSampler(textures(64, 512), 128, "any", True, device)
    generator = sampler.generator(0)
    value = rate(lambda: sampler.sample(batch, generator), batch, device, seconds)
    row(f"PatchSampler batch {batch}", f"{value:,.0f}")
    return value


def section_train(device: torch.device, seconds: float, batch: int) -> float:
    print("\n== train: train_one_epoch with the sampler, --precision auto, patches/s", flush=True)
    config = Config(batch_size=batch, device=str(device))
    source = BatchSource(textures(64, 512), config, device, Rank())
    model = ConvAutoencoder(1, 100).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 2e-4)
    loss_fn = make_loss(config)
    from ssimae.devices import resolve_precision

    bf16 = resolve_precision("auto", device, "train") == "bf16"
    micro = 32 if device.type == "cpu" else None
    stream = source.epoch(0)
    value = rate(lambda: train_one_epoch(model, loss_fn, optimizer, itertools.islice(stream, 10), device, micro, bf16),
                 10 * batch, device, seconds)
    row("ssim-ae end to end (sampling included)", f"{value:,.0f}",
        f"target >= 20,000: {'met' if value >= 20_000 else 'NOT met'}; 2M patches in {2e6 / value / 60:.1f} min")
    return value


def section_infer(device: torch.device, seconds: float, batch: int) -> dict:
    print("\n== infer: network + 1 - SSIM map, patches/s", flush=True)
    model = ConvAutoencoder(1, 100).to(device)
    x = torch.rand(batch, 1, 128, 128, device=device)
    results = {}
    for precision in ("fp32", "bf16"):
        patch_fn = torch_patch_fn(model, "ssim", SsimSettings(), device, precision=precision)
        results[precision] = value = rate(lambda: patch_fn(x), batch, device, seconds)
        row(f"batch {batch} {precision}", f"{value:,.0f}", "target >= 150,000" if device.type == "cuda" else "")
    return results


def section_predict(device: torch.device, count: int, side: int) -> float:
    """predict_folder as a whole at the default infer batch (64) and at 512, then where one image's time
    goes on the main thread: the map alone (anomaly_map), and cutting and adding up the windows alone
    (sliding_window with a patch function that does nothing); the writer threads do the rest."""
    print(f"\n== predict: folder of {count} PNGs {side}x{side}, full size, stride 30, all outputs, images/s",
          flush=True)
    from ssimae.detector import load_detector
    from ssimae.inference import sliding_window
    from ssimae.predict import predict_folder

    best = 0.0
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        config = Config(latent_dim=100, stride=30)
        torch.manual_seed(0)
        network = build_model("ae", 1, 100, 128)
        Checkpoint(config, 1, network.state_dict(), Thresholds(0.5, "bench", 0.9, "bench"),
                   TrainingState(complete=True)).save(work / "checkpoint.pt")
        images = textures(count, side)
        for i, image in enumerate(images):
            Image.fromarray((image[:, :, 0] * 255).astype(np.uint8)).save(work / f"{i:03d}.png")
        for batch in (64, 512):
            detector = load_detector(work / "checkpoint.pt", overrides={"device": str(device), "infer_batch_size": batch})
            detector.predict(textures(1, side, 99)[0])  # warm-up
            started = time.perf_counter()
            predict_folder(detector, work, work / f"out{batch}")
            value = count / (time.perf_counter() - started)
            best = max(best, value)
            row(f"predict_folder, infer batch {batch}", f"{value:.1f}", "target >= 20" if device.type == "cuda" else "")
            started = time.perf_counter()
            for image in images:
                detector.anomaly_map(image)
            row(f"  anomaly_map alone, infer batch {batch}", f"{(time.perf_counter() - started) / count * 1000:.1f} ms/image")
            started = time.perf_counter()
            for image in images:
                sliding_window(image, lambda patches: patches, 128, 30, batch, device)
            row(f"  windows cut and added up alone, batch {batch}",
                f"{(time.perf_counter() - started) / count * 1000:.1f} ms/image")
    return best


def section_patchcore(device: torch.device, data: Path) -> float | None:
    if not data.is_dir():
        print(f"\n== patchcore: {data} not found; skipped", flush=True)
        return None
    print("\n== patchcore: fit on magnetic_tile (features of 686 images + greedy coreset)", flush=True)
    from ssimae.config import config_from_dict
    from ssimae.train import fit

    with tempfile.TemporaryDirectory() as work:
        config = config_from_dict({"method": "patchcore", "device": str(device)}).validate()
        started = time.perf_counter()
        fit(config, data, Path(work) / "run", progress=False)
        value = time.perf_counter() - started
    row("fit, threshold included", f"{value:.1f} s", "target < 30 s")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small batches and sizes: a smoke test of the script")
    parser.add_argument("--sections", default="step,sample,train,infer,predict,patchcore")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-only", action="store_true", help="step section: only the torch.compile variants")
    parser.add_argument("--seconds", type=float, default=None, help="timing window of each rate (default 3, quick 0.5)")
    parser.add_argument("--magnetic-tile", type=Path, default=MAGNETIC, help="magnetic_tile's folder (patchcore)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device; use --device cpu for a smoke test")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    sections = args.sections.split(",")
    seconds = args.seconds or (0.5 if args.quick else 3.0)
    batches = (8,) if args.quick else (128, 256, 512)
    compile_modes = () if args.no_compile or args.quick else ("reduce-overhead", "max-autotune")
    if "step" in sections:
        section_step(device, () if args.compile_only else batches, seconds, compile_modes, batches[0])
    if "sample" in sections:
        section_sample(device, seconds, 8 if args.quick else 512)
    if "train" in sections:
        section_train(device, seconds, 8 if args.quick else 128)
    if "infer" in sections:
        section_infer(device, seconds, 8 if args.quick else 1024)
    if "predict" in sections:
        section_predict(device, 2 if args.quick else 20, 256 if args.quick else 1024)
    if "patchcore" in sections and not args.quick:
        section_patchcore(device, args.magnetic_tile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
