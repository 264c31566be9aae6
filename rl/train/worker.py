"""One data-parallel rank of the training group, run as a Ray actor; with `colocate` it also takes part in a
rollout engine on its GPU (`rl/placement.py`): the engine's first rank hosts it, and each rank hands it the
weights on its own GPU."""

from __future__ import annotations

import gc
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rl import checkpoint
from rl.batch import TrainSample
from rl.ports import free_port
from rl.placement import colocated_engines, engine_ranks, server_gpus
from rl.rollout.engine import Generation, SamplingParams, engine_factory, gpus_per_engine
from rl.train.backend import TrainingBackend
from rl.weight_sync import BucketMeta, UpdateGroup, buckets

if TYPE_CHECKING:
    from rl.config import RLConfig

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"
"""The actor's concurrency group in which `saved` waits for a background save while the actor trains."""


def training_backend(cfg: RLConfig) -> type:
    """The backend class `perf.train_backend` names; Megatron-core is imported only when chosen."""
    if cfg.perf.train_backend == "megatron":
        from rl.megatron.backend import MegatronBackend

        return MegatronBackend
    from rl.train.torch_backend import TorchBackend

    return TorchBackend


class TrainWorker:
    def __init__(self, cfg: RLConfig, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 init_from: str, total_steps: int, threads: int, host_engine: bool):
        torch.set_num_threads(threads)
        self.rank = rank
        self.bucket_bytes = cfg.rollout.update_weight_buffer_size
        self.update_group: UpdateGroup | None = None
        """Rank 0 of a decoupled run without fault tolerance: the group its weights are broadcast over."""
        # Each rank's own stream (dropout), the same in every run of this config; a resume restores it.
        torch.manual_seed(cfg.run.seed + rank)
        random.seed(cfg.run.seed + rank)
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.backend_device = device
        if world_size > 1 or cfg.perf.train_backend == "megatron":
            # Megatron's parallel state is built on a process group even for one rank; a lone rank's needs no
            # rendezvous elsewhere.
            if world_size == 1:
                master_addr, master_port = "127.0.0.1", free_port("127.0.0.1")
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank,
                                    world_size=world_size, init_method=f"tcp://{master_addr}:{master_port}")
        self.backend: TrainingBackend = training_backend(cfg)(cfg, init_from=init_from, total_steps=total_steps,
                                                               device=device)
        self.critic = None
        if cfg.grpo.advantage_estimator == "ppo":
            from rl.train.critic import TorchCritic

            self.critic = TorchCritic(cfg, init_from=init_from, total_steps=total_steps, device=device)
        self.writers: list[checkpoint.BackgroundWriter] = []
        """With `ckpt.async_save`: the policy's (and the critic's) background writer."""
        if cfg.ckpt.async_save:
            # A group of their own for the writes' collectives (gloo: DCP plans on the host), created by every
            # rank at once, as new_group must be.
            group = dist.new_group(backend="gloo") if dist.is_initialized() else None
            self.writers = [checkpoint.BackgroundWriter(group) for _ in range(1 if self.critic is None else 2)]
        self.engine: Any = None
        """The colocated engine this rank hosts, if it hosts one."""
        self.engine_group: Any = None
        """Colocated engines of several GPUs: the (gloo) group of this rank's engine's ranks."""
        self.offload = cfg.perf.colocate and cfg.perf.offload_train
        if host_engine:  # colocated: every rank takes part in an engine; the driver's call, not the config's
            self._take_part_in_engine(cfg, init_from, world_size)
        gc.freeze()  # as the driver does: full collections no longer walk what lives as long as the actor

    def node(self) -> tuple[str, int]:
        """(address of this worker's Ray node, pid)."""
        import ray

        return ray.util.get_node_ip_address(), os.getpid()

    def data_parallel(self) -> tuple[int, int, bool]:
        """(data-parallel rank, data-parallel size, whether this rank reports for its data-parallel rank)."""
        return self.backend.dp_rank, self.backend.dp_size, self.backend.reports

    def compute_log_probs(self, samples: list[TrainSample], ref: bool = False) -> list[list[float]]:
        return self.backend.compute_log_probs(samples, ref=ref)

    def train(self, steps: list[list[TrainSample]], sizes: list[tuple[int, int]],
              old_log_probs: list[list[list[float]] | None]) -> list[dict[str, float]]:
        """A rollout's optimizer steps, each on this rank's share of its global batch of `sizes[k]` = (samples,
        loss tokens); with PPO the critic's step follows each (its metrics prefixed `critic_`). A step's
        `old_log_probs` None means the policy's as this call begins: the first step's own forward gives them,
        the later steps' samples are scored before any update. One call per rollout, as slime's
        `train(rollout_id, data)`: no round trip per step, and every sample sent once. A save in progress
        has its copy of the state waited for only before the first optimizer step."""
        later = [k for k in range(1, len(steps)) if old_log_probs[k] is None]
        if later:
            scored = iter(self.backend.compute_log_probs([s for k in later for s in steps[k]]))
            old_log_probs = [[next(scored) for _ in steps[k]] if k in later else old for k, old in
                             enumerate(old_log_probs)]
        results = []
        for batch, (num_samples, num_tokens), old in zip(steps, sizes, old_log_probs):
            metrics = self.backend.train_step(batch, num_samples=num_samples, num_tokens=num_tokens,
                                              old_log_probs=old, before_update=self._staged)
            if self.critic is not None:
                critic = self.critic.train_step(batch, num_samples=num_samples, num_tokens=num_tokens,
                                                before_update=self._staged)
                metrics |= {f"critic_{k}" if k in ("grad_norm", "lr", "skipped_steps") else k: v
                            for k, v in critic.items()}
            results.append(metrics)
        return results

    def compute_values(self, samples: list[TrainSample]) -> list[list[float]]:
        assert self.critic is not None, "a run with a critic (advantage_estimator ppo)"
        return self.critic.compute_values(samples)

    def weight_buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The policy's weights from rank 0 in buckets of at most `update_weight_buffer_size` bytes (a larger
        tensor alone), for a Ray streaming call: each bucket is copied into the object store as it is yielded,
        so rank 0 holds one bucket beyond the model. The other ranks yield nothing; every rank is called, since
        sharded weights are gathered collectively."""
        if self.rank != 0:
            self._join_gather()
            return
        yield from buckets(self.backend.named_weights(), self.bucket_bytes)

    def join_update_group(self, engines: list[Any], world_size: int, ranks_per_engine: int) -> None:
        """Rank 0: open the weight-update group of `world_size` with `engines`, engine i from rank
        1 + i·`ranks_per_engine` on; the rendezvous store lives here, at this node's address."""
        import ray

        address = ray.util.get_node_ip_address()
        port = free_port(address)
        backend = "nccl" if self.backend_device.startswith("cuda") else "gloo"
        joining = [e.init_weights_update_group.remote(address, port, rank, world_size, backend)
                   for rank, e in zip(range(1, world_size, ranks_per_engine), engines, strict=True)]
        self.update_group = UpdateGroup(address, port, 0, world_size, backend)
        ray.get(joining)

    def broadcast_weights(self, engines: list[Any], version: int) -> None:
        """Rank 0: in one weight-update session on every engine (SGLang loads broadcast weights only within
        one; opening and closing one costs each server a barrier of its ranks and, quantized, an unpacking and
        a repacking of every layer), each bucket's shapes to every engine by Ray, then its tensors over the
        weight-update group (the engines receive them in the same order). The sessions are closed whatever
        fails, so that the next sync can open them again. The other ranks take part in gathering."""
        import ray

        if self.rank != 0:
            self._join_gather()
            return
        assert self.update_group is not None, "join_update_group first"
        weights = buckets(self.backend.named_weights(), self.bucket_bytes)
        try:
            ray.get([e.begin_weight_update.remote() for e in engines])
            for bucket in weights:
                receiving = [e.update_weights_from_distributed.remote(BucketMeta.of(bucket), version)
                             for e in engines]
                self.update_group.send(bucket)
                ray.get(receiving)
        finally:
            # Failed, rank 0 still joins the other ranks' gathers of the rest, which would otherwise wait for
            # it until the collectives time out and hide the cause.
            for _ in weights:
                pass
            ray.get([e.end_weight_update.remote() for e in engines])

    def _join_gather(self) -> None:
        """Take part in gathering the policy's weights for the rank that needs them, keeping none: sharded
        weights are gathered by every rank together, parameter by parameter."""
        for _ in self.backend.named_weights():
            pass

    # --- the hosted engine (colocated) ---

    def generate_stream(self, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> Iterator[list[tuple[int, Generation]]]:
        yield from self.engine.generate_stream(prompts, params, seeds)

    def abort(self) -> None:
        self.engine.abort()

    def to_training(self) -> None:
        """Colocated: the hosted engine frees its memory for training (its weights come back with
        `sync_engine`), and training's memory returns from the host if it was offloaded."""
        self._staged()
        if self.engine is not None:
            self.engine.release_memory()
        if self.offload:
            self.backend.reload()

    def _take_part_in_engine(self, cfg: RLConfig, init_from: str, world_size: int) -> None:
        """Colocated: join this rank's engine (`rl/placement.py`), launching it if this rank hosts it. The
        ranks of an engine of several GPUs form a group, through which the host learns their GPUs (its
        server's) and receives their payloads."""
        per_engine = gpus_per_engine(cfg)
        ranks = engine_ranks(self.rank, per_engine)
        gpus = None
        if per_engine > 1:
            for members in colocated_engines(world_size, per_engine):  # every rank makes every group, in order
                group = dist.new_group(list(members), backend="gloo")
                if members == ranks:
                    self.engine_group = group
            devices: list[str | None] = [None] * per_engine
            dist.all_gather_object(devices, os.environ.get("CUDA_VISIBLE_DEVICES"), group=self.engine_group)
            gpus = server_gpus(devices)
        if ranks[0] == self.rank:
            engine_cls, kwargs = engine_factory(cfg)
            self.engine = engine_cls(init_from, device=self.backend_device, **kwargs,
                                     **({"gpus": gpus} if gpus is not None else {}))

    def sync_engine(self, version: int) -> float:
        """Load the policy into the colocated engines, the memory training held first given back to them
        when offloading. Each engine takes the weights of its own ranks (every rank's `named_weights` yields the
        whole policy), bucket by bucket: its host's, or, of several GPUs, each rank's on its own GPU; a rank
        hosting no engine still takes part in gathering sharded weights."""
        start = time.perf_counter()
        self._staged()
        if self.offload:
            self.backend.offload(weights=False)
        weights = buckets(self.backend.named_weights(), self.bucket_bytes)
        if self.engine is not None:
            self.engine.resume_memory()
        if self.engine_group is not None:
            self._hand_payloads(weights, version)
        elif self.engine is not None:
            self.engine.update_weights((pair for bucket in weights for pair in bucket), version)
        else:
            self._join_gather()
        if self.offload:  # sent: the weights can go too
            self.backend.offload(weights=True)
        return time.perf_counter() - start

    def _hand_payloads(self, weights: Iterable[list[tuple[str, torch.Tensor]]], version: int) -> None:
        """An engine of several GPUs: each of its ranks makes the payload of each bucket on its own GPU, and
        the host sends them, in tensor-parallel order, as one request per bucket (slime's colocated
        `update_weights_from_tensor`)."""
        from rl.rollout import sglang_engine

        host = dist.get_global_rank(self.engine_group, 0)
        size = dist.get_world_size(self.engine_group)

        def payloads() -> Iterator[list[str]]:
            for bucket in weights:
                [mine] = sglang_engine.rank_payloads(bucket, [self.backend_device])
                everyone: list[str] | None = [""] * size if self.rank == host else None
                dist.gather_object(mine, everyone, dst=host, group=self.engine_group)
                if everyone is not None:
                    yield everyone

        stream = payloads()
        try:
            if self.engine is not None:
                self.engine.update_weights_from_payloads(stream, version)
        finally:  # a host that failed still joins the others' gathers and barrier, then raises
            for _ in stream:
                pass
            # The host's requests have been answered, so the server holds no handle any more: what was
            # shared can be freed now rather than at the next sync.
            dist.barrier(group=self.engine_group)
        if torch.cuda.is_initialized():
            torch.cuda.ipc_collect()

    # --- checkpoints ---

    def save(self, folder: str) -> None:
        """Write this rank's part of a checkpoint into `folder`; with `ckpt.async_save` only begin it (then
        `saved` says when it is written)."""
        writers = iter(self.writers)
        self.backend.save(Path(folder), next(writers, None))
        if self.critic is not None:
            self.critic.save(Path(folder) / "critic", next(writers, None))
        checkpoint.save_rng(Path(folder), self.rank)

    def saved(self) -> None:
        """Return once the save in progress is written. Called in the CHECKPOINT concurrency group, so that
        the actor trains meanwhile."""
        for writer in self.writers:
            writer.wait()

    def _staged(self) -> None:
        """Before training's state changes: the save in progress has copied it."""
        for writer in self.writers:
            writer.staged()

    def load(self, folder: str) -> None:
        self._staged()
        self.backend.load(Path(folder))
        if self.critic is not None:
            self.critic.load(Path(folder) / "critic")
        if not checkpoint.load_rng(Path(folder), self.rank):
            log.warning("%s has no random state for rank %d (written by fewer ranks): this rank's dropout "
                        "continues from its seed", folder, self.rank)
