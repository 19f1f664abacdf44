"""fit(): run folder contents, self-describing checkpoints, budgets, resume, reproducibility."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, tmp_files

import ssimae
from ssimae.checkpoint import FORMAT, SCHEMA, Checkpoint
from ssimae.config import Config, config_from_dict, load_config, preset_config
from ssimae.errors import SsimaeError
from ssimae.models import build_model
from ssimae.train import fit


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_folder_contents(trained_run):
    for name in ("checkpoint.pt", "config.yaml", "train.log", "training_log.jsonl"):
        assert (trained_run / name).is_file(), name
    assert tmp_files(trained_run) == []
    log = (trained_run / "train.log").read_text()
    assert "threshold" in log and "epoch 1 step 2" in log  # INFO records reach the file without a CLI
    records = _jsonl(trained_run / "training_log.jsonl")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2)]
    for key in ("loss", "val_loss", "fidelity_corr", "detail_ratio", "patches_per_s", "seconds"):
        assert math.isfinite(records[0][key]), key
    assert load_config(trained_run / "config.yaml") == tiny_config()


def test_checkpoint_is_self_describing_and_loads_with_weights_only(checkpoint_path):
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert (state["format"], state["schema"], state["version"]) == (FORMAT, SCHEMA, ssimae.__version__)
    assert state["method"] == "ssim-ae" and state["channels"] == 1
    assert state["config"]["latent_dim"] == 8 and state["config"]["stride"] == 64
    assert isinstance(state["thresholds"]["pixel"], float) and math.isfinite(state["thresholds"]["pixel"])
    assert "pixel FPR 0.001" in state["thresholds"]["pixel_rule"] and math.isfinite(state["thresholds"]["image"])
    assert state["training"]["step"] == 2 and state["training"]["complete"] is True
    assert state["history"][0]["step"] == 2
    model = build_model("ae", 1, 8, 128)
    model.load_state_dict(state["weights"])
    loaded = Checkpoint.load(checkpoint_path)
    assert loaded.config == tiny_config() and loaded.method == "ssim-ae"
    network = loaded.network()
    assert not network.training
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(network(x), model.eval()(x))


def test_checkpoint_round_trips_every_field(checkpoint_path, tmp_path):
    loaded = Checkpoint.load(checkpoint_path)
    loaded.save(tmp_path / "copy.pt")
    again = Checkpoint.load(tmp_path / "copy.pt")
    assert (again.config, again.channels, again.thresholds, again.training, again.history) == \
        (loaded.config, loaded.channels, loaded.thresholds, loaded.training, loaded.history)
    assert again.weights.keys() == loaded.weights.keys()
    assert all(torch.equal(again.weights[k], loaded.weights[k]) for k in loaded.weights)


def test_checkpoints_of_version_0_1_0_still_load(checkpoint_path, tmp_path):
    """The untyped dict of ssimae 0.1.0 (format ssimae-checkpoint-1) is read and converted."""
    new = Checkpoint.load(checkpoint_path)
    old = {"format": "ssimae-checkpoint-1", "version": "0.1.0", "method": "ssim-ae", "model_kind": "ae",
           "model_kwargs": {"channels": 1, "latent_dim": 8, "patch_size": 128}, "model_state": new.weights,
           "config": {**new.config.to_dict(), "retired_setting": 1}, "threshold": 0.25,
           "threshold_rule": "min defect area 25 px on validation images",
           "training": {"step": 2, "epoch": 1, "seconds": 1.0, "complete": True}, "optimizer_state": None,
           "history": []}
    torch.save(old, tmp_path / "old.pt")
    loaded = Checkpoint.load(tmp_path / "old.pt")
    assert loaded.config == dataclasses.replace(new.config, image_score="max")  # 0.1.0 scored images by the maximum
    assert loaded.thresholds.pixel == 0.25 and loaded.training.step == 2


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
    a, b = Checkpoint.load(straight_dir / "checkpoint.pt"), Checkpoint.load(resumed_dir / "checkpoint.pt")
    for name, tensor in a.weights.items():
        torch.testing.assert_close(tensor, b.weights[name], rtol=1e-5, atol=1e-6)
    assert tmp_files(tmp_path) == []


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
    assert not (run / "checkpoint.pt").exists() and tmp_files(tmp_path) == []


def test_interrupted_checkpoint_save_keeps_the_previous_file(checkpoint_path, tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    shutil.copy(checkpoint_path, target)
    before = target.read_bytes()
    checkpoint = Checkpoint.load(target)

    def broken_save(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(target)
    assert target.read_bytes() == before and tmp_files(tmp_path) == []


@pytest.mark.parametrize("method, module", [("l2-ae", "ConvAutoencoder"), ("vae", "VariationalAutoencoder")])
def test_other_methods_train_and_describe_themselves(method, module, mvtec_root, tmp_path):
    result = fit(tiny_config(method=method, max_steps=1), mvtec_root, tmp_path / method, progress=False)
    checkpoint = Checkpoint.load(result.checkpoint)
    assert (checkpoint.method, type(checkpoint.network()).__name__, result.steps) == (method, module, 1)
    assert math.isfinite(checkpoint.thresholds.pixel)
    assert yaml.safe_load((tmp_path / method / "config.yaml").read_text())["method"] == method


def test_time_budget_stops_training(mvtec_root, tmp_path):
    # 200 epochs x 2 steps without a step limit; a 6 ms budget must stop it almost at once.
    result = fit(tiny_config(max_steps=None, max_minutes=1e-4), mvtec_root, tmp_path / "run", progress=False)
    assert result.steps <= 2
    assert Checkpoint.load(result.checkpoint).training.complete is True


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


def test_l2_warmup_defaults_to_the_methods_own():
    """Unset, the warm-up is the method's (100 steps for ssim-ae only); set, it is what was set; the paper
    preset has none."""
    assert Config(method="ssim-ae").warmup_steps == 100
    assert [Config(method=m).warmup_steps for m in ("l2-ae", "vae", "fm-ae", "patchcore", "blur")] == [0] * 5
    assert Config(method="ssim-ae", l2_warmup_steps=7).warmup_steps == 7
    assert config_from_dict({"method": "ssim-ae"}, preset_config("paper")).warmup_steps == 0


def test_presets_reach_the_run_under_yaml_and_flags(mvtec_root, tmp_path):
    """--preset tuned through the CLI: its values reach the saved settings; YAML and flags still win."""
    from ssimae.cli import main
    from ssimae.config import PRESETS

    settings = tmp_path / "settings.yaml"
    settings.write_text("map-smoothing: 3\n")
    run = tmp_path / "run"
    assert main(["train", str(mvtec_root), "--output", str(run), "--preset", "tuned", "--config", str(settings),
                 "--map-smoothing", "1", "--max-steps", "2", "--batch-size", "4", "--patches-per-epoch", "8",
                 "--latent-dim", "8", "--stride", "64", "--device", "cpu", "--quiet"]) == 0
    saved = Checkpoint.load(run / "checkpoint.pt").config
    assert PRESETS["tuned"]["l2_warmup_steps"] == 100 and PRESETS["tuned"]["map_smoothing"] not in (1, 3)
    assert (saved.l2_warmup_steps, saved.map_smoothing) == (100, 1.0)  # preset, then YAML, then the flag wins
    assert main(["train", str(mvtec_root), "--output", str(tmp_path / "bad"), "--preset", "fast", "--quiet"]) == 2


def test_the_saved_optimizer_state_is_the_one_of_a_run_without_cuda_graphs():
    """A CUDA-graph run's Adam is `capturable`, with its step counters on the GPU; what a checkpoint keeps
    must load into a plain Adam anywhere (here: the flag and counters of such a run, made by hand)."""
    from ssimae.graphs import portable_optimizer_state

    model = build_model("ae", 1, 8, 128)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model(torch.rand(2, 1, 128, 128)).mean().backward()
    optimizer.step()
    for group in optimizer.param_groups:
        group["capturable"] = True
    state = portable_optimizer_state(optimizer)
    assert all(group["capturable"] is False for group in state["param_groups"])
    assert all(entry["step"].device.type == "cpu" and entry["step"].item() == 1 for entry in state["state"].values())
    plain = torch.optim.Adam(build_model("ae", 1, 8, 128).parameters(), 1e-3)
    plain.load_state_dict(state)
    assert plain.param_groups[0]["capturable"] is False
    assert optimizer.param_groups[0]["capturable"] is True  # the live optimizer is left as it was
