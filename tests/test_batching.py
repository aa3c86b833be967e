"""batching.py: the deadline heap and its scheduler, with a real (in-memory) store and a clock of our own."""

from __future__ import annotations

import itertools

from batching import BatchManager, build_batch_event as build
from debounce import DebounceSettings
from doubles import wait_until
from store import BatchRow, MemoryStore, Store

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


def closings_counted(store: Store) -> list[int]:
    """Have `store` note each transaction closing batches by deadline: how many users' batches it looked at."""
    calls: list[int] = []
    together, alone = store.close_batches_if_due, store.close_batch_if_due
    store.close_batches_if_due = lambda keys, *args: calls.append(len(keys)) or together(keys, *args)  # type: ignore
    store.close_batch_if_due = lambda *args: calls.append(1) or alone(*args)  # type: ignore
    return calls


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


def test_a_batch_closed_by_size_is_forgotten_at_once_without_asking_the_store() -> None:
    """The message that fills a batch closes it, and the scheduler stops timing it then and there: nothing is
    left for its thread to look up in the store (under a burst, one transaction per closing, one by one). The
    user's next message opens a batch that is timed and closes on its deadline."""
    clock, closed = Clock(), []
    batches = manager(clock, DebounceSettings(4, 15, 3), closed)
    for update_id in (1, 2, 3):
        batches.add(update_id, 5, 5, {"id": 5}, {"type": "text", "text": f"m{update_id}"})
    assert closed == [(5, 3, "max_messages")]
    assert not batches.has_open(5, 5) and batches.active_batches == 0
    looked_up = closings_counted(batches._store)
    clock.now += 60
    assert batches._close_due() == 60.0 and looked_up == []  # nothing due: its deadline went with it
    batches.add(4, 5, 5, {"id": 5}, {"type": "text", "text": "m4"})
    assert batches.has_open(5, 5)
    clock.now += 4
    batches._close_due()
    assert closed == [(5, 3, "max_messages"), (5, 1, "quiet")] and batches.active_batches == 0


def test_results_of_one_user_taken_out_of_order_never_drop_a_newer_batchs_deadline() -> None:
    """Each result reaches the scheduler on the thread that committed it, so a newer batch's may come first:
    the closing of the older batch then leaves the newer one timed, and it closes on its deadline. A late
    result of the closed batch only has the store looked at once its time comes: nothing closes twice."""
    clock, closed = Clock(), []
    batches = manager(clock, DebounceSettings(4, 15, 3), closed)
    store = batches._store
    results = [store.add_message(update_id, 5, 5, {"id": 5}, {"type": "text", "text": f"m{update_id}"}, clock.now,
                                 3, lambda batch, reason: build(batch, reason)) for update_id in (1, 2, 3, 4)]
    assert [r.closed for r in results] == [False, False, True, False]
    assert results[2].batch is not None and results[3].batch is not None
    assert results[2].batch.batch_id != results[3].batch.batch_id
    batches._added(5, 5, results[3])  # the newer batch's message, first
    batches._added(5, 5, results[2])  # then the closing of the older one
    assert batches.has_open(5, 5)
    batches._added(5, 5, results[1])  # then a late result of the older one
    clock.now += 4
    batches._close_due()
    assert closed == [(5, 3, "max_messages"), (5, 1, "quiet")]
    assert batches.active_batches == 0 and store.open_batches() == []


def test_a_restored_batch_filled_up_is_looked_at_in_the_store() -> None:
    """A batch timed since a restart (its id unknown to the scheduler) that fills up has the store looked at
    once, which finds it closed and forgets it."""
    clock, closed = Clock(), []
    store = MemoryStore()
    for update_id in (1, 2):
        store.add_message(update_id, 5, 5, {"id": 5}, {"type": "text", "text": "m"}, clock.now, 3, build)
    batches = BatchManager(store, DebounceSettings(4, 15, 3), clock=clock.wall, monotonic=clock.monotonic,
                           on_closed=lambda batch, reason: closed.append((batch.chat_id, batch.count, reason)))
    assert batches.restore() == 1 and batches.has_open(5, 5)
    looked_up = closings_counted(store)
    batches.add(3, 5, 5, {"id": 5}, {"type": "text", "text": "m"})
    assert closed == [(5, 3, "max_messages")] and batches.has_open(5, 5)
    batches._close_due()
    assert looked_up == [1] and batches.active_batches == 0 and closed == [(5, 3, "max_messages")]


def test_batches_falling_due_together_are_closed_a_few_dozen_to_a_transaction() -> None:
    """120 users' batches falling due at once (a backlog after an outage) take three store transactions, not
    120 one after another on the scheduler's thread; every one closes once, with its message."""
    clock, closed = Clock(), []
    batches = manager(clock, DebounceSettings(4, 15, 50), closed)
    for user in range(1, 121):
        batches.add(user, user, user, {"id": user}, {"type": "text", "text": f"from {user}"})
    store = batches._store
    calls = closings_counted(store)
    clock.now += 4
    batches._close_due()
    assert calls == [50, 50, 20]
    assert sorted(closed) == [(user, 1, "quiet") for user in range(1, 121)]
    assert batches.active_batches == 0 and store.open_batches() == []
    assert store.outbox_stats(clock.now)["outbox_pending"] == 120


def test_a_batch_that_cannot_be_closed_holds_up_none_of_those_due_with_it() -> None:
    """If closing a few due batches together fails (one of them cannot be closed), each is closed on its own:
    the others close, and the one that fails is looked at again a second later."""
    clock, closed = Clock(), []
    batches = manager(clock, DebounceSettings(4, 15, 50), closed)
    for user in (1, 2, 3):
        batches.add(user, user, user, {"id": user}, {"type": "text", "text": "hi"})
    store = batches._store
    together, alone = store.close_batches_if_due, store.close_batch_if_due

    def refuse_user_2(chat_id: int, user_id: int, *args: object) -> object:
        if user_id == 2:
            raise RuntimeError("this batch cannot be closed")
        return alone(chat_id, user_id, *args)

    def refuse_with_user_2(keys: list[tuple[int, int]], *args: object) -> object:
        if (2, 2) in keys:
            raise RuntimeError("this batch cannot be closed")
        return together(keys, *args)

    store.close_batch_if_due = refuse_user_2  # type: ignore
    store.close_batches_if_due = refuse_with_user_2  # type: ignore
    clock.now += 4
    batches._close_due()
    assert sorted(closed) == [(1, 1, "quiet"), (3, 1, "quiet")]
    assert batches.has_open(2, 2) and not batches.has_open(1, 1)
    store.close_batch_if_due, store.close_batches_if_due = alone, together  # type: ignore
    clock.now += 1
    batches._close_due()
    assert sorted(closed) == [(1, 1, "quiet"), (2, 1, "quiet"), (3, 1, "quiet")]


def test_a_failure_telling_of_a_closed_batch_holds_up_none_of_the_others() -> None:
    """If telling of one closed batch fails (here the `on_closed` callback), that batch is closed all the same
    and the others closed with it are told of and forgotten as usual."""
    clock, closed = Clock(), []

    def on_closed(batch: BatchRow, reason: str) -> None:
        if batch.chat_id == 2:
            raise RuntimeError("the metrics are broken")
        closed.append((batch.chat_id, batch.count, reason))

    batches = BatchManager(MemoryStore(), DebounceSettings(4, 15, 50), on_closed=on_closed, clock=clock.wall,
                           monotonic=clock.monotonic)
    for user in range(1, 121):
        batches.add(user, user, user, {"id": user}, {"type": "text", "text": "hi"})
    clock.now += 4
    batches._close_due()
    assert sorted(closed) == [(user, 1, "quiet") for user in range(1, 121) if user != 2]
    assert batches.active_batches == 0 and batches._store.open_batches() == []
    assert batches._store.outbox_stats(clock.now)["outbox_pending"] == 120


def test_a_users_results_in_any_order_leave_no_open_batch_untimed() -> None:
    """Whatever order the results of one user's messages reach the scheduler in (two batches: the third message
    fills the first, the fourth opens the second), every batch still open is timed and closes on its deadline,
    and none closes twice."""
    for order in itertools.permutations(range(4)):
        clock, closed = Clock(), []
        batches = manager(clock, DebounceSettings(4, 15, 3), closed)
        store = batches._store
        results = [store.add_message(n, 5, 5, {"id": 5}, {"type": "text", "text": f"m{n}"}, clock.now, 3, build)
                   for n in (1, 2, 3, 4)]
        for n in order:
            batches._added(5, 5, results[n])
        assert batches.has_open(5, 5), order
        for _ in range(3):
            clock.now += 20
            batches._close_due()
        assert store.open_batches() == [] and batches.active_batches == 0, order
        assert sorted(closed) == [(5, 1, "quiet"), (5, 3, "max_messages")], order


def test_batches_found_overdue_at_start_are_closed_a_few_dozen_to_a_transaction() -> None:
    """After an outage, the open batches found overdue at start close together too (reason `restart`), and
    those not due yet are timed."""
    clock = Clock()
    store = MemoryStore()
    for user in range(1, 122):
        store.add_message(user, user, user, {"id": user}, {"type": "text", "text": "hi"},
                          clock.now + (60 if user == 121 else 0), 50, build)
    closed: list[tuple[int, int, str]] = []
    batches = BatchManager(store, DebounceSettings(4, 15, 50), clock=clock.wall, monotonic=clock.monotonic,
                           on_closed=lambda batch, reason: closed.append((batch.chat_id, batch.count, reason)))
    calls = closings_counted(store)
    clock.now += 30
    assert batches.restore() == 121
    assert calls == [50, 50, 20]
    assert sorted(closed) == [(user, 1, "restart") for user in range(1, 121)]
    assert batches.has_open(121, 121) and batches.active_batches == 1
