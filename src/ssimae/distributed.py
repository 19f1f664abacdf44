"""Running under torchrun: which process this is, and the few collective steps the package needs.

`torchrun --nproc_per_node N -m ssimae train|predict ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set (and MASTER_ADDR/PORT, or a rendezvous endpoint across machines). Each process calls
setup(), which joins the process group: NCCL when the process has a CUDA device, gloo on CPU. Every
collective has a timeout (SSIMAE_DIST_TIMEOUT seconds, default 600), so a rank that dies or hangs
ends the run with an error instead of a hang; torchrun also stops the other ranks when one fails.
Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op for a single process.
"""

from __future__ import annotations

import math
import os
import sys
from datetime import timedelta
from typing import Any, NamedTuple

from .errors import SsimaeError

# torch is imported inside the functions that need it: the CLI imports this module, and `ssimae --help`
# should not pay for importing torch.


class Rank(NamedTuple):
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> Rank:
    """This process's place in a torchrun launch (Rank() when not launched by torchrun)."""
    try:
        return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise SsimaeError("RANK, WORLD_SIZE or LOCAL_RANK is not a number; start ssimae with torchrun") from None


def timeout() -> timedelta:
    text = os.environ.get("SSIMAE_DIST_TIMEOUT", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise SsimaeError(f"SSIMAE_DIST_TIMEOUT={text!r} must be a positive number of seconds, e.g. 600")
    return timedelta(seconds=seconds)


def setup(device: str = "auto") -> Rank:
    """Join the process group if launched by torchrun; returns this process's Rank."""
    rank = launched()
    if not rank.distributed:
        return rank
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return rank
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(rank.local)
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout())
    except Exception as error:  # a rendezvous that fails or times out
        raise SsimaeError(f"rank {rank.rank}: could not join the other {rank.world - 1} process(es) "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                          "check the torchrun rendezvous settings") from None
    return rank


def device_for(rank: Rank, device: str) -> str:
    """The device name of this rank: its own GPU (cuda:LOCAL_RANK) when the setting allows CUDA."""
    import torch

    if rank.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local}"
    return device


def _initialized() -> bool:
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def lost_contact(error: BaseException) -> bool:
    """Whether an exception says that another process failed or a collective timed out."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return isinstance(error, dist.DistBackendError)


def teardown() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


def any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. 'my time budget ran out')."""
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (picklable values)."""
    if not _initialized():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not _initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def shard(items: list, rank: Rank) -> list:
    """This rank's share of a list: every world-th item, starting at its rank."""
    return items[rank.rank :: rank.world]
