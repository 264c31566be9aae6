"""The training-backend interface every backend implements: the torch backend here, Megatron-core on GPUs.

One instance per data-parallel rank (a Ray actor, `rl/train/worker.py`), each given its rank's share of the
global batch. Shaped after what Megatron-core needs, so its backend fits without a change of shape:
samples travel as token lists that the backend packs into micro-batches of at most `max_tokens_per_gpu`
tokens (Megatron's THD layout: no padding, positions restarting per sequence) or into `micro_batch_size`
rows; a training step is Megatron's `forward_backward_func` over those micro-batches followed by one
optimizer step; weights leave by Hugging Face name (slime converts Megatron's names the same way) for
`RolloutEngine.update_weights`; and each backend writes its own checkpoint format into the folder it is
given (torch.distributed.checkpoint here, Megatron's `dist_checkpointing` there), which `rl/checkpoint.py`
then seals as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from rl.batch import TrainSample
    from rl.checkpoint import BackgroundWriter


@runtime_checkable
class TrainingBackend(Protocol):
    step: int
    """Optimizer steps taken (the learning-rate schedule's position; restored by `load`)."""
    dp_rank: int
    dp_size: int
    """This rank's data-parallel rank and their count: ranks of one model-parallel group (tensor, pipeline)
    share a data-parallel rank and are given the same samples."""
    reports: bool
    """Whether this rank's results (log-probs, metrics) stand for its data-parallel rank; the driver reads only
    those (with pipeline parallelism, only the last stage has them)."""

    def compute_log_probs(self, samples: list[TrainSample], *, ref: bool = False) -> list[list[float]]:
        """log π(token) of each sample's response tokens under the policy, or the reference model with
        `ref` (no gradient)."""
        ...

    def train_step(self, samples: list[TrainSample], *, num_samples: int, num_tokens: int,
                   old_log_probs: list[list[float]] | None = None,
                   before_update: Callable[[], None] = lambda: None) -> dict[str, float]:
        """One optimizer step on this rank's share of a global batch of `num_samples` samples holding
        `num_tokens` loss tokens (the global denominators of the loss reductions), gradients accumulated
        over micro-batches and reduced over ranks. `old_log_probs` when the policy moved since the rollout.
        `before_update()` is called right before the optimizer changes the weights or its state, the first
        thing of the step that does (forward and backward only read them): an asynchronous save's copy of the
        state is waited for there, as torchtitan does, so that it overlaps the step's forward and backward.
        Returns this rank's summed loss metrics with `grad_norm`, `lr` and `skipped_steps` (1 where a non-finite
        loss or gradient norm on any rank left the weights, the optimizer and `step` as they were, else 0)."""
        ...

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The full policy weights by Hugging Face parameter name, for the rollout engines."""
        ...

    def offload(self, *, weights: bool) -> None:
        """Move training memory to the host (colocated runs with `perf.offload_train`: the engines generate in
        that memory); the weights too with `weights`, once they have been sent to the engines. Idempotent."""
        ...

    def reload(self) -> None:
        """Bring what `offload` moved back to the device before training."""
        ...

    def save(self, folder: Path, writer: BackgroundWriter | None = None) -> None:
        """Write model, optimizer and step into `folder` (every rank calls this, collectively); with `writer`
        (`ckpt.async_save`), only start the writing, which goes on in the background."""
        ...

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote (every rank calls this, collectively)."""
        ...
