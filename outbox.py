"""`OutboxWorkers`: a small pool of named threads draining one target of the durable outbox.

The store hands out one event at a time per order key (`claim_due_event`), so any number of threads
keep each chat's events in order. Subclasses say what to do with a claimed row in `_handle()`, which
must leave the row delivered or failed: a row left in flight blocks its order key until a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from store import OutboxRow, SQLiteStore, StoreError

log = logging.getLogger("gateway.outbox")


class OutboxWorkers:
    """Threads `<name>-1..N` that claim due rows of `target` and hand each to `_handle()`."""

    def __init__(self, store: SQLiteStore, target: str, name: str, workers: int,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._target = target
        self._name = name
        self._workers = workers
        self._clock = clock
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

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
                    log.error("outcome of %s not recorded (%s): it stays in flight and is sent again at the next "
                              "start", row.event_id, err)
                    return
                log.error("outcome of %s not recorded yet (%s); retrying in 1 s", row.event_id, err)
                self._stopping.wait(1.0)

    def wakeup(self) -> None:
        """Tell the threads a row may be due now."""
        self._wakeup.set()

    def start(self) -> None:
        """Start the threads, after making rows a crash left in flight due again."""
        reset = self._store.reset_inflight(self._target)
        if reset:
            log.info("%d %s row(s) were in flight at the last stop; they will be sent again", reset, self._target)
        for n in range(1, self._workers + 1):
            thread = threading.Thread(target=self._run, name=f"{self._name}-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking rows; a row still in flight is sent again at the next start. Safe to call twice."""
        self._stopping.set()
        self._wakeup.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        """True while every thread runs."""
        return len(self._threads) == self._workers and all(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                row = self._store.claim_due_event(self._clock(), target=self._target)
                if row is not None:
                    self._handle(row)
                    continue
                next_at = self._store.next_attempt_at(target=self._target)
                wait = 5.0 if next_at is None else min(5.0, max(0.05, next_at - self._clock()))
            except Exception:
                log.exception("%s pass failed; retrying in 1 s", self._name)
                wait = 1.0
            self._wakeup.wait(wait)
            self._wakeup.clear()
