"""batching.py: the deadline heap and its scheduler, with a real (in-memory) store and a clock of our own."""

from __future__ import annotations

from batching import BatchManager
from debounce import DebounceSettings
from doubles import wait_until
from store import BatchRow, MemoryStore

T0 = 1_763_900_000.0


class Clock:
    """Wall and monotonic time, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - T0


def manager(clock: Clock, settings: DebounceSettings, closed: list[tuple[int, int, str]]) -> BatchManager:
    def on_closed(batch: BatchRow, reason: str) -> None:
        closed.append((batch.chat_id, batch.count, reason))

    return BatchManager(MemoryStore(), settings, on_closed=on_closed, clock=clock.wall, monotonic=clock.monotonic)


def test_resets_keep_the_heap_a_small_multiple_of_the_open_batches() -> None:
    """Twenty users resetting their quiet period 200 times each, under a long DEBOUNCE_SECONDS, leave at most
    three heap entries per open batch (plus a few), not one per message; every batch then closes once, on time,
    with all its messages."""
    clock, closed = Clock(), []
    batches = manager(clock, DebounceSettings(60, 3600, 10_000), closed)
    update_id = 0
    for _ in range(200):
        for user in range(1, 21):
            update_id += 1
            batches.add(update_id, user, user, {"id": user}, {"type": "text", "text": "more"})
        clock.now += 1.0
        assert batches.heap_entries <= 3 * 20 + 64 + 1
    assert batches.active_batches == 20 and closed == []
    clock.now += 58.0  # the last messages came 1 s ago: 59 s of quiet is one second short
    batches._close_due()
    assert closed == []
    clock.now += 1.0
    batches._close_due()
    assert sorted(closed) == [(user, 200, "quiet") for user in range(1, 21)]
    assert batches.active_batches == 0 and batches.heap_entries == 0


def test_a_debounce_reset_does_not_wake_the_scheduler() -> None:
    """A new batch's first deadline wakes the scheduler; a reset, due later than what it waits for, does not."""
    clock, closed = Clock(), []
    batches = manager(clock, DebounceSettings(4, 15, 50), closed)
    batches.add(1, 5, 5, {"id": 5}, {"type": "text", "text": "hi"})
    assert batches._wakeup.is_set()
    batches._wakeup.clear()
    for update_id in range(2, 10):
        clock.now += 0.5
        batches.add(update_id, 5, 5, {"id": 5}, {"type": "text", "text": "and"})
        batches.add(100 + update_id, 6 + update_id, 6 + update_id, {"id": 6}, {"type": "text", "text": "new user"})
    assert not batches._wakeup.is_set()


def test_a_flushed_batch_is_forgotten_at_once_while_others_wait() -> None:
    """With the scheduler thread waiting for a deadline a minute away, a flush (due now) wakes it: the flushed
    batch stops counting as open at once, and the other stays."""
    closed: list[tuple[int, int, str]] = []
    batches = BatchManager(MemoryStore(), DebounceSettings(60, 120, 50),
                           on_closed=lambda batch, reason: closed.append((batch.chat_id, batch.count, reason)))
    batches.start()
    try:
        batches.add(1, 5, 5, {"id": 5}, {"type": "text", "text": "hi"})
        batches.add(2, 6, 6, {"id": 6}, {"type": "text", "text": "hi"})
        assert batches.flush(6, 6)
        wait_until(lambda: not batches.has_open(6, 6), timeout=2, what="the flushed batch forgotten")
        assert batches.has_open(5, 5) and closed == [(6, 1, "flushed")]
    finally:
        batches.stop()
