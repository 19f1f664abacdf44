"""CUDA graphs: a training step, or a batch of inference, recorded once and replayed.

The reconstruction networks are small: at the documented batch of 128 a training step launches a few
hundred kernels, each too short to hide the launch of the next, so the card sat idle much of the time.
A CUDA graph records those launches once and replays them with one call: on an H200 an ssim-ae step ran
1.7x (TF32) to 2.7x (bf16) faster, and inference at batch 64 2.3x (bench/README.md). What a graph
needs, and what this module provides:
  - every tensor it reads or writes stays at one address: the batch is copied into a static input,
    the loss and outputs are read from static tensors, the optimizer keeps its step count on the device
    (Adam's `capturable`);
  - a few ordinary steps first, on a side stream, so cuDNN has chosen its algorithms and autograd has
    made the gradient tensors before recording (these are real steps of the run, on real batches);
  - nothing in the step synchronises with the host (no .item(), no tensors made from Python values).
Used on CUDA only, for one process (DistributedDataParallel keeps its own launches), and only for a
batch of the recorded shape; anything else runs eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch

# Ordinary steps before recording: cuDNN's algorithm choice and autograd's gradient tensors settle in one
# or two; PyTorch's documentation uses three.
EAGER_STEPS_BEFORE_RECORDING = 3


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let `optimizer.step()` be recorded in a graph: its step counters move to the parameters' device."""
    for group in optimizer.param_groups:
        group["capturable"] = True
    for param, state in optimizer.state.items():
        if "step" in state and state["step"].device != param.device:
            state["step"] = state["step"].to(param.device, torch.float32)


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() as a run without graphs saves it (capturable off, step counters on the CPU),
    so a checkpoint trained with graphs on a GPU resumes anywhere, the CPU included."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if group.get("capturable"):
            group["capturable"] = False
    state["state"] = {key: {name: value.cpu() if name == "step" else value for name, value in entry.items()}
                      for key, entry in state["state"].items()}
    return state


def on_side_stream(fn: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """fn() on a new stream that starts after the current stream's work, which then waits for it: how
    PyTorch's documentation runs the eager iterations before recording a graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return result


class GraphedTrainStep:
    """forward, loss, backward and optimizer step of one batch -> the loss as a 0-d device tensor.

    Batches run eagerly on a side stream until EAGER_STEPS_BEFORE_RECORDING of one shape have run in a
    row; the next batch of that shape is recorded as a CUDA graph and replayed, as is every later batch
    of that shape (another shape runs eagerly). `step_fn(x)` must do forward, loss, backward and
    optimizer.step() and return the loss, with the gradients cleared (set to None) before it is called
    the first time.
    """

    def __init__(self, step_fn: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                 device: torch.device):
        make_capturable(optimizer)
        self.step_fn, self.optimizer, self.device = step_fn, optimizer, torch.device(device)
        self.eager_shape: torch.Size | None = None  # the shape of the eager steps in a row before recording
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_input: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The graph's device made current: recording captures the current device's work only.
        with torch.cuda.device(self.device):
            if self.graph is not None and x.shape == self.static_input.shape:
                self.static_input.copy_(x)
                self.graph.replay()
                return self.static_loss.clone()  # the next replay overwrites static_loss
            ready = x.shape == self.eager_shape and self.eager_steps >= EAGER_STEPS_BEFORE_RECORDING
            if self.graph is not None or not ready:
                return self._eager(x)  # before recording, or a batch of another shape
            self.static_input = x.clone()
            self.optimizer.zero_grad(set_to_none=True)  # the graph's own pool holds the gradients it makes
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device)):
                self.static_loss = self.step_fn(self.static_input)
            self.graph.replay()  # recording runs nothing: this is the batch's step
            return self.static_loss.clone()

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        def step() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            return self.step_fn(x)

        loss = on_side_stream(step, self.device)
        if self.graph is None:
            self.eager_steps = self.eager_steps + 1 if x.shape == self.eager_shape else 1
            self.eager_shape = x.shape
        return loss


class GraphedBatches:
    """fn(x) for batches of up to `size` items, replayed from one CUDA graph recorded at that size.

    A batch of at least half the size is copied into the front of the static input (the rest keeps
    earlier values, which are computed and dropped) and gets the front of the static output; a smaller
    one runs eagerly (padding it would at least double its work), a larger one goes in slices of `size`.
    fn is run once eagerly on a side stream before recording (cuDNN's algorithm choice, cached filters).
    An input of another shape per item, or dtype, runs fn eagerly.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], size: int, device: torch.device):
        self.fn, self.size, self.device = fn, size, torch.device(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_input: torch.Tensor | None = None
        self.static_output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.size:
            return torch.cat([self(part) for part in x.split(self.size)])
        if 2 * len(x) < self.size:
            return self.fn(x)
        with torch.cuda.device(self.device):  # recording captures the current device's work only
            if self.graph is None:
                self._record(x)
            elif x.shape[1:] != self.static_input.shape[1:] or x.dtype != self.static_input.dtype:
                return self.fn(x)
            count = len(x)
            self.static_input[:count].copy_(x)
            self.graph.replay()
            return self.static_output[:count].clone()  # the next replay overwrites static_output

    def _record(self, x: torch.Tensor) -> None:
        self.static_input = torch.zeros((self.size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        self.static_input[: len(x)].copy_(x)
        on_side_stream(lambda: self.fn(self.static_input), self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device)):
            self.static_output = self.fn(self.static_input)
