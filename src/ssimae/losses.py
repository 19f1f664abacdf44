"""Training losses and residual maps; a method is a model kind + a loss + a residual.

    ssim-ae  autoencoder, loss 1 - SSIM,              residual 1 - SSIM per pixel
    l2-ae    autoencoder, loss mean squared error,    residual squared error per pixel
    vae      VAE,         loss L2 + beta * KL,        residual squared error of the mean's decoding
    fm-ae    autoencoder, loss L2 + lambda * feature L2, residual squared error per pixel
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .models import VaeOutput
from .ssim import ssim_loss, ssim_residual


class Method(NamedTuple):
    model_kind: str  # key of models.MODEL_CLASSES
    loss: str  # "ssim" | "l2" | "vae" | "fm"
    residual: str  # "ssim" | "l2"


METHODS = {
    "ssim-ae": Method("ae", "ssim", "ssim"),
    "l2-ae": Method("ae", "l2", "l2"),
    "vae": Method("vae", "vae", "l2"),
    "fm-ae": Method("ae", "fm", "l2"),
}


class SsimSettings(NamedTuple):
    window: int = 11
    sigma: float = 1.5
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0


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


def compute_loss(
    method: Method,
    output,
    x: torch.Tensor,
    ssim: SsimSettings = SsimSettings(),
    vae_beta: float = 1.0,
    fm_lambda: float = 1.0,
    feature_extractor: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Scalar training loss of `method` for the model output on the batch x."""
    x_hat = reconstruction(output)
    if method.loss == "ssim":
        return ssim_loss(x, x_hat, **ssim._asdict())
    if method.loss == "l2":
        return (x - x_hat).pow(2).mean()
    if method.loss == "vae":
        # Per-sample sum of squared errors + beta * KL, averaged over the batch, then divided by the
        # pixels per sample so the loss is on the scale of the other methods (Adam is scale-free).
        pixels = x[0].numel()
        sse = (x - x_hat).pow(2).flatten(1).sum(dim=1)  # (N,)
        kl = kl_to_unit_gaussian(output.mean, output.log_var)  # (N,)
        return (sse + vae_beta * kl).mean() / pixels
    if method.loss == "fm":
        if feature_extractor is None:
            raise ValueError("the fm loss needs a feature extractor")
        feature_error = (feature_extractor(x) - feature_extractor(x_hat)).pow(2).mean()
        return (x - x_hat).pow(2).mean() + fm_lambda * feature_error
    raise ValueError(f"unknown loss {method.loss!r}")
