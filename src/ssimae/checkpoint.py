"""Self-describing checkpoints: everything `predict`, `evaluate` and `export` need, in one typed object.

The file holds only tensors and plain Python values, so it loads with torch.load(weights_only=True).
It is written to a temp file and renamed, so an interrupted save never corrupts the previous one.
Every method stores an nn.Module's state dict under `weights`: the autoencoders' parameters, or
PatchCore's backbone and memory bank; `build_network` makes the module those weights belong to.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import Config, config_from_dict, known_settings
from .errors import SsimaeError
from .files import atomic_path
from .methods import METHODS

FORMAT = "ssimae-checkpoint"
SCHEMA = 2  # 1: the untyped dict of ssimae 0.1.0 (still read)
NORMALISATION = "pixels scaled to [0, 1] by bit depth; no mean/std"


@dataclass
class TrainingState:
    step: int = 0  # optimiser steps done (0 for methods without gradient training)
    epoch: int = 0
    seconds: float = 0.0  # training time, summed over resumed segments
    complete: bool = False  # True once the threshold is chosen


@dataclass
class Thresholds:
    """Decision thresholds chosen on defect-free validation images."""

    pixel: float  # a pixel is defective when its anomaly score is > this
    pixel_rule: str  # how it was chosen, in words
    image: float | None = None  # an image is defective when its image score is > this (None: any mask region)
    image_rule: str = ""
    validation: dict = field(default_factory=dict)  # what they achieve on the validation images (threshold.py)


@dataclass
class Checkpoint:
    config: Config
    channels: int  # 1 (gray) or 3 (rgb)
    weights: dict[str, torch.Tensor]  # state dict of build_network(config, channels)
    thresholds: Thresholds | None = None  # None until training has finished
    training: TrainingState = field(default_factory=TrainingState)
    history: list[dict] = field(default_factory=list)  # one record per epoch
    # The settings of each stretch of training: a resume that changes settings starts a new segment,
    # {"start_step": step, "changed": {setting: [before, after]}, "config": the settings from then on}.
    segments: list[dict] = field(default_factory=list)
    optimizer_state: dict | None = None
    rng_state: dict | None = None  # torch (and CUDA) generator states, restored on resume
    version: str = __version__

    @property
    def method(self) -> str:
        return self.config.method

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "schema": SCHEMA,
            "version": self.version,
            "method": self.method,
            "config": self.config.to_dict(),
            "channels": self.channels,
            "normalisation": NORMALISATION,
            "weights": {k: v.detach().cpu() for k, v in self.weights.items()},
            "thresholds": dataclasses.asdict(self.thresholds) if self.thresholds else None,
            "training": dataclasses.asdict(self.training),
            "history": self.history,
            "segments": self.segments,
            "optimizer_state": self.optimizer_state,
            "rng_state": self.rng_state,
        }

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            try:
                torch.save(self.to_dict(), tmp)
            except RuntimeError as error:  # torch's zip writer reports a failed write so, not as an OSError
                raise SsimaeError(f"cannot write the checkpoint {path} ({_describe(error)}); the disk may be full "
                                  "or the folder not writable: free some space or choose another --output") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Checkpoint":
        """A checkpoint file, checked: format, schema, settings and the weights' names and shapes."""
        path = Path(path)
        state = _read(path)
        try:
            checkpoint = _from_v1(state) if state.get("format") == "ssimae-checkpoint-1" else _from_dict(state)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SsimaeError(f"checkpoint {path} is incomplete or damaged ({_describe(error)}); "
                              "train again with `ssimae train`") from None
        except SsimaeError as error:
            raise SsimaeError(f"checkpoint {path} has invalid settings ({error}); train again with `ssimae train`") \
                from None
        checkpoint.network(source=path)  # fails now, naming the file, if the weights do not fit
        return checkpoint

    def network(self, source: str | os.PathLike = "checkpoint") -> torch.nn.Module:
        """The method's module with these weights, in eval mode, on the CPU."""
        module = build_network(self.config, self.channels, pretrained=False)  # the weights are ours
        try:
            module.load_state_dict(self.weights)
        except RuntimeError as error:  # missing or unexpected keys, shape mismatch
            raise SsimaeError(f"checkpoint {source}: its weights do not fit a {self.method} model "
                              f"({_describe(error)}); train again with `ssimae train`") from None
        return module.eval()


def build_network(config: Config, channels: int, pretrained: bool = True) -> torch.nn.Module:
    """The (untrained) module of config.method for images with `channels` channels. pretrained=False: a
    module whose frozen pretrained parts (PatchCore's backbone) will be loaded from a checkpoint, so their
    weights file is not read."""
    model = METHODS[config.method].model
    if model in ("ae", "vae"):
        from .models import build_model

        return build_model(model, channels, config.latent_dim, config.patch_size)
    if model == "blur":
        from .blur import BlurResidual

        return BlurResidual(config.blur_sigma)
    if model == "patchcore":
        from .patchcore import build_patchcore

        return build_patchcore(config, channels, pretrained)
    raise ValueError(f"method {config.method!r} has no network builder")


def read_state(path: str | os.PathLike) -> dict:
    """The raw dict of a checkpoint file (checked only for being one)."""
    return _read(Path(path))


def _read(path: Path) -> dict:
    if path.is_dir():
        raise SsimaeError(f"checkpoint {path} is a folder; pass the checkpoint file, e.g. {path / 'checkpoint.pt'}")
    if not path.is_file():
        raise SsimaeError(f"checkpoint {path} does not exist; train one with `ssimae train`")
    if path.stat().st_size == 0:
        raise SsimaeError(f"checkpoint {path} is an empty (zero-byte) file; train again or pick another file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles on stderr before failing on them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise SsimaeError(
            f"cannot load checkpoint {path}: it is damaged or not an ssimae checkpoint ({_load_error_reason(error)}); "
            "train one with `ssimae train`"
        ) from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, "ssimae-checkpoint-1"):
        raise SsimaeError(f"{path} is not an ssimae checkpoint (format {FORMAT})")
    if state.get("format") == FORMAT and state.get("schema") != SCHEMA:
        raise SsimaeError(f"checkpoint {path} has schema {state.get('schema')!r}; this ssimae {__version__} reads "
                          f"schema {SCHEMA}: use the ssimae version that wrote it, or train again")
    return state


def _from_dict(state: dict) -> Checkpoint:
    thresholds = state["thresholds"]
    return Checkpoint(
        config=_config(state["config"]),
        channels=_channels(state["channels"]),
        weights=_weights(state["weights"]),
        thresholds=Thresholds(**threshold_fields(thresholds)) if thresholds is not None else None,
        training=TrainingState(**state["training"]),
        history=list(state["history"]),
        segments=list(state["segments"]),
        optimizer_state=state["optimizer_state"],
        rng_state=state["rng_state"],
        version=str(state["version"]),
    )


def _from_v1(state: dict) -> Checkpoint:
    """The untyped dict written by ssimae 0.1.0 (pixel threshold only; its rule was min-area unless
    threshold_fpr was set)."""
    threshold = state["threshold"]
    values = dict(state["config"])
    if values.get("threshold_fpr") is None:
        values.pop("threshold_fpr", None)
        values["threshold_rule"] = "min-area"
    values["image_score"] = "max"
    return Checkpoint(
        config=_config(values),
        channels=_channels(state["model_kwargs"]["channels"]),
        weights=_weights(state["model_state"]),
        thresholds=Thresholds(_finite(threshold), str(state["threshold_rule"])) if threshold is not None else None,
        training=TrainingState(**state["training"]),
        history=list(state.get("history") or []),
        optimizer_state=state.get("optimizer_state"),
        version=str(state.get("version", "0.1.0")),
    )


def _config(values: Any) -> Config:
    if not isinstance(values, dict):
        raise TypeError("config is not a dict of settings")
    return config_from_dict(known_settings(values)).validate()


def _channels(value: Any) -> int:
    if value not in (1, 3):
        raise ValueError(f"channels {value!r} is not 1 or 3")
    return int(value)


def _weights(values: Any) -> dict[str, torch.Tensor]:
    if not isinstance(values, dict) or not all(isinstance(v, torch.Tensor) for v in values.values()):
        raise TypeError("weights are not a dict of tensors")
    return values


def threshold_fields(values: Any) -> dict:
    """The Thresholds fields of a stored dict, checked (finite numbers)."""
    if not isinstance(values, dict):
        raise TypeError("thresholds are not a dict")
    names = {f.name for f in dataclasses.fields(Thresholds)}
    result = {k: v for k, v in values.items() if k in names}
    result["pixel"] = _finite(result["pixel"])
    if result.get("image") is not None:
        result["image"] = _finite(result["image"])
    return result


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"threshold {value!r} is not a finite number")
    return float(value)


def _describe(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]  # torch's heading; the next line says which weight does not fit and how
    text = lines[0] if lines else ""
    if isinstance(error, KeyError):
        return f"missing {text}"
    return (text[:200] + "...") if len(text) > 200 else (text or type(error).__name__)


def _load_error_reason(error: Exception) -> str:
    """The informative part of a torch.load error, on one line.

    A weights-only failure carries torch's advice to load with weights_only=False, which is wrong
    for a foreign or damaged file: that advice is dropped and the reason kept.
    """
    if isinstance(error, (KeyError, EOFError, pickle.UnpicklingError)) and "unsupported" not in str(error).lower():
        return "not a PyTorch file, or cut short"  # what torch.load raises on text or a cut-off legacy file
    text = str(error)
    for marker in ("WeightsUnpickler error:", "Unsupported operand", "Unsupported global"):
        if marker in text:
            text = text[text.index(marker):].replace("WeightsUnpickler error:", "")
            break
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and "weights_only" not in line and "torch.load" not in line
             and "Please file an issue" not in line and "unsafe" not in line.lower()]
    return lines[0].split(". ")[0][:200] if lines else type(error).__name__  # the first sentence
