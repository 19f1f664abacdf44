"""Table 1 of Bergmann et al. (2019): layer-by-layer shapes, activations, init and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssimae.models import ConvAutoencoder, VaeOutput, VariationalAutoencoder, build_model

D = 100

# Table 1, 128x128 input: (out channels, kernel, stride, padding, output side) per conv layer.
ENCODER_128 = [
    (32, 4, 2, 1, 64),
    (32, 4, 2, 1, 32),
    (32, 3, 1, 1, 32),
    (64, 4, 2, 1, 16),
    (64, 3, 1, 1, 16),
    (128, 4, 2, 1, 8),
    (64, 3, 1, 1, 8),
    (32, 3, 1, 1, 8),
    ("d", 8, 1, 0, 1),
]
# Decoder: (transposed?, out channels, kernel, stride, padding, output side).
DECODER_128 = [
    (True, 32, 8, 1, 0, 8),
    (False, 64, 3, 1, 1, 8),
    (False, 128, 3, 1, 1, 8),
    (True, 64, 4, 2, 1, 16),
    (False, 64, 3, 1, 1, 16),
    (True, 32, 4, 2, 1, 32),
    (False, 32, 3, 1, 1, 32),
    (True, 32, 4, 2, 1, 64),
    (True, "C", 4, 2, 1, 128),
]
# 256 input: one extra stride-2 conv in front of the encoder, one extra stride-2 transposed conv
# before the output layer of the decoder.
ENCODER_256 = [(32, 4, 2, 1, 128)] + ENCODER_128
DECODER_256 = DECODER_128[:-1] + [(True, 32, 4, 2, 1, 128), (True, "C", 4, 2, 1, 256)]


def _convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def _leaves(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if not list(m.children())]


def _record_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Size]]:
    """(conv module, output shape) in execution order."""
    seen: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, out.shape))) for m in _convs(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _resolve(value, channels):
    return {"d": D, "C": channels}.get(value, value)


@pytest.mark.parametrize(
    "patch_size, channels, encoder_spec, decoder_spec",
    [(128, 1, ENCODER_128, DECODER_128), (128, 3, ENCODER_128, DECODER_128), (256, 1, ENCODER_256, DECODER_256)],
)
def test_table1_layers_and_shapes(patch_size, channels, encoder_spec, decoder_spec):
    torch.manual_seed(0)
    model = ConvAutoencoder(channels=channels, latent_dim=D, patch_size=patch_size)
    seen = _record_outputs(model, torch.rand(2, channels, patch_size, patch_size))
    assert len(seen) == len(encoder_spec) + len(decoder_spec)
    encoder_seen, decoder_seen = seen[: len(encoder_spec)], seen[len(encoder_spec) :]
    for i, ((module, shape), (cout, k, s, p, side)) in enumerate(zip(encoder_seen, encoder_spec)):
        cout = _resolve(cout, channels)
        assert type(module) is nn.Conv2d, f"encoder layer {i}"
        assert (module.out_channels, module.kernel_size, module.stride, module.padding) == (cout, (k, k), (s, s), (p, p))
        assert tuple(shape) == (2, cout, side, side), f"encoder layer {i}"
    for i, ((module, shape), (transposed, cout, k, s, p, side)) in enumerate(zip(decoder_seen, decoder_spec)):
        cout = _resolve(cout, channels)
        assert type(module) is (nn.ConvTranspose2d if transposed else nn.Conv2d), f"decoder layer {i}"
        assert (module.out_channels, module.kernel_size, module.stride, module.padding) == (cout, (k, k), (s, s), (p, p))
        assert tuple(shape) == (2, cout, side, side), f"decoder layer {i}"


def test_latent_is_linear_and_activations_are_leaky_relu_02():
    torch.manual_seed(0)
    model = ConvAutoencoder(channels=1, latent_dim=D)
    leaves = _leaves(model)
    convs = [i for i, m in enumerate(leaves) if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    latent, output = convs[8], convs[-1]
    for i in convs:
        following = leaves[i + 1]
        if i == latent:
            assert isinstance(following, (nn.Conv2d, nn.ConvTranspose2d)), "no activation after the latent conv"
        elif i == output:
            assert isinstance(following, nn.Sigmoid)
        else:
            assert isinstance(following, nn.LeakyReLU) and following.negative_slope == pytest.approx(0.2)
    assert sum(isinstance(m, nn.LeakyReLU) for m in leaves) == len(convs) - 2
    assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm2d, nn.Tanh)) for m in leaves)

    # Functionally: the encoder output is the latent conv's raw output (LeakyReLU would scale its
    # negative part by 0.2, so the equality below fails for any activation), and it takes negative values.
    x = torch.rand(4, 1, 128, 128)
    with torch.no_grad():
        z = model.encoder(x)
        pre = model.encoder[0](x)
        raw = leaves[latent](pre)
    assert z.shape == (4, D, 1, 1)
    torch.testing.assert_close(z, raw)
    assert (z < 0).any()


def test_output_is_sigmoid_in_unit_interval():
    torch.manual_seed(0)
    model = ConvAutoencoder(channels=3, latent_dim=D)
    x = torch.cat([torch.rand(2, 3, 128, 128), 50 * torch.randn(2, 3, 128, 128)])  # even wild inputs
    last = _convs(model)[-1]
    captured = {}
    handle = last.register_forward_hook(lambda m, i, o: captured.setdefault("logits", o))
    with torch.no_grad():
        y = model(x)
    handle.remove()
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    torch.testing.assert_close(y, torch.sigmoid(captured["logits"]))


def _fan_in(module: nn.Module) -> int:
    k = module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.ConvTranspose2d):
        # Inputs reaching one output pixel: in_channels * (k / stride)^2; the first decoder layer
        # reads a 1x1 latent, so each output pixel sees in_channels values.
        if module.stride[0] == 1 and module.padding[0] == 0:
            return module.in_channels
        return module.in_channels * (module.kernel_size[0] // module.stride[0]) ** 2
    return module.in_channels * k


@pytest.mark.parametrize("model_cls", [ConvAutoencoder, VariationalAutoencoder])
def test_he_initialisation_and_zero_bias(model_cls):
    torch.manual_seed(0)
    model = model_cls(channels=1, latent_dim=D)
    skip = {id(model.log_var_head)} if model_cls is VariationalAutoencoder else set()
    checked = 0
    for module in _convs(model):
        assert torch.count_nonzero(module.bias) == 0
        if id(module) in skip:
            continue
        expected = math.sqrt(2.0 / ((1 + 0.2**2) * _fan_in(module)))
        std = module.weight.std().item()
        # Relative sampling error of a std over n >= 512 normal weights is ~3%; 15% is generous, and
        # PyTorch's default init (std = 1/sqrt(3 fan_in), 0.58x this) is far outside it.
        assert std == pytest.approx(expected, rel=0.15), f"{module}: std {std:.4g} vs He {expected:.4g}"
        assert abs(module.weight.mean().item()) < 0.2 * expected
        checked += 1
    assert checked == 18


def test_vae_heads_shapes_and_initial_unit_variance():
    torch.manual_seed(0)
    model = VariationalAutoencoder(channels=1, latent_dim=16)
    x = torch.rand(3, 1, 128, 128)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, VaeOutput)
    assert out.reconstruction.shape == (3, 1, 128, 128)
    assert out.mean.shape == (3, 16, 1, 1) and out.log_var.shape == (3, 16, 1, 1)
    assert torch.count_nonzero(out.log_var) == 0  # log-variance head starts at zero: unit posterior variance
    assert float(out.reconstruction.min()) >= 0 and float(out.reconstruction.max()) <= 1


def test_vae_eval_is_deterministic_and_decodes_the_mean_train_is_stochastic():
    torch.manual_seed(0)
    model = VariationalAutoencoder(channels=1, latent_dim=16)
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        model.eval()
        first, second = model(x), model(x)
        torch.testing.assert_close(first.reconstruction, second.reconstruction, rtol=0, atol=0)
        torch.testing.assert_close(first.reconstruction, model.decoder(first.mean))
        model.train()
        a, b = model(x), model(x)
    assert not torch.equal(a.reconstruction, b.reconstruction)
    torch.testing.assert_close(a.mean, first.mean)  # only the sample differs, not the encoding
    assert (a.reconstruction - first.reconstruction).abs().max() > 1e-4


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Hand-computed from Table 1 (weights + biases), d = 100:
#   gray 128  encoder 544 + 16416 + 9248 + 32832 + 36928 + 131200 + 73792 + 18464 + 204900 = 524,324
#             decoder 204832 + 18496 + 73856 + 131136 + 36928 + 32800 + 9248 + 16416 + 513 = 524,225
#             together 1,048,549
#   rgb 128   + 2 * 16 * 32 in the first conv, + 2 * 32 * 16 + 2 in the output transposed conv = 1,050,599
#   gray 256  + 16,416 for the extra 32 -> 32 4x4 layer in each half = 1,081,381
#   vae 128   + 204,900 for the second 8x8 head (log-variance) = 1,253,449
@pytest.mark.parametrize(
    "kind, channels, patch_size, expected",
    [
        ("ae", 1, 128, 1_048_549),
        ("ae", 3, 128, 1_050_599),
        ("ae", 1, 256, 1_081_381),
        ("vae", 1, 128, 1_253_449),
    ],
)
def test_parameter_counts_match_hand_computation(kind, channels, patch_size, expected):
    assert _count(build_model(kind, channels, D, patch_size)) == expected


def test_unsupported_patch_size_is_rejected():
    with pytest.raises(ValueError, match="192"):
        ConvAutoencoder(patch_size=192)
