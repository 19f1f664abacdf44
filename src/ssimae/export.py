"""ONNX export for deployment: the network part of a detector, with its settings in the metadata.

The graph depends on the method's kind (methods.py):
    reconstruction  input  patches         (N, C, P, P) float32 in [0, 1]; N is dynamic
                    output reconstruction  (N, C, P, P)
                    output residual        (N, 1, P, P)  1 - SSIM per pixel (ssim-ae) or squared error
    memory          input  image           (1, C, H, W) float32 in [0, 1]; H and W are dynamic (blur) or
                                                         the working size (patchcore: its backbone's
                                                         'same' padding is fixed when traced)
                    output scores          (1, 1, h, w)  the method's score grid (patchcore: nearest-
                                                         neighbour distances at feature resolution)
The residual is traced from the same code as the torch backend (ssim.py: the Gaussian filter is two
MatMuls with constant banded matrices), so ONNX Runtime and torch maps agree within float rounding.
Everything around the graph (colour conversion, resize, reflect padding, the sliding window and its
averaging, upsampling the grid, smoothing, thresholds) stays outside it, as for the torch backend
(detector.py); the settings it needs travel in metadata_props (strings; numbers and structures as
JSON, None as ''), listed in METADATA_KEYS and read back by onnx_backend.py.

Exporter: torch.onnx.export's TorchScript-based path (dynamo=False), opset 17. The dynamo exporter
needs the onnxscript package, which is not a dependency of this project.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .checkpoint import NORMALISATION, Checkpoint
from .errors import SsimaeError
from .files import atomic_path
from .losses import SsimSettings, reconstruction, residual_map
from .methods import METHODS

log = logging.getLogger(__name__)

FORMAT = "ssimae-onnx-1"
OPSET = 17
PATCH_INPUT, PATCH_OUTPUTS = "patches", ("reconstruction", "residual")
IMAGE_INPUT, IMAGE_OUTPUT = "image", "scores"
METADATA_KEYS = ("format", "version", "checkpoint_version", "method", "kind", "color", "image_size", "patch_size",
                 "stride", "map_smoothing", "threshold", "threshold_rule", "thresholds", "channels", "normalisation",
                 "ssim_window", "ssim_sigma", "config")


class PatchGraph(nn.Module):
    """The exported computation of a reconstruction method: patches -> (reconstruction, residual map)."""

    def __init__(self, model: nn.Module, residual: str, ssim: SsimSettings):
        super().__init__()
        self.model, self.residual, self.ssim = model, residual, ssim

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat = reconstruction(self.model(patches))  # (N, C, P, P)
        return x_hat, residual_map(self.residual, patches, x_hat, self.ssim)  # (N, 1, P, P)


def _metadata_value(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def metadata_for(checkpoint: Checkpoint) -> dict[str, str]:
    """The metadata_props of an exported checkpoint: preprocessing settings, thresholds, versions."""
    config, thresholds = checkpoint.config, checkpoint.thresholds
    values = {
        "format": FORMAT,
        "version": __version__,
        "checkpoint_version": checkpoint.version,
        "method": config.method,
        "kind": config.kind,
        "color": config.color,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "stride": config.stride,
        "map_smoothing": config.smoothing,
        "threshold": thresholds.pixel if thresholds else None,
        "threshold_rule": thresholds.pixel_rule if thresholds else None,
        "thresholds": dataclasses.asdict(thresholds) if thresholds else None,
        "channels": checkpoint.channels,
        "normalisation": NORMALISATION,
        "ssim_window": config.ssim_window,
        "ssim_sigma": config.ssim_sigma,
        "config": config.to_dict(),
    }
    return {key: _metadata_value(values[key]) for key in METADATA_KEYS}


def onnx_model_bytes(checkpoint: Checkpoint, opset: int = OPSET) -> bytes:
    """Serialized ONNX model of a checkpoint, metadata included."""
    import onnx

    config, channels = checkpoint.config, checkpoint.channels
    network = checkpoint.network()
    if config.kind == "reconstruction":
        graph = PatchGraph(network, METHODS[config.method].residual, SsimSettings.from_config(config))
        example = torch.rand(2, channels, config.patch_size, config.patch_size)
        names = dict(input_names=[PATCH_INPUT], output_names=list(PATCH_OUTPUTS),
                     dynamic_axes={name: {0: "batch"} for name in (PATCH_INPUT, *PATCH_OUTPUTS)})
    elif config.method == "patchcore":  # its backbone's padding depends on the input size: a fixed size
        from .patchcore import check_image_size

        check_image_size(config)
        width, height = config.resize
        graph, example = network, torch.rand(1, channels, height, width)
        names = dict(input_names=[IMAGE_INPUT], output_names=[IMAGE_OUTPUT])
    else:
        graph = network
        example = torch.rand(1, channels, 160, 192)
        names = dict(input_names=[IMAGE_INPUT], output_names=[IMAGE_OUTPUT],
                     dynamic_axes={IMAGE_INPUT: {2: "height", 3: "width"}, IMAGE_OUTPUT: {2: "rows", 3: "columns"}})
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that shapes become constants (only the named axes are dynamic, as wanted)
        # and that the TorchScript-based exporter is legacy (see the module docstring).
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), buffer, opset_version=opset, do_constant_folding=True, dynamo=False,
                          **names)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, metadata_for(checkpoint))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise SsimaeError(f"ONNX support needs onnx and onnxruntime ({error}); pip install 'ssimae[onnx]'") from None


def newest_opset() -> int | None:
    """The newest opset torch's TorchScript-based exporter supports (None if this torch does not say)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    return getattr(_constants, "ONNX_MAX_OPSET", None)


def export_onnx(checkpoint: str | os.PathLike, output: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write the ONNX model of a checkpoint to `output` (atomically); returns the path."""
    require_onnx()
    if opset < 17:
        raise SsimaeError(f"opset {opset} is too old; use 17 or newer")
    newest = newest_opset()
    if newest is not None and opset > newest:  # checked here: the exporter prints its whole graph before failing
        raise SsimaeError(f"opset {opset} is newer than this torch can export (up to {newest}); "
                          f"use {OPSET}, the default")
    output = Path(output)
    if output.is_dir():
        raise SsimaeError(f"--output {output} is a folder; give the model's file name, e.g. {output / 'model.onnx'}")
    if output.suffix.lower() != ".onnx":  # predict tells an exported model from a checkpoint by this suffix
        raise SsimaeError(f"--output {output}: an exported model's name must end in .onnx, "
                          f"e.g. {output.with_suffix('.onnx')}")
    model = Checkpoint.load(checkpoint)
    if model.thresholds is None:
        log.warning("%s has no threshold (its training did not finish): predicting with the export will need "
                    "--threshold", checkpoint)
    try:
        data = onnx_model_bytes(model, opset)
    except RuntimeError as error:  # the exporter's own limit, e.g. "Unsupported onnx_opset_version: 99"
        if "opset" not in str(error).lower():
            raise
        raise SsimaeError(f"opset {opset} cannot be exported by this torch ({str(error).splitlines()[0]}); "
                          f"use {OPSET}, the default") from None
    with atomic_path(output) as tmp:
        tmp.write_bytes(data)
    return output
