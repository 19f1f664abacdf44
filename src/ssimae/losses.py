"""Training losses and residual maps of the reconstruction methods (methods.py lists which uses which).

A loss function takes the model's forward output and the input batch and returns a scalar:
`loss_fn(output, x) -> Tensor`. make_loss builds it from the settings, so the training loop never
looks at the method's name.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .methods import METHODS
from .models import VaeOutput
from .ssim import ssim_loss, ssim_residual

LossFn = Callable[[object, torch.Tensor], torch.Tensor]  # (model output, x (N, C, P, P)) -> scalar


class SsimSettings(NamedTuple):
    window: int = 11
    sigma: float = 1.5
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    data_range: float = 1.0

    @classmethod
    def from_config(cls, config) -> "SsimSettings":
        return cls(config.ssim_window, config.ssim_sigma, config.ssim_alpha, config.ssim_beta, config.ssim_gamma,
                   config.ssim_data_range)


def reconstruction(output) -> torch.Tensor:
    """The reconstruction from any model's forward output, (N, C, P, P)."""
    return output.reconstruction if isinstance(output, VaeOutput) else output


def kl_to_unit_gaussian(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) per sample, summed over latent dims: (N, d, 1, 1) -> (N,).

    Closed form from Kingma & Welling, "Auto-Encoding Variational Bayes" (2014), Appendix B:
    KL = -1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2).
    """
    return -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).flatten(1).sum(dim=1)


def squared_error_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared error averaged over channels, (N, 1, H, W)."""
    return (x - x_hat).pow(2).mean(dim=1, keepdim=True)


def residual_map(kind: str, x: torch.Tensor, x_hat: torch.Tensor, ssim: SsimSettings = SsimSettings()) -> torch.Tensor:
    """Anomaly map of a reconstruction, (N, 1, H, W); higher = more anomalous."""
    if kind == "ssim":
        return ssim_residual(x, x_hat, **ssim._asdict())
    if kind == "l2":
        return squared_error_map(x, x_hat)
    raise ValueError(f"unknown residual {kind!r}; use 'ssim' or 'l2'")


def l2_loss(output, x: torch.Tensor) -> torch.Tensor:
    return (x - reconstruction(output)).pow(2).mean()


def ssim_loss_fn(ssim: SsimSettings) -> LossFn:
    def loss(output, x: torch.Tensor) -> torch.Tensor:
        return ssim_loss(x, reconstruction(output), **ssim._asdict())

    return loss


def vae_loss_fn(beta: float) -> LossFn:
    def loss(output: VaeOutput, x: torch.Tensor) -> torch.Tensor:
        # Per-sample sum of squared errors + beta * KL, averaged over the batch, then divided by the
        # pixels per sample so the loss is on the scale of the other methods (Adam is scale-free).
        pixels = x[0].numel()
        sse = (x - output.reconstruction).pow(2).flatten(1).sum(dim=1)  # (N,)
        kl = kl_to_unit_gaussian(output.mean, output.log_var)  # (N,)
        return (sse + beta * kl).mean() / pixels

    return loss


def feature_matching_loss_fn(feature_extractor: torch.nn.Module, weight: float) -> LossFn:
    def loss(output, x: torch.Tensor) -> torch.Tensor:
        x_hat = reconstruction(output)
        feature_error = (feature_extractor(x) - feature_extractor(x_hat)).pow(2).mean()
        return (x - x_hat).pow(2).mean() + weight * feature_error

    return loss


def make_loss(config, feature_extractor: torch.nn.Module | None = None) -> LossFn:
    """The training loss of config.method with its settings."""
    loss = METHODS[config.method].loss
    if loss == "ssim":
        return ssim_loss_fn(SsimSettings.from_config(config))
    if loss == "l2":
        return l2_loss
    if loss == "vae":
        return vae_loss_fn(config.vae_beta)
    if loss == "fm":
        if feature_extractor is None:
            raise ValueError("the fm loss needs a feature extractor")
        return feature_matching_loss_fn(feature_extractor, config.fm_lambda)
    raise ValueError(f"method {config.method!r} has no training loss")
