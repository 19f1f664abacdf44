"""One contract for every method of methods.METHODS through the Detector, the paper methods' models
and losses, and hand-computed losses."""

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ssimae.features
import ssimae.train
from conftest import texture_batch, write_good_folder
from ssimae.config import Config
from ssimae.detector import load_detector
from ssimae.features import build_feature_extractor
from ssimae.losses import feature_matching_loss_fn, kl_to_unit_gaussian, make_loss, reconstruction, vae_loss_fn
from ssimae.methods import METHODS, PAPER_METHODS
from ssimae.models import VaeOutput, build_model
from ssimae.scoring import image_score
from ssimae.train import fit

LATENT = 8


@pytest.fixture(scope="module")
def feature_extractor():
    return build_feature_extractor()  # the default F: packaged EfficientNet-Lite0 weights


@pytest.mark.parametrize("name", PAPER_METHODS)
@pytest.mark.parametrize("channels", [1, 3])
def test_model_output_shapes(name, channels):
    torch.manual_seed(0)
    model = build_model(METHODS[name].model, channels=channels, latent_dim=LATENT, patch_size=128).eval()
    x = torch.rand(2, channels, 128, 128)
    with torch.no_grad():
        output = model(x)
    x_hat = reconstruction(output)
    assert x_hat.shape == (2, channels, 128, 128)
    assert 0 <= x_hat.min() and x_hat.max() <= 1
    if METHODS[name].model == "vae":
        assert isinstance(output, VaeOutput)
        assert output.mean.shape == output.log_var.shape == (2, LATENT, 1, 1)
        assert torch.equal(model(x).reconstruction, x_hat)  # eval mode decodes the mean: deterministic


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_loss_is_finite_and_a_few_steps_lower_it(name, feature_extractor):
    torch.manual_seed(0)
    model = build_model(METHODS[name].model, channels=1, latent_dim=LATENT, patch_size=128).train()
    x = texture_batch(2)
    loss_fn = make_loss(Config(method=name), feature_extractor if name == "fm-ae" else None)

    def objective():
        torch.manual_seed(123)  # the VAE's reparameterisation noise is the same in every evaluation
        return loss_fn(model(x), x)

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


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_fits_and_predicts_from_its_checkpoint_alone(name, tmp_path, monkeypatch):
    """The contract of every method kind: fit on a folder, then a Detector from the copied checkpoint
    alone gives full-size finite maps, a boolean mask at the threshold and the map's maximum as score."""
    monkeypatch.setattr(ssimae.train, "VALIDATION_PATCHES", 4)  # keep the per-epoch validation tiny
    write_good_folder(tmp_path / "good")
    config = Config(method=name, latent_dim=LATENT, batch_size=2, patches_per_epoch=2, max_steps=1, stride=64,
                    infer_batch_size=8, val_fraction=0.34, device="cpu")
    result = fit(config, tmp_path / "good", tmp_path / "run", progress=False)
    assert result.threshold is not None and math.isfinite(result.threshold)
    assert result.steps == (1 if METHODS[name].kind == "reconstruction" else 0)

    # Only the checkpoint file: no run folder, no training images, no feature extractor.
    checkpoint = tmp_path / "model.pt"
    shutil.copy(result.checkpoint, checkpoint)
    image = np.asarray(Image.open(tmp_path / "good" / "good_0.png"), dtype=np.float32)[:, :, None] / 255
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(tmp_path / "good")

    def no_features(*args, **kwargs):
        raise AssertionError("prediction must not need the feature extractor")

    monkeypatch.setattr(ssimae.features, "build_feature_extractor", no_features)
    detector = load_detector(checkpoint, overrides={"device": "cpu"})
    assert detector.config.method == name
    prediction = detector.predict(image)
    assert prediction.anomaly_map.shape == (140, 150) and prediction.mask.shape == (140, 150)
    assert np.isfinite(prediction.anomaly_map).all() and prediction.anomaly_map.min() >= 0
    assert prediction.mask.dtype == bool
    expected = image_score(prediction.anomaly_map, "top-mean" if name == "patchcore" else "max", 0.01,
                           1 / 32 if name == "patchcore" else 0.0)
    assert prediction.score == pytest.approx(expected)  # each method's own image score


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
    loss = vae_loss_fn(2.0)(output, x)
    assert loss.item() == pytest.approx((1 + 2 * kl) / 4, rel=1e-6)


def test_fm_loss_is_l2_plus_lambda_feature_error():
    x, x_hat = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)

    def double(images):  # a stand-in F with a known output
        return 2 * images

    loss = feature_matching_loss_fn(double, 0.5)(x_hat, x)
    assert loss.item() == pytest.approx(0.25 + 0.5 * 1.0)  # L2 0.25; features differ by 1 -> squared 1


def test_make_loss_picks_the_method_loss():
    x = texture_batch(2)
    x_hat = x.flip(3)
    assert make_loss(Config(method="l2-ae"))(x_hat, x).item() == pytest.approx((x - x_hat).pow(2).mean().item())
    ssim = make_loss(Config(method="ssim-ae"))(x_hat, x).item()
    assert 0 < ssim < 2 and make_loss(Config(method="ssim-ae"))(x, x).item() == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="feature extractor"):
        make_loss(Config(method="fm-ae"))
    with pytest.raises(ValueError, match="no training loss"):
        make_loss(Config(method="blur"))
