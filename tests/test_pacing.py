"""pacing.py: Telegram's sending limits decided from plain numbers (no threads, no sleeps)."""

from __future__ import annotations

import random

import pytest

from pacing import GROUP_INTERVAL_SECONDS, CallWindow, ChatSpacing, chat_interval, is_group

T0 = 1_763_900_000.0


def test_a_call_counts_in_the_window_until_a_window_after_its_answer() -> None:
    """With a limit of 2 per second, two calls in flight fill it; one answered frees its place only a second
    after its answer, not after its start."""
    window = CallWindow(2, 1.0)
    assert window.room(0.0) == 2 and window.wait(0.0) == 0.0
    window.started()
    window.started()
    assert window.room(0.5) == 0
    assert window.wait(0.5) is None  # both in flight: only an answer can make room
    window.ended(0.7)
    assert window.room(1.5) == 0 and window.wait(1.5) == pytest.approx(0.2)
    assert window.room(1.7) == 1 and window.wait(1.7) == 0.0


def test_per_second_rounds_a_fractional_rate_up() -> None:
    """A rate of 2.5 a second is a window of 3 calls per second (the claim loop's spacing keeps the average);
    below 1 a second it is one call."""
    assert (CallWindow.per_second(30).limit, CallWindow.per_second(2.5).limit, CallWindow.per_second(0.2).limit) \
        == (30, 3, 1)
    with pytest.raises(ValueError):
        CallWindow(0)


@pytest.mark.parametrize("seed", range(5))
def test_the_far_end_never_counts_more_than_the_limit_whatever_the_delays(seed: int) -> None:
    """Calls started as soon as the window allows, each reaching the far end after a random delay and answered
    after another, never put more than the limit into any one second as the far end counts them."""
    rand = random.Random(seed)
    limit = 5
    window = CallWindow(limit, 1.0)
    now, arrivals, pending = 0.0, [], []  # pending: (answer time) of calls in flight
    while len(arrivals) < 300:
        for answered in sorted(at for at in pending if at <= now):
            window.ended(answered)
            pending.remove(answered)
        if window.room(now) > 0:
            window.started()
            arrival = now + rand.uniform(0.0, 0.2)  # a busy thread, a slow network
            arrivals.append(arrival)
            pending.append(arrival + rand.uniform(0.0, 0.2))
        else:
            wait = window.wait(now)
            now = min(pending) if wait is None else now + wait
        now += rand.uniform(0.0, 0.01)
    arrivals.sort()
    most = max(sum(1 for at in arrivals if first <= at < first + 1.0) for first in arrivals)
    assert most <= limit
    assert most == limit  # and it does use the whole limit, not some smaller one


def test_groups_get_twenty_messages_a_minute_and_users_their_interval() -> None:
    """A group (negative id, or an @username) waits at least 3 s between messages, a user's chat the interval
    set; an interval of 0 turns spacing off for both."""
    assert GROUP_INTERVAL_SECONDS == 3.0
    assert [is_group(c) for c in (42, -42, -1001234567890, "@channel", True)] == [False, True, True, True, False]
    assert chat_interval(42, 1.0) == 1.0
    assert chat_interval(-1001234567890, 1.0) == GROUP_INTERVAL_SECONDS
    assert chat_interval(-42, 5.0) == 5.0
    assert chat_interval(42, 0.0) == chat_interval(-42, 0.0) == 0.0


def test_a_chat_may_get_its_next_message_an_interval_after_the_answer_to_its_last() -> None:
    """A quiet chat may get a message at once; after one answered at T0, not before T0 + interval; a group
    not before T0 + 3 s; other chats are not held back."""
    spacing = ChatSpacing(1.0)
    assert spacing.reserve(42, T0 - 0.2) is None
    assert spacing.sent(42, T0) == T0 + 1.0
    assert spacing.sent(-42, T0) == T0 + GROUP_INTERVAL_SECONDS
    assert spacing.reserve(42, T0 + 0.4) == T0 + 1.0
    assert spacing.reserve(7, T0 + 0.4) is None
    assert spacing.reserve(42, T0 + 1.0) is None
    assert spacing.reserve(-42, T0 + 2.0) == T0 + GROUP_INTERVAL_SECONDS


def test_a_message_under_way_holds_its_chat_until_its_answer() -> None:
    """While one message to a chat awaits its answer, another to the same chat (from another queue) is held
    back; the answer then sets the chat's time from when it came."""
    spacing = ChatSpacing(1.0)
    assert spacing.reserve(42, T0) is None
    assert spacing.reserve(42, T0 + 0.1) == T0 + 1.0  # not before an interval after the start, at least
    assert spacing.sent(42, T0 + 1.5) == T0 + 2.5  # a slow answer: the interval counts from it
    assert spacing.reserve(42, T0 + 2.0) == T0 + 2.5


def test_chats_whose_time_has_passed_are_forgotten() -> None:
    """Memory follows the chats that got a message within the last few seconds, not every chat ever served."""
    spacing = ChatSpacing(1.0)
    for chat in range(1000):
        spacing.sent(chat, T0)
    assert len(spacing) == 1000
    spacing.sent(5000, T0 + 60)
    assert len(spacing) == 1


def test_a_wall_clock_stepped_back_holds_no_chat_for_the_step() -> None:
    """The clock set back an hour (NTP, a VM resumed): a chat that had a message just before is held for its
    interval at most, not for the hour, and chats are still forgotten once their time has passed."""
    spacing = ChatSpacing(1.0)
    assert spacing.sent(42, T0) == T0 + 1.0
    back = T0 - 3600
    assert spacing.reserve(42, back) is None
    assert spacing.reserve(42, back + 0.1) == back + 1.0
    for chat in range(1000, 2000):
        spacing.sent(chat, back + 0.5)
    spacing.sent(7, back + 10)
    assert len(spacing) == 1
