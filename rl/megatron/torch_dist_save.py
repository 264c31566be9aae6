"""Megatron-core's torch_dist checkpoints written by `rl.checkpoint`'s writers: synchronously (`Synchronous`), or
in the background with `ckpt.async_save` (`BackgroundWriter`: the save begins; `staged()` once training may change
its tensors again; `wait()` once written). Either way the files are those of Megatron's own
`dist_checkpointing.save`, and the data files are written by `rl.checkpoint.storage_writer`, whose writer threads
compute their checksums as they write them: sealing a checkpoint then reads nothing back of what the ranks wrote
(on a cluster, over the shared file system).

`dist_checkpointing.save` is given `TorchDistStrategy` as its sharded strategy: Megatron still applies its
factories, checks the sharding and writes `common.pt` and `metadata.json` (small, synchronously); the strategy
then hands the ShardedTensors' tensors alone to the writer, whose stager (in the background) copies them to the
host, and rebuilds them as Megatron's torch_dist strategy does (`mcore_to_pyt_state_dict`) around them when DCP
plans the write. Not Megatron's own `async_sharded_save`: its request is written by processes forked from the
rank (a Ray actor, with threads and NCCL) and finalized by collectives that every rank must call in lockstep after
the write, outside any save; and not DCP's stager on Megatron's wrapped tensors, whose every operation raises:
hence the split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedStateDict, ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

if TYPE_CHECKING:
    from rl.checkpoint import BackgroundWriter, Synchronous

TORCH_DIST = ("torch_dist", 1)
"""The backend and version `metadata.json` records, Megatron's torch_dist strategy's: what its loader reads."""
WRITE_THREADS = 2
"""Files per rank, as Megatron's torch_dist strategy writes by default."""


class TorchDistStrategy(SaveShardedStrategy):
    """A torch_dist sharded strategy that saves through `writer` (a background one only begins the write)."""

    def __init__(self, writer: BackgroundWriter | Synchronous):
        super().__init__(*TORCH_DIST)
        self.writer = writer

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: str | Path) -> None:
        from rl.checkpoint import storage_writer

        # Main replicas only, by global key, as Megatron's strategy writes them.
        shards, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        tensors = {key: [s.data for s in group] for key, group in shards.items() if isinstance(group[0], ShardedTensor)}
        # Sharded objects are serialized here, now: a copy as it stands.
        objects = mcore_to_pyt_state_dict({key: group for key, group in shards.items() if key not in tensors})
        self.writer.save(tensors, storage_writer(Path(checkpoint_dir), thread_count=WRITE_THREADS),
                         planner=_Planner(shards, objects))


class _Planner(MCoreSavePlanner):
    """Megatron's save planner, given the tensors to write (in the background, their staged host copies): it plans
    the ShardedTensors of the save with their data replaced by those, and the sharded objects serialized when the
    save began."""

    def __init__(self, shards: dict[str, list[ShardedBase]], objects: dict[str, Any]):
        # Megatron's own settings for its planner (keep_only_main_replica: nothing to deduplicate).
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._shards = shards
        self._objects = objects

    def set_up_planner(self, state_dict: dict[str, list[Any]], storage_meta: Any = None,
                       is_coordinator: bool = False) -> None:
        copies = {key: [dataclasses.replace(s, data=data) for s, data in zip(self._shards[key], staged, strict=True)]
                  for key, staged in state_dict.items()}
        super().set_up_planner({**mcore_to_pyt_state_dict(copies), **self._objects}, storage_meta, is_coordinator)
