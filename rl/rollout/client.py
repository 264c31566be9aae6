"""The engines as generate functions see them: `await engine.generate(input_ids, params, seed)`.

Generate functions work one sample at a time (a multi-turn one calls the engine once per turn), but the torch
engine is only efficient on batches: requests made while the engines are busy, or within the same turn of
the event loop, go to the engines together as one batch per set of sampling parameters. (SGLang batches on
its own; its client would post each request.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rl.rollout.engine import Generation, SamplingParams


class EngineClient:
    def __init__(self, pool: Any, tokenizer: Any, abandon: Callable[[], bool] = lambda: False):
        """`pool`: an `rl.rollout.pool.EnginePool`; `abandon()` true ends the waiting with Interrupted."""
        self.pool, self.tokenizer, self.abandon = pool, tokenizer, abandon
        self._queue: list[tuple[list[int], SamplingParams, int, asyncio.Future[Generation]]] = []
        self._sender: asyncio.Task[None] | None = None
        self.aborted = False
        """Set by `abort` until `reset`: requests are answered at once with nothing generated."""

    async def generate(self, input_ids: list[int], params: SamplingParams, seed: int) -> Generation:
        """One generation from `input_ids`; `seed` fixes its randomness (derive it from `Sample.seed`)."""
        if self.aborted:
            return Generation([], [], "abort")
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._queue.append((input_ids, params, seed, future))
        if self._sender is None:
            # After the requests already scheduled in this turn of the event loop have joined the queue.
            self._sender = asyncio.get_running_loop().create_task(self._send())
        return stop_at_strings(await future, params.stop, self.tokenizer)

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                for params in dict.fromkeys(p for _, p, _, _ in batch):
                    part = [r for r in batch if r[1] == params]
                    futures = [f for _, _, _, f in part]
                    if self.aborted:
                        for f in futures:
                            f.set_result(Generation([], [], "abort"))
                        continue

                    def deliver(ended: list[tuple[int, Generation]], futures: list = futures) -> None:
                        # One wake-up of the event loop per message from the engines, not one per sample.
                        loop.call_soon_threadsafe(_resolve, [(futures[i], gen) for i, gen in ended])

                    try:
                        await asyncio.to_thread(self.pool.generate, [ids for ids, _, _, _ in part], params,
                                                [s for _, _, s, _ in part], self.abandon, deliver)
                    except BaseException as e:  # every waiting request hears of it, the later ones too
                        for f in futures + [f for *_, f in self._queue]:
                            if not f.done():
                                f.set_exception(e)
                        self._queue = []
                        return
        finally:
            self._sender = None

    def abort(self) -> None:
        """End the generations in progress (they come back partial) and answer new requests with nothing."""
        self.aborted = True
        self.pool.abort()

    async def reset(self) -> None:
        """Wait for the aborted generations to come back, then serve requests again."""
        while self._sender is not None:
            await asyncio.sleep(0.01)
        self.aborted = False


def stop_at_strings(gen: Generation, stop: tuple[str, ...], tokenizer: Any) -> Generation:
    """`gen` cut after its first token whose text completes one of the `stop` strings, finish reason "stop"
    (as SGLang stops); `gen` itself when none occurs. The tokens after it were drawn from their own seeds'
    randomness, so the ones kept are those a generation that stopped there would have drawn."""
    ids = gen.output_ids
    if not stop or not any(s in tokenizer.decode(ids) for s in stop):
        return gen
    low, high = 1, len(ids)  # the shortest prefix whose text holds a stop string (holding one stays true)
    while low < high:
        mid = (low + high) // 2
        if any(s in tokenizer.decode(ids[:mid]) for s in stop):
            high = mid
        else:
            low = mid + 1
    return Generation(ids[:low], gen.log_probs[:low], "stop", gen.weight_version)


def _resolve(ended: list[tuple[asyncio.Future[Generation], Generation]]) -> None:
    for future, gen in ended:
        if not future.done():  # its waiter may have been cancelled
            future.set_result(gen)
