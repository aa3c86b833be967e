"""outbox.py: the claim loop and its worker threads, in process, with a real (in-memory) store."""

from __future__ import annotations

import threading
from collections import defaultdict

from doubles import wait_until
from outbox import ElasticThreads, OutboxWorkers
from store import MemoryStore, NewEvent, OutboxRow, SQLiteStore

T0 = 1_763_900_000.0


class Recorder(OutboxWorkers):
    """Handles a row by noting it (and how many rows were being handled at that moment), then delivering it."""

    def __init__(self, store: SQLiteStore, max_in_flight: int, gate: threading.Event | None = None,
                 idle_seconds: float = 30.0) -> None:
        super().__init__(store, "make", "test-outbox", max_in_flight, clock=lambda: T0, idle_seconds=idle_seconds)
        self.gate = gate
        self.lock = threading.Lock()
        self.handled: list[str] = []
        self.attempts: list[int] = []
        self.busy = 0
        self.most_busy = 0
        self.open_keys: set[str] = set()
        self.overlaps: list[str] = []

    def _handle(self, row: OutboxRow) -> None:
        with self.lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
            if row.order_key in self.open_keys:
                self.overlaps.append(row.order_key)
            self.open_keys.add(row.order_key)
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.busy -= 1
            self.open_keys.discard(row.order_key)
            self.handled.append(row.event_id)
            self.attempts.append(row.attempts)
        self._store.mark_delivered(row.id)


def test_idle_threads_end_and_their_names_are_reused() -> None:
    """Ten tasks at once get ten threads; once idle past `idle_seconds` they end, and new work starts
    again at `-1`."""
    threads = ElasticThreads("w", idle_seconds=0.2)
    release = threading.Event()
    names: list[str] = []
    lock = threading.Lock()

    def task() -> None:
        with lock:
            names.append(threading.current_thread().name)
        release.wait(10)

    for _ in range(10):
        threads.submit(task)
    wait_until(lambda: len(names) == 10, what="ten tasks running")
    assert threads.count == 10 and threads.peak == 10
    assert sorted(names) == sorted(f"w-{n}" for n in range(1, 11))
    release.set()
    wait_until(lambda: threads.count == 0, what="idle threads to end")
    threads.submit(task)
    wait_until(lambda: len(names) == 11, what="a task after the shrink")
    assert names[-1] == "w-1" and threads.peak == 10
    threads.stop(deadline=0)
    wait_until(lambda: threads.count == 0, what="the last thread to end at stop")


def test_an_idle_thread_is_reused_before_a_new_one_is_made() -> None:
    """Tasks submitted one after another, each once the last has finished, all run on one thread."""
    threads = ElasticThreads("w", idle_seconds=5)
    ran_on: list[str] = []
    for _ in range(20):
        threads.submit(lambda: ran_on.append(threading.current_thread().name))
        wait_until(lambda: threads.idle == 1, what="the worker to be idle again")
    assert ran_on == ["w-1"] * 20 and threads.peak == 1
    threads.stop(deadline=0)


def test_threads_follow_the_calls_in_flight_not_the_queue() -> None:
    """500 queued rows over 500 chats with at most 5 in flight use at most 5 worker threads, and each row
    is handled once."""
    store = MemoryStore()
    store.enqueue_events([NewEvent(f"e{n}", f"chat:{n}", "update", {}) for n in range(500)], T0)
    workers = Recorder(store, max_in_flight=5)
    workers.start()
    wait_until(lambda: len(workers.handled) == 500, what="500 rows handled")
    workers.stop()
    assert sorted(workers.handled) == sorted(f"e{n}" for n in range(500))
    assert workers.peak_threads <= 5 and workers.most_busy <= 5
    store.close()


def test_in_flight_rows_stay_within_the_bound_and_one_per_chat() -> None:
    """With 3 allowed in flight and 4 chats of 5 rows each, exactly 3 are handled together (a gate holds
    them), never two of one chat, and each chat's rows are handled in order."""
    store = MemoryStore()
    store.enqueue_events([NewEvent(f"c{c}-{n}", f"chat:{c}", "update", {}) for n in range(5) for c in range(4)], T0)
    gate = threading.Event()
    workers = Recorder(store, max_in_flight=3, gate=gate)
    workers.start()
    wait_until(lambda: workers.busy == 3, what="three rows in flight")
    assert workers.in_flight == 3
    gate.set()
    wait_until(lambda: len(workers.handled) == 20, what="all rows handled")
    workers.stop()
    assert workers.most_busy == 3 and workers.overlaps == []
    by_chat: dict[str, list[int]] = defaultdict(list)
    for event_id in workers.handled:
        chat, n = event_id.split("-")
        by_chat[chat].append(int(n))
    assert all(order == list(range(5)) for order in by_chat.values())
    store.close()


def test_new_work_wakes_the_claim_loop_and_stop_is_safe_twice() -> None:
    """A row enqueued after the start is handled without waiting for the loop's next look, and stop() twice is fine."""
    store = MemoryStore()
    workers = Recorder(store, max_in_flight=2)
    workers.start()
    assert workers.alive()
    store.enqueue_event(NewEvent("late", "chat:1", "update", {}), T0)
    wait_until(lambda: workers.handled == ["late"], timeout=2, what="the row enqueued after the start")
    workers.stop()
    workers.stop()
    assert not workers.alive()
    store.close()


def test_rows_that_find_no_thread_go_back_to_their_queues() -> None:
    """When no worker thread can be started (out of memory, a process limit), the claimed rows become due
    again instead of staying in flight, the loop says why, and they are all handled once threads start."""
    store = MemoryStore()
    store.enqueue_events([NewEvent(f"e{n}", f"chat:{n}", "update", {}) for n in range(6)], T0)
    workers = Recorder(store, max_in_flight=4)
    real_submit, refusing = workers._threads.submit, [True]

    def submit(task, done) -> None:
        if refusing[0]:
            raise RuntimeError("can't start new thread")
        real_submit(task, done)

    workers._threads.submit = submit  # type: ignore[method-assign]
    workers.start()
    wait_until(lambda: workers.dispatch_error, what="a refusal")
    assert "can't start new thread" in workers.dispatch_error
    wait_until(lambda: store.outbox_stats(T0)["outbox_inflight"] == 0, what="the refused rows put back")
    assert store.outbox_stats(T0)["outbox_pending"] == 6 and workers.in_flight == 0
    refusing[0] = False
    wait_until(lambda: len(workers.handled) == 6, what="every row handled")
    workers.stop()
    assert sorted(workers.handled) == sorted(f"e{n}" for n in range(6)) and workers.in_flight == 0
    assert workers.attempts == [1] * 6  # a row that never left was not counted as an attempt
    assert workers.dispatch_error is None and store.outbox_stats(T0)["outbox_pending"] == 0
    store.close()
