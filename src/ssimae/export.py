"""ONNX export for deployment, and an ONNX Runtime patch function for the sliding window.

The graph maps a batch of patches to the reconstruction and the residual map:
    input   patches         (N, C, P, P) float32 in [0, 1]; N is dynamic
    output  reconstruction  (N, C, P, P)
    output  residual        (N, 1, P, P)  1 - SSIM per pixel (ssim-ae) or squared error (the others)
The residual is traced from the same code as the torch backend (ssim.py: the Gaussian filter is two
MatMuls with constant banded matrices), so ONNX Runtime and torch maps agree within float rounding.
Everything around the patches (colour conversion, resize, reflect padding, the sliding window and
its averaging, the threshold) stays outside the graph, as it does for the torch backend; the
settings it needs travel in the model's metadata_props (all strings, as ONNX requires):
    format, version, checkpoint_version, method, model_kind, residual, color, image_size,
    patch_size, stride, infer_batch_size, map_smoothing, threshold, threshold_rule, channels,
    latent_dim, normalisation, ssim_window, ssim_sigma, ssim_alpha, ssim_beta, ssim_gamma,
    config (JSON of every setting; what `ssimae predict model.onnx` reads back)
Strings are stored as they are, numbers and booleans as JSON, None as an empty string.

Exporter: torch.onnx.export's TorchScript-based path (dynamo=False), opset 17, dynamic batch axis.
The dynamo exporter needs the onnxscript package, which is not a dependency of this project.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import load_model
from .config import Config, config_from_dict
from .errors import SsimaeError
from .files import atomic_path
from . import inference
from .inference import PatchFn, in_micro_batches
from .losses import METHODS, Method, SsimSettings, reconstruction, residual_map

FORMAT = "ssimae-onnx-1"
OPSET = 17
INPUT = "patches"
OUTPUTS = ("reconstruction", "residual")


class PatchGraph(nn.Module):
    """The exported computation: patches -> (reconstruction, residual map)."""

    def __init__(self, model: nn.Module, method: Method, ssim: SsimSettings):
        super().__init__()
        self.model, self.method, self.ssim = model, method, ssim

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat = reconstruction(self.model(patches))  # (N, C, P, P)
        return x_hat, residual_map(self.method.residual, patches, x_hat, self.ssim)  # (N, 1, P, P)


def _ssim_settings(config: Config) -> SsimSettings:
    return SsimSettings(config.ssim_window, config.ssim_sigma, config.ssim_alpha, config.ssim_beta, config.ssim_gamma)


def _metadata_value(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def metadata_for(config: Config, state: dict) -> dict[str, str]:
    """The metadata_props of an exported checkpoint: preprocessing settings, threshold, versions."""
    method = METHODS[config.method]
    values = {
        "format": FORMAT,
        "version": __version__,
        "checkpoint_version": state.get("version"),
        "method": config.method,
        "model_kind": method.model_kind,
        "residual": method.residual,
        "color": config.color,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "stride": config.stride,
        "infer_batch_size": config.infer_batch_size,
        "map_smoothing": getattr(config, "map_smoothing", None),
        "threshold": state.get("threshold"),
        "threshold_rule": state.get("threshold_rule"),
        "channels": state["model_kwargs"]["channels"],
        "latent_dim": config.latent_dim,
        "normalisation": state.get("normalisation"),
        "ssim_window": config.ssim_window,
        "ssim_sigma": config.ssim_sigma,
        "ssim_alpha": config.ssim_alpha,
        "ssim_beta": config.ssim_beta,
        "ssim_gamma": config.ssim_gamma,
        "config": json.dumps(config.to_dict()),
    }
    return {key: _metadata_value(value) for key, value in values.items()}


def onnx_model_bytes(model: nn.Module, config: Config, state: dict, opset: int = OPSET) -> bytes:
    """Serialized ONNX model of a loaded checkpoint, metadata included."""
    import onnx

    channels, patch = state["model_kwargs"]["channels"], config.patch_size
    graph = PatchGraph(model.eval(), METHODS[config.method], _ssim_settings(config))
    example = torch.rand(2, channels, patch, patch)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that shapes become constants (only the batch axis is dynamic, as wanted)
        # and that the TorchScript-based exporter is legacy (see the module docstring).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), buffer, input_names=[INPUT], output_names=list(OUTPUTS),
            dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, metadata_for(config, state))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(checkpoint: str | os.PathLike, output: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write the ONNX model of a checkpoint to `output` (atomically); returns the path."""
    _require_onnx()
    if opset < 17:
        raise SsimaeError(f"opset {opset} is too old; use 17 or newer")
    model, config, state = load_model(checkpoint)
    data = onnx_model_bytes(model, config, state, opset)
    output = Path(output)
    with atomic_path(output) as tmp:
        tmp.write_bytes(data)
    return output


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise SsimaeError(f"ONNX support needs onnx and onnxruntime ({error}); pip install 'ssimae[onnx]'") from None


class OnnxModel(NamedTuple):
    """An ONNX Runtime session and the settings read from (or exported with) the model."""

    session: object  # onnxruntime.InferenceSession
    config: Config
    threshold: float | None
    channels: int
    metadata: dict[str, str]


def read_metadata(model: str | os.PathLike | bytes) -> dict[str, str]:
    """metadata_props of an ONNX file (or serialized model) as a dict."""
    import onnx

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}


def make_session(model: str | os.PathLike | bytes, device: str | torch.device = "cpu"):
    """An onnxruntime InferenceSession, CUDA when asked for and available, else CPU.

    Intra-op threads follow torch.get_num_threads(), so one thread setting governs both backends.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers)


def load_onnx(path: str | os.PathLike, device: str | torch.device = "cpu") -> OnnxModel:
    """An exported .onnx file, ready for onnxruntime_patch_fn; settings from its metadata."""
    _require_onnx()
    path = Path(path)
    if not path.is_file():
        raise SsimaeError(f"ONNX model {path} does not exist; make one with `ssimae export CHECKPOINT --output {path}`")
    try:
        metadata = read_metadata(path)
    except Exception as error:  # onnx raises DecodeError and others for a damaged file
        raise SsimaeError(f"cannot read ONNX model {path}: {str(error).splitlines()[0] if str(error) else error}") from None
    if metadata.get("format") != FORMAT:
        raise SsimaeError(f"{path} is not an ssimae ONNX export (format {FORMAT}); export it with `ssimae export`")
    known = Config.__dataclass_fields__
    values = {k: v for k, v in json.loads(metadata["config"]).items() if k in known}
    config = config_from_dict(values, source=str(path))
    threshold = float(metadata["threshold"]) if metadata.get("threshold") else None
    return OnnxModel(make_session(path, device), config, threshold, int(metadata["channels"]), metadata)


def onnx_from_checkpoint(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> OnnxModel:
    """A checkpoint exported in memory and loaded into onnxruntime (no file written)."""
    _require_onnx()
    model, config, state = load_model(checkpoint)
    data = onnx_model_bytes(model, config, state)
    return OnnxModel(make_session(data, device), config, state["threshold"], state["model_kwargs"]["channels"],
                     read_metadata(data))


def onnxruntime_patch_fn(session, outputs: str = "residual") -> PatchFn:
    """A PatchFn running an exported model: 'residual' (N, 1, P, P) or 'reconstruction' (N, C, P, P)."""
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs {outputs!r} is not one of {OUTPUTS}")

    def run(patches: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(patches.detach().cpu().numpy(), dtype=np.float32)  # (n, C, P, P)
        (result,) = session.run([outputs], {INPUT: array})
        return torch.from_numpy(result)

    def patch_fn(patches: torch.Tensor) -> torch.Tensor:
        return in_micro_batches(run, patches, inference.INFER_MICRO_BATCH)  # faster on CPU, as for torch

    return patch_fn
