"""Speed benchmark: figures and ratios measured side by side in one run (issue 4). Not a test.

    python bench/speed.py                          # every section (about 5-8 minutes on 2 cores)
    python bench/speed.py --sections train,infer   # a subset; each section alone takes 1-3 minutes
    python bench/speed.py --quick                  # fewer rounds and images

Sections
    machine  fp32 matmul rate (torch.mm of 2048x2048, best of N) and the Table 1 FLOP count
    ssim     the SSIM alone, patches/s: banded-matrix filter (the package) vs grouped 1-D convolutions
             vs the naive 11x11 window of the reference; loss forward+backward and map forward
    train    training patches/s: ssim-ae and l2-ae steps, the full train_one_epoch loop (sampling included),
             the plain eager reference of bench/reference_eager.py, micro-batches vs one pass, NHWC vs NCHW
    infer    inference patches/s (model + residual map): torch NHWC, torch NCHW, ONNX Runtime, reference
    predict  ms per 1024x1024 gray image: --image-size 256 at stride 30, and full size at stride 30
    folder   images/s over a folder of 1024x1024 PNGs (--image-size 256, stride 30), I/O overlapped or not
    outputs  ms per 1024x1024 image of what predict does besides the network (mask, score and verdict,
             overlay picture, PNG and TIFF encoding), against the Pillow and scipy ways it replaced
    load     peak RSS and time of `ssimae predict` on 2,000 small images in one process
    memory   peak RSS of `ssimae predict` on one 8192x8192 gray image at full size (stride 128: memory does
             not depend on the stride, time does), and on a 1024x1024 image, each in a fresh subprocess
    thresholds  peak memory and time of the pixel threshold rules (pixel-fpr, min-area) on 20 validation
             maps of 2048x2048: summarised as they are made (the fit's way: memory includes making them),
             then on maps already held, map by map and all pixels at once (the way before); each in a fresh
             subprocess; the thresholds must be equal

Timing: alternatives run interleaved, round after round, in this one process; each figure is the best
round (the machine is shared, and the best round is the one least disturbed by other processes). The
load average is printed before and after each section: compare figures only within a run.
Every throughput is also given as a fraction of the measured matmul rate in FLOP terms (model FLOPs
only: 2 * multiply-adds of the convolutions; a training step counted as 3 forward passes) and as a
ratio against the plain eager reference.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_eager as ref  # noqa: E402

from ssimae.checkpoint import Checkpoint, Thresholds, TrainingState  # noqa: E402
from ssimae.config import Config  # noqa: E402
from ssimae.data import resize_image, sample_patches  # noqa: E402
from ssimae import inference  # noqa: E402
from ssimae.inference import torch_patch_fn  # noqa: E402
from ssimae.losses import SsimSettings, l2_loss, make_loss  # noqa: E402
from ssimae.models import ConvAutoencoder, build_model  # noqa: E402
from ssimae.train import patch_batches, train_one_epoch  # noqa: E402

SECTIONS = ("machine", "ssim", "train", "infer", "predict", "folder", "outputs", "memory", "load", "thresholds")


# --------------------------------------------------------------------------- helpers


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


CLOCK = time.perf_counter  # --cpu-time: time.process_time (robust on a busy machine with --threads 1)
MATMUL_N = 2048
_A, _B = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)


def matmul() -> None:
    for _ in range(3):
        torch.mm(_A, _B)


def best_of(alternatives: dict, rounds: int, ctx: dict | None = None, warmup: bool = True) -> dict[str, float]:
    """Seconds per call of each alternative: interleaved rounds, the best round of each.

    With ctx, a 2048x2048 matmul runs among the alternatives, and ctx['gflops'] becomes the best
    rate seen so far in the run: fractions of it compare figures measured side by side.
    """
    if ctx is not None:
        alternatives = {**alternatives, "_matmul": matmul}
    best = {name: float("inf") for name in alternatives}
    for fn in alternatives.values() if warmup else ():
        fn()  # warm-up: oneDNN primitive creation, allocator, ONNX Runtime arenas
    for _ in range(rounds):
        for name, fn in alternatives.items():
            start = CLOCK()
            fn()
            best[name] = min(best[name], CLOCK() - start)
    if ctx is not None:
        ctx["gflops"] = max(ctx["gflops"], 3 * 2 * MATMUL_N**3 / best.pop("_matmul") / 1e9)
    return best


def matmul_gflops(rounds: int = 5) -> float:
    seconds = best_of({"mm": matmul}, rounds)["mm"]
    return 3 * 2 * MATMUL_N**3 / seconds / 1e9


def model_gflop(channels: int = 1, latent_dim: int = 100, patch: int = 128) -> float:
    """Forward GFLOP per patch of the Table 1 net: 2 * multiply-adds of every conv, counted from shapes."""
    model = ConvAutoencoder(channels, latent_dim, patch)
    macs = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input pixel scatters a k x k x Cout block
            pixels = inputs[0].shape[2] * inputs[0].shape[3]
            macs.append(pixels * module.in_channels * module.out_channels * module.kernel_size[0] * module.kernel_size[1])
        elif isinstance(module, torch.nn.Conv2d):  # each output pixel gathers a k x k x Cin block
            pixels = output.shape[2] * output.shape[3]
            macs.append(pixels * module.in_channels * module.out_channels * module.kernel_size[0] * module.kernel_size[1])

    for m in model.modules():
        m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, channels, patch, patch))
    return 2 * sum(macs) / 1e9


def row(name: str, value: str, *extra: str) -> None:
    print(f"  {name:<52}{value:>14}" + "".join(f"{e:>22}" for e in extra))


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """A gray uint8 texture (grating + noise), like the fixtures of the tests."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.2 * np.sin(2 * np.pi * (x + 0.5 * y) / 12 + rng.uniform(0, 6.3))
    base += 0.05 * rng.standard_normal((height, width)).astype(np.float32)
    return (np.clip(base, 0, 1) * 200 + 20).astype(np.uint8)


def write_checkpoint(path: Path, config: Config, seed: int = 0) -> Path:
    """A He-initialised Table 1 ssim-ae checkpoint (speed does not depend on training)."""
    torch.manual_seed(seed)
    model = build_model("ae", 1, config.latent_dim, config.patch_size)
    Checkpoint(config, 1, model.state_dict(), Thresholds(0.5, "bench"), TrainingState(complete=True)).save(path)
    return path


def reference_from(model: torch.nn.Module) -> torch.nn.Sequential:
    """The plain reference net with the same weights (layers are in the same order)."""
    reference = ref.reference_autoencoder(1, 100)
    src = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    dst = [m for m in reference.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for a, b in zip(src, dst, strict=True):
        b.load_state_dict(a.state_dict())
    return reference


# --------------------------------------------------------------------------- sections


def section_machine(ctx: dict) -> None:
    print(f"\n== machine ({load()})")
    row("torch / threads", f"{torch.__version__} / {torch.get_num_threads()}")
    row("fp32 matmul 2048x2048 (GFLOP/s)", f"{ctx['gflops']:.1f}")
    row("Table 1 forward, 128x128 gray (GFLOP)", f"{ctx['fwd_gflop']:.4f}", "issue says 0.243")
    row("  training step (3 x forward, GFLOP)", f"{3 * ctx['fwd_gflop']:.4f}")
    limit = ctx["gflops"] / ctx["fwd_gflop"]
    row("matmul-rate bound: inference patches/s", f"{limit:.0f}", f"training {limit / 3:.0f}")


def section_ssim(ctx: dict, rounds: int, batch: int = 64) -> dict:
    print(f"\n== ssim: patches/s of the SSIM alone, 128x128 gray, batch {batch} ({load()})")
    from ssimae import ssim

    torch.manual_seed(0)
    x = torch.rand(batch, 1, 128, 128)
    y = (0.7 * x + 0.3 * torch.rand_like(x)).clamp(0, 1)

    def with_filter(fn, matrix):
        def run():
            saved, ssim.MATRIX_MAX_SIDE = ssim.MATRIX_MAX_SIDE, (ssim.MATRIX_MAX_SIDE if matrix else 0)
            try:
                fn()
            finally:
                ssim.MATRIX_MAX_SIDE = saved
        return run

    def loss(fn):
        def run():
            y_hat = y.clone().requires_grad_(True)
            fn(x, y_hat).backward()
        return run

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(x, y)
        return run

    t = best_of({
        "loss_matrix": with_filter(loss(ssim.ssim_loss), True),
        "loss_conv": with_filter(loss(ssim.ssim_loss), False),
        "loss_naive": loss(ref.naive_ssim_loss),
        "map_matrix": with_filter(forward(ssim.ssim_map), True),
        "map_conv": with_filter(forward(ssim.ssim_map), False),
        "map_naive": forward(ref.naive_ssim_map),
    }, rounds, ctx)
    for kind, label in (("loss", "loss forward+backward"), ("map", "map forward")):
        for name, what in (("naive", "naive 11x11 window (reference)"), ("conv", "grouped 1-D convolutions"),
                           ("matrix", "banded matrices (package)")):
            key = f"{kind}_{name}"
            row(f"{label}, {what}", f"{batch / t[key]:.0f} p/s", f"{t[f'{kind}_naive'] / t[key]:.2f}x naive",
                f"{t[f'{kind}_conv'] / t[key]:.2f}x conv")
    print(f"  ({load()})")
    return t


def section_train(ctx: dict, rounds: int, batch: int) -> dict:
    print(f"\n== train: patches/s, batch {batch}, Adam ({load()})")
    from ssimae.train import TRAIN_MICRO_BATCH

    torch.manual_seed(0)
    x = torch.rand(batch, 1, 128, 128)
    ssim_ae, l2_ae = make_loss(Config()), l2_loss

    def package(memory_format):
        model = ConvAutoencoder(1, 100).to(memory_format=memory_format)
        return model, torch.optim.Adam(model.parameters(), 2e-4, weight_decay=1e-5)

    def step(model, optimizer, loss_fn, micro):
        """One optimiser step as train_one_epoch takes it (gradient accumulated over micro-batches)."""
        def run():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            for part in x.split(micro):
                (loss_fn(model(part), part) * (len(part) / len(x))).backward()
            optimizer.step()
        return run

    def ref_step(loss_fn):
        def run():
            ref.train_step(reference, ref_opt, x, loss_fn)
        return run

    nhwc, nchw = package(torch.channels_last), package(torch.contiguous_format)
    reference = ref.reference_autoencoder()
    ref_opt = torch.optim.Adam(reference.parameters(), 2e-4)
    images = [texture(512, 512, seed)[:, :, None].astype(np.float32) / 255 for seed in range(8)]
    config = Config(batch_size=batch, rotate="any", flip=True)
    loop_model, loop_opt = package(torch.channels_last)

    def loop():
        batches = itertools.islice(patch_batches(images, config, np.random.default_rng(0)), 2)
        train_one_epoch(loop_model, ssim_ae, loop_opt, batches, torch.device("cpu"), TRAIN_MICRO_BATCH)

    micro = TRAIN_MICRO_BATCH
    t = best_of({
        "ref_l2": ref_step(ref.l2_loss),
        "ref_ssim": ref_step(ref.naive_ssim_loss),
        "l2": step(*nhwc, l2_ae, micro),
        "ssim": step(*nhwc, ssim_ae, micro),
        "l2_whole": step(*nhwc, l2_ae, batch),
        "ssim_whole": step(*nhwc, ssim_ae, batch),
        "l2_nchw": step(*nchw, l2_ae, micro),
        "ssim_nchw": step(*nchw, ssim_ae, micro),
        "loop": loop,
    }, rounds, ctx)
    t["loop"] /= 2
    sample_s = best_of({"sample": lambda: sample_patches(images, batch, 128, np.random.default_rng(0), "any", True)},
                       rounds)["sample"]
    gf = 3 * ctx["fwd_gflop"]

    def show(name, key, versus=None):
        pps = batch / t[key]
        extra = [f"{pps * gf / ctx['gflops']:.1%} of matmul"]
        if versus:
            extra.append(f"{t[versus] / t[key]:.2f}x {versus}")
        row(name, f"{pps:.1f} p/s", *extra)

    show("reference eager, L2 loss", "ref_l2")
    show("reference eager, naive 11x11 SSIM loss", "ref_ssim")
    show(f"l2-ae step (NHWC, micro-batches of {micro})", "l2", "ref_l2")
    show(f"ssim-ae step (NHWC, micro-batches of {micro})", "ssim", "ref_ssim")
    show(f"l2-ae step (NHWC, one pass of {batch})", "l2_whole", "ref_l2")
    show(f"ssim-ae step (NHWC, one pass of {batch})", "ssim_whole", "ref_ssim")
    show(f"l2-ae step (NCHW, micro-batches of {micro})", "l2_nchw", "ref_l2")
    show(f"ssim-ae step (NCHW, micro-batches of {micro})", "ssim_nchw", "ref_ssim")
    show("train_one_epoch ssim-ae (sampling included)", "loop", "ref_ssim")
    row("sample_patches alone (rotate any + flips)", f"{batch / sample_s:.0f} p/s")
    row("ssim-ae step / l2-ae step (target <= 1.15)", f"{t['ssim'] / t['l2']:.3f}",
        f"one pass {t['ssim_whole'] / t['l2_whole']:.3f}", f"NCHW {t['ssim_nchw'] / t['l2_nchw']:.3f}")
    row("  the same for the reference", f"{t['ref_ssim'] / t['ref_l2']:.3f}")
    row("ssim-ae training vs reference (target >= 2x)", f"{t['ref_ssim'] / t['loop']:.2f}x",
        f"step alone {t['ref_ssim'] / t['ssim']:.2f}x")
    row("micro-batches over one pass (ssim-ae step)", f"{t['ssim_whole'] / t['ssim']:.2f}x",
        f"l2-ae {t['l2_whole'] / t['l2']:.2f}x")
    row("NHWC over NCHW (ssim-ae step)", f"{t['ssim_nchw'] / t['ssim']:.2f}x", f"l2-ae {t['l2_nchw'] / t['l2']:.2f}x")
    print(f"  ({load()})")
    return t


def section_infer(ctx: dict, rounds: int, batch: int) -> dict:
    print(f"\n== infer: patches/s incl. the 1 - SSIM map, batch {batch} ({load()})")
    from ssimae.export import onnx_model_bytes
    from ssimae.onnx_backend import make_session, onnxruntime_patch_fn

    torch.manual_seed(0)
    config = Config(latent_dim=100)
    model = ConvAutoencoder(1, 100).eval()
    reference = reference_from(model).eval()
    x = torch.rand(batch, 1, 128, 128)
    nchw_model = ConvAutoencoder(1, 100).eval()
    nchw_model.load_state_dict(model.state_dict())
    settings = SsimSettings()
    torch_fn = torch_patch_fn(model, "ssim", settings)  # NHWC (channels_last)

    @torch.inference_mode()
    def torch_nchw(patches):
        from ssimae.ssim import ssim_residual
        return ssim_residual(patches, nchw_model(patches))

    session = make_session(onnx_model_bytes(Checkpoint(config, 1, model.state_dict(), Thresholds(0.5, "bench"))))
    ort_fn = onnxruntime_patch_fn(session)
    maps = {"torch": torch_fn(x), "onnxruntime": ort_fn(x), "reference": ref.infer(reference, x)}
    for name in ("onnxruntime", "reference"):
        row(f"max |map - torch map| {name}", f"{(maps[name] - maps['torch']).abs().max().item():.2e}")
    bf16_fn = torch_patch_fn(model, "ssim", settings, precision="bf16")
    row("max |map - torch map| torch bf16 (CPU)", f"{(bf16_fn(x) - maps['torch']).abs().max().item():.2e}")

    def one_pass(fn):
        """fn with the whole batch in one forward pass (no micro-batches)."""
        def run():
            saved, inference.INFER_MICRO_BATCH = inference.INFER_MICRO_BATCH, 1 << 30
            try:
                return fn(x)
            finally:
                inference.INFER_MICRO_BATCH = saved
        return run

    t = best_of({
        "reference": lambda: ref.infer(reference, x),
        "torch_nchw": lambda: torch_nchw(x),
        "torch_whole": one_pass(torch_fn),
        "torch": lambda: torch_fn(x),
        "onnxruntime_whole": one_pass(ort_fn),
        "onnxruntime": lambda: ort_fn(x),
        "torch_bf16": lambda: bf16_fn(x),
    }, rounds, ctx)
    micro = inference.INFER_MICRO_BATCH
    for name, label in (("reference", "reference eager (NCHW, naive SSIM)"),
                        ("torch_nchw", f"torch NCHW, one pass of {batch}"),
                        ("torch_whole", f"torch NHWC, one pass of {batch}"),
                        ("torch", f"torch NHWC, micro-batches of {micro} (predict)"),
                        ("onnxruntime_whole", f"ONNX Runtime, one pass of {batch}"),
                        ("onnxruntime", f"ONNX Runtime, micro-batches of {micro}"),
                        ("torch_bf16", "torch NHWC bf16 autocast (--precision bf16)")):
        pps = batch / t[name]
        row(label, f"{pps:.1f} p/s", f"{pps * ctx['fwd_gflop'] / ctx['gflops']:.1%} of matmul",
            f"{t['reference'] / t[name]:.2f}x reference")
    row("onnxruntime over torch (micro-batches)", f"{t['torch'] / t['onnxruntime']:.2f}x")
    print(f"  ({load()})")
    return t


def section_predict(ctx: dict, rounds: int, workdir: Path) -> dict:
    print(f"\n== predict: ms per 1024x1024 gray image, stride 30 ({load()})")
    from ssimae.detector import load_detector

    checkpoint = write_checkpoint(workdir / "checkpoint.pt", Config(latent_dim=100, stride=30, infer_batch_size=128))
    image = (texture(1024, 1024, 1).astype(np.float32) / 255)[:, :, None]  # (H, W, 1) as read_image gives
    torch.manual_seed(0)
    detectors = {}
    for size in ("256", None):
        for backend in ("torch", "onnxruntime"):
            det = load_detector(checkpoint, backend, {"device": "cpu"})
            det.config.image_size = size
            detectors[(size, backend)] = det
    model = build_model("ae", 1, 100, 128)
    model.load_state_dict(Checkpoint.load(checkpoint).weights)
    reference = reference_from(model).eval()

    def reference_predict(size):
        def run():
            # the same preprocessing and resize back as the package, then a plain sliding window
            small = resize_image(image, int(size)) if size else image
            amap = ref.reference_anomaly_map(torch.from_numpy(small).permute(2, 0, 1), reference, 128, 30, 128)
            if size:
                amap = torch.nn.functional.interpolate(amap[None, None], size=(1024, 1024), mode="bilinear",
                                                       align_corners=False)[0, 0]
            return amap
        return run

    results = {}
    for size, label, r in (("256", "--image-size 256", rounds), (None, "full size", max(1, rounds - 1))):
        patches = (len(range(0, (int(size) if size else 1024) - 128 + 1, 30)) + 1) ** 2
        check = np.abs(detectors[(size, "onnxruntime")].predict(image).anomaly_map
                       - detectors[(size, "torch")].predict(image).anomaly_map).max()
        t = best_of({
            "reference": reference_predict(size),
            "torch": lambda: detectors[(size, "torch")].predict(image),
            "onnxruntime": lambda: detectors[(size, "onnxruntime")].predict(image),
        }, r, ctx)
        print(f"  {label}: {patches} patches per image; max |onnxruntime map - torch map| {check:.2e}")
        for name in ("reference", "torch", "onnxruntime"):
            row(f"{label}, {name}", f"{1000 * t[name]:.0f} ms",
                f"{patches * ctx['fwd_gflop'] / t[name] / ctx['gflops']:.1%} of matmul",
                f"{t['reference'] / t[name]:.2f}x reference")
        results[label] = t
    print(f"  ({load()})")
    return results


def section_folder(ctx: dict, rounds: int, count: int, workdir: Path) -> dict:
    print(f"\n== folder: {count} PNGs of 1024x1024 gray, --image-size 256, stride 30 ({load()})")
    from ssimae.detector import load_detector
    from ssimae.predict import predict_folder

    checkpoint = write_checkpoint(workdir / "checkpoint.pt", Config(latent_dim=100, stride=30, infer_batch_size=128))
    folder = workdir / "images"
    folder.mkdir(exist_ok=True)
    for i in range(count):
        Image.fromarray(texture(1024, 1024, i)).save(folder / f"{i:03d}.png")
    runs, detectors = {}, []
    for backend in ("torch", "onnxruntime"):
        det = load_detector(checkpoint, backend, {"device": "cpu"})
        det.config.image_size = "256"
        detectors.append(det)
        for overlap in (True, False):
            out = workdir / f"out-{backend}-{overlap}"
            runs[f"{backend}, {'overlapped' if overlap else 'sequential'} I/O"] = (
                lambda det=det, out=out, overlap=overlap: predict_folder(det, folder, out, overlap=overlap))
    model = build_model("ae", 1, 100, 128)
    model.load_state_dict(Checkpoint.load(checkpoint).weights)
    reference = reference_from(model).eval()

    def reference_folder():
        """One image after the other: read, resize, the plain sliding window, resize back, write."""
        from ssimae.data import read_image, resize_map
        from ssimae.detector import Prediction
        from ssimae.predict import score_row, write_outputs

        for path in sorted(folder.glob("*.png")):
            image = read_image(path)
            small = resize_image(image, 256)
            amap = ref.reference_anomaly_map(torch.from_numpy(small).permute(2, 0, 1), reference, 128, 30, 128)
            amap = resize_map(amap.numpy(), *image.shape[:2])
            mask = amap > 0.5
            result = Prediction(amap, mask, float(amap.max()), bool(mask.any()), int(mask.any()))
            write_outputs(workdir / "out-reference", Path(path.stem), image, result,
                          score_row(path.name, result, 0.5, None))

    runs["reference eager, sequential"] = reference_folder
    for det in detectors:  # warm up each backend on one image, not on the whole folder
        det.predict((texture(1024, 1024, 0)[:, :, None] / 255).astype(np.float32))
    t = best_of(runs, rounds, ctx, warmup=False)
    a = np.asarray(Image.open(workdir / "out-torch-True" / "overlays" / "000.png"))
    b = np.asarray(Image.open(workdir / "out-torch-False" / "overlays" / "000.png"))
    print(f"  overlapped and sequential outputs identical: {bool((a == b).all())}")
    base = t["reference eager, sequential"]
    for name, seconds in t.items():
        ips = count / seconds
        row(name, f"{ips:.2f} img/s", f"{ips * 36 * ctx['fwd_gflop'] / ctx['gflops']:.1%} of matmul",
            f"{base / seconds:.2f}x reference")
    for backend in ("torch", "onnxruntime"):
        row(f"overlapped over sequential I/O, {backend}",
            f"{t[f'{backend}, sequential I/O'] / t[f'{backend}, overlapped I/O']:.2f}x")
    print(f"  ({load()})")
    return t


def section_outputs(ctx: dict, rounds: int, workdir: Path) -> dict:
    """The per-image work of predict's writer threads, one thread: on a GPU it limits predict."""
    print(f"\n== outputs: ms per 1024x1024 gray image, besides the network, 1 thread ({load()})")
    import io

    from scipy import ndimage

    from ssimae.checkpoint import Thresholds
    from ssimae.detector import Detector
    from ssimae.overlay import contour, verdict_overlay
    from ssimae.png import encode_png
    from ssimae.predict import caption, score_row, write_outputs

    image = (texture(1024, 1024, 0)[:, :, None] / 255).astype(np.float32)
    amap = ndimage.gaussian_filter(np.abs(image[:, :, 0] - ndimage.gaussian_filter(image[:, :, 0], 8)), 2)
    amap[400:460, 500:620] += 0.2  # a defect, so that the mask and the contour are not empty
    pixel = float(np.quantile(amap, 0.99))
    detector = Detector(Config(), lambda working: amap, Thresholds(pixel, "bench", float(amap.max()), "bench"), 1)
    result = detector.decide(amap)
    row_ = score_row("a.png", result, pixel, detector.image_threshold)
    overlay = verdict_overlay(image, amap, result.mask, pixel, caption(row_), result.defective)
    mask = result.mask.astype(np.uint8) * 255

    def pillow_png(array, level):
        return lambda: Image.fromarray(array).save(io.BytesIO(), format="PNG", compress_level=level)

    def stdlib_zlib_png():  # png.py before isal: the same Up filter, deflated by the standard library
        import zlib

        import ssimae.png as png_module

        deflate, png_module.deflate = png_module.deflate, zlib
        try:
            return encode_png(overlay)
        finally:
            png_module.deflate = deflate

    def scipy_contour():
        edge = result.mask & ~ndimage.binary_erosion(result.mask, iterations=1, border_value=0)
        ndimage.binary_dilation(edge, iterations=1)

    runs = {
        "decide (mask, regions, score, verdict)": lambda: detector.decide(amap),
        "overlay picture (verdict_overlay)": lambda: verdict_overlay(image, amap, result.mask, pixel, caption(row_),
                                                                     result.defective),
        "contour, numpy shifts (package)": lambda: contour(result.mask, True),
        "contour, scipy binary morphology (before)": scipy_contour,
        "overlay PNG, Up filter + isal 2 (package)": lambda: encode_png(overlay),
        "overlay PNG, Up filter + zlib 1 (before)": stdlib_zlib_png,
        "overlay PNG, Pillow level 1 (before)": pillow_png(overlay, 1),
        "overlay PNG, Pillow default level 6": pillow_png(overlay, 6),
        "mask PNG (package)": lambda: encode_png(mask),
        "mask PNG, Pillow level 1 (before)": pillow_png(mask, 1),
        "map TIFF (float32, Pillow)": lambda: Image.fromarray(amap, mode="F").save(io.BytesIO(), format="TIFF"),
        "all files of one image (write_outputs)": lambda: write_outputs(workdir / "out-outputs", Path("a"), image,
                                                                        result, row_),
    }
    t = best_of(runs, rounds)
    sizes = {"overlay PNG, Up filter + isal 2 (package)": len(encode_png(overlay)),
             "overlay PNG, Up filter + zlib 1 (before)": len(stdlib_zlib_png())}
    for name, level in (("overlay PNG, Pillow level 1 (before)", 1), ("overlay PNG, Pillow default level 6", 6)):
        buffer = io.BytesIO()
        Image.fromarray(overlay).save(buffer, format="PNG", compress_level=level)
        sizes[name] = len(buffer.getvalue())
    for name, seconds in t.items():
        size = f"{sizes[name] / 1e6:.2f} MB" if name in sizes else ""
        row(name, f"{seconds * 1000:.1f} ms", size)
    package = t["overlay PNG, Up filter + isal 2 (package)"]
    row("overlay PNG: package over Pillow level 1", f"{t['overlay PNG, Pillow level 1 (before)'] / package:.2f}x")
    row("overlay PNG: package over stdlib zlib 1", f"{t['overlay PNG, Up filter + zlib 1 (before)'] / package:.2f}x")
    row("contour: package over scipy", f"{t['contour, scipy binary morphology (before)'] / t['contour, numpy shifts (package)']:.1f}x")
    t.update(writer_scaling(detector, amap, image, pixel, workdir / "out-writers"))
    print(f"  ({load()})")
    return t


def writer_scaling(detector, amap: np.ndarray, image: np.ndarray, pixel: float, out: Path, count: int = 24) -> dict:
    """Images per second of predict's writer job (decide, then write_outputs) in 1 thread and in as many
    as predict uses here: whether the writers run in parallel or wait on the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    from ssimae.predict import WRITERS, score_row, write_outputs

    def job(index: int) -> None:
        result = detector.decide(amap)
        write_outputs(out, Path(str(index)), image, result, score_row(f"{index}.png", result, pixel,
                                                                      detector.image_threshold))

    rates = {}
    for threads in sorted({1, WRITERS}):
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(job, range(count)))
        rates[threads] = count / (time.perf_counter() - start)
        row(f"writer job, {threads} thread(s)", f"{rates[threads]:.2f} images/s")
    if WRITERS > 1:
        row(f"writers: {WRITERS} threads over 1", f"{rates[WRITERS] / rates[1]:.2f}x", f"{os.cpu_count()} cores")
    return {f"writers_{threads}_images_per_s": rate for threads, rate in rates.items()}


MEMORY_SCRIPT = r"""
import sys, time
from ssimae.cli import main
start = time.perf_counter()
rc = main(["predict", sys.argv[1], sys.argv[2], "-o", sys.argv[3], "--quiet", "--backend", sys.argv[4]])
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(rc, peak / 1024, time.perf_counter() - start)
"""


def section_memory(ctx: dict, workdir: Path, backends: tuple[str, ...]) -> dict:
    print(f"\n== memory: peak RSS of `ssimae predict`, one image, full size ({load()})")
    results = {}
    for side, stride in ((1024, 30), (8192, 128)):
        checkpoint = write_checkpoint(workdir / f"checkpoint{stride}.pt",
                                      Config(latent_dim=100, stride=stride, infer_batch_size=64))
        folder = workdir / f"mem{side}"
        folder.mkdir(exist_ok=True)
        y, x = np.mgrid[0:side, 0:side].astype(np.float32)
        Image.fromarray((127 + 60 * np.sin(x / 7) * np.cos(y / 11)).astype(np.uint8)).save(folder / "image.png")
        del y, x
        for backend in backends:
            out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(checkpoint), str(folder),
                                  str(workdir / f"memout{side}"), backend],
                                 capture_output=True, text=True, check=True)
            rc, peak, seconds = out.stdout.split()[-3:]
            results[(side, backend)] = float(peak)
            row(f"{side}x{side}, stride {stride}, {backend}", f"{float(peak):.0f} MB",
                f"{float(seconds):.1f} s", "target < 2048 MB" if side == 8192 else "")
    baseline = subprocess.run([sys.executable, "-c", "import ssimae.cli, ssimae.predict, torch\n"
                               "print(next(int(l.split()[1]) for l in open('/proc/self/status') "
                               "if l.startswith('VmHWM:')) / 1024)"], capture_output=True, text=True, check=True)
    row("python + torch + ssimae imported, nothing run", f"{float(baseline.stdout):.0f} MB")
    print(f"  ({load()})")
    return results


def section_load(ctx: dict, workdir: Path, count: int) -> dict:
    """`ssimae predict` on a folder of many small images, in a fresh process: peak RSS and time (memory
    must not grow with the number of images: scores.csv is written as images finish)."""
    print(f"\n== load: `ssimae predict` on {count} PNGs of 128x128 gray, one process ({load()})")
    checkpoint = write_checkpoint(workdir / "checkpoint-load.pt", Config(latent_dim=100, stride=30, infer_batch_size=64))
    folder = workdir / "load"
    folder.mkdir(exist_ok=True)
    for i in range(count):
        Image.fromarray(texture(128, 128, i)).save(folder / f"{i:05d}.png")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(checkpoint), str(folder), str(workdir / "loadout"),
                          "torch"], capture_output=True, text=True, check=True)
    rc, peak, seconds = out.stdout.split()[-3:]
    rows = sum(1 for _ in open(workdir / "loadout" / "scores.csv")) - 1
    row(f"{count} images, exit {rc}, {rows} rows in scores.csv", f"{float(peak):.0f} MB",
        f"{float(seconds):.0f} s, {count / float(seconds):.1f} images/s")
    print(f"  ({load()})")
    return {"peak_mb": float(peak), "seconds": float(seconds)}


THRESHOLD_SCRIPT = r"""
import sys, time
import numpy as np
from scipy import ndimage
from ssimae import threshold

def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

def all_at_once_min_area(maps, area):  # the package's rule before: one search over every map's values
    allowed = max(area - 1, 0)
    candidates = np.unique(np.concatenate([m.ravel() for m in maps]))
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        if max(threshold.largest_component(m > candidates[middle]) for m in maps) <= allowed:
            high = middle
        else:
            low = middle + 1
    return float(candidates[high])

count, side, rule, way = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = np.random.default_rng(0)
make = lambda: ndimage.gaussian_filter(rng.random((side, side), dtype=np.float32), 3)
if way == "summary":  # the fit's way: each map summarised as it is made, none kept
    before = peak_mb()
    started = time.perf_counter()
    summary = threshold.ValidationSummary(rule, 0.001, 25, count * side * side)
    for _ in range(count):
        amap = make()
        summary.add(amap, float(amap.max()))
    value = summary.threshold()
    summary.figures(value, 1.0)
    print(repr(value), peak_mb() - before, time.perf_counter() - started)
    sys.exit()
maps = [make() for _ in range(count)]
before = peak_mb()
started = time.perf_counter()
if rule == "pixel-fpr":
    value = (threshold.fpr_threshold(maps, 0.001) if way == "map by map"
             else threshold.rate_threshold(np.concatenate([m.ravel() for m in maps]), 0.001))
else:
    value = threshold.min_area_threshold(maps, 25) if way == "map by map" else all_at_once_min_area(maps, 25)
print(repr(value), peak_mb() - before, time.perf_counter() - started)
"""


def section_thresholds(ctx: dict, count: int = 20, side: int = 2048) -> dict:
    """The pixel threshold rules on large validation maps: memory beyond the maps themselves, and time."""
    print(f"\n== thresholds: {count} validation maps of {side}x{side} ({count * side * side * 4 / 2**20:.0f} MB), "
          f"memory added at the peak beyond python and numpy (and beyond the maps where they are held) ({load()})")
    results = {}
    for rule in ("pixel-fpr", "min-area"):
        for way in ("summary", "map by map", "all at once"):
            out = subprocess.run([sys.executable, "-c", THRESHOLD_SCRIPT, str(count), str(side), rule, way],
                                 capture_output=True, text=True, check=True)
            value, added, seconds = out.stdout.split()[-3:]
            results[(rule, way)] = (value, float(added), float(seconds))
            label = {"summary": "summarised as made (the fit)", "map by map": "held, map by map",
                     "all at once": "held, all at once (before)"}[way]
            row(f"{rule}: maps {label}",
                f"{float(added):.0f} MB", f"{float(seconds):.1f} s", f"threshold {float(value):.6f}")
        same = len({results[(rule, way)][0] for way in ("summary", "map by map", "all at once")}) == 1
        print(f"  {rule}: the same threshold every way: {'yes' if same else 'NO'}")
    print(f"  ({load()})")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="2 rounds, batch 64 training, 20 folder images")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per comparison (default 3, quick 2)")
    parser.add_argument("--threads", type=int, help="torch (and ONNX Runtime) intra-op threads (default: torch's)")
    parser.add_argument("--train-batch", type=int, help="training batch (default 128 as in the paper, quick 64)")
    parser.add_argument("--infer-batch", type=int, default=128)
    parser.add_argument("--folder-images", type=int, help="images in the folder section (default 100, quick 20)")
    parser.add_argument("--memory-backends", default="torch", help="torch,onnxruntime")
    parser.add_argument("--load-images", type=int, default=2000, help="images in the load section")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time (use with --threads 1 on a busy machine)")
    args = parser.parse_args(argv)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    rounds = args.rounds or (2 if args.quick else 3)
    train_batch = args.train_batch or (64 if args.quick else 128)
    folder_images = args.folder_images or (20 if args.quick else 100)
    started = time.perf_counter()
    print(f"ssimae speed bench, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {load()}, "
          f"{'CPU' if args.cpu_time else 'wall'} time, best of {rounds} interleaved rounds")
    ctx = {"gflops": matmul_gflops(), "fwd_gflop": model_gflop()}
    ctx["start_gflops"] = ctx["gflops"]
    section_machine(ctx)
    with tempfile.TemporaryDirectory(prefix="ssimae-bench-") as tmp:
        work = Path(tmp)
        if "ssim" in sections:
            section_ssim(ctx, rounds)
        if "train" in sections:
            section_train(ctx, rounds, train_batch)
        if "infer" in sections:
            section_infer(ctx, rounds, args.infer_batch)
        if "predict" in sections:
            section_predict(ctx, rounds, work)
        if "folder" in sections:
            section_folder(ctx, 1, folder_images, work)
        if "outputs" in sections:
            section_outputs(ctx, rounds, work)
        if "memory" in sections:
            section_memory(ctx, work, tuple(args.memory_backends.split(",")))
        if "load" in sections:
            section_load(ctx, work, args.load_images)
        if "thresholds" in sections:
            section_thresholds(ctx)
    start_rate = ctx["start_gflops"]
    print(f"\nmatmul rate: {start_rate:.1f} GFLOP/s at the start, {matmul_gflops():.1f} at the end, best seen "
          f"{ctx['gflops']:.1f} (the fractions above use the best seen up to their section); "
          f"{time.perf_counter() - started:.0f} s; {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
