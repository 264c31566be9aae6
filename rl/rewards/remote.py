"""A reward model behind HTTP: POST {prompt, response, label} to rm_url, read back a number."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.request
from typing import Any


class RemoteRewardError(RuntimeError):
    pass


def _post(url: str, payload: dict[str, Any], timeout_s: float) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def _as_reward(body: Any) -> float:
    # Servers answer a bare number, or an object carrying it as "reward" or "score".
    if isinstance(body, dict):
        body = body.get("reward", body.get("score"))
    if isinstance(body, bool) or not isinstance(body, (int, float)):
        raise RemoteRewardError(f"the reward server answered {body!r}, not a number")
    return float(body)


async def remote_reward(
    url: str,
    payload: dict[str, Any],
    *,
    timeout_s: float = 30.0,
    max_retries: int = 5,
    backoff_s: float = 1.0,
) -> float:
    """POST with a timeout; on failure retry with exponential backoff and jitter (backoff_s · 2^k, at most
    30 s), then raise an error naming the URL and the last cause."""
    attempt = 0
    while True:
        try:
            return _as_reward(await asyncio.to_thread(_post, url, payload, timeout_s))
        except RemoteRewardError:
            raise
        except (OSError, json.JSONDecodeError) as e:  # URLError and timeouts are OSErrors
            if attempt == max_retries:
                raise RemoteRewardError(
                    f"reward server {url} still failing after {max_retries + 1} attempts: {e}"
                ) from e
            await asyncio.sleep(min(backoff_s * 2**attempt, 30.0) * (1 + 0.25 * random.random()))
            attempt += 1
