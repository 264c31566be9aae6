"""A reward model behind HTTP: POST {prompt, response, label} to rm_url, read back a number."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
from typing import Any

RETRIED_CLIENT_ERRORS = {408, 425, 429}
"""4xx answers that say "later" (timeout, too early, too many requests); any other 4xx is the request's fault
and would fail the same way again."""


class RemoteRewardError(RuntimeError):
    pass


def _post(url: str, payload: dict[str, Any], timeout_s: float) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def _as_reward(body: Any, reward_key: str | None) -> float:
    # Servers answer a bare number, or an object carrying it as "reward" or "score" (or as reward_key).
    from rl.rewards import reward_value

    if isinstance(body, dict) and reward_key is None:
        body = body.get("reward", body.get("score"))
    try:
        return reward_value(body, "the reward server", reward_key)
    except ValueError as e:
        raise RemoteRewardError(str(e)) from None


async def remote_reward(
    url: str,
    payload: dict[str, Any],
    *,
    timeout_s: float = 30.0,
    max_retries: int = 5,
    backoff_s: float = 1.0,
    deadline_s: float = 300.0,
    reward_key: str | None = None,
) -> float:
    """POST with a timeout; on an outage (no answer, 5xx, 408/425/429) retry with exponential backoff and
    jitter (backoff_s · 2^k, at most 30 s) while `deadline_s` from the first attempt allows, then raise an
    error naming the URL and the last cause. Any other 4xx fails at once: the server refused the request."""
    deadline = time.monotonic() + deadline_s
    attempt = 0
    while True:
        left = max(deadline - time.monotonic(), 0.01)  # a sleep may overrun its end a little
        try:
            return _as_reward(await asyncio.to_thread(_post, url, payload, min(timeout_s, left)), reward_key)
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in RETRIED_CLIENT_ERRORS:
                raise RemoteRewardError(f"reward server {url} refused the request: HTTP {e.code} {e.reason}") from e
            cause: Exception = e
        except (OSError, json.JSONDecodeError) as e:  # URLError and timeouts are OSErrors
            cause = e
        pause = min(backoff_s * 2**attempt, 30.0) * (1 + 0.25 * random.random())
        if attempt == max_retries:
            raise RemoteRewardError(f"reward server {url} still failing after {attempt + 1} attempts: "
                                    f"{cause}") from cause
        if time.monotonic() + pause >= deadline:
            raise RemoteRewardError(f"reward server {url} still failing after {attempt + 1} attempts, at the "
                                    f"{deadline_s:g} s deadline (rollout.rm_deadline_s): {cause}") from cause
        await asyncio.sleep(pause)
        attempt += 1
