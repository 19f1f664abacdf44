"""Bad input and faults: every case a one-line error (exit 2) or the right behaviour, nothing left half-written.

BAD_INPUTS is the table the README shows (section "When something is wrong"): each row is a command
line built in a temp folder, and a fragment its one-line error must contain.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_FLAGS, texture_png, tiny_config, tmp_files, write_good_folder, write_png
from PIL import Image

from ssimae.checkpoint import Checkpoint
from ssimae.cli import main
from ssimae.predict import output_names
from ssimae.train import fit


@pytest.fixture(autouse=True)
def _restore_logging(restore_logging):
    """main() points the 'ssimae' logger at this test's captured stderr; conftest undoes that."""


def one_line_error(capsys, args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssimae: error:") and "Traceback" not in err, err
    return lines[0]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height (and holds almost no data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))
    return path


def _checkpoint_without(key: str):
    def make(source: Path, path: Path) -> Path:
        state = torch.load(source, weights_only=True)
        del state[key]
        torch.save(state, path)
        return path
    return make


def _checkpoint_with_wrong_shapes(source: Path, path: Path) -> Path:
    state = torch.load(source, weights_only=True)
    name = next(iter(state["weights"]))
    state["weights"][name] = torch.zeros(3, 3)
    torch.save(state, path)
    return path


def _crafted_checkpoint(source: Path, path: Path) -> Path:
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo crafted",))

    torch.save({"format": "ssimae-checkpoint", "payload": RunsCode()}, path)
    return path


# (case id, what the README calls it, a builder of the command line, a fragment of the error)
BAD_INPUTS = [
    ("train-output-file", "`--output` is an existing file",
     lambda t, ck, data: ["train", data, "--output", _file(t / "taken"), *TINY_FLAGS], "is a file, not a folder"),
    ("predict-output-file", "`--output` is an existing file (predict)",
     lambda t, ck, data: ["predict", ck, data / "test", "--output", _file(t / "taken")], "is a file, not a folder"),
    ("evaluate-output-file", "`--output` is an existing file (evaluate)",
     lambda t, ck, data: ["evaluate", ck, data, "--output", _file(t / "taken")], "is a file, not a folder"),
    ("output-unwritable", "`--output` where nothing can be written (/proc)",
     lambda t, ck, data: ["predict", ck, data / "test" / "good", "--output", "/proc/ssimae-out"], "/proc/ssimae-out"),
    ("config-folder", "`--config` is a folder",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--config", t, *TINY_FLAGS], "is a folder"),
    ("config-not-utf8", "`--config` is not UTF-8 text",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--config", _bytes(t / "c.yaml", b"stride: \xff\xfe\n"),
                          *TINY_FLAGS], "not UTF-8"),
    ("config-key-twice", "a setting given twice in the `--config` file",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--config",
                          _bytes(t / "c.yaml", b"stride: 16\nlatent-dim: 8\nstride: 32\n"), *TINY_FLAGS],
     "line 3: setting 'stride' is given twice"),
    ("image-size-tiny", "`--image-size 8`",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--image-size", "8", *TINY_FLAGS],
     "--image-size '8' is too small"),
    ("threshold-nan", "`--threshold nan`",
     lambda t, ck, data: ["predict", ck, data / "test", "--output", t / "o", "--threshold", "nan"],
     "--threshold nan is not a finite number"),
    ("image-bomb", "an image whose header claims 30000x30000 pixels",
     lambda t, ck, data: ["predict", ck, _png_header_only(t / "bomb.png", 30000, 30000), "--output", t / "o",
                          "--strict", "--quiet"], "more than the limit"),
    ("checkpoint-missing-key", "a checkpoint with the right format but a missing entry",
     lambda t, ck, data: ["predict", _checkpoint_without("weights")(ck, t / "c.pt"), data / "test", "--output", t / "o"],
     "incomplete or damaged (missing 'weights')"),
    ("checkpoint-wrong-shapes", "a checkpoint whose weights have other shapes",
     lambda t, ck, data: ["predict", _checkpoint_with_wrong_shapes(ck, t / "c.pt"), data / "test", "--output", t / "o"],
     "size mismatch for"),
    ("checkpoint-crafted", "a crafted checkpoint that would run code when unpickled",
     lambda t, ck, data: ["predict", _crafted_checkpoint(ck, t / "c.pt"), data / "test", "--output", t / "o"],
     "unsupported GLOBAL"),
    ("ssim-window-too-large", "`--ssim-window` larger than the patch allows",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--ssim-window", "129", *TINY_FLAGS],
     "--ssim-window 129 must be at most half the patch size"),
    ("batch-size-zero", "`predict --batch-size 0`",
     lambda t, ck, data: ["predict", ck, data / "test", "--output", t / "o", "--batch-size", "0"],
     "--batch-size must be at least 1"),
    ("stride-mismatch", "`predict --stride` other than the training stride, without `--threshold`",
     lambda t, ck, data: ["predict", ck, data / "test", "--output", t / "o", "--stride", "32"],
     "--stride 32 differs from the stride 64"),
    ("resume-changed-model", "`--resume` with a changed model setting",
     lambda t, ck, data: ["train", data, "--output", _run_copy(ck, t / "run"), "--resume", *TINY_FLAGS,
                          "--latent-dim", "16"], "latent_dim differ"),
    ("output-refuses-files", "`--output` a folder that refuses new files (/proc)",
     lambda t, ck, data: ["evaluate", ck, data, "--output", "/proc"],
     "the output folder /proc does not accept new files"),
    ("mask-wrong-size", "a ground-truth mask of another size than its image",
     lambda t, ck, data: ["compare", _with_a_resized_mask(data, t / "data"), "--output", t / "cmp", "--methods",
                          "ssim-ae", *TINY_FLAGS], "masks must have their image's size"),
    ("config-bad-type", "a value of the wrong type in the `--config` file, with the flag also typed",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--config", _bytes(t / "c.yaml", b"max-steps: many\n"),
                          *TINY_FLAGS], "c.yaml: max_steps must be empty or int, got 'many'"),
    ("config-out-of-range", "a value out of range in the `--config` file",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--config", _bytes(t / "c.yaml", b"epochs: 0\n"),
                          *TINY_FLAGS], "c.yaml: epochs must be at least 1, got 0"),
    ("config-not-yaml", "`--config` is not valid YAML",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--config",
                          _bytes(t / "c.yaml", b"stride: 16\nlatent-dim: [8\n"), *TINY_FLAGS],
     "is not valid YAML, line"),
    ("latent-dim-huge", "`--latent-dim 1000000000`",
     lambda t, ck, data: ["train", data, "--output", t / "run", *TINY_FLAGS, "--latent-dim", "1000000000"],
     "--latent-dim 1000000000 is larger than 16,384"),
    ("resume-nothing", "`--resume` where no run was started",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--resume", *TINY_FLAGS], "nothing to resume"),
    ("feature-weights-missing", "`--feature-net vgg16` without a weights file",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--method", "fm-ae", "--feature-net", "vgg16",
                          *TINY_FLAGS], "needs --feature-weights"),
    ("unknown-flag", "a mistyped flag",
     lambda t, ck, data: ["train", data, "--output", t / "run", "--strid", "4", *TINY_FLAGS],
     "unrecognized arguments: --strid"),
    ("flag-type", "a flag value of the wrong type",
     lambda t, ck, data: ["train", data, "--output", t / "run", *TINY_FLAGS, "--lr", "fast"],
     "--lr: 'fast' is not a valid float"),
]


def _file(path: Path) -> Path:
    path.write_text("not a folder\n")
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _with_a_resized_mask(data: Path, copy: Path) -> Path:
    shutil.copytree(data, copy)
    mask = next(copy.glob("ground_truth/*/*_mask.png"))
    with Image.open(mask) as image:
        image.resize((image.width + 4, image.height)).save(mask)
    return copy


def _run_copy(checkpoint: Path, run: Path) -> Path:
    run.mkdir()
    shutil.copy(checkpoint, run / "checkpoint.pt")
    return run


@pytest.mark.parametrize("case, label, build, fragment", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_a_one_line_error(case, label, build, fragment, checkpoint_path, mvtec_root, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    args = build(work, checkpoint_path, mvtec_root)
    before = {p for p in work.rglob("*") if p.is_file()}
    line = one_line_error(capsys, args)
    assert fragment in line, line
    assert "weights_only" not in line  # torch's advice to load untrusted files unsafely is not passed on
    assert tmp_files(work) == [] and tmp_files(mvtec_root) == []
    # No output file: an output folder may have been made before the error, but nothing is in it.
    made = {p for p in work.rglob("*") if p.is_file()} - before
    assert made <= {work / "run" / "checkpoint.pt"}, made


def test_the_readme_shows_the_bad_input_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for _, label, _, fragment in BAD_INPUTS:
        assert label in readme, label


# --------------------------------------------------------------------------- behaviour, not errors


def test_inputs_sharing_a_stem_keep_their_extension(checkpoint_path, tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    write_png(folder / "a.png", texture_png(140, 150, rng))
    Image.fromarray(texture_png(140, 150, rng)).save(folder / "a.bmp")
    write_png(folder / "b.png", texture_png(140, 150, rng))
    stale, foreign = tmp_path / "o" / "maps" / ".b.k3x9q2.tiff.tmp", tmp_path / "o" / "mine" / ".notes.tmp"
    for path in (stale, foreign):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
    assert main(["predict", str(checkpoint_path), str(folder), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    assert not stale.exists() and foreign.exists()  # a killed run's temp goes; a user's own file stays
    maps = sorted(p.name for p in (tmp_path / "o" / "maps").iterdir())
    assert maps == ["a.bmp.tiff", "a.png.tiff", "b.tiff"]
    with open(tmp_path / "o" / "scores.csv", newline="") as handle:
        assert sorted(row["path"] for row in csv.DictReader(handle)) == ["a.bmp", "a.png", "b.png"]


def test_output_names_never_write_one_file_for_two_inputs():
    base = Path("in")
    paths = [base / n for n in ("a.png", "a.jpg", "a.png.png", "b.png", "B.png", "c.png", "sub/c.png")]
    names = output_names(paths, base)
    assert [str(names[p]) for p in paths] == ["a.png", "a.jpg", "a.png.png", "b.png", "B.png-2", "c", "sub/c"]
    assert len({str(n).casefold() for n in names.values()}) == len(paths)  # also where case is ignored


def test_predicting_into_the_input_folder_does_not_read_its_own_outputs(checkpoint_path, tmp_path):
    folder = write_good_folder(tmp_path / "in", count=2)
    for out in ("out", "out", "out2"):  # the later runs find the earlier runs' PNG masks and overlays
        assert main(["predict", str(checkpoint_path), str(folder), "--output", str(folder / out), "--quiet"]) == 0
        with open(folder / out / "scores.csv", newline="") as handle:
            assert [row["path"] for row in csv.DictReader(handle)] == ["good_0.png", "good_1.png"]


def test_predicting_into_the_input_folder_itself_says_why_nothing_is_left(checkpoint_path, tmp_path, capsys):
    folder = write_good_folder(tmp_path / "in", count=1)
    assert main(["predict", str(checkpoint_path), str(folder), "--output", str(folder), "--quiet"]) == 2
    assert "outside predict's outputs (1 image(s) there)" in capsys.readouterr().err


def test_a_failed_train_leaves_no_run_folder(tmp_path):
    data = write_good_folder(tmp_path / "data", count=2)
    (data / "broken.png").write_bytes((data / "good_0.png").read_bytes()[:80])
    run = tmp_path / "run"
    assert main(["train", str(data), "--output", str(run), *TINY_FLAGS]) == 2
    assert not run.exists()


def test_a_new_run_starts_its_logs_afresh_and_removes_killed_saves(mvtec_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "training_log.jsonl").write_text('{"epoch": 99, "step": 999}\n')  # left by a failed run
    (run / ".checkpoint.abc123.pt.tmp").write_bytes(b"")  # a save killed by SIGKILL
    fit(tiny_config(), mvtec_root, run, progress=False)
    records = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]
    assert tmp_files(run) == []


def test_resume_applies_and_records_changed_settings(checkpoint_path, mvtec_root, tmp_path):
    run = _run_copy(checkpoint_path, tmp_path / "run")
    before = Checkpoint.load(run / "checkpoint.pt")
    result = fit(tiny_config(max_steps=3, lr=5e-5, seed=7), mvtec_root, run, resume=True, progress=False)
    after = Checkpoint.load(result.checkpoint)
    assert [g["lr"] for g in after.optimizer_state["param_groups"]] == [5e-5]  # the optimizer really uses it
    assert after.config.lr == 5e-5 and yaml.safe_load((run / "config.yaml").read_text())["lr"] == 5e-5
    first, second = after.segments
    assert first["start_step"] == 0 and first["config"]["lr"] == before.config.lr == 2e-4
    assert second["start_step"] == 2 and second["changed"] == {"lr": [2e-4, 5e-5], "seed": [0, 7], "max_steps": [2, 3]}
    assert "settings changed from step 2" in (run / "train.log").read_text()


def test_a_resume_with_another_seed_keeps_the_validation_split(mvtec_root, tmp_path, monkeypatch):
    import ssimae.train as train

    splits = []
    real = train.find_training_images
    monkeypatch.setattr(train, "find_training_images", lambda *args: splits.append(real(*args)) or splits[-1])
    fit(tiny_config(max_steps=1, val_fraction=0.5), mvtec_root, tmp_path / "run", progress=False)
    fit(tiny_config(max_steps=2, val_fraction=0.5, seed=7), mvtec_root, tmp_path / "run", resume=True, progress=False)
    assert splits[0] == splits[1]
    assert real(mvtec_root, 0.5, 7) != splits[0]  # seed 7's own split differs: the first segment's seed was kept


def test_a_resume_on_another_data_folder_is_said(mvtec_root, tmp_path, caplog):
    fit(tiny_config(max_steps=1), mvtec_root, tmp_path / "run", progress=False)
    other = shutil.copytree(mvtec_root, tmp_path / "other")
    fit(tiny_config(max_steps=2), mvtec_root, tmp_path / "run", resume=True, progress=False)
    assert "resuming a run that started on" not in caplog.text
    fit(tiny_config(max_steps=3), other, tmp_path / "run", resume=True, progress=False)
    assert f"resuming a run that started on {mvtec_root.resolve()} with the images of {other.resolve()}" in caplog.text


def test_a_resumed_run_gets_only_what_is_left_of_its_time_budget(mvtec_root, tmp_path, monkeypatch):
    """--max-minutes counts the whole wall time, validation and saves too: a resume with the same budget
    after the time ran out trains no further step (the budget was counted on two clocks before)."""
    import ssimae.train as train

    clock = iter(range(0, 10**6, 1))  # every reading of the clock is one second later
    monkeypatch.setattr(train.time, "monotonic", lambda: float(next(clock)))
    config = tiny_config(max_steps=None, max_minutes=0.5)
    fit(config, mvtec_root, tmp_path / "run", progress=False)
    first = Checkpoint.load(tmp_path / "run" / "checkpoint.pt").training
    fit(config, mvtec_root, tmp_path / "run", resume=True, progress=False)
    again = Checkpoint.load(tmp_path / "run" / "checkpoint.pt").training
    assert 0 < first.step and again.step == first.step


@pytest.mark.parametrize("method", ["ssim-ae", "l2-ae", "vae", "fm-ae"])
@pytest.mark.slow
def test_resume_is_bit_exact(method, mvtec_root, tmp_path):
    """Two steps, stop, resume for a third = three steps straight: the same weights, bit for bit."""
    config = tiny_config(method=method, patches_per_epoch=4, max_steps=2)  # one step per epoch
    fit(config, mvtec_root, tmp_path / "resumed", progress=False)
    fit(tiny_config(method=method, patches_per_epoch=4, max_steps=3), mvtec_root, tmp_path / "resumed", resume=True,
        progress=False)
    fit(tiny_config(method=method, patches_per_epoch=4, max_steps=3), mvtec_root, tmp_path / "straight",
        progress=False)
    resumed = Checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    straight = Checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    assert resumed.training.step == straight.training.step == 3
    for name, tensor in straight.weights.items():
        assert torch.equal(tensor, resumed.weights[name]), name


@pytest.mark.slow
def test_progress_total_follows_the_time_budget(mvtec_root, tmp_path, monkeypatch):
    """Under --max-minutes the bar's total is what the time allows, not the 200-epoch step budget."""
    import ssimae.train as train

    totals = []
    real = train.TrainingProgress.step

    def spy(self, loss):
        real(self, loss)
        totals.append(self.bar.total)

    monkeypatch.setattr(train.TrainingProgress, "step", spy)
    fit(tiny_config(max_steps=None, max_minutes=0.05), mvtec_root, tmp_path / "run", progress=False)
    steps = Checkpoint.load(tmp_path / "run" / "checkpoint.pt").training.step
    budget = 200 * 2 * 4  # epochs x steps per epoch x batch: what the bar showed before
    assert totals and max(totals[len(totals) // 2:]) < budget / 4
    assert totals[-1] == pytest.approx(steps * 4, rel=0.5)


def test_a_refused_atomic_write_names_the_target_not_its_temp_file(tmp_path):
    from ssimae.files import atomic_path

    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a non-empty folder where the file should go
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"data")
    assert info.value.filename == str(target)
    assert tmp_files(tmp_path) == []


def test_a_folder_refusing_the_temp_file_names_the_target(tmp_path, monkeypatch):
    from ssimae.files import atomic_path

    def refuse(dir, prefix, suffix):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / f"{prefix}abc{suffix}"))

    monkeypatch.setattr("ssimae.files.tempfile.mkstemp", refuse)
    with pytest.raises(OSError) as info:
        with atomic_path(tmp_path / "metrics.json"):
            pass
    assert info.value.filename == str(tmp_path / "metrics.json")


def test_an_unknown_option_after_a_command_points_at_that_commands_help(mvtec_root, tmp_path, capsys):
    line = one_line_error(capsys, ["train", mvtec_root, "--output", tmp_path / "run", "--strid", "4"])
    assert "see `ssimae train --help`" in line, line


def test_a_checkpoint_save_that_fails_is_one_line_naming_the_file(mvtec_root, tmp_path, capsys, monkeypatch):
    def full_disk(obj, path):  # what torch's zip writer raises when a write fails part-way
        Path(path).write_bytes(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr("ssimae.checkpoint.torch.save", full_disk)
    line = one_line_error(capsys, ["train", mvtec_root, "--output", tmp_path / "run", *TINY_FLAGS])
    assert f"cannot write the checkpoint {tmp_path / 'run' / 'checkpoint.pt'}" in line and "disk may be full" in line
    assert tmp_files(tmp_path) == [] and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_full_disk_names_the_file_and_says_to_free_space(checkpoint_path, mvtec_root, tmp_path, capsys, monkeypatch):
    def no_space(self, *args, **kwargs):  # a full disk: the error carries no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    line = one_line_error(capsys, ["evaluate", checkpoint_path, mvtec_root, "--output", tmp_path / "eval", "--quiet"])
    assert f"{tmp_path / 'eval' / 'metrics.json'}: No space left on device; free some space" in line, line
    assert tmp_files(tmp_path) == []


def test_running_out_of_memory_is_a_user_error_with_what_to_lower(monkeypatch, capsys):
    from ssimae import cli

    def allocate(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 400000000000 bytes.")

    monkeypatch.setitem(cli.COMMANDS, "report", allocate)
    line = one_line_error(capsys, ["report", "somewhere"])
    assert "out of memory" in line and "--batch-size" in line, line


def test_a_bug_is_still_a_traceback(monkeypatch):
    from ssimae import cli

    def broken(args):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    with pytest.raises(RuntimeError, match="internal invariant"):
        main(["report", "somewhere"])


def test_a_failed_evaluate_leaves_no_folder_it_made(checkpoint_path, tmp_path, mvtec_root, capsys):
    data = tmp_path / "data"
    shutil.copytree(mvtec_root, data)
    damaged = next(data.glob("test/good/*.png"))
    damaged.write_bytes(b"not an image")  # found only when the maps are computed, after the folder is made
    line = one_line_error(capsys, ["evaluate", checkpoint_path, data, "--output", tmp_path / "eval", "--quiet"])
    assert damaged.name in line
    assert not (tmp_path / "eval").exists()


def test_evaluating_on_good_images_only_says_which_figures_are_undefined(checkpoint_path, mvtec_root, tmp_path,
                                                                           capsys):
    data = tmp_path / "data"
    shutil.copytree(mvtec_root / "test" / "good", data / "test" / "good")
    code = main([str(a) for a in ["evaluate", checkpoint_path, data, "--output", tmp_path / "eval"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "only good images" in err and "nan" not in out
    assert "n/a" in out.splitlines()[2] and "good images flagged" in out
