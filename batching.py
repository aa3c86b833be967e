"""Open batches per (chat, user), their deadlines on one scheduler thread, and closing them into events.

The store is the truth about a batch (its messages, first and last arrival, count); the heap here only
says when to look at it again. A debounce reset pushes a new heap entry with a higher generation and
the old one is skipped when popped (or dropped when stale entries pile up), so the thread count stays
one however many users are typing, and the heap a small multiple of the open batches.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable

from debounce import DebounceSettings, deadline
from store import AddResult, BatchRow, NewEvent, Store
from updates import batch_text

log = logging.getLogger("gateway.batching")

Key = tuple[int, int]  # (chat_id, user_id)

# The heap is rebuilt without its stale entries when it holds more than _COMPACT_AT entries per open
# batch (plus _COMPACT_FLOOR, so a handful of batches never rebuild it on every push).
_COMPACT_AT = 3
_COMPACT_FLOOR = 64
# On a database several instances share, each instance times the batches it stored, and every few seconds
# sweeps the store for batches overdue by more than the grace (their instance died or was cut off). The grace
# also covers the instances' clocks being a little apart (they are checked at start).
# Batches falling due together are closed this many to a transaction: after an outage, thousands of users'
# batches fall due within seconds, and one transaction (and one commit) each held the scheduler's thread for
# each in turn. Bounded, so that the messages committed in the same group wait for a few dozen closings at most.
CLOSE_TOGETHER = 50
SWEEP_SECONDS = 2.0
SWEEP_GRACE_SECONDS = 5.0


def build_batch_event(batch: BatchRow, reason: str) -> NewEvent:
    """The `message_batch` event of the contract for a closed batch."""
    payload: dict[str, Any] = {
        "event_type": "message_batch",
        "event_id": f"batch-{batch.batch_id}",
        "chat_id": batch.chat_id,
        "user_id": batch.user_id,
        "user": batch.user,
        "messages": batch.messages,
        "batch_size": len(batch.messages),
        "text": batch_text(batch.messages),
        "reason": reason,
        "flood_held": batch.flood_held,
        "first_at": batch.first_at,
        "last_at": batch.last_at,
    }
    return NewEvent(payload["event_id"], f"chat:{batch.chat_id}", "message_batch", payload)


class BatchManager:
    """Adds messages to open batches and closes each batch on its deadline, on one named thread."""

    def __init__(self, store: Store, settings: DebounceSettings,
                 on_closed: Callable[[BatchRow, str], None] = lambda batch, reason: None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._settings = settings
        self._on_closed = on_closed
        self._clock = clock
        self._monotonic = monotonic
        # _lock guards _generation (key -> latest generation: one per open batch with a deadline), _timed (key ->
        # the id of the batch that generation times, when known), and _heap (entries (due monotonic, seq, key,
        # generation); stale generations are skipped).
        self._lock = threading.Lock()
        self._generation: dict[Key, int] = {}
        self._timed: dict[Key, str | None] = {}
        self._heap: list[tuple[float, int, Key, int]] = []
        self._seq = itertools.count()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, update_id: int, chat_id: int, user_id: int, user: dict[str, Any] | None,
            item: dict[str, Any], admit: Callable[[], bool] | None = None) -> AddResult:
        """Store the message in its batch (durably) and schedule the batch's deadline; idempotent per update_id.
        `admit()` (flood control) is asked once the update is known to be new: False holds the message back."""
        result = self._store.add_message(update_id, chat_id, user_id, user, item, self._clock(),
                                         self._settings.max_messages, build_batch_event, admit)
        return self._added(chat_id, user_id, result)

    def add_later(self, update_id: int, chat_id: int, user_id: int, user: dict[str, Any] | None,
                  item: dict[str, Any], admit: Callable[[], bool] | None,
                  then: Callable[[AddResult | Exception], None]) -> None:
        """`add` without waiting for the commit: `then(result)`, or `then(error)` if it failed, once it is over,
        on the store's committing thread (quick, and never calling the store: see `Store._submit`)."""
        def committed(unit: Any) -> None:
            try:
                result: AddResult | Exception = self._added(chat_id, user_id, unit.outcome())
            except Exception as err:  # noqa: BLE001 - handed to the caller, which answers for it
                result = err
            then(result)
        self._store.add_message_later(update_id, chat_id, user_id, user, item, self._clock(),
                                      self._settings.max_messages, build_batch_event, admit, committed)

    def _added(self, chat_id: int, user_id: int, result: AddResult) -> AddResult:
        """After a message is stored: time its batch's deadline (or have a closed one looked at now)."""
        if not result.new or result.held:
            return result
        assert result.batch is not None
        if result.closed:
            self._closed_by_size((chat_id, user_id), result.batch.batch_id)
            self._on_closed(result.batch, "max_messages")
        else:
            at, _ = deadline(result.batch.first_at, result.batch.last_at, result.batch.count, self._settings)
            self._schedule((chat_id, user_id), at, result.batch.batch_id)
        return result

    def _closed_by_size(self, key: Key, batch_id: str) -> None:
        """Stop timing a batch that filled up, unless the key's deadline may be a newer batch's."""
        # Results of one key may reach here out of order (each on the thread that committed it), so the deadline
        # is dropped only when it is known to be this batch's and no other batch's result came since it was set
        # (`_schedule`): a batch id is never reused. One of a newer batch stays; one of unknown batch (two batches
        # seen, restored, or rescheduled after a close) is looked at now, in the store.
        # Looking every closing up in the store cost a transaction each: under a burst of users filling their
        # batches together, one after another on the scheduler's thread.
        with self._lock:
            if key not in self._generation:
                return  # never timed here (a one-message batch), or a newer batch's result comes next
            timed = self._timed.get(key)
            if timed == batch_id:
                del self._generation[key], self._timed[key]
                return
        if timed is None:
            self._schedule(key, self._clock())

    def restore(self) -> int:
        """Reschedule the open batches found in the store; close the overdue ones now with reason `restart`.
        On a shared database the other instances time their own batches, and the sweep takes those nobody
        times: nothing to do."""
        if self._store.shared:
            return 0
        now = self._clock()
        batches = self._store.open_batches()
        overdue: list[tuple[Key, int | None]] = []
        for batch in batches:
            at, _ = deadline(batch.first_at, batch.last_at, batch.count, self._settings)
            if at <= now:
                overdue.append(((batch.chat_id, batch.user_id), None))
            else:
                self._schedule((batch.chat_id, batch.user_id), at)
        self._close_all(overdue, restart=True)
        return len(batches)

    def has_open(self, chat_id: int, user_id: int) -> bool:
        """True while the user has an open batch in `chat_id` (this process times its deadline; on a shared
        database another instance may have stored it, so only the store can say: True)."""
        if self._store.shared:
            return True
        with self._lock:
            return (chat_id, user_id) in self._generation

    def flush(self, chat_id: int, user_id: int) -> bool:
        """Close the user's open batch in `chat_id` now (reason `flushed`), so that an event of theirs stored
        next reaches Make after it; return whether one was closed. Raises `StoreError` if the store fails."""
        key = (chat_id, user_id)
        if not self.has_open(chat_id, user_id):
            return False
        closed: list[BatchRow] = []

        def build(batch: BatchRow, reason: str) -> NewEvent:
            closed.append(batch)
            return build_batch_event(batch, reason)

        self._store.close_batch_if_due(chat_id, user_id, self._clock(), lambda batch: (0.0, "flushed"), build)
        # The scheduler looks at the key now and forgets it (or times a batch opened meanwhile).
        self._schedule(key, self._clock())
        if closed:
            log.info("batch flushed: chat %s user %s, %d message(s), ahead of their next event",
                     chat_id, user_id, closed[0].count)
            self._on_closed(closed[0], "flushed")
        return bool(closed)

    @property
    def active_batches(self) -> int:
        """Open batches this process is timing."""
        with self._lock:
            return len(self._generation)

    @property
    def scheduled_deadlines(self) -> int:
        """Batch deadlines waiting on the scheduler (one per open batch; stale heap entries not counted)."""
        return self.active_batches

    def start(self) -> None:
        """Start the `batch-scheduler` thread."""
        self._thread = threading.Thread(target=self._run, name="batch-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the scheduler; open batches stay in the store for the next start. Safe to call twice."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """True while the scheduler thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def heap_entries(self) -> int:
        """Entries in the deadline heap, stale ones included: at most about three per open batch."""
        with self._lock:
            return len(self._heap)

    def _schedule(self, key: Key, at_wall: float, batch_id: str | None = None) -> None:
        due = self._monotonic() + max(0.0, at_wall - self._clock())
        with self._lock:
            generation = next(self._seq)  # unique, so an old entry never matches a later batch
            # Two batches' results for one key (a late one of a batch since closed, or a newer batch's before the
            # older one's closing): which one the deadline is for is no longer known, so its closing asks the store.
            known = key not in self._generation or self._timed.get(key) == batch_id
            self._generation[key] = generation
            self._timed[key] = batch_id if known else None
            heapq.heappush(self._heap, (due, generation, key, generation))
            if len(self._heap) > _COMPACT_AT * len(self._generation) + _COMPACT_FLOOR:
                self._compact()
            # The scheduler sleeps until the earliest entry it saw: only a new earliest one needs it awake.
            # A debounce reset is due after its own batch's previous entry, so it wakes nobody.
            earliest = self._heap[0][1] == generation
        if earliest:
            self._wakeup.set()

    def _compact(self) -> None:
        # Called under _lock. Each debounce reset leaves a stale entry until its due time, up to
        # DEBOUNCE_SECONDS later: a long quiet period and chatty users would keep many per open batch.
        # Dropping them once they outnumber the live ones 2 to 1 costs O(1) per push, amortized.
        self._heap = [entry for entry in self._heap if self._generation.get(entry[2]) == entry[3]]
        heapq.heapify(self._heap)

    def _forget(self, key: Key, generation: int | None) -> None:
        # A message may have opened a new batch (a newer generation) meanwhile: keep that one.
        with self._lock:
            if self._generation.get(key) == generation:
                self._generation.pop(key, None)
                self._timed.pop(key, None)

    def _run(self) -> None:
        next_sweep = self._monotonic() + SWEEP_SECONDS
        while not self._stopping.is_set():
            try:
                wait = self._close_due()
            except Exception:
                log.exception("batch scheduler pass failed; retrying in 1 s")
                wait = 1.0
            if self._store.shared:
                if self._monotonic() >= next_sweep:
                    next_sweep = self._monotonic() + SWEEP_SECONDS
                    try:
                        self.sweep()
                    except Exception:
                        log.exception("sweeping for overdue batches failed; again in %g s", SWEEP_SECONDS)
                wait = min(wait, max(0.0, next_sweep - self._monotonic()))
            self._wakeup.wait(wait)
            self._wakeup.clear()

    def sweep(self) -> int:
        """Close the batches in the store overdue by more than the grace, whoever stored them (reason `restart`:
        they outlived their instance, as batches outlive a restart); return how many were closed."""
        grace = SWEEP_GRACE_SECONDS

        def due(batch: BatchRow, now: float) -> tuple[float, str]:
            at, _ = deadline(batch.first_at, batch.last_at, batch.count, self._settings)
            return at + grace, "restart"

        closed = self._store.close_due_batches(self._clock(), self._settings.debounce_seconds + grace,
                                               self._settings.max_wait_seconds + grace, due, build_batch_event)
        for batch in closed:
            log.info("batch closed: chat %s user %s, %d message(s), reason restart (overdue: no instance timed it)",
                     batch.chat_id, batch.user_id, batch.count)
            self._on_closed(batch, "restart")
        return len(closed)

    def _close_due(self) -> float:
        """Close every batch whose deadline has come; return seconds until the next deadline."""
        due_keys: list[tuple[Key, int | None]] = []
        with self._lock:
            now = self._monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, _, key, generation = heapq.heappop(self._heap)
                if self._generation.get(key) == generation:
                    due_keys.append((key, generation))
            wait = self._heap[0][0] - now if self._heap else 60.0
        self._close_all(due_keys)  # store writes happen outside the lock
        return max(0.0, wait) if not due_keys else 0.0

    def _close_all(self, due: list[tuple[Key, int | None]], restart: bool = False) -> None:
        """Close the batches of `due` (key, generation), `CLOSE_TOGETHER` to a transaction."""
        for start in range(0, len(due), CLOSE_TOGETHER):
            chunk = due[start:start + CLOSE_TOGETHER]
            try:
                if len(chunk) == 1:
                    self._close(*chunk[0], restart=restart)
                else:
                    self._close_together(chunk, restart)
            except Exception:  # (after the store: what was told of a closed batch) their heap entries are gone
                log.exception("closing %d batch(es) failed; looking at them again in 1 s", len(chunk))
                for key, _ in chunk:
                    self._schedule(key, self._clock() + 1.0)

    def _close(self, key: Key, generation: int | None, restart: bool = False) -> None:
        closing = _Closing(self._settings, restart)
        try:
            closed, later = self._store.close_batch_if_due(*key, self._clock(), closing.due, closing.build)
        except Exception:
            log.exception("closing the batch of chat %s user %s failed; retrying in 1 s", *key)
            self._schedule(key, self._clock() + 1.0)
            return
        self._after_close(key, generation, closed, later, closing)

    def _close_together(self, due: list[tuple[Key, int | None]], restart: bool = False) -> None:
        """Close several due batches in one store transaction; if it fails, close them one by one, so that a batch
        that cannot be closed holds up no other."""
        closing = _Closing(self._settings, restart)
        try:
            outcomes = self._store.close_batches_if_due([key for key, _ in due], self._clock(), closing.due,
                                                        closing.build)
        except Exception:
            log.exception("closing %d batches together failed; closing them one by one", len(due))
            for key, generation in due:
                self._close(key, generation, restart)
            return
        for (key, generation), (closed, later) in zip(due, outcomes):
            self._after_close(key, generation, closed, later, closing)

    def _after_close(self, key: Key, generation: int | None, closed: bool, later: float | None,
                     closing: "_Closing") -> None:
        """After the store looked at a key's batch: forget it (closed, or none), or time it again (not due yet)."""
        if closed or later is None:
            self._forget(key, generation)
        if closed:
            batch, reason = closing.built[key]
            log.info("batch closed: chat %s user %s, %d message(s), reason %s", *key, batch.count, reason)
            try:
                self._on_closed(batch, reason)
            except Exception:  # the batch is closed all the same: nothing to retry, and the others go on
                log.exception("telling of the closed batch of chat %s user %s failed", *key)
        elif later is not None:
            self._schedule(key, later)


class _Closing:
    """What the store is told to close by deadline (`due`, `build`), and what it closed: key -> (batch, reason)."""

    def __init__(self, settings: DebounceSettings, restart: bool = False) -> None:
        self._settings = settings
        self._restart = restart
        self.built: dict[Key, tuple[BatchRow, str]] = {}

    def due(self, batch: BatchRow) -> tuple[float, str]:
        """The batch's deadline and the reason it closes then (`restart` for one found overdue at start)."""
        at, reason = deadline(batch.first_at, batch.last_at, batch.count, self._settings)
        return at, "restart" if self._restart else reason

    def build(self, batch: BatchRow, reason: str) -> NewEvent:
        """The batch's event, the batch noted as closed."""
        self.built[(batch.chat_id, batch.user_id)] = (batch, reason)
        return build_batch_event(batch, reason)
