"""The rollout engines of a decoupled run, as Ray actors, and what keeps a rollout whole when one fails.

With `use_fault_tolerance`, an engine whose process dies, or that does not answer a health check within
`rollout_health_check_timeout` (checked every `rollout_health_check_interval` while it generates, after
`rollout_health_check_first_wait`), is killed and replaced by a new one loaded with the current weights; its
requests are issued again there. Samples are seeded per request, so the rollout is the one a healthy engine
would have produced, sample for sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from rl.config import RolloutConfig
from rl.interrupt import Interrupted
from rl.rollout.engine import Generation, RolloutEngine, SamplingParams

POLL_S = 0.2
HEALTH = "health"
"""The concurrency group health checks run in, so that they are answered while the engine generates."""

log = logging.getLogger(__name__)


def shares_by_prompt(prompts: list[list[int]], engines: int) -> list[list[int]]:
    """Request indices for each engine, every request of one prompt on the same engine, so that its prefix
    cache reads a GRPO group's prompt once for all its samples (what sglang-router's cache-aware policy gives
    slime). Prompts are placed in order of first request, each on the engine with the fewest requests so far;
    indices ascend within a share."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    shares: list[list[int]] = [[] for _ in range(engines)]
    for requests in by_prompt.values():
        min(shares, key=len).extend(requests)
    return [sorted(share) for share in shares]


def streamed_buckets(workers: list[Any]) -> Iterator[Any]:
    """The policy's weights from the training workers' rank 0 in buckets (`TrainWorker.weight_buckets`), as
    references into Ray's object store, each as soon as it is there (at most two ahead of the caller); once
    the last has come, the other ranks' part in gathering is waited for, their errors raised."""
    streams = [w.weight_buckets.options(num_returns="streaming", _generator_backpressure_num_objects=2).remote()
               for w in workers]
    yield from streams[0]
    for other in streams[1:]:  # they yield nothing
        for _ in other:
            pass


def _load_buckets(engine: RolloutEngine, refs: list[Any], version: int) -> None:
    """In an engine's actor (`__ray_call__`): the buckets kept in Ray's object store, fetched one at a time, as
    one update, hence one weight-update session (a list of references reaches the actor unresolved)."""
    import ray

    engine.update_weights((pair for ref in refs for pair in ray.get(ref)), version)


class EnginePool:
    def __init__(self, make: Callable[..., Any] | None, count: int, rollout: RolloutConfig,
                 engines: list[Any] | None = None, ranks_per_engine: int = 1):
        """`make(slot)` creates the engine actor (of an `actor_class`) of a slot (its placement). A pool of
        given `engines` instead (a colocated trainer generating) never replaces them. `ranks_per_engine`: the
        processes of an engine that receive weights (an SGLang server's tensor-parallel ranks)."""
        self._make, self.cfg = make, rollout
        self.engines = engines or [self._start(slot) for slot in range(count)]
        self.fault_tolerant = rollout.use_fault_tolerance and make is not None
        self.weights: tuple[list[Any], int] | None = None
        """The buckets of the weights in use and their version, for an engine that replaces one."""
        self.restarts = 0
        self.ranks_per_engine = ranks_per_engine
        self.joined = False
        """Whether the engines and the trainer's rank 0 have formed their weight-update group."""

    @staticmethod
    def actor_class(engine: type, *groups: str) -> Any:
        """The engine as a Ray actor class whose health checks are answered while it generates; `groups`: other
        concurrency groups of one thread each, for calls answered while it is busy."""
        import ray

        # Ray's typed overloads of `remote` leave out actors' concurrency_groups, which it takes.
        return ray.remote(concurrency_groups={HEALTH: 1, **dict.fromkeys(groups, 1)})(engine)  # type: ignore[call-overload]

    def _start(self, slot: int) -> Any:
        assert self._make is not None
        return self._make(slot)

    def sync_weights(self, workers: list[Any], version: int) -> None:
        """The policy's weights from the training workers (rank 0 sends, every rank takes part in gathering)
        to every engine, in buckets of at most `update_weight_buffer_size` bytes (`rl/weight_sync.py`):
        broadcast over the engines' weight-update group with the trainer's rank 0, joined at the first sync;
        with fault tolerance through the object store instead, the buckets kept for engines started later
        (the trainer may have moved past this version by the time one is)."""
        import ray

        if not self.fault_tolerant:
            if not self.joined:
                world_size = 1 + len(self.engines) * self.ranks_per_engine
                ray.get(workers[0].join_update_group.remote(self.engines, world_size, self.ranks_per_engine))
                self.joined = True
            ray.get([w.broadcast_weights.remote(self.engines, version) for w in workers])
            return
        kept = list(streamed_buckets(workers))
        ray.get([e.__ray_call__.remote(_load_buckets, kept, version) for e in self.engines])
        self.weights = (kept, version)

    def replace(self, slot: int, why: str) -> None:
        import ray

        log.warning("rollout engine %d %s: replacing it (restart %d)", slot, why, self.restarts + 1)
        ray.kill(self.engines[slot], no_restart=True)
        self.engines[slot] = self._start(slot)
        if self.weights is not None:
            refs, version = self.weights
            ray.get(self.engines[slot].__ray_call__.remote(_load_buckets, refs, version))
        self.restarts += 1

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int],
                 abandon: Callable[[], bool] = lambda: False,
                 on_results: Callable[[list[tuple[int, Generation]]], None] = lambda ended: None
                 ) -> list[Generation]:
        """Generations in request order, each engine taking about an equal share, a prompt's requests together
        (`shares_by_prompt`); `on_results([(i, generation)])`
        hears of those that end together as soon as they do. Raises Interrupted as soon as `abandon()` turns
        true (the engines' work is discarded with them)."""
        import ray

        results: list[Generation | None] = [None] * len(prompts)
        streams: dict[Any, tuple[int, list[int]]] = {}  # engine's stream -> (slot, its requests)

        def issue(slot: int, requests: list[int]) -> None:
            if requests:
                stream = self.engines[slot].generate_stream.options(num_returns="streaming").remote(
                    [prompts[i] for i in requests], params, [seeds[i] for i in requests])
                streams[stream] = (slot, requests)

        def reissue(slot: int, why: str) -> None:  # an engine has one stream per call
            [stream] = [s for s, (other, _) in streams.items() if other == slot]
            _, requests = streams.pop(stream)
            self.replace(slot, why)
            issue(slot, [i for i in requests if results[i] is None])

        for slot, share in enumerate(shares_by_prompt(prompts, len(self.engines))):
            issue(slot, share)
        c = self.cfg
        next_check = time.monotonic() + c.rollout_health_check_first_wait + c.rollout_health_check_interval
        ready: list[Any]  # the streams (ObjectRefGenerator) that have a result, which ray.wait types as refs
        while streams:
            if abandon():
                raise Interrupted
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=POLL_S)
            for stream in ready:
                slot, requests = streams[stream]
                try:
                    ended = ray.get(next(stream))
                except StopIteration:
                    del streams[stream]
                    continue
                except ray.exceptions.RayActorError:
                    if not self.fault_tolerant:
                        raise
                    reissue(slot, "died")
                    continue
                done = [(requests[k], gen) for k, gen in ended]
                for i, gen in done:
                    results[i] = gen
                on_results(done)
            if self.fault_tolerant and streams and time.monotonic() >= next_check:
                for slot in self._unresponsive(sorted({slot for slot, _ in streams.values()})):
                    reissue(slot, f"did not answer its health check within "
                                  f"{self.cfg.rollout_health_check_timeout:.0f}s")
                next_check = time.monotonic() + self.cfg.rollout_health_check_interval
        return results  # type: ignore[return-value]

    def abort(self) -> None:
        """Ask every engine to end its generation in progress now; the unfinished samples come back partial
        (finish reason "abort") through `generate`. Not waited for: an idle engine has nothing to end."""
        for engine in self.engines:
            engine.abort.options(concurrency_group=HEALTH).remote()

    def _unresponsive(self, slots: list[int]) -> list[int]:
        import ray

        checks = {self.engines[s].health.options(concurrency_group=HEALTH).remote(): s for s in slots}
        ready, _ = ray.wait(list(checks), num_returns=len(checks), timeout=self.cfg.rollout_health_check_timeout)
        bad = [checks[f] for f in checks if f not in ready]
        for future in ready:
            try:
                if not ray.get(future):
                    bad.append(checks[future])
            except ray.exceptions.RayActorError:
                bad.append(checks[future])
        return sorted(bad)

    def kill(self) -> None:
        import ray

        if self._make is not None:
            for engine in self.engines:
                ray.kill(engine)
