"""The rollout-engine interface every engine implements: the torch engine here, SGLang on GPUs.

Shaped after SGLang's server API so the SGLang engine is a thin client: `generate` is `/generate` with
`return_logprob` (token ids in, output ids, per-token log-probs and finish reason out), `update_weights` is
`update_weights_from_tensor`, `init_weights_update_group` and `update_weights_from_distributed` are SGLang's
namesakes (a broadcast from the trainer, decoupled engines), `abort` is
`/abort_request`, and `release_memory` / `resume_memory` are `release_memory_occupation` /
`resume_memory_occupation`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from rl.config import RLConfig
    from rl.weight_sync import BucketMeta


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1: off."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sample ends after any of these (the EOS token included by the caller)."""
    stop: tuple[str, ...] = ()
    """Generation of a sample ends after the token that completes any of these strings (SGLang's `stop`); the
    engine client cuts there for an engine that does not stop at strings itself."""


FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Generation:
    output_ids: list[int]
    """The sampled tokens, the stop token included when one ended the sample."""
    log_probs: list[float] = field(default_factory=list)
    """log π(token) under the temperature-scaled distribution the token was drawn from (before top-p/k)."""
    finish_reason: FinishReason = "length"
    weight_version: int = 0
    """Version of the weights that generated the sample."""


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Generation]:
        """One response per prompt (repeat a prompt for n samples); `seeds[i]` fixes sample i's randomness."""
        ...

    def generate_stream(self, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> Iterator[list[tuple[int, Generation]]]:
        """The same generations as soon as they end, so that a rollout can stop waiting once it has enough:
        lists of `(index, generation)`, one per set of generations that ended together (a decoding step of
        a batch; a single answer of SGLang's). Sent in lists because each item crossing between Ray actors
        costs far more than a step of a small model."""
        ...

    def abort(self) -> None:
        """End the generations in progress at once, returning what each has so far (finish reason "abort");
        SGLang's `/abort_request`."""
        ...

    def update_weights(self, named_tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], version: int) -> None:
        """Load new policy weights (all or some, by Hugging Face parameter name)."""
        ...

    def init_weights_update_group(self, master_address: str, master_port: int, rank: int, world_size: int,
                                  backend: str) -> None:
        """Join the weight-update group (`rl/weight_sync.py`) as `rank`, the trainer's rank 0 being rank 0."""
        ...

    def begin_weight_update(self) -> None:
        """Open a weight-update session (SGLang's `/begin_weight_update`): the buckets of one sync are loaded
        within one session, and one session at a time."""
        ...

    def end_weight_update(self) -> None:
        """Close the session `begin_weight_update` opened, if one is open (a failed sync closes every engine's)."""
        ...

    def update_weights_from_distributed(self, meta: BucketMeta, version: int) -> None:
        """Receive the bucket `meta` describes from the weight-update group's broadcast, and load it; only
        within a weight-update session."""
        ...

    def health(self) -> bool: ...

    def release_memory(self) -> None:
        """Free weights and caches so a colocated trainer can use the memory; weights must be sent again."""
        ...

    def resume_memory(self) -> None: ...


def in_order(n: int, stream: Iterable[list[tuple[int, Generation]]]) -> list[Generation]:
    """The `n` generations of a `generate_stream`, in request order."""
    out: list[Generation | None] = [None] * n
    for ended in stream:
        for i, generation in ended:
            out[i] = generation
    return out  # type: ignore[return-value]


def sample_seed(run_seed: int, rollout_id: int, sample_index: int) -> int:
    """The seed of one sample: a function of (run seed, rollout id, sample index) alone, so a resumed run
    draws exactly what an uninterrupted one would, whatever engine or batch the sample lands in."""
    digest = hashlib.blake2b(f"{run_seed}:{rollout_id}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def engine_factory(cfg: RLConfig) -> tuple[type, dict[str, Any]]:
    """The engine class `rollout.engine` names, and the keyword arguments it takes beyond the model path,
    `device` and `threads`; SGLang's engine is imported only when chosen."""
    if cfg.rollout.engine == "sglang":
        from rl.rollout.sglang_engine import SglangEngine

        return SglangEngine, {"options": cfg.sglang, "colocate": cfg.perf.colocate,
                              "update_weight_buffer_size": cfg.rollout.update_weight_buffer_size}
    from rl.rollout.torch_engine import TorchEngine

    return TorchEngine, {"stream_interval": cfg.rollout.stream_interval}


def gpus_per_engine(cfg: RLConfig) -> int:
    """The GPUs of one engine: an SGLang server's tensor-parallel size, one for the torch engine."""
    return cfg.sglang.rollout_num_gpus_per_engine if cfg.rollout.engine == "sglang" else 1
