"""Self-describing checkpoints: everything `predict`, `evaluate` and `export` need in one file.

The file holds only tensors and plain Python values, so it loads with torch.load(weights_only=True).
It is written to a temp file and renamed, so an interrupted save never corrupts the previous one.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import __version__
from .config import Config, config_from_dict
from .errors import SsimaeError
from .files import atomic_path
from .losses import METHODS
from .models import build_model

FORMAT = "ssimae-checkpoint-1"


def checkpoint_dict(
    model: torch.nn.Module,
    config: Config,
    channels: int,
    threshold: float | None,
    threshold_rule: str | None,
    training: dict,
    optimizer: torch.optim.Optimizer | None = None,
    history: list[dict] | None = None,
) -> dict:
    method = METHODS[config.method]
    return {
        "format": FORMAT,
        "version": __version__,
        "method": config.method,
        "model_kind": method.model_kind,
        "model_kwargs": {"channels": channels, "latent_dim": config.latent_dim, "patch_size": config.patch_size},
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config.to_dict(),
        # What predict needs, repeated at the top level so a reader need not know Config:
        "color": config.color,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "stride": config.stride,
        "threshold": threshold,
        "threshold_rule": threshold_rule,
        "normalisation": "pixels scaled to [0, 1] by bit depth; no mean/std",
        "training": training,  # step, epoch, seconds, complete
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "history": history or [],
    }


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SsimaeError(f"{path} is not an ssimae checkpoint (format {FORMAT})")
    return state


def _load_error_reason(error: Exception) -> str:
    """The informative part of a torch.load error, on one line.

    A weights-only failure starts with advice to load with weights_only=False, which is wrong for a
    foreign or damaged file; the reason follows 'WeightsUnpickler error:'. Some errors have no text.
    """
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class LoadedModel(NamedTuple):
    model: torch.nn.Module  # in eval mode, on the CPU
    config: Config
    state: dict  # the whole checkpoint dict


def load_model(path: str | os.PathLike) -> LoadedModel:
    """The model and settings of a checkpoint, ready for inference."""
    state = read_checkpoint(path)
    model = build_model(state["model_kind"], **state["model_kwargs"])
    model.load_state_dict(state["model_state"])
    model.eval()
    config = config_from_dict(_known_keys(state["config"]), source=str(path))
    return LoadedModel(model, config, state)


def _known_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Config values of a checkpoint, ignoring settings this version no longer has."""
    known = Config.__dataclass_fields__
    return {k: v for k, v in values.items() if k in known}
