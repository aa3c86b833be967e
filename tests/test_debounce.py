"""debounce.py: batch deadlines and per-user flood control, decided from plain numbers (no threads, no sleeps)."""

from __future__ import annotations

import pytest

from debounce import DebounceManager, DebounceSettings, deadline

# The contract's defaults: DEBOUNCE_SECONDS=4, MAX_WAIT_SECONDS=15, MAX_BATCH_MESSAGES=50.
CFG = DebounceSettings(debounce_seconds=4.0, max_wait_seconds=15.0, max_messages=50)
T0 = 1_000.0


# deadline()


def test_single_message_closes_after_the_quiet_period() -> None:
    """A batch of one message closes DEBOUNCE_SECONDS after it, because the user went quiet."""
    assert deadline(T0, T0, 1, CFG) == (T0 + CFG.debounce_seconds, "quiet")


def test_each_new_message_restarts_the_quiet_clock() -> None:
    """Every message pushes the deadline to DEBOUNCE_SECONDS after that message, not after the first."""
    first, _ = deadline(T0, T0, 1, CFG)
    second, reason = deadline(T0, T0 + 3, 2, CFG)
    third, _ = deadline(T0, T0 + 6, 3, CFG)
    assert second == T0 + 3 + CFG.debounce_seconds and reason == "quiet"
    assert first < second < third == T0 + 6 + CFG.debounce_seconds


def test_max_wait_counts_from_the_first_message() -> None:
    """A user who never pauses long enough still gets the batch closed MAX_WAIT_SECONDS after the first message."""
    at, reason = deadline(T0, T0 + 12, 5, CFG)  # quiet would be T0+16, after the cap
    assert (at, reason) == (T0 + CFG.max_wait_seconds, "max_wait")


def test_steady_stream_of_messages_is_capped_from_its_first_message() -> None:
    """With a message every 3 s the deadline follows the quiet clock until it would pass the cap, then stays at the cap."""
    for n in range(1, 10):
        last = T0 + 3 * (n - 1)
        at, reason = deadline(T0, last, n, CFG)
        assert at == min(last + CFG.debounce_seconds, T0 + CFG.max_wait_seconds), f"message {n}"
        assert reason == ("quiet" if last + CFG.debounce_seconds < T0 + CFG.max_wait_seconds else "max_wait")


def test_quiet_and_cap_falling_on_the_same_moment_close_then() -> None:
    """When the quiet deadline and the cap coincide, the batch closes at that moment (either reason is honest)."""
    last = T0 + CFG.max_wait_seconds - CFG.debounce_seconds
    at, reason = deadline(T0, last, 3, CFG)
    assert at == T0 + CFG.max_wait_seconds
    assert reason in ("quiet", "max_wait")


def test_debounce_equal_to_max_wait_closes_one_quiet_period_after_the_first_message() -> None:
    """With DEBOUNCE_SECONDS equal to MAX_WAIT_SECONDS a lone message closes after that one period."""
    cfg = DebounceSettings(debounce_seconds=5.0, max_wait_seconds=5.0, max_messages=50)
    at, reason = deadline(T0, T0, 1, cfg)
    assert at == T0 + 5.0 and reason in ("quiet", "max_wait")


def test_batch_reaching_max_messages_closes_at_once() -> None:
    """The message that brings a batch to MAX_BATCH_MESSAGES closes it at that message's time."""
    assert deadline(T0, T0 + 2, CFG.max_messages, CFG) == (T0 + 2, "max_messages")


def test_one_message_below_max_messages_still_waits() -> None:
    """A batch one message short of the limit waits for the quiet period as usual."""
    assert deadline(T0, T0 + 2, CFG.max_messages - 1, CFG) == (T0 + 2 + CFG.debounce_seconds, "quiet")


def test_max_messages_of_one_closes_every_message_at_once() -> None:
    """With MAX_BATCH_MESSAGES=1 every message is its own batch, closed immediately."""
    cfg = DebounceSettings(debounce_seconds=4.0, max_wait_seconds=15.0, max_messages=1)
    assert deadline(T0, T0, 1, cfg) == (T0, "max_messages")


# DebounceManager


def test_messages_over_the_limit_in_one_window_are_held_back() -> None:
    """At most `max_messages` messages per window pass; the rest are refused."""
    flood = DebounceManager(max_messages=3, window_seconds=60)
    assert [flood.should_process(1, T0 + i) for i in range(5)] == [True, True, True, False, False]


def test_window_slides_so_old_messages_stop_counting() -> None:
    """Once the oldest counted message is more than a window old, one more message may pass."""
    flood = DebounceManager(max_messages=3, window_seconds=60)
    for i in range(3):
        assert flood.should_process(1, T0 + i)
    assert not flood.should_process(1, T0 + 59.5)  # all three still inside the window
    assert flood.should_process(1, T0 + 60.5)  # the one at T0 left the window
    assert not flood.should_process(1, T0 + 60.6)  # T0+1, T0+2 and T0+60.5 are inside
    assert flood.should_process(1, T0 + 61.5)  # the one at T0+1 left the window


def test_held_messages_do_not_extend_the_users_penalty() -> None:
    """Refused messages are not counted, so a full quota is back one window after the accepted ones."""
    flood = DebounceManager(max_messages=3, window_seconds=60)
    for i in range(3):
        assert flood.should_process(1, T0 + i)
    for i in range(3, 50):
        assert not flood.should_process(1, T0 + i)
    assert [flood.should_process(1, T0 + 62.5 + i / 10) for i in range(4)] == [True, True, True, False]


def test_users_are_limited_independently() -> None:
    """One user hitting the limit does not hold back another user's messages."""
    flood = DebounceManager(max_messages=2, window_seconds=60)
    assert flood.should_process(1, T0) and flood.should_process(1, T0 + 1)
    assert not flood.should_process(1, T0 + 2)
    assert flood.should_process(2, T0 + 2) and flood.should_process(2, T0 + 3)
    assert not flood.should_process(2, T0 + 4)


def test_clear_user_starts_the_limit_afresh() -> None:
    """After `clear_user` the user gets a whole new quota at once; other users are untouched."""
    flood = DebounceManager(max_messages=2, window_seconds=60)
    for user in (1, 2):
        flood.should_process(user, T0)
        flood.should_process(user, T0 + 1)
    flood.clear_user(1)
    flood.clear_user(999)  # unknown user: nothing to forget, no error
    assert flood.should_process(1, T0 + 2) and flood.should_process(1, T0 + 3)
    assert not flood.should_process(2, T0 + 2)


def test_active_users_count_counts_each_user_once() -> None:
    """Three users writing several messages each are three active users; a cleared one is gone."""
    flood = DebounceManager(max_messages=30, window_seconds=60)
    assert flood.get_active_users_count() == 0
    for i in range(9):
        flood.should_process(i % 3, T0 + i)
    assert flood.get_active_users_count() == 3
    flood.clear_user(0)
    assert flood.get_active_users_count() == 2


def test_users_quiet_for_a_window_are_swept() -> None:
    """Users who sent nothing for longer than a window are forgotten once time moves on."""
    flood = DebounceManager(max_messages=30, window_seconds=60)
    for user in range(1_000):
        flood.should_process(user, T0 + user / 100)  # all within the first 10 s
    assert flood.get_active_users_count() == 1_000
    flood.should_process(5_000, T0 + 75)  # every earlier user has been quiet for more than 60 s
    assert flood.get_active_users_count() == 1


@pytest.mark.parametrize("window", [1.0, 60.0])
def test_memory_follows_the_active_users_not_every_user_ever_seen(window: float) -> None:
    """Round after round of fresh users, the number remembered never exceeds two windows' worth."""
    flood = DebounceManager(max_messages=30, window_seconds=window)
    per_round = 100
    for round_no in range(20):
        for i in range(per_round):
            flood.should_process(round_no * 10_000 + i, T0 + round_no * window + i * window / (2 * per_round))
        assert flood.get_active_users_count() <= 2 * per_round, f"round {round_no}"


def test_held_in_a_row_counts_until_a_message_passes_again() -> None:
    """held_in_a_row counts the user's held messages and starts again once one passes."""
    flood = DebounceManager(max_messages=1, window_seconds=10)
    assert flood.should_process(1, now=0.0)
    assert not flood.should_process(1, now=1.0) and not flood.should_process(1, now=2.0)
    assert flood.held_in_a_row(1) == 2 and flood.held_in_a_row(2) == 0
    assert flood.should_process(1, now=11.0)
    assert flood.held_in_a_row(1) == 0

