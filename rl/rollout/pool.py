"""The rollout engines of a decoupled run, as Ray actors, and what keeps a rollout whole when one fails.

With `use_fault_tolerance`, an engine whose process dies, or that does not answer a health check within
`rollout_health_check_timeout` (checked every `rollout_health_check_interval` while it generates, after
`rollout_health_check_first_wait`), is killed and replaced by a new one loaded with the current weights; its
requests are issued again there. Samples are seeded per request, so the rollout is the one a healthy engine
would have produced, sample for sample.

Each batch of requests is spread over the engines by `shares_by_prefix`: a prompt's requests together, and with
SGLang engines, a request where its prefix is cached, as sglang-router's cache-aware policy places them for
slime. The pool remembers what it sent to each engine (`PrefixMemory`) until the engines' caches are flushed (a
weight update, memory released for training) or the engine is replaced. The torch engine keeps no cache from one
call to the next, so its requests go by load alone.

Placement is meant not to change results. Every engine holds the same weights, each sample draws its randomness
from its own seed, and what a request is batched with does not change its output: SGLang's deterministic
inference (`sglang_enable_deterministic_inference`, without which seeds are ignored) uses batch-invariant kernels,
radix-cache hits included by SGLang's documentation (not checked here without a GPU: a multi-turn request whose
earlier turn's KV was computed in decode, against one that prefills it all); the torch engine draws each token by
inverse CDF from uniforms drawn up front from the sample's seed (`TorchEngine._sample`), so its tokens do not
depend on the batch (unless a uniform falls within rounding of the boundary between two tokens) and its log-probs
only to rounding (`tests/test_torch_engine.py`). The same batches in the same order are placed alike; but batches
form by timing (`rl/rollout/client.py`), and an evaluation can generate beside a rollout, so placement, unlike
results, is not a function of the data alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rl.config import RolloutConfig
from rl.interrupt import Interrupted
from rl.rollout.engine import Generation, RolloutEngine, SamplingParams

POLL_S = 0.2
HEALTH = "health"
"""The concurrency group health checks run in, so that they are answered while the engine generates."""

log = logging.getLogger(__name__)


BLOCK_TOKENS = 16
"""Prefixes are remembered and matched in whole blocks of this many tokens: one hash per block where a radix
tree would keep a node per token (sglang-router's tree keeps one per character). A request's match is short by
less than a block, which moves its match rate little against a threshold of 30%."""
MEMORY_BLOCKS = 1 << 16
"""Blocks remembered per engine: about a million tokens, at least what an engine's KV cache holds (an 8B model's
on one H100: a few hundred thousand tokens). Remembering more than the engine holds only sends some requests to
an engine that has dropped their prefix since; the memory costs about 8 MB per engine in the driver."""
CACHE_THRESHOLD = 0.3
"""sglang-router's default `cache_threshold`: a request goes to the engine holding its longest prefix only where
that prefix is more than this fraction of its tokens; else by load."""
# Balance: an engine takes the requests whose prefix it holds only up to its even share of the batch, rounded
# up. A batch lasts as long as its largest share; and with sglang-router's looser rule (1.5 times the even share,
# `balance_rel_threshold`) a prefix every prompt shares, a system prompt or a template, piled the batch onto the
# engines that had served one first, and an engine that had served none stayed idle for good (4 engines, 64
# requests: 24, 24, 16, 0). The router can afford it: it balances live loads, request by request.


def block_hashes(tokens: Sequence[int], known: Sequence[int] = ()) -> list[int]:
    """One hash per whole block of `tokens`, each of the block and all before it (so equal hashes mean equal
    prefixes, as the page hashes of SGLang's hierarchical cache); `known`: those of a prefix of `tokens`, not
    computed again. Python hashes tuples of ints without the per-process salt of strings: the same in every
    process."""
    hashes = list(known)
    h = hashes[-1] if hashes else 0
    for start in range(len(hashes) * BLOCK_TOKENS, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h = hash((h, *tokens[start:start + BLOCK_TOKENS]))
        hashes.append(h)
    return hashes


class PrefixMemory:
    """What each engine's prefix cache (SGLang's radix cache) likely holds: the token sequences recently sent to
    it, requests and then requests with their responses, as `block_hashes`; sglang-router's approximate tree per
    worker. At most `capacity` blocks per engine, the least recently used forgotten first. A sequence's blocks are
    touched last block first, so a prefix is always more recent than its extensions and goes after them (as a
    radix cache evicts leaves first): what an engine holds stays closed under prefixes."""

    def __init__(self, engines: int, capacity: int = MEMORY_BLOCKS):
        self.capacity = capacity
        self.held: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(engines)]

    def record(self, engine: int, hashes: list[int]) -> None:
        held = self.held[engine]
        for h in reversed(hashes):
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def matched(self, hashes: list[int]) -> list[int]:
        """The blocks of the longest prefix of a sequence (its `block_hashes`) each engine holds."""
        return [next((k for k, h in enumerate(hashes) if h not in held), len(hashes)) for held in self.held]

    def forget(self, engine: int | None = None) -> None:
        """Nothing remembered of `engine` (None: of any)."""
        for held in self.held if engine is None else [self.held[engine]]:
            held.clear()


def shares_by_prefix(prompts: list[list[int]], engines: int, memory: PrefixMemory | None = None) -> list[list[int]]:
    """Request indices for each engine, indices ascending within a share. Every request of one prompt goes to the
    same engine, so that its prefix cache reads a GRPO group's prompt once for all its samples. Prompts are
    placed in order of first request. With `memory` (sglang-router's cache-aware policy, for engines that keep a
    prefix cache): on the engine holding the longest prefix of the prompt, where that covers more than
    CACHE_THRESHOLD of it and leaves the engine within its even share (rounded up), so that a
    multi-turn sample's next turn (its prompt, response and the environment's reply) goes where the turn before
    was served; else on the engine with the fewest requests so far (the first of them), as without `memory`. Each
    placed prompt is recorded in `memory`, so later prompts of the batch sharing its prefix follow it."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    shares: list[list[int]] = [[] for _ in range(engines)]
    most = math.ceil(len(prompts) / engines)
    for tokens, requests in by_prompt.items():
        least = min(range(engines), key=lambda e: len(shares[e]))
        if memory is None:
            shares[least].extend(requests)
            continue
        hashes = block_hashes(tokens)
        room = [e for e in range(engines) if not shares[e] or len(shares[e]) + len(requests) <= most]
        matched = memory.matched(hashes)
        best = max(room, key=lambda e: (matched[e], -len(shares[e]), -e), default=least)
        slot = best if BLOCK_TOKENS * matched[best] > CACHE_THRESHOLD * len(tokens) else least
        shares[slot].extend(requests)
        memory.record(slot, hashes)
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
        self.prefixes = PrefixMemory(len(self.engines)) if rollout.engine == "sglang" else None
        """What each engine's prefix cache likely holds; None for engines that keep none."""
        self._placing = threading.Lock()
        """Held while `prefixes` is read or changed: an evaluation generates while the next rollout does."""

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

        self.forget_prefixes()  # each engine flushes its cache with the update, one that fails too
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
        self.forget_prefixes(slot)
        self.restarts += 1

    def forget_prefixes(self, slot: int | None = None) -> None:
        """The engines' prefix caches were flushed (`slot`: that engine's alone, a new one): place requests as if
        they held nothing."""
        if self.prefixes is not None:
            with self._placing:
                self.prefixes.forget(slot)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int],
                 abandon: Callable[[], bool] = lambda: False,
                 on_results: Callable[[list[tuple[int, Generation]]], None] = lambda ended: None
                 ) -> list[Generation]:
        """Generations in request order, each engine taking about an equal share, a prompt's requests together,
        a request where its prefix is cached (`shares_by_prefix`); `on_results([(i, generation)])` hears of those
        that end together as soon as they do. Raises Interrupted as soon as `abandon()` turns true (the engines'
        work is discarded with them)."""
        import ray

        results: list[Generation | None] = [None] * len(prompts)
        streams: dict[Any, tuple[int, list[int]]] = {}  # engine's stream -> (slot, its requests)
        with self._placing:
            shares = shares_by_prefix(prompts, len(self.engines), self.prefixes)
        served_by_the_old: set[int] = set()  # by an engine replaced since: not in its replacement's cache

        def issue(slot: int, requests: list[int]) -> None:
            if requests:
                stream = self.engines[slot].generate_stream.options(num_returns="streaming").remote(
                    [prompts[i] for i in requests], params, [seeds[i] for i in requests])
                streams[stream] = (slot, requests)

        def reissue(slot: int, why: str) -> None:  # an engine has one stream per call
            [stream] = [s for s, (other, _) in streams.items() if other == slot]
            _, requests = streams.pop(stream)
            self.replace(slot, why)
            served_by_the_old.update(i for i in shares[slot] if results[i] is not None)
            issue(slot, [i for i in requests if results[i] is None])

        for slot, requests in enumerate(shares):
            issue(slot, requests)
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
        self._remember(shares, prompts, results, served_by_the_old)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _remember(self, shares: list[list[int]], prompts: list[list[int]], results: list[Generation],
                  stale: set[int]) -> None:
        """Each engine's cache now holds its requests with their responses (SGLang caches a request's tokens
        as it ends, an aborted one's too). In request order, so that the memory is a function of the batches."""
        if self.prefixes is None:
            return
        slot_of = {i: slot for slot, requests in enumerate(shares) for i in requests}
        of_prompt: dict[tuple[int, ...], list[int]] = {}  # a group's samples hash their prompt once
        with self._placing:
            for i, prompt in enumerate(prompts):
                if i in stale:
                    continue
                key = tuple(prompt)
                if key not in of_prompt:
                    of_prompt[key] = block_hashes(prompt)
                self.prefixes.record(slot_of[i], block_hashes(prompt + results[i].output_ids, of_prompt[key]))

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
