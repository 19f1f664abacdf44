"""CUDA only (skipped without a GPU): CUDA-graph training steps and inference batches compute what the
eager code computes; the GPU's way of adding up windows equals the CPU's; a run trained on the GPU
resumes on the CPU. CI has no GPU: these run in the GPU sessions (bench/README.md says which)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import texture_batch, tiny_config

from ssimae.checkpoint import Checkpoint
from ssimae.config import Config
from ssimae.fused_ssim import fused_available, fused_ssim_residual
from ssimae.graphs import EAGER_STEPS_BEFORE_RECORDING, GraphedBatches, portable_optimizer_state
from ssimae.inference import sliding_window, torch_patch_fn
from ssimae.losses import l2_loss, make_loss
from ssimae.models import ConvAutoencoder
from ssimae.ssim import ssim_residual
from ssimae.train import eager_step, fit, graphed_step, train_one_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def strict_fp32():
    """Strict fp32 matrix products and convolutions, so that eager and graphed runs can be compared closely."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = ConvAutoencoder(1, 16).to(CUDA, memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), 2e-4, weight_decay=1e-5)


@pytest.mark.parametrize("loss_name", ["ssim", "l2"])
def test_each_graphed_step_is_the_eager_step(loss_name):
    """Step by step, from the same weights and optimizer state: a whole trajectory cannot be compared, as
    a relative 1e-6 of rounding in the gradients moves the SSIM-AE's weights by up to 7e-4 within 8 steps
    (measured on the CPU by perturbing the gradients). Within one step Adam's update (about the learning
    rate, 2e-4, per weight) can still differ by rounding where a gradient is near 0: on an H200 one weight
    in 36,864 moved by 2.8e-6. A wrong step (a stale batch or gradient) moves most weights by ~2e-4."""
    loss_fn = make_loss(Config()) if loss_name == "ssim" else l2_loss
    model, optimizer = _model_and_optimizer()
    step = graphed_step(model, loss_fn, optimizer, CUDA)
    twin, twin_optimizer = _model_and_optimizer()
    for k in range(8):
        x = texture_batch(16, seed=k).to(CUDA)
        twin.load_state_dict(model.state_dict())
        twin_optimizer.load_state_dict(copy.deepcopy(portable_optimizer_state(optimizer)))
        expected_loss = eager_step(twin, loss_fn, twin_optimizer, x).item()
        loss = step(x).item()
        assert (step.graph is not None) == (k >= EAGER_STEPS_BEFORE_RECORDING)  # later steps are replays
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        difference = torch.cat([(got - expected).abs().flatten()
                                for got, expected in zip(model.parameters(), twin.parameters())])
        assert difference.max() < 2e-5  # 10% of the learning rate
        assert (difference > 2e-6).float().mean() < 1e-3  # all but a few weights within 1% of it


def test_recording_waits_for_eager_steps_of_the_batch_s_own_shape():
    model, optimizer = _model_and_optimizer()
    step = graphed_step(model, l2_loss, optimizer, CUDA)
    shapes = [8, 8, 8, 16, 16, 16, 16, 8, 16]  # after 3 batches of 8 one of 16: the count starts again
    recorded = []
    for k, count in enumerate(shapes):
        step(texture_batch(count, seed=k).to(CUDA)).item()
        recorded.append(step.graph is not None)
    assert recorded == [False] * 6 + [True] * 3
    assert step.static_input.shape[0] == 16  # the 8-patch batch after it ran eagerly


def test_train_one_epoch_with_a_graph_counts_and_averages_like_eager():
    batches = [texture_batch(8, seed=k).to(CUDA) for k in range(6)]
    loss_fn = make_loss(Config())
    model, optimizer = _model_and_optimizer()
    eager = train_one_epoch(model, loss_fn, optimizer, iter(batches), CUDA)
    model, optimizer = _model_and_optimizer()
    graphed = train_one_epoch(model, loss_fn, optimizer, iter(batches), CUDA,
                              graphed=graphed_step(model, loss_fn, optimizer, CUDA))
    assert graphed[1] == eager[1] == 6
    assert graphed[0] == pytest.approx(eager[0], rel=1e-4)


def test_a_diverging_graphed_run_stops_with_a_clear_error():
    model, optimizer = _model_and_optimizer()
    for group in optimizer.param_groups:
        group["lr"] = float("inf")
    from ssimae.errors import SsimaeError

    with pytest.raises(SsimaeError, match="diverged"):
        train_one_epoch(model, l2_loss, optimizer, iter([texture_batch(8, seed=k).to(CUDA) for k in range(6)]),
                        CUDA, graphed=graphed_step(model, l2_loss, optimizer, CUDA))


def test_graphed_inference_equals_eager_at_every_batch_size():
    torch.manual_seed(0)
    model = ConvAutoencoder(1, 16).to(CUDA)
    eager = torch_patch_fn(model, "ssim", device=CUDA, precision="fp32")
    graphed = torch_patch_fn(model, "ssim", device=CUDA, precision="fp32", graph_batch=32)
    for count in (32, 5, 32, 70, 1):
        x = texture_batch(count, seed=count).to(CUDA)
        torch.testing.assert_close(graphed(x), eager(x), rtol=0, atol=1e-5)


def test_graphed_bf16_inference_equals_eager_in_the_graph_s_batch_shapes():
    """In bf16 the map depends on the batch's shape (cuDNN picks other kernels): on an H200, 70 patches at
    once and in the graph's slices of 32 differed by up to 0.021. So the graph is compared with eager runs
    on the batches it runs: slices of 32, a last one of at least 16 padded (each patch's map depends on
    that patch alone), a smaller one eagerly."""
    torch.manual_seed(0)
    model = ConvAutoencoder(1, 16).to(CUDA)
    eager = torch_patch_fn(model, "ssim", device=CUDA, precision="bf16")
    graphed = torch_patch_fn(model, "ssim", device=CUDA, precision="bf16", graph_batch=32)
    for count in (32, 5, 20, 70):
        x = texture_batch(count, seed=count).to(CUDA)
        expected = []
        for part in x.split(32):
            if 2 * len(part) < 32:  # run eagerly
                expected.append(eager(part))
                continue
            padded = torch.cat([part, texture_batch(32 - len(part), seed=99).to(CUDA)]) if len(part) < 32 else part
            expected.append(eager(padded)[: len(part)])
        torch.testing.assert_close(graphed(x), torch.cat(expected), rtol=0, atol=1e-3)
        torch.testing.assert_close(graphed(x), eager(x), rtol=0, atol=5e-2)  # any batch shape: bf16's spread


def test_graphed_batches_keep_earlier_outputs_intact():
    fn = GraphedBatches(lambda x: x * 2, 4, CUDA)
    first = fn(torch.ones(4, 3, device=CUDA))
    second = fn(torch.full((2, 3), 5.0, device=CUDA))
    assert first.eq(2).all() and second.eq(10).all() and len(second) == 2


def test_windows_added_up_on_the_gpu_equal_the_cpu():
    rng = np.random.default_rng(0)
    weights = torch.linspace(0.5, 1.5, 128)[None, None, :, None]
    for shape in [(1024, 1000, 1), (300, 517, 3), (100, 90, 1)]:
        image = rng.random(shape, dtype=np.float32)
        cpu = sliding_window(image, lambda p: p.mean(1, keepdim=True) * weights, 128, 30, 64, "cpu")
        gpu = sliding_window(image, lambda p: p.mean(1, keepdim=True) * weights.to(CUDA), 128, 30, 64, CUDA)
        np.testing.assert_allclose(gpu, cpu, atol=1e-5)
        again = sliding_window(image, lambda p: p.mean(1, keepdim=True) * weights.to(CUDA), 128, 30, 64, CUDA)
        np.testing.assert_array_equal(again, gpu)  # the same map from run to run


def test_a_run_trained_with_graphs_on_the_gpu_resumes_on_the_cpu(tmp_path, mvtec_root):
    fit(tiny_config(device="cuda", max_steps=6, batch_size=8, patches_per_epoch=24), mvtec_root, tmp_path / "run",
        progress=False)
    saved = Checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert saved.training.step == 6
    assert not any(group.get("capturable") for group in saved.optimizer_state["param_groups"])
    fit(tiny_config(device="cpu", max_steps=8, batch_size=8, patches_per_epoch=24), mvtec_root, tmp_path / "run",
        progress=False, resume=True)
    assert Checkpoint.load(tmp_path / "run" / "checkpoint.pt").training.step == 8


def test_every_reconstruction_method_trains_on_the_gpu(tmp_path, mvtec_root):
    """2 L2 warm-up steps, then 7 of the method's loss: 3 eager, a recording, 3 replays."""
    for method in ("ssim-ae", "l2-ae", "vae", "fm-ae"):
        fit(tiny_config(method=method, device="cuda", max_steps=9, l2_warmup_steps=2), mvtec_root,
            tmp_path / method, progress=False)
        network = Checkpoint.load(tmp_path / method / "checkpoint.pt").network()
        assert all(torch.isfinite(p).all() for p in network.parameters())


@pytest.mark.parametrize("channels, data_range", [(1, 1.0), (3, 1.0), (1, 0.3)])
def test_fused_ssim_map_equals_the_plain_one(channels, data_range):
    assert fused_available(CUDA)  # torch's CUDA build compiles the jiterator kernels
    torch.manual_seed(channels)
    x = torch.rand(40, channels, 128, 128, device=CUDA) * 0.2 + 0.4
    y = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    y[:5] = y[:5].mean(dim=(2, 3), keepdim=True)  # flat reconstructions, as a collapsed SSIM-AE gives
    plain = ssim_residual(x, y, data_range=data_range)
    fused = fused_ssim_residual(x, y, data_range=data_range)
    assert fused.shape == plain.shape == (40, 1, 128, 128)
    torch.testing.assert_close(fused, plain, atol=2e-5, rtol=0)
    with_tf32 = fused_ssim_residual(x, y, data_range=data_range, tf32_filter=True)
    assert (with_tf32 - plain).abs().max().item() < 5e-3  # TF32: 10 mantissa bits in the filter products
    assert not torch.backends.cuda.matmul.allow_tf32  # the switch is restored after the filter


def test_inference_on_cuda_uses_the_fused_map_and_matches_the_cpu(monkeypatch):
    import ssimae.inference as inference

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("tf32_filter", args[5] if len(args) > 5 else None))
        return fused_ssim_residual(*args, **kwargs)

    monkeypatch.setattr(inference, "fused_ssim_residual", counted)
    model = ConvAutoencoder(1, 16).eval()
    x = texture_batch(12, seed=5)
    on_cpu = torch_patch_fn(copy.deepcopy(model), "ssim", device="cpu")(x)
    assert not calls
    for graph_batch in (None, 16):  # eager, and replayed from a graph (12 patches: padded to the graph's 16)
        on_cuda = torch_patch_fn(copy.deepcopy(model), "ssim", device=CUDA, precision="fp32", graph_batch=graph_batch)(x)
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-4, rtol=0)
    assert calls and set(calls) == {False}  # fp32: strict filter products
    torch_patch_fn(copy.deepcopy(model), "ssim", device=CUDA, precision="bf16")(x)
    assert calls[-1] is True  # bf16: TF32 filter products
