"""`OutboxWorkers`: one claim loop per target of the durable outbox, and the calls it has in flight.

The `<name>` thread claims due rows (the store hands out only the head of each order key's queue, so
one chat's events go one at a time, in order) and runs each on a `<name>-N` worker thread: at most
`max_in_flight` at once, started at most `max_rate` per second (and, given a `CallWindow`, never more
than it holds as the far end counts them). Workers are made when every one is busy and end after
`idle_seconds` without work, so threads follow the calls in flight, never the number of chats or
queued rows. Subclasses say what to do with a claimed row in `_handle()`, which must leave the
row delivered or failed: a row left in flight blocks its order key until a restart (or, on a shared
database, until its lease runs out and an instance claims it again).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Callable

from pacing import CallWindow
from store import LEASE_SECONDS, OutboxRow, Store, StoreError

log = logging.getLogger("gateway.outbox")

IDLE_SECONDS = 30.0  # a worker thread without work this long ends
_MAX_WAIT = 5.0  # the claim loop looks again at least this often (new work also wakes it)


class ElasticThreads:
    """Runs each task on an idle `<name>-N` thread, or on a new one when all are busy; an idle thread ends
    after `idle_seconds`. The caller bounds how many tasks run at once."""

    def __init__(self, name: str, idle_seconds: float = IDLE_SECONDS) -> None:
        self._name = name
        self._idle_seconds = idle_seconds
        # _lock guards _idle (workers waiting for a task, most recently used last), _workers (every live
        # worker), _free_numbers (N of ended workers, reused so names stay small), _next_number, _stopping, peak.
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._free_numbers: list[int] = []
        self._next_number = 1
        self._stopping = False
        self.peak = 0

    def submit(self, task: Callable[[], None], done: Callable[[], None] = lambda: None) -> None:
        """Run `task` on a worker thread now; call `done` once that thread is free for the next task."""
        with self._lock:
            if self._stopping:
                raise RuntimeError(f"{self._name} threads are stopped")
            if self._idle:
                worker = self._idle.pop()  # the most recently busy one: the others may time out and end
                worker.task, worker.done = task, done
                worker.ready.set()
                return
            if self._free_numbers:
                number = heapq.heappop(self._free_numbers)
            else:
                number, self._next_number = self._next_number, self._next_number + 1
            worker = _Worker(task, done, number)
            worker.thread = threading.Thread(target=self._work, args=(worker,), name=f"{self._name}-{number}",
                                             daemon=True)
            try:
                worker.thread.start()  # under the lock, so the worker's first look at _workers finds itself
            except RuntimeError:  # "can't start new thread": out of memory or over the process limit
                heapq.heappush(self._free_numbers, number)
                raise
            self._workers.add(worker)
            self.peak = max(self.peak, len(self._workers))

    @property
    def count(self) -> int:
        """Worker threads alive now (busy or idle)."""
        with self._lock:
            return len(self._workers)

    @property
    def idle(self) -> int:
        """Worker threads waiting for a task now."""
        with self._lock:
            return len(self._idle)

    def stop(self, deadline: float) -> None:
        """End idle workers now and wait for busy ones until `deadline` (time.monotonic()); safe to call twice."""
        with self._lock:
            self._stopping = True
            for worker in self._idle:
                worker.ready.set()
            workers = list(self._workers)
        for worker in workers:
            if worker.thread is not None:
                worker.thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self, worker: "_Worker") -> None:
        try:
            while True:
                task, done, worker.task, worker.done = worker.task, worker.done, None, None
                if task is not None:
                    try:
                        task()
                    except Exception:
                        log.exception("%s task failed", self._name)
                with self._lock:
                    stopping = self._stopping
                    if not stopping:
                        worker.ready.clear()
                        self._idle.append(worker)
                # Only now: whoever waits for a free thread finds this one idle, instead of making another.
                if done is not None:
                    done()
                if stopping:
                    return
                worker.ready.wait(self._idle_seconds)
                with self._lock:
                    if worker.task is None:  # timed out, or stopping: no task was handed over
                        if worker in self._idle:
                            self._idle.remove(worker)
                        return
        finally:
            with self._lock:
                self._workers.discard(worker)
                heapq.heappush(self._free_numbers, worker.number)


class _Worker:
    """One worker thread's hand-over slot: `submit` sets `task` and `done`, then `ready`."""

    def __init__(self, task: Callable[[], None], done: Callable[[], None], number: int) -> None:
        self.task: Callable[[], None] | None = task
        self.done: Callable[[], None] | None = done
        self.number = number
        self.ready = threading.Event()
        self.thread: threading.Thread | None = None


class OutboxWorkers:
    """The `<name>` claim loop for rows of `target`, each row handled on a `<name>-N` worker thread."""

    def __init__(self, store: Store, target: str, name: str, max_in_flight: int, max_rate: float = 0.0,
                 clock: Callable[[], float] = time.time, idle_seconds: float = IDLE_SECONDS,
                 window: CallWindow | None = None, lease_seconds: float = LEASE_SECONDS) -> None:
        self._store = store
        # A claimed row stays ours this long without word from us: on a shared database the claim loop renews
        # the leases of the rows its threads work on (`_held`: row id -> lease token), every quarter of it, and
        # another instance claims a row again only once its lease has run out (ours died or stopped).
        self._lease = lease_seconds
        self._held: dict[int, str] = {}
        self._renew_at = 0.0
        self._target = target
        self.name = name
        self.max_in_flight = max_in_flight
        self._interval = 1.0 / max_rate if max_rate > 0 else 0.0
        # Even spacing alone can still bunch at the far end (a call that took longer to leave arrives
        # with the next one); the window counts each call until after its answer, so it never does.
        self._window = window
        self._calling = threading.local()  # on a worker thread: whether its row still counts in the window
        self._clock = clock
        self._threads = ElasticThreads(name, idle_seconds)
        # _lock guards in_flight (rows handed to workers whose threads are not free yet) and _paused_until
        # (time.monotonic() before which no row may start: the target said so).
        self._lock = threading.Lock()
        self.in_flight = 0
        self._paused_until = 0.0
        self._next_start = 0.0  # time.monotonic() before which no row may start (pacing); claim loop only
        self.dispatch_error: str | None = None  # why rows could not be handed to a thread, until one can
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        store.on_new_work(self._on_new_work)

    def _handle(self, row: OutboxRow) -> None:
        raise NotImplementedError

    def _settle(self, write: Callable[[], None], row: OutboxRow) -> None:
        """Record a row's outcome, retrying while the store is busy or full: the call already happened,
        so reading a store error as "not sent" would send it again."""
        while True:
            try:
                write()
                return
            except StoreError as err:
                if self._stopping.is_set():
                    log.error("outcome of %s not recorded (%s): it stays in flight, and the next start sends it "
                              "again (or, if it may have reached Telegram, records it as done)", row.event_id, err)
                    return
                log.error("outcome of %s not recorded yet (%s); retrying in 1 s", row.event_id, err)
                self._stopping.wait(1.0)

    def wakeup(self) -> None:
        """Tell the claim loop a row may be due now."""
        self._wakeup.set()

    def pause(self, seconds: float) -> None:
        """Start nothing for `seconds` (the target is over its rate limit: every call would be refused)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def _on_new_work(self, target: str) -> None:
        if target == self._target:
            self._wakeup.set()

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        return self._threads.count

    @property
    def peak_threads(self) -> int:
        """The most worker threads alive at once since the start."""
        return self._threads.peak

    def start(self) -> None:
        """Start the claim loop, after making rows a crash left in flight due again."""
        reset = self._store.reset_inflight(self._target, self._clock())
        if reset:
            log.info("%d %s row(s) were in flight at the last stop; they will be sent again", reset, self._target)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop claiming and wait up to `timeout` for calls in flight; a row still in flight then is sent
        again at the next start. Safe to call twice."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.stop(deadline)

    def alive(self) -> bool:
        """True while the claim loop runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()  # before looking: work that arrives while we look sets it again
            try:
                wait = self._dispatch()
            except Exception:
                log.exception("%s pass failed; retrying in 1 s", self.name)
                wait = 1.0
            if self._store.shared:
                wait = min(wait, self._renew())
            if wait > 0:
                self._wakeup.wait(wait)

    def _renew(self) -> float:
        """Renew the leases of the rows in the threads' hands when due; return the seconds until the next time."""
        now = time.monotonic()
        if now >= self._renew_at:
            self._renew_at = now + self._lease / 4
            with self._lock:
                held = list(self._held.items())
            if held:
                try:
                    self._store.renew_leases(held, self._clock() + self._lease)
                except StoreError as err:  # the next turn tries again; the lease has three more quarters
                    log.warning("%s: leases of %d row(s) not renewed: %s", self.name, len(held), err)
        return max(0.0, self._renew_at - now)

    def _dispatch(self) -> float:
        """Claim what may start now and hand it to workers; return how long to wait before looking again."""
        with self._lock:
            free = self.max_in_flight - self.in_flight
            paused_until = self._paused_until
        if free <= 0:
            return _MAX_WAIT  # a finishing row wakes the loop
        now = time.monotonic()
        not_before = max(self._next_start, paused_until)
        if not_before > now:
            return min(_MAX_WAIT, not_before - now)
        if self._window is not None:
            room = self._window.room(now)
            if room <= 0:
                wait = self._window.wait(now)
                return _MAX_WAIT if wait is None else min(_MAX_WAIT, max(0.001, wait))  # an ending call wakes
            free = min(free, room)
        if self._interval:
            free = 1  # paced: one start per interval, never a burst
        rows = self._store.claim_due_events(self._clock(), self._target, free, self._lease)
        if rows:
            self._next_start = now + self._interval
            if not self._start(rows):
                return 1.0
            if len(rows) == free:
                return 0.0  # there may be more: look again at once
        # Nothing more was due when we looked (no second, empty claim to learn it): new work, a row's retry
        # time set (its thread coming free) and the next attempt due wake us.
        next_at = self._store.next_attempt_at(self._target)
        return _MAX_WAIT if next_at is None else min(_MAX_WAIT, max(0.01, next_at - self._clock()))

    def _start(self, rows: list[OutboxRow]) -> bool:
        """Hand claimed rows to worker threads; put back those that find none, and return False then."""
        for n, row in enumerate(rows):
            with self._lock:
                self.in_flight += 1
                if row.lease is not None:
                    self._held[row.id] = row.lease
            if self._window is not None:
                self._window.started()
            try:
                self._threads.submit(lambda row=row: self._run_one(row), self._slot_free)
            except Exception as err:  # RuntimeError("can't start new thread") above all
                with self._lock:
                    self.in_flight -= 1
                    for unstarted in rows[n:]:
                        self._held.pop(unstarted.id, None)
                if self._window is not None:
                    self._window.ended(time.monotonic())  # never started: it frees its place in a second
                self._unclaim(rows[n:], f"no thread to send it on ({err})")
                return False
        self.dispatch_error = None
        return True

    def _unclaim(self, rows: list[OutboxRow], reason: str) -> None:
        """Put claimed rows that never started back in their queues (no attempt counted), and claim nothing
        for a second: threads are short now, and every pass would only claim and put back again."""
        self.dispatch_error = reason
        log.error("%s: %d claimed row(s) could not start: %s; trying again in 1 s", self.name, len(rows), reason)
        self.pause(1.0)
        self._settle(lambda: self._store.release_claims([row.id for row in rows], self._clock(), lease=rows[0].lease),
                     rows[0])

    def _run_one(self, row: OutboxRow) -> None:
        self._calling.open = True
        try:
            self._handle(row)
        except Exception:
            log.exception("%s: handling %s failed; it stays in flight until the next start", self.name, row.event_id)
        finally:
            with self._lock:
                self._held.pop(row.id, None)
            self._answered()

    def _answered(self) -> None:
        """The row this worker thread handles has its answer (or makes no call): from now on it counts in the
        window only for the window's length (`_handle` may say so as soon as the answer comes)."""
        if self._window is not None and getattr(self._calling, "open", False):
            self._calling.open = False
            self._window.ended(time.monotonic())

    def _slot_free(self) -> None:
        """A row's thread is back among the idle ones: another row may start."""
        with self._lock:
            self.in_flight -= 1
        self._wakeup.set()
