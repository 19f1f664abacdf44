"""torchrun on the CPU: two gloo processes train one model and shard a predict (issue 11's contract)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_FLAGS

from ssimae.distributed import timeout
from ssimae.errors import SsimaeError

HELPERS = Path(__file__).resolve().parent / "helpers"
pytestmark = pytest.mark.slow


def torchrun(*args, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "SSIMAE_DIST_TIMEOUT": "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run([str(a) for a in command], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, mvtec_root) -> Path:
    work = tmp_path_factory.mktemp("ddp")
    flags = [f for f in TINY_FLAGS if f != "--quiet"]
    result = torchrun(HELPERS / "ddp_train.py", "train", mvtec_root, "--output", work / "run", *flags,
                      "--max-steps", "3", "--quiet", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def test_ranks_end_with_the_same_weights_and_one_checkpoint(ddp_run):
    a, b = (torch.load(ddp_run / f"weights.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert sorted(p.name for p in (ddp_run / "run").iterdir()) == [
        "checkpoint.pt", "config.yaml", "train.log", "training_log.jsonl"]
    from ssimae.checkpoint import Checkpoint

    checkpoint = Checkpoint.load(ddp_run / "run" / "checkpoint.pt")
    assert checkpoint.training.step == 3 and checkpoint.thresholds is not None
    for name, tensor in checkpoint.weights.items():
        assert torch.equal(tensor, a[name]), name


def test_sharded_predict_writes_what_one_process_writes(ddp_run, mvtec_root):
    from ssimae.cli import main

    checkpoint = ddp_run / "run" / "checkpoint.pt"
    assert main(["predict", str(checkpoint), str(mvtec_root / "test"), "--output", str(ddp_run / "single"),
                 "--quiet", "--device", "cpu"]) == 0
    result = torchrun("-m", "ssimae", "predict", checkpoint, mvtec_root / "test", "--output", ddp_run / "sharded",
                      "--quiet", "--device", "cpu", cwd=ddp_run)
    assert result.returncode == 0, result.stderr[-3000:]
    single = sorted(p.relative_to(ddp_run / "single") for p in (ddp_run / "single").rglob("*") if p.is_file())
    sharded = sorted(p.relative_to(ddp_run / "sharded") for p in (ddp_run / "sharded").rglob("*") if p.is_file())
    assert single == sharded and len(single) == 13  # 4 x (map, mask, overlay) + scores.csv
    for relative in single:
        assert (ddp_run / "single" / relative).read_bytes() == (ddp_run / "sharded" / relative).read_bytes(), relative


def test_a_failing_rank_ends_the_run_with_its_message(ddp_run, mvtec_root):
    folder = ddp_run / "mixed"
    folder.mkdir()
    good = (mvtec_root / "test" / "good" / "000.png").read_bytes()
    (folder / "a.png").write_bytes(good)
    (folder / "b.png").write_bytes(good[:50])  # the second image: rank 1's share
    result = torchrun("-m", "ssimae", "predict", ddp_run / "run" / "checkpoint.pt", folder, "--output",
                      ddp_run / "mixed-out", "--strict", "--quiet", "--device", "cpu", cwd=ddp_run, timeout=180)
    assert result.returncode != 0
    assert "ssimae: error: cannot read image" in result.stderr and "b.png" in result.stderr


def test_commands_that_run_in_one_process_refuse_torchrun(ddp_run, mvtec_root):
    result = torchrun("-m", "ssimae", "evaluate", ddp_run / "run" / "checkpoint.pt", mvtec_root, "--output",
                      ddp_run / "eval", cwd=ddp_run)
    assert result.returncode != 0 and "runs in one process; start it without torchrun" in result.stderr
    assert not (ddp_run / "eval").exists()


@pytest.mark.parametrize("text", ["ten", "0", "-5", "nan"])
def test_a_bad_collective_timeout_is_a_user_error(monkeypatch, text):
    monkeypatch.setenv("SSIMAE_DIST_TIMEOUT", text)
    with pytest.raises(SsimaeError, match="SSIMAE_DIST_TIMEOUT"):
        timeout()
    monkeypatch.setenv("SSIMAE_DIST_TIMEOUT", "90")
    assert timeout().total_seconds() == 90


def test_every_rank_and_every_resume_gets_its_own_torch_seed():
    from ssimae.train import rank_seed

    seeds = {(rank, step): rank_seed(5, rank, step) for rank in (1, 2, 3) for step in (0, 100, 250)}
    assert len(set(seeds.values())) == len(seeds)  # no two processes, nor a resumed run, share the noise
    assert seeds[(1, 0)] == rank_seed(5, 1, 0) and rank_seed(6, 1, 0) != seeds[(1, 0)]  # reproducible, by seed
    assert all(0 <= seed < 2**63 for seed in seeds.values())
    torch.manual_seed(max(seeds.values()))  # in torch's range
