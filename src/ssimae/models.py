"""The paper's convolutional autoencoder (Bergmann et al. 2019, Table 1) and its VAE sibling.

Encoder for a 128x128xC input (out channels, kernel, stride, padding -> output size):
    conv1 32,4,2,1 -> 64   conv2 32,4,2,1 -> 32   conv3 32,3,1,1 -> 32
    conv4 64,4,2,1 -> 16   conv5 64,3,1,1 -> 16   conv6 128,4,2,1 -> 8
    conv7 64,3,1,1 -> 8    conv8 32,3,1,1 -> 8    conv9 d,8,1,0 -> 1   (linear latent)
The decoder mirrors it and ends in a sigmoid. A 256x256 input gets one more stride-2 conv at the
front of the encoder and one more stride-2 transposed conv at the end of the decoder (MVTec AD).
LeakyReLU(0.2) follows every layer except the latent and the output. Weights use He
initialisation for LeakyReLU(0.2): with PyTorch's default init the 18-layer net collapsed to a
flat grey output on short budgets (measured; bench/README.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

SUPPORTED_PATCH_SIZES = (128, 256)
NEGATIVE_SLOPE = 0.2


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding), nn.LeakyReLU(NEGATIVE_SLOPE)]


def _deconv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, kernel, stride, padding), nn.LeakyReLU(NEGATIVE_SLOPE)]


def _check_patch_size(patch_size: int) -> None:
    if patch_size not in SUPPORTED_PATCH_SIZES:
        raise ValueError(f"patch size {patch_size} is not supported; use one of {SUPPORTED_PATCH_SIZES}")


def encoder_trunk(channels: int, patch_size: int = 128) -> nn.Sequential:
    """Table 1 encoder up to conv8: (N, C, P, P) -> (N, 32, 8, 8)."""
    _check_patch_size(patch_size)
    layers: list[nn.Module] = []
    cin = channels
    if patch_size == 256:
        layers += _conv(cin, 32, 4, 2, 1)  # 256 -> 128, the extra layer
        cin = 32
    layers += _conv(cin, 32, 4, 2, 1)  # 128 -> 64
    layers += _conv(32, 32, 4, 2, 1)  # 64 -> 32
    layers += _conv(32, 32, 3, 1, 1)  # 32
    layers += _conv(32, 64, 4, 2, 1)  # 32 -> 16
    layers += _conv(64, 64, 3, 1, 1)  # 16
    layers += _conv(64, 128, 4, 2, 1)  # 16 -> 8
    layers += _conv(128, 64, 3, 1, 1)  # 8
    layers += _conv(64, 32, 3, 1, 1)  # 8
    return nn.Sequential(*layers)


def decoder(channels: int, latent_dim: int, patch_size: int = 128) -> nn.Sequential:
    """Table 1 decoder: (N, d, 1, 1) -> (N, C, P, P) in [0, 1]."""
    _check_patch_size(patch_size)
    layers: list[nn.Module] = []
    layers += _deconv(latent_dim, 32, 8, 1, 0)  # 1 -> 8
    layers += _conv(32, 64, 3, 1, 1)  # 8
    layers += _conv(64, 128, 3, 1, 1)  # 8
    layers += _deconv(128, 64, 4, 2, 1)  # 8 -> 16
    layers += _conv(64, 64, 3, 1, 1)  # 16
    layers += _deconv(64, 32, 4, 2, 1)  # 16 -> 32
    layers += _conv(32, 32, 3, 1, 1)  # 32
    layers += _deconv(32, 32, 4, 2, 1)  # 32 -> 64
    if patch_size == 256:
        layers += _deconv(32, 32, 4, 2, 1)  # 64 -> 128, mirror of the extra layer
    layers += [nn.ConvTranspose2d(32, channels, 4, 2, 1), nn.Sigmoid()]  # -> P
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """He init for LeakyReLU(0.2) on every conv, zero bias.

    For a transposed conv the fan-in is the number of inputs that reach one output pixel:
    in_channels * (kernel / stride)^2, and just in_channels for the first decoder layer, which
    reads a 1x1 latent. PyTorch's kaiming_normal_ counts out_channels * kernel^2 for transposed
    convs, which started the decoder about 18x too quiet in standard deviation (the first layer
    alone 4.5x): the output sat at a constant grey for hundreds of steps (measured on PIPED).
    """
    gain = nn.init.calculate_gain("leaky_relu", NEGATIVE_SLOPE)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.ConvTranspose2d):
            kernel, stride = m.kernel_size[0], m.stride[0]
            reads_latent = stride == 1 and m.padding[0] == 0  # the 1x1 -> 8x8 layer
            fan_in = m.in_channels * (1 if reads_latent else (kernel // stride) ** 2)
            nn.init.normal_(m.weight, 0.0, gain / fan_in**0.5)
            nn.init.zeros_(m.bias)


class ConvAutoencoder(nn.Module):
    """Table 1 autoencoder with a 1x1xd latent; forward returns the reconstruction."""

    def __init__(self, channels: int = 1, latent_dim: int = 100, patch_size: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(encoder_trunk(channels, patch_size), nn.Conv2d(32, latent_dim, 8, 1, 0))
        self.decoder = decoder(channels, latent_dim, patch_size)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # (N, C, P, P) -> (N, d, 1, 1) -> (N, C, P, P)


class VaeOutput(NamedTuple):
    reconstruction: torch.Tensor  # (N, C, P, P), decoded from a sample in training, from the mean in eval
    mean: torch.Tensor  # (N, d, 1, 1)
    log_var: torch.Tensor  # (N, d, 1, 1)


class VariationalAutoencoder(nn.Module):
    """Table 1 trunk with mean and log-variance heads, reparameterisation, the same decoder.

    In training mode the decoder sees z = mean + exp(log_var / 2) * eps; in eval mode it sees
    the mean, so residual maps at test time are deterministic.
    """

    def __init__(self, channels: int = 1, latent_dim: int = 100, patch_size: int = 128):
        super().__init__()
        self.trunk = encoder_trunk(channels, patch_size)
        self.mean_head = nn.Conv2d(32, latent_dim, 8, 1, 0)
        self.log_var_head = nn.Conv2d(32, latent_dim, 8, 1, 0)
        self.decoder = decoder(channels, latent_dim, patch_size)
        init_weights(self)
        # Start with unit posterior variance; He-init log-variance values would be far from 0.
        nn.init.zeros_(self.log_var_head.weight)

    def forward(self, x: torch.Tensor) -> VaeOutput:
        features = self.trunk(x)  # (N, 32, 8, 8)
        mean, log_var = self.mean_head(features), self.log_var_head(features)  # (N, d, 1, 1)
        z = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean) if self.training else mean
        return VaeOutput(self.decoder(z), mean, log_var)


MODEL_CLASSES = {"ae": ConvAutoencoder, "vae": VariationalAutoencoder}


def build_model(kind: str, channels: int, latent_dim: int, patch_size: int) -> nn.Module:
    """Model from the kwargs a checkpoint stores."""
    return MODEL_CLASSES[kind](channels=channels, latent_dim=latent_dim, patch_size=patch_size)
