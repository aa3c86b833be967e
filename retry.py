"""The one backoff rule shared by the Telegram client and the Make outbox."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff: `initial * base**(attempt-1)` plus jitter, never above `maximum` seconds."""

    initial: float = 1.0
    base: float = 2.0
    maximum: float = 30.0
    jitter: float = 1.0


def backoff(attempt: int, policy: BackoffPolicy, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry)."""
    exponent = min(max(attempt, 1) - 1, 64)  # bounded so a long outage cannot overflow a float
    delay = policy.initial * policy.base**exponent + policy.jitter * rand()
    return min(policy.maximum, delay)
