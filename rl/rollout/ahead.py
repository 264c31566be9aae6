"""Rollouts generated ahead of training, for async training (slime's `train_async.py`).

A background thread generates rollout g as soon as rollout g − `async_buffer_size` has been taken for
training, while the trainer trains on the earlier ones. The engines' weights are updated every
`update_weights_interval` trained rollouts, never in the middle of a generation (`settle` first). So the
samples of rollout g come from a policy at most `async_buffer_size + update_weights_interval − 1` versions
behind the one trained on them; each sample records its version (`Sample.weight_versions`).

With `async_buffer_size = update_weights_interval = 1` (slime's `train_async.py`: the next rollout generates
while this one trains) the generator moves in lockstep with the trainer, so a run is reproducible, and a
checkpoint (taken once the generator has settled, holding the generated rollouts not yet trained on) resumes
exactly. Larger values let generation run ahead as timing allows. A stop abandons the rollout being generated
ahead; the resumed run generates it again with the newer weights it resumes with: nothing is lost and the bound
holds, but that rollout is not the one the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rl.rollout.sampling import Sampler
from rl.sample import Sample


@dataclass
class Generated:
    """One rollout's groups as generated, waiting to be trained on."""

    rollout_id: int
    samples: list[Sample]
    dropped: int
    """Groups dynamic sampling dropped."""
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Generated:
        return cls(**{**d, "samples": [Sample(**s) for s in d["samples"]]})


class RolloutsAhead:
    def __init__(self, produce: Callable[[int, Callable[[], bool]], Generated], sampler: Sampler, *, first: int,
                 end: int, ahead: int, stop: Callable[[], bool], pending: Sequence[Generated] = ()):
        """`produce(rollout_id, abandon)` generates one rollout with `sampler`, raising Interrupted once
        `abandon()` turns true; `pending` are rollouts generated before a resume, from `first` on."""
        self._produce, self._sampler, self._end, self._ahead, self._stop = produce, sampler, end, ahead, stop
        self._ready = {g.rollout_id: g for g in pending}
        self._taken, self._next = first, first + len(pending)
        self._state = sampler.state_dict()
        self._busy = self._closing = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="rollouts-ahead", daemon=True)
        self._thread.start()

    def _abandon(self) -> bool:
        return self._closing or self._stop()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._next >= self._end
                                    or self._next < self._taken + self._ahead)
                if self._closing or self._next >= self._end:
                    return
                g, self._busy = self._next, True
            try:
                out = self._produce(g, self._abandon)
            except BaseException as e:  # the trainer hears of it when it takes the rollout
                with self._cond:
                    self._error, self._busy = e, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready[g], self._next, self._busy = out, g + 1, False
                self._state = self._sampler.state_dict()  # after this rollout: where a checkpoint resumes
                self._cond.notify_all()

    def take(self, rollout_id: int) -> Generated:
        """Rollout `rollout_id` once generated (raising what stopped its generation, Interrupted included)."""
        with self._cond:
            self._cond.wait_for(lambda: rollout_id in self._ready or self._error is not None)
            if rollout_id not in self._ready:
                raise self._error  # type: ignore[misc]
            self._taken = rollout_id + 1
            self._cond.notify_all()
            return self._ready.pop(rollout_id)

    def settle(self) -> tuple[dict[str, Any], list[Generated]]:
        """Wait until no rollout is being generated; then the sampler's state after the last generated one and
        the generated rollouts not yet taken: together what a checkpoint needs."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)
            return self._state, [self._ready[g] for g in sorted(self._ready)]

    def close(self) -> None:
        """Abandon a generation in progress and end the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

