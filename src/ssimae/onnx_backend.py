"""The ONNX Runtime backend: a Detector whose network runs in ONNX Runtime.

It takes an exported .onnx file (settings from its metadata, checked before use) or a checkpoint
(exported in memory, nothing written). Both feed the same map functions as the torch backend
(detector.py), so their maps agree within 1e-4 (tests/test_export.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .checkpoint import Checkpoint, Thresholds, threshold_fields
from .config import Config, config_from_dict, known_settings
from .detector import Detector, apply_overrides, check_stride, grid_map_fn, grid_stride, reconstruction_map_fn
from .errors import SsimaeError
from .export import FORMAT, IMAGE_INPUT, IMAGE_OUTPUT, PATCH_INPUT, PATCH_OUTPUTS, onnx_model_bytes, require_onnx
from .inference import INFER_MICRO_BATCH, PatchFn, in_micro_batches


class OnnxModel(NamedTuple):
    """An ONNX Runtime session and the settings read from (or exported with) the model."""

    session: object  # onnxruntime.InferenceSession
    config: Config
    thresholds: Thresholds | None
    channels: int
    metadata: dict[str, str]

    @property
    def threshold(self) -> float | None:
        return self.thresholds.pixel if self.thresholds else None


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


def settings_from_metadata(metadata: dict[str, str], source: str) -> tuple[Config, Thresholds | None, int]:
    """(config, thresholds, channels) from an export's metadata; a clear error naming what is wrong."""
    if metadata.get("format") != FORMAT:
        raise SsimaeError(f"{source} is not an ssimae ONNX export (format {FORMAT}); export it with `ssimae export`")
    fix = "export it again with `ssimae export`"
    try:
        values = json.loads(metadata["config"])
        if not isinstance(values, dict):
            raise ValueError("config is not a JSON object")
        config = config_from_dict(known_settings(values), source=source).validate()
        channels = int(metadata["channels"])
        if channels not in (1, 3):
            raise ValueError(f"channels {channels} is not 1 or 3")
        thresholds = None
        if metadata.get("thresholds"):
            thresholds = Thresholds(**threshold_fields(json.loads(metadata["thresholds"])))
        elif metadata.get("threshold"):  # exports of ssimae 0.1.0
            thresholds = Thresholds(float(metadata["threshold"]), metadata.get("threshold_rule", ""))
    except KeyError as error:
        raise SsimaeError(f"ONNX model {source} lacks the metadata entry {error}; {fix}") from None
    except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        raise SsimaeError(f"ONNX model {source} has invalid metadata ({str(error).splitlines()[0]}); {fix}") from None
    except SsimaeError as error:
        raise SsimaeError(f"ONNX model {source} has invalid settings ({error}); {fix}") from None
    return config, thresholds, channels


def load_onnx(path: str | os.PathLike, device: str | torch.device = "cpu") -> OnnxModel:
    """An exported .onnx file, ready to run; settings from its metadata."""
    require_onnx()
    path = Path(path)
    if not path.is_file():
        raise SsimaeError(f"ONNX model {path} does not exist; make one with `ssimae export CHECKPOINT --output {path}`")
    try:
        metadata = read_metadata(path)
    except Exception as error:  # onnx raises DecodeError and others for a damaged file
        raise SsimaeError(f"cannot read ONNX model {path}: {str(error).splitlines()[0] if str(error) else error}") from None
    config, thresholds, channels = settings_from_metadata(metadata, str(path))
    return OnnxModel(make_session(path, device), config, thresholds, channels, metadata)


def onnx_from_checkpoint(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> OnnxModel:
    """A checkpoint exported in memory and loaded into onnxruntime (no file written)."""
    require_onnx()
    loaded = Checkpoint.load(checkpoint)
    data = onnx_model_bytes(loaded)
    return OnnxModel(make_session(data, device), loaded.config, loaded.thresholds, loaded.channels,
                     read_metadata(data))


def onnxruntime_patch_fn(session, outputs: str = "residual") -> PatchFn:
    """A PatchFn running an exported patch graph: 'residual' (N, 1, P, P) or 'reconstruction' (N, C, P, P)."""
    if outputs not in PATCH_OUTPUTS:
        raise ValueError(f"outputs {outputs!r} is not one of {PATCH_OUTPUTS}")

    def run(patches: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(patches.detach().cpu().numpy(), dtype=np.float32)  # (n, C, P, P)
        (result,) = session.run([outputs], {PATCH_INPUT: array})
        return torch.from_numpy(result)

    def patch_fn(patches: torch.Tensor) -> torch.Tensor:
        return in_micro_batches(run, patches, INFER_MICRO_BATCH)  # faster on CPU, as for torch

    return patch_fn


def onnxruntime_grid_fn(session):
    """A GridFn running an exported whole-image graph: (1, C, H, W) -> (1, 1, h, w)."""

    def grid_fn(image: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
        (result,) = session.run([IMAGE_OUTPUT], {IMAGE_INPUT: array})
        return torch.from_numpy(result)

    return grid_fn


def onnx_detector(source: str | os.PathLike, device: torch.device, overrides: dict | None = None,
                  threshold: float | None = None) -> Detector:
    """A Detector running an .onnx file, or a checkpoint exported in memory, in ONNX Runtime."""
    is_onnx = Path(source).suffix.lower() == ".onnx"
    loaded = load_onnx(source, device) if is_onnx else onnx_from_checkpoint(source, device)
    config = apply_overrides(loaded.config, overrides)
    check_stride(loaded.config, config, threshold)
    if config.kind == "reconstruction":
        map_fn = reconstruction_map_fn(onnxruntime_patch_fn(loaded.session), config)
    else:
        map_fn = grid_map_fn(onnxruntime_grid_fn(loaded.session), grid_stride(config))
    return Detector(config, map_fn, loaded.thresholds, loaded.channels)
