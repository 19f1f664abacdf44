"""fit(): run folder contents, self-describing checkpoints, budgets, resume, reproducibility."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config

import ssimae
from ssimae.checkpoint import load_model, read_checkpoint, save_checkpoint
from ssimae.config import load_config
from ssimae.errors import SsimaeError
from ssimae.models import build_model
from ssimae.train import fit


def _tmp_files(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_folder_contents(trained_run):
    for name in ("checkpoint.pt", "config.yaml", "train.log", "training_log.jsonl"):
        assert (trained_run / name).is_file(), name
    assert _tmp_files(trained_run) == []
    log = (trained_run / "train.log").read_text()
    assert "threshold" in log and "epoch 1 step 2" in log  # INFO records reach the file without a CLI
    records = _jsonl(trained_run / "training_log.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2)]
    for key in ("loss", "val_loss", "fidelity_corr", "detail_ratio", "patches_per_s", "seconds"):
        assert math.isfinite(records[0][key]), key
    assert load_config(trained_run / "config.yaml") == tiny_config()


def test_checkpoint_is_self_describing_and_loads_with_weights_only(checkpoint_path):
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert state["format"] == "ssimae-checkpoint-1" and state["version"] == ssimae.__version__
    assert state["method"] == "ssim-ae" and state["model_kind"] == "ae"
    assert state["model_kwargs"] == {"channels": 1, "latent_dim": 8, "patch_size": 128}
    assert (state["color"], state["image_size"], state["patch_size"], state["stride"]) == ("gray", None, 128, 64)
    assert isinstance(state["threshold"], float) and math.isfinite(state["threshold"])
    assert "min defect area 25" in state["threshold_rule"]
    assert state["training"]["step"] == 2 and state["training"]["complete"] is True
    assert state["config"]["latent_dim"] == 8 and state["history"][0]["step"] == 2
    model = build_model(state["model_kind"], **state["model_kwargs"])
    model.load_state_dict(state["model_state"])
    loaded = load_model(checkpoint_path)
    assert loaded.config == tiny_config() and not loaded.model.training
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model.eval()(x))


def test_max_steps_resume_and_reproducibility(trained_run, mvtec_root, tmp_path):
    # Resume the 2-step run up to 3 steps: one more epoch of a single step (3 is not a multiple of 2).
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(trained_run, resumed_dir)
    resumed = fit(tiny_config(max_steps=3), mvtec_root, resumed_dir, resume=True, progress=False)
    assert resumed.steps == 3
    records = _jsonl(resumed_dir / "training_log.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2), (2, 3)]  # appended, not rewritten
    assert [h["step"] for h in resumed.history] == [2, 3]
    # A straight 3-step run with the same seed: the same first epoch as the session run (reproducible),
    # the same budget, and the same final weights as the resumed run (resume continues exactly).
    straight_dir = tmp_path / "straight"
    straight = fit(tiny_config(max_steps=3), mvtec_root, straight_dir, progress=False)
    assert straight.steps == 3
    first = _jsonl(trained_run / "training_log.jsonl")[0]
    assert straight.history[0]["loss"] == first["loss"] and straight.history[0]["val_loss"] == first["val_loss"]
    assert [h["loss"] for h in straight.history] == pytest.approx([h["loss"] for h in resumed.history], rel=1e-6)
    a, b = read_checkpoint(straight_dir / "checkpoint.pt"), read_checkpoint(resumed_dir / "checkpoint.pt")
    for name, tensor in a["model_state"].items():
        torch.testing.assert_close(tensor, b["model_state"][name], rtol=1e-5, atol=1e-6)
    assert _tmp_files(tmp_path) == []


def test_resume_with_a_changed_model_setting_is_refused(checkpoint_path, mvtec_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint_path, run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SsimaeError, match="latent_dim") as info:
        fit(tiny_config(latent_dim=16), mvtec_root, run, resume=True, progress=False)
    assert "checkpoint.pt" in str(info.value)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_existing_checkpoint_needs_resume(checkpoint_path, mvtec_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint_path, run / "checkpoint.pt")
    with pytest.raises(SsimaeError, match="--resume"):
        fit(tiny_config(), mvtec_root, run, progress=False)


def test_resume_without_a_checkpoint_is_an_error(mvtec_root, tmp_path):
    with pytest.raises(SsimaeError, match="does not exist"):
        fit(tiny_config(), mvtec_root, tmp_path / "new", resume=True, progress=False)


def test_a_bad_training_image_stops_before_any_checkpoint(tmp_path):
    data = tmp_path / "plain"
    data.mkdir()
    from PIL import Image

    Image.fromarray(np.full((130, 130), 100, dtype=np.uint8)).save(data / "a.png")
    (data / "b.png").write_bytes((data / "a.png").read_bytes()[:60])
    run = tmp_path / "run"
    with pytest.raises(SsimaeError, match="b.png"):
        fit(tiny_config(), data, run, progress=False)
    assert not (run / "checkpoint.pt").exists() and _tmp_files(tmp_path) == []


def test_interrupted_checkpoint_save_keeps_the_previous_file(checkpoint_path, tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    shutil.copy(checkpoint_path, target)
    before = target.read_bytes()

    def broken_save(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format": "x"}, target)
    assert target.read_bytes() == before and _tmp_files(tmp_path) == []


@pytest.mark.parametrize("method, kind", [("l2-ae", "ae"), ("vae", "vae")])
def test_other_methods_train_and_describe_themselves(method, kind, mvtec_root, tmp_path):
    result = fit(tiny_config(method=method, max_steps=1), mvtec_root, tmp_path / method, progress=False)
    state = read_checkpoint(result.checkpoint)
    assert (state["method"], state["model_kind"], result.steps) == (method, kind, 1)
    assert math.isfinite(state["threshold"])
    assert yaml.safe_load((tmp_path / method / "config.yaml").read_text())["method"] == method


def test_time_budget_stops_training(mvtec_root, tmp_path):
    # 200 epochs x 2 steps without a step limit; a 6 ms budget must stop it almost at once.
    result = fit(tiny_config(max_steps=None, max_minutes=1e-4), mvtec_root, tmp_path / "run", progress=False)
    assert result.steps <= 2
    assert read_checkpoint(result.checkpoint)["training"]["complete"] is True


def test_l2_warmup_trains_with_the_l2_loss_then_switches(mvtec_root, tmp_path):
    # With the warm-up covering every step, an ssim-ae run must follow exactly the l2-ae run of the
    # same seed; with a one-step warm-up the second step's loss must differ from it (SSIM, not L2).
    def losses(method, warmup, name):
        run = fit(tiny_config(method=method, l2_warmup_steps=warmup, patches_per_epoch=4), mvtec_root,
                  tmp_path / name, progress=False)
        return [record["loss"] for record in run.history]

    l2 = losses("l2-ae", 0, "l2")
    assert losses("ssim-ae", 2, "warm-all") == pytest.approx(l2, rel=1e-6)
    partly = losses("ssim-ae", 1, "warm-one")
    assert partly[0] == pytest.approx(l2[0], rel=1e-6)
    assert partly[1] != pytest.approx(l2[1], rel=1e-3)


def test_presets_apply_under_flags():
    from ssimae.config import PRESETS, preset_config

    tuned = preset_config("tuned")
    assert (tuned.l2_warmup_steps, tuned.map_smoothing) == (PRESETS["tuned"]["l2_warmup_steps"], 2.0)
    assert preset_config("paper") == preset_config(None)
    with pytest.raises(SsimaeError, match="unknown preset 'fast'"):
        preset_config("fast")
