"""retry.py: the one backoff rule, tested on its own with a fixed random source."""

from __future__ import annotations

import math
import sys

import pytest

from retry import BackoffPolicy, backoff

NO_JITTER = BackoffPolicy(initial=1.0, base=2.0, maximum=30.0, jitter=0.0)


def zero() -> float:
    """A random source that always gives 0 (no jitter)."""
    return 0.0


def test_delay_grows_exponentially() -> None:
    """Without jitter the n-th retry waits initial * base**(n-1)."""
    assert [backoff(n, NO_JITTER, zero) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_initial_and_base_are_honoured() -> None:
    """Another initial delay and base give their own sequence."""
    policy = BackoffPolicy(initial=0.5, base=3.0, maximum=100.0, jitter=0.0)
    assert [backoff(n, policy, zero) for n in range(1, 5)] == [0.5, 1.5, 4.5, 13.5]


def test_delay_is_capped_at_the_maximum() -> None:
    """Once the exponential passes the maximum, every retry waits exactly the maximum."""
    assert [backoff(n, NO_JITTER, zero) for n in range(5, 10)] == [16.0, 30.0, 30.0, 30.0, 30.0]


def test_jitter_is_added_in_proportion_to_rand() -> None:
    """The jitter adds `jitter * rand()` seconds on top of the exponential part."""
    policy = BackoffPolicy(initial=1.0, base=2.0, maximum=30.0, jitter=2.0)
    assert backoff(3, policy, lambda: 0.0) == 4.0
    assert backoff(3, policy, lambda: 0.25) == 4.5
    assert backoff(3, policy, lambda: 0.999) == pytest.approx(4.0 + 2.0 * 0.999)


def test_jitter_never_lifts_the_delay_above_the_maximum() -> None:
    """Even with the largest jitter the delay stays at or under the maximum."""
    policy = BackoffPolicy(initial=1.0, base=2.0, maximum=10.0, jitter=5.0)
    for attempt in range(1, 12):
        assert backoff(attempt, policy, lambda: 0.999999) <= 10.0


def test_default_random_source_stays_within_bounds() -> None:
    """With the real random source the delay lies between the exponential part and that plus the jitter."""
    policy = BackoffPolicy(initial=1.0, base=2.0, maximum=30.0, jitter=1.0)
    for _ in range(200):
        assert 4.0 <= backoff(3, policy) <= 5.0


@pytest.mark.parametrize("attempt", [0, -1, -1_000])
def test_attempt_below_one_is_treated_as_the_first_retry(attempt: int) -> None:
    """An attempt number of zero or less waits like the first retry, never less."""
    assert backoff(attempt, NO_JITTER, zero) == backoff(1, NO_JITTER, zero) == 1.0


@pytest.mark.parametrize("attempt", [64, 65, 1_000, 10**9, sys.maxsize])
def test_huge_attempt_does_not_overflow(attempt: int) -> None:
    """After a very long outage the delay is simply the maximum, finite, with no OverflowError."""
    delay = backoff(attempt, BackoffPolicy(), lambda: 0.5)
    assert math.isfinite(delay)
    assert delay == BackoffPolicy().maximum

