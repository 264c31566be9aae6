"""Moving the policy's weights from the trainer to the rollout engines in buckets of bounded size.

Weights leave the trainer one parameter at a time (`TrainingBackend.named_weights`, gathered as they go) and
are packed into buckets of at most `rollout.update_weight_buffer_size` bytes, so that neither side ever holds
more than a bucket beyond the model itself. A bucket reaches decoupled engines one of two ways:

- through Ray's object store (`TrainWorker.weight_buckets`, a streaming generator), one object per bucket; and
- broadcast over a process group of its own that joins the trainer's rank 0 (rank 0 of the group) and every
  engine (slime's `init_weights_update_group` + `update_weights_from_distributed`): gloo on the host, NCCL on
  GPUs. A bucket's `BucketMeta` (names, dtypes, shapes) goes ahead by Ray, so that each engine can allocate
  the tensors it receives into.

The driver broadcasts, unless engines are replaced when they fail (`rollout.use_fault_tolerance`): a new
engine must be given the weights of the version in use, which the trainer may already have moved past
(training runs beside generation in async mode), so then the buckets go through the object store and the
engine pool keeps them. A colocated engine is handed the parameters in-process as they are gathered.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

UPDATE_GROUP = "rlhpc_weights"
"""The weight-update group's name: its store prefix, and its name on an SGLang server."""
GROUP_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a member of the weight-update group waits for the others (joining, or a bucket's broadcast)."""


def buckets(named_tensors: Iterable[tuple[str, Tensor]], limit: int) -> Iterator[list[tuple[str, Tensor]]]:
    """Consecutive tensors in groups of at most `limit` bytes, a larger tensor alone (slime's packing). Taken
    lazily, so that weights gathered one by one are never all held at once."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass(frozen=True)
class BucketMeta:
    """What an engine needs to receive a bucket's broadcast: SGLang's `update_weights_from_distributed`
    request (names, dtypes, shapes), sent ahead of the tensors."""
    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, bucket: list[tuple[str, Tensor]]) -> BucketMeta:
        return cls(tuple(n for n, _ in bucket), tuple(t.dtype for _, t in bucket),
                   tuple(tuple(t.shape) for _, t in bucket))


class UpdateGroup:
    """The weight-update process group: rank 0 the trainer's rank 0, ranks 1.. the engines (an SGLang
    server's tensor-parallel rank r at its engine's rank + r). Made the way SGLang's
    `init_custom_process_group` makes its side (a TCP rendezvous at rank 0, the store prefixed with the group's
    name, torch's own group constructor), so that both sides meet on the same keys; the default group, which
    the trainer's ranks use among themselves and the engines are not part of, is left alone. A bucket goes one
    broadcast per tensor, all in flight together, as SGLang's receiving side takes it (no flattening copy)."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, backend: str,
                 name: str = UPDATE_GROUP):
        from torch.distributed.distributed_c10d import GroupName, _new_process_group_helper, _world, rendezvous

        store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                  timeout=GROUP_TIMEOUT))
        store.set_timeout(GROUP_TIMEOUT)
        self.group, _ = _new_process_group_helper(world_size, rank, [], dist.Backend(backend),
                                                  dist.PrefixStore(name, store), group_name=GroupName(name),
                                                  timeout=GROUP_TIMEOUT)
        _world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}

    def _broadcast(self, tensors: list[Tensor]) -> None:
        for work in [dist.broadcast(t, src=0, group=self.group, async_op=True) for t in tensors]:
            work.wait()

    def send(self, bucket: list[tuple[str, Tensor]]) -> None:
        """Rank 0: the bucket's tensors to every engine."""
        self._broadcast([t.detach().contiguous() for _, t in bucket])

    def receive(self, meta: BucketMeta, device: torch.device) -> list[tuple[str, Tensor]]:
        """An engine: the tensors of the bucket rank 0 is sending."""
        tensors = [torch.empty(shape, dtype=dtype, device=device) for dtype, shape in zip(meta.dtypes, meta.shapes)]
        self._broadcast(tensors)
        return list(zip(meta.names, tensors))
