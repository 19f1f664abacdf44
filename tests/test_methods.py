"""One contract for every method of losses.METHODS (ssim-ae, l2-ae, vae, fm-ae), plus hand-computed losses."""

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ssimae.features
import ssimae.train
from ssimae.config import Config
from ssimae.features import build_feature_extractor
from ssimae.losses import METHODS, compute_loss, kl_to_unit_gaussian, reconstruction
from ssimae.models import VaeOutput, build_model
from ssimae.predict import load_detector
from ssimae.train import fit

LATENT = 8


@pytest.fixture(scope="module")
def feature_extractor():
    return build_feature_extractor()  # the default F: packaged EfficientNet-Lite0 weights


def textured_batch(count: int = 2, size: int = 128) -> torch.Tensor:
    """Fixed patches, (count, 1, size, size): stripes on a dark or a bright base, plus fixed noise."""
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    patches = [(0.25 if k % 2 else 0.7) + 0.15 * torch.sin(xx / (4 + k) + yy / 7)
               + 0.05 * torch.randn(size, size, generator=generator) for k in range(count)]
    return torch.stack(patches).clamp(0, 1)[:, None]


def loss_args(name, feature_extractor):
    return {"feature_extractor": feature_extractor if METHODS[name].loss == "fm" else None}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("channels", [1, 3])
def test_model_output_shapes(name, channels):
    torch.manual_seed(0)
    model = build_model(METHODS[name].model_kind, channels=channels, latent_dim=LATENT, patch_size=128).eval()
    x = torch.rand(2, channels, 128, 128)
    with torch.no_grad():
        output = model(x)
    x_hat = reconstruction(output)
    assert x_hat.shape == (2, channels, 128, 128)
    assert 0 <= x_hat.min() and x_hat.max() <= 1
    if METHODS[name].model_kind == "vae":
        assert isinstance(output, VaeOutput)
        assert output.mean.shape == output.log_var.shape == (2, LATENT, 1, 1)
        assert torch.equal(model(x).reconstruction, x_hat)  # eval mode decodes the mean: deterministic


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_is_finite_and_a_few_steps_lower_it(name, feature_extractor):
    torch.manual_seed(0)
    model = build_model(METHODS[name].model_kind, channels=1, latent_dim=LATENT, patch_size=128).train()
    x = textured_batch()
    args = loss_args(name, feature_extractor)

    def objective():
        torch.manual_seed(123)  # the VAE's reparameterisation noise is the same in every evaluation
        return compute_loss(METHODS[name], model(x), x, **args)

    with torch.no_grad():
        before = objective().item()
    assert math.isfinite(before) and before > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        loss = objective()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = objective().item()
    assert after < 0.99 * before, (before, after)


def write_folder(folder, count: int = 3, size=(140, 150)):
    """Gray textured PNGs (H, W) = size in a plain folder."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: size[0], : size[1]]
    for i in range(count):
        image = 0.5 + 0.2 * np.sin(xx / 5 + yy / (7 + i)) + 0.05 * rng.standard_normal(size)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / f"good_{i}.png")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_predict_from_the_checkpoint_alone_after_a_tiny_fit(name, tmp_path, monkeypatch):
    monkeypatch.setattr(ssimae.train, "VALIDATION_PATCHES", 4)  # keep the per-epoch validation tiny
    write_folder(tmp_path / "good")
    config = Config(method=name, latent_dim=LATENT, batch_size=2, patches_per_epoch=2, max_steps=1, stride=64,
                    infer_batch_size=8, val_fraction=0.34, device="cpu")
    result = fit(config, tmp_path / "good", tmp_path / "run", progress=False)
    assert result.steps == 1 and result.threshold is not None

    # Only the checkpoint file: no run folder, no training images, no feature extractor.
    checkpoint = tmp_path / "model.pt"
    shutil.copy(result.checkpoint, checkpoint)
    image = np.asarray(Image.open(tmp_path / "good" / "good_0.png"), dtype=np.float32)[:, :, None] / 255
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(tmp_path / "good")

    def no_features(*args, **kwargs):
        raise AssertionError("prediction must not need the feature extractor")

    monkeypatch.setattr(ssimae.features, "build_feature_extractor", no_features)
    detector = load_detector(checkpoint, device="cpu")
    assert detector.config.method == name
    prediction = detector.predict(image)
    assert prediction.anomaly_map.shape == (140, 150) and prediction.mask.shape == (140, 150)
    assert np.isfinite(prediction.anomaly_map).all() and prediction.anomaly_map.min() >= 0
    assert prediction.mask.dtype == bool
    assert prediction.score == pytest.approx(float(prediction.anomaly_map.max()))


def test_kl_matches_a_hand_computed_value():
    # Sample 1: mu = (1, 0), sigma^2 = (1, 2): KL = -1/2 [(1 + 0 - 1 - 1) + (1 + ln 2 - 0 - 2)] = 1 - ln(2) / 2.
    # Sample 2: the prior itself: KL = 0.
    mean = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 2, 1, 1)
    log_var = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]]).view(2, 2, 1, 1)
    kl = kl_to_unit_gaussian(mean, log_var)
    assert kl.shape == (2,)
    assert kl[0].item() == pytest.approx(1 - math.log(2) / 2, rel=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    # An independent reference: torch.distributions.
    posterior = torch.distributions.Normal(mean.flatten(1), (0.5 * log_var.flatten(1)).exp())
    prior = torch.distributions.Normal(torch.zeros(2, 2), torch.ones(2, 2))
    reference = torch.distributions.kl_divergence(posterior, prior).sum(dim=1)
    assert torch.allclose(kl, reference, atol=1e-6)


def test_vae_loss_is_l2_plus_beta_kl_per_pixel():
    x = torch.zeros(1, 1, 2, 2)
    output = VaeOutput(torch.full((1, 1, 2, 2), 0.5), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1),
                       torch.tensor([0.0, math.log(2.0)]).view(1, 2, 1, 1))
    kl = 1 - math.log(2) / 2
    # Sum of squared errors 4 * 0.25 = 1, plus beta * KL, over the 4 pixels of a sample.
    loss = compute_loss(METHODS["vae"], output, x, vae_beta=2.0)
    assert loss.item() == pytest.approx((1 + 2 * kl) / 4, rel=1e-6)


def test_fm_loss_is_l2_plus_lambda_feature_error():
    x, x_hat = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)

    def double(images):  # a stand-in F with a known output
        return 2 * images

    loss = compute_loss(METHODS["fm-ae"], x_hat, x, fm_lambda=0.5, feature_extractor=double)
    assert loss.item() == pytest.approx(0.25 + 0.5 * 1.0)  # L2 0.25; features differ by 1 -> squared 1
