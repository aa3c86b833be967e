"""Durable state behind one small interface: seen updates, open batches, the outbox, small facts.

`Store` holds every transaction's logic and the group commit; `SQLiteStore(path)` keeps the state in a
SQLite file (WAL, synchronous=FULL: a committed update survives a crash), `SQLiteStore(":memory:")` (also
`MemoryStore()`) has the same behaviour for throwaway runs and tests, and `store_postgres.PostgresStore` keeps
it in PostgreSQL, shared by several gateway instances (`open_store(config)` picks one). Every public method is
one unit of work, atomic and durable when it returns. Units that arrive together share one transaction and one
fsync (group commit, `Store._run`): the connection is shared by all threads, and whichever thread is first in
line runs and commits the waiting units of the others.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections import deque
from pathlib import Path
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Generic, Iterable, Sequence, TypeVar

log = logging.getLogger("gateway.store")

# Version 1: the first schema. Each later entry of _MIGRATIONS moves a database one version up, in one
# transaction, so a state file of any earlier version is upgraded in place at start (its outbox kept).
_SCHEMA_V1 = """
CREATE TABLE seen_updates (
    update_id   INTEGER PRIMARY KEY,
    received_at REAL NOT NULL
);
CREATE INDEX seen_updates_age ON seen_updates (received_at);

CREATE TABLE batches (
    batch_id  TEXT PRIMARY KEY,
    chat_id   INTEGER NOT NULL,
    user_id   INTEGER NOT NULL,
    user_json TEXT NOT NULL,
    first_at  REAL NOT NULL,
    last_at   REAL NOT NULL,
    count     INTEGER NOT NULL,
    UNIQUE (chat_id, user_id)
);
CREATE TABLE batch_messages (
    batch_id  TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    item_json TEXT NOT NULL,
    PRIMARY KEY (batch_id, seq)
);
CREATE TABLE flood_held (
    chat_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    held    INTEGER NOT NULL,
    PRIMARY KEY (chat_id, user_id)
);

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    order_key       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    target          TEXT NOT NULL DEFAULT 'make',
    payload         TEXT NOT NULL,
    created_at      REAL NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT
);
CREATE INDEX outbox_queue ON outbox (order_key, id) WHERE status IN ('pending', 'inflight');
CREATE INDEX outbox_due ON outbox (status, next_attempt_at);

CREATE TABLE payments (
    charge_id    TEXT PRIMARY KEY,
    payload      TEXT NOT NULL,
    user_id      INTEGER,
    currency     TEXT NOT NULL,
    total_amount INTEGER NOT NULL,
    duplicate    INTEGER NOT NULL,
    received_at  REAL NOT NULL,
    body         TEXT NOT NULL
);
CREATE TABLE paid_payloads (
    payload   TEXT PRIMARY KEY,
    charge_id TEXT NOT NULL,
    paid_at   REAL NOT NULL
);
CREATE TABLE checkout_holds (
    payload    TEXT PRIMARY KEY,
    query_id   TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE refunds (
    charge_id   TEXT PRIMARY KEY,
    payload     TEXT NOT NULL,
    received_at REAL NOT NULL,
    body        TEXT NOT NULL
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Version 2: a backlog costs nothing. `is_head` marks the one live row (pending or in flight) that
# heads its order key's queue, so claiming reads an index of ready heads instead of checking every due
# event against every earlier one; the counts that health and metrics show are kept by triggers.
_OUTBOX_HEADS = """
ALTER TABLE outbox ADD COLUMN is_head INTEGER NOT NULL DEFAULT 0;
DROP INDEX outbox_due;
-- Only a stopped gateway's file is migrated, so whatever it left in flight is due again (version 1 could
-- even leave two rows of one chat in flight, which the index below forbids).
UPDATE outbox SET status = 'pending' WHERE status = 'inflight';
UPDATE outbox SET is_head = 1 WHERE status IN ('pending', 'inflight') AND id = (
    SELECT MIN(p.id) FROM outbox p WHERE p.order_key = outbox.order_key AND p.status IN ('pending', 'inflight'));
CREATE UNIQUE INDEX outbox_one_head ON outbox (order_key) WHERE is_head = 1;
CREATE UNIQUE INDEX outbox_one_inflight ON outbox (order_key) WHERE status = 'inflight';
CREATE INDEX outbox_ready ON outbox (target, next_attempt_at) WHERE is_head = 1 AND status = 'pending';
CREATE INDEX outbox_age ON outbox (created_at) WHERE status IN ('pending', 'inflight');

CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    n    INTEGER NOT NULL
);
INSERT INTO counters VALUES
    ('outbox:pending', (SELECT COUNT(*) FROM outbox WHERE status = 'pending')),
    ('outbox:inflight', (SELECT COUNT(*) FROM outbox WHERE status = 'inflight')),
    ('outbox:dead', (SELECT COUNT(*) FROM outbox WHERE status = 'dead')),
    ('payments', (SELECT COUNT(*) FROM payments)),
    ('batches', (SELECT COUNT(*) FROM batches));
CREATE TRIGGER outbox_in AFTER INSERT ON outbox BEGIN
    UPDATE counters SET n = n + 1 WHERE name = 'outbox:' || NEW.status;
END;
CREATE TRIGGER outbox_out AFTER DELETE ON outbox BEGIN
    UPDATE counters SET n = n - 1 WHERE name = 'outbox:' || OLD.status;
END;
CREATE TRIGGER outbox_moved AFTER UPDATE OF status ON outbox WHEN OLD.status <> NEW.status BEGIN
    UPDATE counters SET n = n - 1 WHERE name = 'outbox:' || OLD.status;
    UPDATE counters SET n = n + 1 WHERE name = 'outbox:' || NEW.status;
END;
CREATE TRIGGER payments_in AFTER INSERT ON payments BEGIN
    UPDATE counters SET n = n + 1 WHERE name = 'payments';
END;
CREATE TRIGGER batches_in AFTER INSERT ON batches BEGIN
    UPDATE counters SET n = n + 1 WHERE name = 'batches';
END;
CREATE TRIGGER batches_out AFTER DELETE ON batches BEGIN
    UPDATE counters SET n = n - 1 WHERE name = 'batches';
END;
"""

# Version 3: checkouts are held per buyer, and subscription payloads are known.
# - A hold is keyed by (payload, user): a buyer whose card was declined may try again at once (their new
#   checkout replaces their hold), while another buyer stays refused until it expires. A version 2 hold
#   has no buyer: it gets user 0 (no Telegram user has it), so it keeps refusing everyone until it expires.
# - A Stars subscription renews with the same payload, and a subscription link's payload is shared by
#   every subscriber: a payload a recurring payment paid is a subscription payload, never "paid" for the
#   one-off rule. Version 2 marked the first such payment's payload paid; that mark goes.
_CHECKOUT_PER_BUYER = """
CREATE TABLE checkout_holds_v3 (
    payload    TEXT NOT NULL,
    user_id    INTEGER NOT NULL,
    query_id   TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (payload, user_id)
);
INSERT INTO checkout_holds_v3 SELECT payload, 0, query_id, expires_at FROM checkout_holds;
DROP TABLE checkout_holds;
ALTER TABLE checkout_holds_v3 RENAME TO checkout_holds;

CREATE TABLE subscription_payloads (
    payload  TEXT PRIMARY KEY,
    first_at REAL NOT NULL
);
INSERT INTO subscription_payloads SELECT payload, MIN(received_at) FROM payments
    WHERE json_extract(body, '$.is_recurring') = 1 GROUP BY payload;
DELETE FROM paid_payloads WHERE charge_id IN (
    SELECT charge_id FROM payments WHERE json_extract(body, '$.is_recurring') = 1);
"""

# Version 4: `on_wire` marks an outbox row whose call that must not be repeated (sendMessage) has begun to
# go out: after a crash such a row may have arrived, so it is not sent again; one a crash caught before
# its request left (waiting for a connection, say) is sent at the next start.
# Rows an older gateway left in flight may have gone out already: its sendMessage rows count as on the wire.
_ON_WIRE = """
ALTER TABLE outbox ADD COLUMN on_wire INTEGER NOT NULL DEFAULT 0;
UPDATE outbox SET on_wire = 1
    WHERE status = 'inflight' AND target LIKE 'telegram%' AND json_extract(payload, '$.method') = 'sendMessage';
"""

# Version 5: a claim is a lease. `lease_until` says until when the instance that claimed a row may still settle
# it, and `lease_token` which claim that was: once the lease has run out another instance may claim the row
# again (its instance died), and a late answer of the first is refused (see `Store.claim_due_events`).
_LEASES = """
ALTER TABLE outbox ADD COLUMN lease_until REAL;
ALTER TABLE outbox ADD COLUMN lease_token TEXT;
CREATE INDEX outbox_leases ON outbox (target, lease_until) WHERE status = 'inflight';
"""

_MIGRATIONS = (_SCHEMA_V1, _OUTBOX_HEADS, _CHECKOUT_PER_BUYER, _ON_WIRE, _LEASES)  # entry N-1: to version N
SCHEMA_VERSION = len(_MIGRATIONS)
_BUSY_TIMEOUT_SECONDS = 2.0  # SQLite's wait for a lock held by another process
_LOCK_WAIT_SECONDS = 5.0  # a thread's wait for the connection, behind others waiting on SQLite
_CHECKPOINT_SECONDS = 0.5  # how often the wal-checkpoint thread copies the WAL back into the database file
_CHECKPOINT_RESET_PAGES = 10_000  # a WAL this long (~40 MB) is reset even if writers must wait a moment
_CHECKPOINT_RESTART_WAIT_SECONDS = 0.2  # the longest a RESTART waits (holding writers) for a lock or a reader
MIN_SQLITE = (3, 35)  # RETURNING
_GROUP_MAX = 512  # units one commit takes at most: bounds how long the last of them waits for it
# How long a claimed row stays its claimer's without word from it: on a shared database its claimer renews the
# lease while it works on the row (every quarter of it), so this is how soon another instance takes over the row
# of one that died or stopped, whatever the call's length.
LEASE_SECONDS = 20.0

# Every query below that reads the ready heads says `is_head = 1 AND status = 'pending'` literally, so
# SQLite uses the partial index outbox_ready.
_PROMOTE_HEAD = ("UPDATE outbox SET is_head = 1 WHERE id = (SELECT id FROM outbox WHERE order_key = ? "
                 "AND status IN ('pending', 'inflight') ORDER BY id LIMIT 1)")
# What `_enqueue` and `_enqueue_new` write of a new outbox row.
_NEW_OUTBOX_COLUMNS = "event_id, order_key, event_type, target, payload, created_at, next_attempt_at, is_head"
# _PROMOTE_HEAD for the queues of several order keys at once.
_PROMOTE_HEADS = ("UPDATE outbox SET is_head = 1 WHERE id IN (SELECT MIN(id) FROM outbox WHERE order_key IN ({keys}) "
                  "AND status IN ('pending', 'inflight') GROUP BY order_key)")
_PROMOTE_HEAD_IF_NONE = (_PROMOTE_HEAD + " AND NOT EXISTS (SELECT 1 FROM outbox WHERE order_key = ? AND is_head = 1)")


@dataclass
class BatchRow:
    """One open batch as stored: the messages so far and how many flood control held back."""

    batch_id: str
    chat_id: int
    user_id: int
    user: dict[str, Any] | None
    first_at: float
    last_at: float
    count: int
    messages: list[dict[str, Any]] = field(default_factory=list)
    flood_held: int = 0


@dataclass(frozen=True)
class NewEvent:
    """An event to put in the outbox: `order_key` groups the events that must go out in order;
    `target` is `make` (posted to Make) or `telegram` (a Bot API call: `payload` has method and params)."""

    event_id: str
    order_key: str
    event_type: str
    payload: dict[str, Any]
    target: str = "make"
    due_at: float | None = None  # first attempt (wall clock); None: at once
    # True: give a still-pending row with this event_id this payload and due time instead of adding
    # one; nothing happens if that row has gone (it was sent).
    replace: bool = False


@dataclass(frozen=True)
class OutboxRow:
    """An event claimed for delivery (or listed as dead)."""

    id: int
    event_id: str
    order_key: str
    event_type: str
    payload: dict[str, Any]
    created_at: float
    attempts: int
    last_error: str | None
    lease: str | None = None  # the claim's token: settling with it is refused once another claim took the row
    # The row was claimed again after its claimer's lease ran out, and that claimer had begun to send its call
    # (`mark_on_wire`): the call may have arrived.
    was_on_wire: bool = False


@dataclass(frozen=True)
class AddResult:
    """What adding a message did: `new` is False for a repeated update_id; `closed` names a batch closed at once;
    `held`: flood control held the message back (counted for the user's next batch)."""

    new: bool
    batch: BatchRow | None = None
    closed: bool = False
    held: bool = False


Builder = Callable[[BatchRow, str], NewEvent]
T = TypeVar("T")


class StoreError(Exception):
    """The state could not be read or written (locked, read-only, disk full); nothing was half-written."""


class StorePathError(StoreError):
    """STATE_DB names no place a database file can be: its folder cannot be created (a file in the way, no
    permission), or it is a folder or a device itself."""


class StoreNotFound(StoreError):
    """There is no state database at the path (a command that only reads or replays found nothing to open)."""


class Store:
    """The gateway's durable state: every transaction's logic, and the group commit that runs them, once for
    both databases. A subclass (`SQLiteStore`, `store_postgres.PostgresStore`) connects, keeps the schema, and
    says in a few statements and hooks how its database differs (the class attributes below)."""

    # The database's errors: a unit failing with one of these fails as a StoreError.
    _errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    # Where the dialects differ: the update ids among a JSON array's that are stored (one JSON array back)...
    _KNOWN_UPDATES = ("SELECT json_group_array(update_id) FROM seen_updates "
                      "WHERE update_id IN (SELECT value FROM json_each(?))")
    # ...the open batches of a JSON array of [chat, user] pairs (one JSON array of [chat, user, batch id, count,
    # first_at] back, first_at exact)...
    _OPEN_BATCHES_OF = ("SELECT json_group_array(json_array(chat_id, user_id, batch_id, count, "
                        "printf('%!.17g', first_at))) FROM batches WHERE (chat_id, user_id) IN ({pairs})")
    # ...a batch's messages as one JSON array of [seq, item]...
    _BATCH_ITEMS = "SELECT json_group_array(json_array(seq, json(item_json))) FROM batch_messages WHERE batch_id=?"
    # ...the messages of several batches, as one JSON array of [batch id, seq, item]...
    _ITEMS_OF = ("SELECT json_group_array(json_array(batch_id, seq, json(item_json))) FROM batch_messages "
                 "WHERE batch_id IN ({ids})")
    # ...the order keys among several whose queue has a live row, as one JSON array...
    _LIVE_KEYS_OF = ("SELECT json_group_array(DISTINCT order_key) FROM outbox WHERE order_key IN ({keys}) "
                     "AND status IN ('pending', 'inflight')")
    # ...outbox rows as one JSON array of their `OutboxRow` fields (created_at exact)...
    _OUTBOX_ROWS_OF = ("SELECT json_group_array(json_array(id, event_id, order_key, event_type, payload, "
                       "printf('%!.17g', created_at), attempts, last_error, lease_token)) FROM outbox "
                       "WHERE id IN ({ids})")
    # ...outbox rows' states as one JSON array of [id, lease token, status, order key, target] (asked on SQLite
    # only: on PostgreSQL each settle locks its row first)...
    _OUTBOX_STATES_OF = ("SELECT json_group_array(json_array(id, lease_token, status, order_key, target)) "
                         "FROM outbox WHERE id IN ({ids})")
    # ...and the counts health shows, as (name, n) rows (SQLite keeps them by triggers).
    _COUNTS = "SELECT name, n FROM counters"
    _PAYMENTS_COUNT = "SELECT n FROM counters WHERE name = 'payments'"
    # Said after a SELECT of rows a transaction is about to change: nothing on SQLite, whose one writer
    # changes them anyway; on PostgreSQL the rows are locked, and those another instance has locked are
    # skipped (`_CLAIMING`) or waited for (`_CHANGING`).
    _CLAIMING = ""
    _CHANGING = ""
    # Whether several gateway processes may use the database at once: then a row in flight whose lease ran out
    # is another's to claim (its instance died), and open batches are swept by every instance.
    shared = False

    def __init__(self) -> None:
        # _lock guards _db (a connection must not run two statements at once) and _new_work (the targets the
        # current transaction gave a row to send).
        self._lock = threading.Lock()
        self._new_work: set[str] = set()
        self._listeners: list[Callable[[str], None]] = []
        # _line_lock guards _line (the units waiting to be committed, the group being committed first) and
        # each unit's taken / leads / done; _inside.cursor is set on the thread running a group.
        self._line_lock = threading.Lock()
        self._line: deque[_Unit[Any]] = deque()
        self._inside = threading.local()
        # The thread that leads groups whose first unit has no caller waiting (`_submit`); started when needed.
        self._committer: threading.Thread | None = None
        self._committer_wake = threading.Event()
        self._closing = False
        # Batch ids and claims' lease tokens: random per process, then counted (uuid4 per message cost a system
        # call and an object).
        self._batch_ids = map(f"{os.urandom(8).hex()}{{:016x}}".format, itertools.count())
        self._lease_tokens = map(f"{os.urandom(8).hex()}-{{:x}}".format, itertools.count())
        # The statements that write many messages' rows at once, each taking its rows as one JSON array.
        self._sql = {
            "known_and_open": (f"SELECT ({self._KNOWN_UPDATES}), "
                               f"({self._OPEN_BATCHES_OF.format(pairs=self._rows('bigint', 'bigint'))})"),
            "add_seen": f"INSERT INTO seen_updates {self._rows('bigint', 'float8')}",
            # One row per user (PostgreSQL refuses a statement that changes one row twice).
            "add_held": (f"INSERT INTO flood_held {self._rows('bigint', 'bigint', 'bigint')} WHERE true "
                         "ON CONFLICT (chat_id, user_id) DO UPDATE SET held = flood_held.held + excluded.held"),
            "write_batches": (f"INSERT INTO batches "
                              f"{self._rows('text', 'bigint', 'bigint', 'text', 'float8', 'float8', 'bigint')} "
                              "WHERE true ON CONFLICT (chat_id, user_id) DO UPDATE "
                              "SET last_at=excluded.last_at, count=excluded.count, user_json=excluded.user_json"),
            "add_items": f"INSERT INTO batch_messages {self._rows('text', 'bigint', 'text')}",
        }

    # What a subclass provides

    def _cursor(self) -> Any:
        """A cursor on the connection, to run one group on (`?` placeholders)."""
        raise NotImplementedError

    def _begin(self, cur: Any, write: bool) -> None:
        """Begin the group's transaction (`write`: it will write, so take the write lock now if the database
        has one)."""
        raise NotImplementedError

    def _in_transaction(self) -> bool:
        """Whether a transaction is open (perhaps failed, waiting for its rollback)."""
        raise NotImplementedError

    def _can_commit(self) -> bool:
        """Whether the open transaction would commit what its units did (a failed one would be rolled back)."""
        return self._in_transaction()

    def _rows(self, *types: str, extra: str = "") -> str:
        """A SELECT of one row per element of a JSON array given as its one parameter, each element an array
        of values of these SQL `types` (then the constant column `extra`, if any): a statement's rows passed as one
        value."""
        raise NotImplementedError

    def _after_group(self) -> None:
        """Called after each group, outside every lock but the leader's turn."""

    def _lock_keys(self, cur: Any, keys: Iterable[str]) -> None:
        """Hold `keys` (a batch's user, an order key, a payload) until the transaction ends: nothing to do with one
        writer; on a shared database, transactions deciding about the same thing take turns."""

    def _try_lock_key(self, cur: Any, key: str) -> bool:
        """`_lock_keys` for one key, without waiting: False if another transaction holds it."""
        return True

    def poller_turn(self) -> bool:
        """Whether this process may poll Telegram now: always with one process; on a shared database, the one
        instance holding the poller lock (taken here if nobody holds it)."""
        return True

    def _close_db(self) -> None:
        """Close the connection (under `_lock`)."""
        raise NotImplementedError


    def on_new_work(self, callback: Callable[[str], None]) -> None:
        """Call `callback(target)` after every commit that gave `target` a row to send (wakes its claim loop)."""
        self._listeners.append(callback)

    def _run(self, work: Callable[[sqlite3.Cursor], T], write: bool = True, *,
             many: Callable[[sqlite3.Cursor, list[Any]], list[Any]] | None = None, args: Any = None) -> T:
        """Run `work(cursor)` as one unit of a transaction; return its result once that transaction is committed.

        Group commit: units that wait together share one transaction and one fsync. The first in line leads:
        it runs every unit waiting (each in a savepoint of its own, so one that fails is undone alone) and
        commits them all; units arriving meanwhile wait for the next group, led by the first of them. A unit
        never returns before its group is on disk, so a caller may acknowledge what it stored."""
        inside = self._inside
        if getattr(inside, "cursor", None) is not None:  # a unit's own work calling the store: same transaction
            return work(inside.cursor)
        if getattr(inside, "continuing", False):
            # It would wait for a group that only this thread (the committer) can lead.
            raise RuntimeError("a continuation given to the store must not call the store")
        unit = _Unit(work, write)
        unit.many, unit.args = many, args
        with self._line_lock:
            self._line.append(unit)
            unit.leads = len(self._line) == 1
        if not unit.leads:
            ready = unit.ready
            assert ready is not None
            if not ready.wait(_LOCK_WAIT_SECONDS):
                with self._line_lock:
                    if not unit.taken and not unit.leads:  # still in line behind a stuck group: give up
                        self._line.remove(unit)
                        raise StoreError("state database busy: another thread is waiting for it (locked from "
                                         "outside?)")
                ready.wait()  # taken into a group (bounded by SQLite's busy timeout), or leading now
            if unit.done:
                return unit.outcome()
        self._lead()
        return unit.outcome()

    def _submit(self, work: Callable[[sqlite3.Cursor], T], then: Callable[["_Unit[T]"], None], *,
                many: Callable[[sqlite3.Cursor, list[Any]], list[Any]] | None = None, args: Any = None) -> None:
        """Queue `work` as a unit of the next group commit and return at once, without waiting for it.

        `then(unit)` is called once the unit's group is done (`unit.outcome()` gives its result or raises), on
        the thread that committed it: it must be quick and must not call the store. A group whose first unit has
        no caller waiting is led by the `store-committer` thread. Units keep their order in the one line, so a
        unit submitted after another is committed with it or after it."""
        unit = _Unit(work, True, then)
        unit.many, unit.args = many, args
        with self._line_lock:
            closing = self._closing
            if not closing:
                self._line.append(unit)
                unit.leads = len(self._line) == 1
        if closing:
            unit.error = StoreError("state database closed: the gateway is stopping")
            then(unit)
        elif unit.leads:
            self._wake_committer()

    def _wake_committer(self) -> None:
        """Have the committer thread lead the group at the head of the line (starting the thread if needed)."""
        if self._committer is None or not self._committer.is_alive():
            with self._line_lock:
                if self._committer is None or not self._committer.is_alive():  # (also while closing: it drains)
                    self._committer = threading.Thread(target=self._commit_loop, name="store-committer", daemon=True)
                    self._committer.start()
        self._committer_wake.set()

    def _commit_loop(self) -> None:
        """The committer thread: lead every group whose first unit was submitted, until the store closes."""
        while True:
            self._committer_wake.wait()
            self._committer_wake.clear()
            while True:
                with self._line_lock:
                    head = self._line[0] if self._line else None
                    ours = head is not None and head.then is not None and head.leads and not head.taken
                    if head is None and self._closing:
                        return
                if not ours:
                    break
                try:
                    self._lead()
                except Exception:  # noqa: BLE001 - _lead settles every unit itself; the thread must go on
                    log.exception("the store's committer failed to commit a group; going on")

    def _lead(self) -> None:
        """Run and commit the group at the head of the line, then hand the lead to the first unit behind it."""
        with self._line_lock:
            group = list(itertools.islice(self._line, _GROUP_MAX))
            if self.shared:
                # One step per transaction: units of one kind lock their keys together, in one order; units of
                # different kinds in one transaction would lock theirs one after another, and two instances
                # doing so in different orders wait for each other (PostgreSQL ends one after a second).
                group = next(_steps(group))
            for unit in group:
                unit.taken = True
        woken: set[str] = set()
        try:
            woken = self._commit(group)
        finally:  # whatever happened, every unit of the group has its outcome and the line moves on
            with self._line_lock:
                for unit in group:
                    self._line.popleft()
                    unit.done = True
                successor = self._line[0] if self._line else None
                if successor is not None:
                    successor.leads = True
            for unit in group:
                if unit.ready is not None:
                    unit.ready.set()
            if successor is not None:
                if successor.ready is not None:
                    successor.ready.set()  # its caller leads next
                else:
                    self._wake_committer()
            self._continue(group)
        self._after_group()
        for target in woken:  # after the commit, outside every lock: a listener may use the store at once
            for listener in self._listeners:
                listener(target)

    def _continue(self, group: list[_Unit[Any]]) -> None:
        """Call the continuations of the group's submitted units, now that it is done."""
        self._inside.continuing = True
        try:
            for unit in group:
                if unit.then is not None:
                    try:
                        unit.then(unit)
                    except BaseException:  # noqa: BLE001 - nor end the committer: the others would never be called
                        log.exception("a store continuation failed")
        finally:
            self._inside.continuing = False

    def _commit(self, group: list[_Unit[Any]]) -> set[str]:
        """Run `group` in one transaction and commit it; return the targets given new work. Each unit ends
        with its result, or with the error that undid it (a failed commit undoes them all)."""
        steps = list(_steps(group))
        alone = len(steps) == 1  # no savepoint needed: a failure rolls back the whole transaction
        woken: set[str] = set()
        committing = False
        with self._lock:
            try:
                cur = self._cursor()
                self._begin(cur, any(unit.write for unit in group))
                self._inside.cursor = cur
                for step in steps:
                    self._new_work = set()
                    try:
                        if not alone:
                            cur.execute("SAVEPOINT unit")
                        if len(step) == 1:
                            step[0].result, step[0].error = step[0].work(cur), None
                        else:  # units of one kind, done together: a few statements for them all
                            for unit, outcome in zip(step, step[0].many(cur, [unit.args for unit in step])):
                                unit.result, unit.error = (None, outcome) if isinstance(outcome, Exception) else (
                                    outcome, None)
                        if not alone:
                            cur.execute("RELEASE unit")
                        woken |= self._new_work
                    except Exception as err:  # it becomes the outcome of the step's units, raised in their threads
                        for unit in step:
                            unit.result = None
                            unit.error = StoreError(f"state database error: {err}") if isinstance(
                                err, self._errors) else err
                        if not self._undo(cur, alone):
                            _fail(group, err)
                            return set()
                if not self._can_commit():  # the one step failed and was rolled back (or the database dropped it)
                    self._rollback()  # (PostgreSQL keeps a failed transaction open until told)
                    _fail(group, RuntimeError("the transaction was rolled back"))
                    return set()
                committing = True
                cur.execute("COMMIT")
                for unit in group:
                    unit.committed = unit.error is None
                return woken
            except self._errors as err:  # BEGIN, a savepoint or the commit failed: nothing of the group is stored
                self._rollback()
                _fail(group, err)
                return set()
            except BaseException:
                # The leader itself interrupted (SIGTERM arrives as KeyboardInterrupt in the main thread, wherever
                # it is: just after the call it waited in, or inside the work of another thread's unit it runs):
                # the interrupt is the leader's, so it goes on here, never handed to that other thread. A
                # transaction left open would refuse every later group: if the COMMIT went through the group is
                # stored, otherwise it is undone; the units not settled are told they were interrupted.
                if committing and not self._in_transaction():
                    for unit in group:
                        unit.committed = unit.error is None
                else:
                    self._rollback()
                raise
            finally:
                self._inside.cursor = None
                self._new_work = set()

    def _undo(self, cur: sqlite3.Cursor, alone: bool) -> bool:
        """Undo the unit that just failed; False if the whole transaction is gone (the database rolled it back)."""
        if alone:
            self._rollback()
            return True
        if not self._in_transaction():
            return False
        try:
            cur.execute("ROLLBACK TO unit")
            cur.execute("RELEASE unit")
            return True
        except self._errors:
            self._rollback()
            return False

    def _rollback(self) -> None:
        """Roll back the open transaction, if any; a failure here is ignored (the database discards it anyway)."""
        raise NotImplementedError

    # Updates

    def seen(self, update_id: int) -> bool:
        """Tell whether `update_id` was already stored."""
        def work(cur: sqlite3.Cursor) -> bool:
            return cur.execute("SELECT 1 FROM seen_updates WHERE update_id=?", (update_id,)).fetchone() is not None
        return self._run(work, write=False)

    def record_update(self, update_id: int, now: float, events: Iterable[NewEvent] = ()) -> bool:
        """Store the update unless its `update_id` was seen (and enqueue `events` with it); return whether it was new."""
        return self._run(self._recording(update_id, now, events))

    def record_update_later(self, update_id: int, now: float, events: Iterable[NewEvent],
                            then: Callable[["_Unit[bool]"], None]) -> None:
        """`record_update` without waiting: `then(unit)` once committed, `unit.outcome()` the result (see `_submit`)."""
        self._submit(self._recording(update_id, now, list(events)), then)

    def _recording(self, update_id: int, now: float, events: Iterable[NewEvent]) -> Callable[[sqlite3.Cursor], bool]:
        """The unit of work `record_update` runs."""
        def work(cur: sqlite3.Cursor) -> bool:
            if not self._mark_seen(cur, update_id, now):
                return False
            for event in events:
                self._enqueue(cur, event, now)
            return True
        return work

    def add_message(self, update_id: int, chat_id: int, user_id: int, user: dict[str, Any] | None,
                    item: dict[str, Any], now: float, max_messages: int, build: Builder,
                    admit: Callable[[], bool] | None = None) -> AddResult:
        """Store a message in its user's open batch (opening one if needed); a batch that reaches
        `max_messages` is closed into the outbox in the same transaction. A seen `update_id` changes nothing.

        `admit()` is asked once the update is known to be new (flood control): False holds the message back,
        counted for the user's next batch (`held`). The result's batch carries no messages unless it closed."""
        adding = self._adding(update_id, chat_id, user_id, user, item, now, max_messages, build, admit)
        return self._run(lambda cur: _only(self._add_messages(cur, [adding])), many=self._add_messages, args=adding)

    def add_message_later(self, update_id: int, chat_id: int, user_id: int, user: dict[str, Any] | None,
                          item: dict[str, Any], now: float, max_messages: int, build: Builder,
                          admit: Callable[[], bool] | None, then: Callable[["_Unit[AddResult]"], None]) -> None:
        """`add_message` without waiting: `then(unit)` once committed, `unit.outcome()` the result (see `_submit`)."""
        adding = self._adding(update_id, chat_id, user_id, user, item, now, max_messages, build, admit)
        self._submit(lambda cur: _only(self._add_messages(cur, [adding])), then, many=self._add_messages, args=adding)

    def _adding(self, update_id: int, chat_id: int, user_id: int, user: dict[str, Any] | None,
                item: dict[str, Any], now: float, max_messages: int, build: Builder,
                admit: Callable[[], bool] | None) -> "_Adding":
        """What `_add_messages` needs of one message, serialized now: the thread committing everyone's units
        should do only the SQL."""
        return _Adding(update_id, chat_id, user_id, user, _strict_json(user), _strict_json(item), now, max_messages,
                       build, admit, next(self._batch_ids))

    def _add_messages(self, cur: sqlite3.Cursor, adds: list["_Adding"]) -> list[AddResult | Exception]:
        """Store messages in their batches, in their order, as `add_message` does each; each one's result, or the
        error that kept it out (its `admit()` failed, an id SQLite cannot hold).

        A few statements for them all, whatever their number: each statement executed hands the GIL over and
        back, and under a burst other threads hold it for a while each time. So the rows are decided here and
        written with one statement per table, each taking its rows as one JSON array."""
        results: list[AddResult | Exception | None] = [None] * len(adds)
        if self.shared:  # other instances may add to these batches or close them meanwhile: they take turns
            self._lock_keys(cur, [_batch_key(add.chat_id, add.user_id) for add in adds if _fits(add)])
        fitting = [add for add in adds if _fits(add)]
        # One statement asks both which updates are stored and the open batches of the group's users.
        stored, open_batches = cur.execute(self._sql["known_and_open"], (
            json.dumps([add.update_id for add in fitting]),
            json.dumps(sorted({(add.chat_id, add.user_id) for add in fitting})))).fetchone()
        known = set(json.loads(stored))
        seen: list[tuple[int, float]] = []
        taken: list[int] = []
        for index, add in enumerate(adds):
            if not _fits(add):
                results[index] = OverflowError("Python int too large to convert to a 64-bit INTEGER")
                continue
            if add.update_id in known:
                results[index] = AddResult(new=False)
                continue
            try:
                admitted = add.admit is None or add.admit()
            except Exception as err:  # noqa: BLE001 - that message's outcome; the others go on
                results[index] = err
                continue
            known.add(add.update_id)
            seen.append((add.update_id, add.now))
            taken.append(index)
            if not admitted:
                results[index] = AddResult(new=True, held=True)
        if taken:  # (the seen are among them)
            self._batch_messages(cur, adds, taken, results, seen, open_batches)
        return results  # type: ignore[return-value]

    def _batch_messages(self, cur: sqlite3.Cursor, adds: list["_Adding"], taken: list[int],
                        results: list[AddResult | Exception | None], seen: list[tuple[int, float]],
                        open_batches: str) -> None:
        """Put the `taken` messages into their batches (opening them, counting them, closing the full ones), or
        count them as held back (those already given a held result), in their order: a batch closed counts only
        the messages held before it.

        The batches that fill up are closed after the loop, all with a few statements: under a burst of users
        filling their batches together, closing each on its own took ten statements (and ten hand-overs of the
        GIL) per batch, inside the group every waiting message shares."""
        # key -> [batch_id, count, first_at] of its open batch
        batches: dict[tuple[int, int], list[Any]] = {(row[0], row[1]): row[2:] for row in json.loads(open_batches)}
        changed: dict[tuple[int, int], list[Any]] = {}  # key -> the batches row to write
        messages: list[tuple[str, int, str]] = []
        held: list[tuple[int, int]] = []
        # The batches filling up: (index, key, [batch_id, count, first_at], held in this group before it, first
        # of its key here: then the held counted before this group are its too).
        closing: list[tuple[int, tuple[int, int], list[Any], int, bool]] = []
        held_here: dict[tuple[int, int], int] = {}  # a closing key -> held in this group since its last closing

        for index in taken:
            add = adds[index]
            key = (add.chat_id, add.user_id)
            if results[index] is not None:  # held back by flood control
                if key in held_here:
                    held_here[key] += 1
                else:
                    held.append(key)
                continue
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = [add.new_batch_id, 0, add.now]
            batch[1] += 1
            batch_id, count, first_at = batch[0], batch[1], float(batch[2])
            changed[key] = [batch_id, add.chat_id, add.user_id, add.user_json, first_at, add.now, count]
            messages.append((batch_id, count, add.item_json))
            if count >= add.max_messages:
                first = key not in held_here
                before = sum(1 for other in held if other == key) if first else held_here[key]
                if first:
                    held[:] = [other for other in held if other != key]  # counted for this batch, never stored
                closing.append((index, key, batch, before, first))
                held_here[key] = 0
                del batches[key], changed[key]  # the user's next message opens a new one
            else:
                results[index] = AddResult(new=True, batch=BatchRow(batch_id, add.chat_id, add.user_id, add.user,
                                                                    first_at, add.now, count))
        held_counts = collections.Counter(held)
        closing_ids = _column(batch[0] for _, _, batch, _, _ in closing) if closing else ""
        if closing:
            self._close_filled(cur, closing, closing_ids)
            held_counts.update(held_here)  # held after their key's last closing: for the next batch
        self._write_rows(cur, seen, [[*key, n] for key, n in held_counts.items() if n], list(changed.values()),
                         messages)
        if closing:
            self._close_filled_items(cur, adds, closing, closing_ids, results)

    def _write_rows(self, cur: sqlite3.Cursor, seen: list[tuple[int, float]], held: list[list[int]],
                    batches: list[list[Any]], messages: list[tuple[str, int, str]]) -> None:
        """Write a group's new rows: updates seen, held counts ([chat, user, how many more]), batches, their
        messages (one statement each)."""
        for (name, _), rows in zip(_INGEST_COLUMNS, (seen, held, batches, messages)):
            if rows:
                cur.execute(self._sql[name], (json.dumps(rows),))

    def _close_filled(self, cur: sqlite3.Cursor, closing: list[tuple[int, tuple[int, int], list[Any], int, bool]],
                      ids: str) -> None:
        """The first half of closing the batches that filled up in a group, before its rows are written: their
        batches rows go (a new batch of the same user is written next) and so do the held counts stored before
        the group, which their first closing batch takes. `ids`: their batch ids (`_column`)."""
        cur.execute(f"DELETE FROM batches WHERE batch_id IN ({self._rows('text')})", (ids,))
        firsts = sorted({key for _, key, _, _, first in closing if first})
        pairs = self._rows("bigint", "bigint")
        stored = {(row[0], row[1]): row[2] for row in cur.execute(
            f"SELECT chat_id, user_id, held FROM flood_held WHERE (chat_id, user_id) IN ({pairs})",
            (json.dumps(firsts),)).fetchall()}
        if stored:
            cur.execute(f"DELETE FROM flood_held WHERE (chat_id, user_id) IN ({pairs})", (json.dumps(sorted(stored)),))
        for n, (index, key, batch, before, first) in enumerate(closing):
            if first and key in stored:
                closing[n] = (index, key, batch, before + stored[key], first)

    def _close_filled_items(self, cur: sqlite3.Cursor, adds: list["_Adding"],
                            closing: list[tuple[int, tuple[int, int], list[Any], int, bool]], ids: str,
                            results: list[AddResult | Exception | None]) -> None:
        """The second half, once every message is written: each closing batch read back whole, its rows deleted,
        its event put in the outbox."""
        items: dict[str, list[tuple[int, Any]]] = {}
        for batch_id, seq, item in json.loads(cur.execute(self._ITEMS_OF.format(ids=self._rows("text")),
                                                          (ids,)).fetchone()[0]):
            items.setdefault(batch_id, []).append((seq, item))
        cur.execute(f"DELETE FROM batch_messages WHERE batch_id IN ({self._rows('text')})", (ids,))
        events = []
        for index, key, batch, held, _ in closing:
            add = adds[index]
            closed = BatchRow(batch[0], add.chat_id, add.user_id, json.loads(add.user_json), float(batch[2]),
                              add.now, batch[1], [item for _, item in sorted(items.get(batch[0], []),
                                                                             key=lambda pair: pair[0])], held)
            events.append((add.build(closed, "max_messages"), add.now))
            results[index] = AddResult(new=True, batch=closed, closed=True)
        self._enqueue_new(cur, events)

    def _enqueue_new(self, cur: sqlite3.Cursor, queued: list[tuple[NewEvent, float]]) -> None:
        """`_enqueue` for new events (none replacing another), each with its time (`now`), all with two
        statements, in their order."""
        events = [event for event, _ in queued]
        keys = sorted({event.order_key for event in events})
        self._lock_keys(cur, [_order_key(key) for key in keys])
        live = set(json.loads(cur.execute(self._LIVE_KEYS_OF.format(keys=self._rows("text")),
                                          (_column(keys),)).fetchone()[0]))
        rows = []
        for event, now in queued:
            head = event.order_key not in live
            live.add(event.order_key)
            rows.append([event.event_id, event.order_key, event.event_type, event.target,
                         _strict_json(event.payload), now, now if event.due_at is None else event.due_at, int(head)])
        added = cur.execute(
            f"INSERT INTO outbox ({_NEW_OUTBOX_COLUMNS}) "
            f"{self._rows('text', 'text', 'text', 'text', 'text', 'float8', 'float8', 'bigint')} "
            "WHERE true ON CONFLICT DO NOTHING", (json.dumps(rows),)).rowcount
        if added < len(rows):  # an event id already stored: a queue may have lost the head it was given
            for key in keys:
                cur.execute(_PROMOTE_HEAD_IF_NONE, (key, key))
        if added:
            self._new_work.update(event.target for event in events)

    def close_batch_if_due(self, chat_id: int, user_id: int, now: float,
                           due: Callable[[BatchRow], tuple[float, str]], build: Builder) -> tuple[bool, float | None]:
        """Close the user's open batch into the outbox if `due(batch)` says its time (`now`) has come.

        Returns (closed, deadline): (True, None) when closed, (False, at) when it is due later at `at`,
        (False, None) when there is no open batch."""
        def work(cur: sqlite3.Cursor) -> tuple[bool, float | None]:
            self._lock_keys(cur, [_batch_key(chat_id, user_id)])
            return self._close_many_if_due(cur, [(chat_id, user_id)], now, due, build)[0]
        return self._run(work)

    def close_batches_if_due(self, keys: list[tuple[int, int]], now: float,
                             due: Callable[[BatchRow], tuple[float, str]],
                             build: Builder) -> list[tuple[bool, float | None]]:
        """`close_batch_if_due` for several users' batches (`keys`: (chat_id, user_id)) in one transaction, so with
        one commit for them all; each key's (closed, deadline), in their order. If one fails, none is closed."""
        def work(cur: sqlite3.Cursor) -> list[tuple[bool, float | None]]:
            self._lock_keys(cur, [_batch_key(chat_id, user_id) for chat_id, user_id in keys])
            return self._close_many_if_due(cur, keys, now, due, build)
        return self._run(work)

    def _close_many_if_due(self, cur: sqlite3.Cursor, keys: list[tuple[int, int]], now: float,
                           due: Callable[[BatchRow], tuple[float, str]],
                           build: Builder) -> list[tuple[bool, float | None]]:
        """Close the batches of these users (their keys held) whose time (`now`) has come by `due(batch)`; for
        each key (closed, None), (False, when it is due) or (False, None) for no open batch. Every event is built
        first, then every chat queue they join locked at once, in one order, then the events queued."""
        outcomes: list[tuple[bool, float | None]] = []
        closing: list[tuple[BatchRow, NewEvent]] = []
        for chat_id, user_id in keys:
            batch = self._load_batch(cur, chat_id, user_id)
            at, reason = due(batch) if batch is not None else (0.0, "")
            if batch is None or at > now:
                outcomes.append((False, None if batch is None else at))
                continue
            closing.append((batch, build(batch, reason)))
            outcomes.append((True, None))
        # On a shared database, two transactions (instances) locking the same chats' queues one at a time, in
        # different orders, would wait for each other.
        self._lock_keys(cur, [_order_key(event.order_key) for _, event in closing])
        for batch, event in closing:
            self._close_built(cur, batch, event, now)
        return outcomes

    def close_due_batches(self, now: float, quiet_seconds: float, max_wait_seconds: float,
                          due: Callable[[BatchRow, float], tuple[float, str]], build: Builder,
                          limit: int = 100) -> list[BatchRow]:
        """Close up to `limit` open batches whose deadline has passed, whoever stored them (the sweep every
        instance of a shared database runs, so that the batches of an instance that died are closed too):
        those quiet for `quiet_seconds` or open for `max_wait_seconds` are looked at, `due(batch, now)` decides.
        A batch another transaction is busy with is left for the next sweep. Returns the batches closed."""
        def work(cur: sqlite3.Cursor) -> list[BatchRow]:
            at = now
            keys = cur.execute("SELECT chat_id, user_id FROM batches WHERE last_at <= ? OR first_at <= ? "
                               "ORDER BY first_at LIMIT ?",
                               (at - quiet_seconds, at - max_wait_seconds, limit)).fetchall()
            closed: list[BatchRow] = []

            def keep(batch: BatchRow, reason: str) -> NewEvent:
                closed.append(batch)
                return build(batch, reason)

            held = [(chat_id, user_id) for chat_id, user_id in keys
                    if self._try_lock_key(cur, _batch_key(chat_id, user_id))]
            self._close_many_if_due(cur, held, at, lambda batch: due(batch, at), keep)
            return closed
        return self._run(work)

    def open_batches(self) -> list[BatchRow]:
        """Every open batch (without messages), for rescheduling after a restart."""
        def work(cur: sqlite3.Cursor) -> list[BatchRow]:
            rows = cur.execute("SELECT batch_id, chat_id, user_id, user_json, first_at, last_at, count "
                               "FROM batches ORDER BY first_at").fetchall()
            return [BatchRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6]) for r in rows]
        return self._run(work, write=False)

    def last_update_id(self) -> int | None:
        """The highest update id remembered, or None."""
        def work(cur: sqlite3.Cursor) -> int | None:
            return cur.execute("SELECT MAX(update_id) FROM seen_updates").fetchone()[0]
        return self._run(work, write=False)

    def prune_seen(self, before: float) -> int:
        """Forget update ids received before `before` (wall clock); return how many."""
        def work(cur: sqlite3.Cursor) -> int:
            return cur.execute("DELETE FROM seen_updates WHERE received_at < ?", (before,)).rowcount
        return self._run(work)

    # Outbox

    def enqueue_event(self, event: NewEvent, now: float) -> bool:
        """Put `event` in the outbox unless its `event_id` is already there; return whether it was added."""
        def work(cur: sqlite3.Cursor) -> bool:
            return self._enqueue(cur, event, now)
        return self._run(work)

    def enqueue_events(self, events: Iterable[NewEvent], now: float) -> int:
        """Put several events in the outbox in one transaction (each unless already there); return how many were added."""
        def work(cur: sqlite3.Cursor) -> int:
            return sum(self._enqueue(cur, event, now) for event in events)
        return self._run(work)

    def reset_inflight(self, target: str = "make", now: float | None = None) -> int:
        """Make rows of `target` that no live instance holds (left in flight by a crash) deliverable again; return
        how many. With one process that is every row in flight; on a shared database, those whose lease ran out."""
        def work(cur: sqlite3.Cursor) -> int:
            left, params = self._left_in_flight(target, now)
            count = cur.execute(f"UPDATE outbox SET status='pending' WHERE {left}", params).rowcount
            if count:
                self._new_work.add(target)
            return count
        return self._run(work)

    def _left_in_flight(self, target: str, now: float | None) -> tuple[str, tuple[Any, ...]]:
        """The condition for the rows of `target` in flight that no live instance holds (with one process, every
        one; on a shared database, those whose lease ran out by `now`), and its parameters."""
        if not self.shared:
            return "status='inflight' AND target=?", (target,)
        return "status='inflight' AND target=? AND lease_until < ?", (target, time.time() if now is None else now)

    def repair_heads(self) -> int:
        """Give every queue that has live events but no head one (its oldest); return how many were repaired.
        Nothing the gateway does leaves a queue headless; this guards the start against a file changed by hand."""
        def work(cur: sqlite3.Cursor) -> int:
            headless = [r[0] for r in cur.execute(
                "SELECT order_key FROM outbox WHERE status IN ('pending', 'inflight') GROUP BY order_key "
                "HAVING MAX(is_head) = 0")]
            for order_key, target in ((k, cur.execute("SELECT target FROM outbox WHERE order_key=? LIMIT 1",
                                                      (k,)).fetchone()[0]) for k in headless):
                self._lock_keys(cur, [_order_key(order_key)])
                self._promote(cur, order_key, target)
            return len(headless)
        return self._run(work)

    def claim_due_events(self, now: float, target: str = "make", limit: int = 1,
                         lease_seconds: float = LEASE_SECONDS) -> list[OutboxRow]:
        """Mark in flight and return up to `limit` due events of `target`, each the head of its order key's
        queue (so never two of one key), earliest due first, atomically. Costs the same however long the queues.

        Each row is leased for `lease_seconds`: its outcome is recorded only with the lease's token (`lease=`
        of the settling methods), and on a shared database a row whose lease ran out (its instance died) is
        claimed again here, with a new token, so that the late answer of the first claim is refused."""
        def work(cur: sqlite3.Cursor) -> list[OutboxRow]:
            at = now
            ids = [r[0] for r in cur.execute(
                "SELECT id FROM outbox WHERE is_head = 1 AND status = 'pending' AND target = ? "
                f"AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?{self._CLAIMING}", (target, at, limit))]
            was_on_wire: set[int] = set()
            if self.shared and len(ids) < limit:
                for row_id, on_wire in cur.execute(
                        "SELECT id, on_wire FROM outbox WHERE status = 'inflight' AND target = ? AND lease_until < ? "
                        f"ORDER BY lease_until LIMIT ?{self._CLAIMING}", (target, at, limit - len(ids))).fetchall():
                    ids.append(row_id)
                    if on_wire:
                        was_on_wire.add(row_id)
            if not ids:
                return []
            lease = next(self._lease_tokens)
            chosen = _column(ids)
            # A row claimed again keeps its mark: should this claim end unsettled too, the next must still know
            # that the call may have arrived. (One statement for all, and one to read them back: each statement
            # hands the GIL over and back, and a claim shares its group with everyone's messages.)
            cur.execute("UPDATE outbox SET status='inflight', attempts=attempts+1, lease_until=?, lease_token=?, "
                        "on_wire=CASE WHEN status='inflight' THEN on_wire ELSE 0 END "
                        f"WHERE id IN ({self._rows('bigint')})", (at + lease_seconds, lease, chosen))
            rows = {r[0]: r for r in json.loads(cur.execute(self._OUTBOX_ROWS_OF.format(ids=self._rows("bigint")),
                                                            (chosen,)).fetchone()[0])}
            return [_outbox_row_from(rows[row_id], row_id in was_on_wire) for row_id in ids]
        return self._run(work)

    def renew_leases(self, leases: Iterable[tuple[int, str]], until: float) -> int:
        """Extend to `until` the leases (row id, token) still held; return how many were."""
        def work(cur: sqlite3.Cursor) -> int:
            return sum(cur.execute("UPDATE outbox SET lease_until=? WHERE id=? AND lease_token=? AND status='inflight'",
                                   (until, row_id, lease)).rowcount for row_id, lease in leases)
        return self._run(work)

    def holds_lease(self, row_id: int, lease: str | None) -> bool:
        """Whether the row is still in flight under the claim of `lease` (nobody claimed it again)."""
        return self._run(lambda cur: lease is not None and self._holds(cur, row_id, lease, lock=False), write=False)

    def mark_on_wire(self, row_id: int, *, lease: str | None = None) -> None:
        """Record that the call of an in-flight row has begun to go out (it may arrive from now on). Raises
        `StoreError` if the row is no longer this claim's (`lease`): then the call must not go out."""
        def work(cur: sqlite3.Cursor) -> None:
            if not self._holds(cur, row_id, lease):
                raise StoreError("the row was claimed again by another instance: not sent from here")
            cur.execute("UPDATE outbox SET on_wire=1 WHERE id=? AND status='inflight'", (row_id,))
        return self._run(work)

    def interrupted_on_wire(self, target: str, now: float | None = None) -> list[OutboxRow]:
        """Rows of `target` a crash or a slow stop left in flight after their call began to go out (on a shared
        database, only those whose lease ran out: the others are live instances' calls)."""
        def work(cur: sqlite3.Cursor) -> list[OutboxRow]:
            left, params = self._left_in_flight(target, now)
            ids = [r[0] for r in cur.execute(f"SELECT id FROM outbox WHERE {left} AND on_wire=1 ORDER BY id", params)]
            return [self._outbox_row(cur, row_id) for row_id in ids]
        return self._run(work, write=False)

    def claim_due_event(self, now: float, target: str = "make") -> OutboxRow | None:
        """Claim the earliest due event of `target` that heads its queue (see `claim_due_events`), or None."""
        rows = self.claim_due_events(now, target, 1)
        return rows[0] if rows else None

    def release_claims(self, row_ids: Iterable[int], due_at: float, *, lease: str | None = None) -> None:
        """Put claimed rows that were never sent back in their queues, due at `due_at`, the attempt not counted
        (those no longer this claim's, `lease`, are left to their new claim)."""
        def work(cur: sqlite3.Cursor) -> None:
            for row_id in row_ids:
                if self._holds(cur, row_id, lease):
                    cur.execute("UPDATE outbox SET status='pending', attempts=attempts-1, next_attempt_at=? "
                                "WHERE id=? AND status='inflight'", (due_at, row_id))
        return self._run(work)

    def mark_delivered(self, row_id: int, followups: Iterable[NewEvent] = (), now: float = 0.0, *,
                       next_not_before: float | None = None, lease: str | None = None) -> set[str]:
        """Delivered: the event leaves the outbox (its queue's next event heads it, due no earlier than
        `next_not_before` if given) and `followups` (e.g. Make's replies) enter it, atomically. Returns the
        event ids of the followups that took effect. With `lease`, nothing is written (and nothing returned) if
        the row is no longer that claim's: another instance claimed it again and records its own outcome."""
        followups = list(followups)
        if not followups and next_not_before is None and not self.shared:
            # Make's answer asked for nothing: settled with a few statements together with the others waiting,
            # as a backlog's calls end dozens at a time. (A shared database locks each row first, one by one.)
            return self._run(lambda cur: _only(self._delivered(cur, [(row_id, lease)])),
                             many=self._delivered, args=(row_id, lease))

        def work(cur: sqlite3.Cursor) -> set[str]:
            if not self._holds(cur, row_id, lease):
                return set()
            found = self._leaving(cur, row_id)
            cur.execute("DELETE FROM outbox WHERE id=?", (row_id,))
            if found is not None:
                self._promote(cur, *found)
                if next_not_before is not None:  # pacing: the chat's next message waits its turn, durably
                    cur.execute("UPDATE outbox SET next_attempt_at = ? WHERE order_key=? AND is_head=1 "
                                "AND status='pending' AND next_attempt_at < ?",
                                (next_not_before, found[0], next_not_before))
            return {event.event_id for event in followups if self._enqueue(cur, event, now)}
        return self._run(work)

    def _delivered(self, cur: sqlite3.Cursor, settles: list[tuple[int, str | None]]) -> list[set[str]]:
        """`mark_delivered` of rows (id, lease) without followups or pacing, with three statements for them all."""
        ids = _column(row_id for row_id, _ in settles)
        found = {r[0]: r[1:] for r in json.loads(cur.execute(self._OUTBOX_STATES_OF.format(ids=self._rows("bigint")),
                                                             (ids,)).fetchone()[0])}
        leaving = {row_id: found[row_id] for row_id, lease in settles if row_id in found and (
            lease is None or (found[row_id][0] == lease and found[row_id][1] == "inflight"))}
        if leaving:
            cur.execute(f"DELETE FROM outbox WHERE id IN ({self._rows('bigint')})",
                        (_column(leaving),))
            keys = sorted({state[2] for state in leaving.values()})
            if cur.execute(_PROMOTE_HEADS.format(keys=self._rows("text")), (_column(keys),)
                           ).rowcount:
                self._new_work.update(state[3] for state in leaving.values())
        return [set() for _ in settles]

    def mark_failed(self, row_id: int, next_attempt_at: float, error: str, dead: bool = False, *,
                    lease: str | None = None) -> bool:
        """Not delivered: try again at `next_attempt_at`, or keep it as a dead letter (its queue moves on).
        Returns False, writing nothing, if the row is no longer the claim's of `lease`."""
        def work(cur: sqlite3.Cursor) -> bool:
            if not self._holds(cur, row_id, lease):
                return False
            if not dead:
                cur.execute("UPDATE outbox SET status='pending', next_attempt_at=?, last_error=? WHERE id=?",
                            (next_attempt_at, error, row_id))
                return True
            found = self._leaving(cur, row_id)
            cur.execute("UPDATE outbox SET status='dead', is_head=0, next_attempt_at=?, last_error=? WHERE id=?",
                        (next_attempt_at, error, row_id))
            if found is not None:
                self._promote(cur, *found)
            return True
        return self._run(work)

    def retry_with(self, row_id: int, payload: dict[str, Any], next_attempt_at: float, error: str, *,
                   lease: str | None = None) -> None:
        """Not delivered: try again at `next_attempt_at` with `payload` instead (e.g. a reply without the
        formatting Telegram refused), in the same place in its queue (unless no longer the claim's of `lease`)."""
        body = _strict_json(payload)
        def work(cur: sqlite3.Cursor) -> None:
            if self._holds(cur, row_id, lease):
                cur.execute("UPDATE outbox SET status='pending', payload=?, next_attempt_at=?, last_error=? "
                            "WHERE id=?", (body, next_attempt_at, error, row_id))
        return self._run(work)

    def next_attempt_at(self, target: str = "make") -> float | None:
        """When the earliest event for `target` that heads its queue becomes due (wall clock), or None; on a shared
        database also when the earliest lease of `target` runs out (its row may then be claimed again)."""
        def work(cur: sqlite3.Cursor) -> float | None:
            due = cur.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE is_head = 1 AND status = 'pending' "
                              "AND target = ?", (target,)).fetchone()[0]
            if not self.shared:
                return due
            lease = cur.execute("SELECT MIN(lease_until) FROM outbox WHERE status = 'inflight' AND target = ?",
                                (target,)).fetchone()[0]
            return min((t for t in (due, lease) if t is not None), default=None)
        return self._run(work, write=False)

    def outbox_stats(self, now: float) -> dict[str, Any]:
        """Pending, in-flight and dead counts, and the oldest undelivered event's age in seconds (read from
        counters and an index: as cheap with a backlog of 100,000 as with none)."""
        def work(cur: sqlite3.Cursor) -> tuple[dict[str, int], float | None]:
            counts = dict(cur.execute(self._COUNTS).fetchall())
            oldest = cur.execute("SELECT MIN(created_at) FROM outbox WHERE status IN ('pending', 'inflight')"
                                 ).fetchone()[0]
            return counts, oldest
        counts, oldest = self._run(work, write=False)
        return {
            "outbox_pending": counts.get("outbox:pending", 0) + counts.get("outbox:inflight", 0),
            "outbox_inflight": counts.get("outbox:inflight", 0),
            "outbox_dead": counts.get("outbox:dead", 0),
            "outbox_oldest_age_seconds": round(now - oldest, 3) if oldest is not None else None,
            "stored_open_batches": counts.get("batches", 0),
        }

    def dead_events(self) -> list[OutboxRow]:
        """The dead letters, oldest first (a read: no write lock)."""
        def work(cur: sqlite3.Cursor) -> list[OutboxRow]:
            ids = [r[0] for r in cur.execute("SELECT id FROM outbox WHERE status='dead' ORDER BY id")]
            return [self._outbox_row(cur, i) for i in ids]
        return self._run(work, write=False)

    def replay_dead(self, now: float) -> int:
        """Make every dead letter pending again (due now, its age reset); return how many."""
        def work(cur: sqlite3.Cursor) -> int:
            count = cur.execute("UPDATE outbox SET status='pending', next_attempt_at=?, created_at=? "
                                "WHERE status='dead'", (now, now)).rowcount
            # A replayed letter is older than what queued behind it, so it heads its queue again, except
            # where an event is in flight right now: that one stays head and the letter follows it.
            idle = ("status IN ('pending', 'inflight') AND order_key NOT IN "
                    "(SELECT order_key FROM outbox WHERE status = 'inflight')")
            cur.execute(f"UPDATE outbox SET is_head = 0 WHERE is_head = 1 AND {idle}")
            cur.execute(f"UPDATE outbox SET is_head = 1 WHERE {idle} AND id = (SELECT MIN(p.id) FROM outbox p "
                        "WHERE p.order_key = outbox.order_key AND p.status IN ('pending', 'inflight'))")
            if count:
                self._new_work.update(r[0] for r in cur.execute("SELECT DISTINCT target FROM outbox "
                                                                  "WHERE is_head = 1 AND status = 'pending'"))
            return count
        return self._run(work)

    # Payments

    def decide_checkout(self, update_id: int, query_id: str, payload: str, user_id: int, now: float,
                        hold_seconds: float) -> str:
        """Decide buyer `user_id`'s pre-checkout durably: `paid` (a one-off payment paid the payload), `busy`
        (another buyer's checkout holds it), `ok` (now held for this buyer for `hold_seconds`, replacing
        their earlier hold), or `duplicate` (this update was seen)."""
        def work(cur: sqlite3.Cursor) -> str:
            if not self._mark_seen(cur, update_id, now):
                return "duplicate"
            self._lock_keys(cur, [_payload_key(payload)])  # two buyers' checkouts at two instances take turns
            at = now
            if cur.execute("SELECT 1 FROM paid_payloads WHERE payload=?", (payload,)).fetchone():
                return "paid"
            # A subscription's payload is sold to every subscriber alike: one buyer's checkout holds it
            # against nobody else.
            shared = cur.execute("SELECT 1 FROM subscription_payloads WHERE payload=?", (payload,)).fetchone()
            if not shared and cur.execute(
                    "SELECT 1 FROM checkout_holds WHERE payload=? AND user_id<>? AND expires_at>? LIMIT 1",
                    (payload, user_id, at)).fetchone():
                return "busy"
            cur.execute("INSERT INTO checkout_holds VALUES (?, ?, ?, ?) ON CONFLICT (payload, user_id) DO UPDATE "
                        "SET query_id=excluded.query_id, expires_at=excluded.expires_at",
                        (payload, user_id, query_id, at + hold_seconds))
            cur.execute("DELETE FROM checkout_holds WHERE expires_at <= ?", (at,))
            return "ok"
        return self._run(work)

    def holds(self, payload: str, query_id: str, now: float) -> bool:
        """Tell whether checkout `query_id` holds `payload` at `now`."""
        def work(cur: sqlite3.Cursor) -> bool:
            return cur.execute("SELECT 1 FROM checkout_holds WHERE payload=? AND query_id=? AND expires_at > ?",
                               (payload, query_id, now)).fetchone() is not None
        return self._run(work, write=False)

    def release_checkout(self, payload: str, query_id: str) -> None:
        """Drop the hold a refused checkout placed on `payload` (unless a newer checkout of its buyer replaced it)."""
        def work(cur: sqlite3.Cursor) -> None:
            cur.execute("DELETE FROM checkout_holds WHERE payload=? AND query_id=?", (payload, query_id))
        return self._run(work)

    def record_payment(self, update_id: int, charge_id: str, payload: str, user_id: int | None, currency: str,
                       total_amount: int, body: dict[str, Any], now: float,
                       build: Callable[[bool], list[NewEvent]], recurring: bool = False) -> tuple[bool, bool]:
        """Record a successful payment once per charge id, mark its payload paid (or, `recurring`, a
        subscription's payload, which is never paid), and enqueue the events `build(duplicate)` returns, all
        in one transaction. Returns (new, duplicate): `duplicate` when a one-off payment's payload had already
        been paid by another charge; a subscription payment is never one."""
        def work(cur: sqlite3.Cursor) -> tuple[bool, bool]:
            if not self._mark_seen(cur, update_id, now):
                return False, False
            self._lock_keys(cur, [_payload_key(payload)])
            if cur.execute("SELECT 1 FROM payments WHERE charge_id=?", (charge_id,)).fetchone():
                return False, False
            duplicate = not recurring and cur.execute("SELECT 1 FROM paid_payloads WHERE payload=?",
                                                      (payload,)).fetchone() is not None
            cur.execute("INSERT INTO payments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (charge_id, payload, user_id, currency, total_amount, int(duplicate), now,
                         json.dumps(body, ensure_ascii=True)))
            if recurring:
                # Renewals repeat the payload, and other subscribers share it: the buyer's own checkout is done.
                cur.execute("INSERT INTO subscription_payloads VALUES (?, ?) ON CONFLICT DO NOTHING", (payload, now))
                cur.execute("DELETE FROM checkout_holds WHERE payload=? AND user_id=?", (payload, user_id))
            else:
                if not duplicate:
                    cur.execute("INSERT INTO paid_payloads VALUES (?, ?, ?)", (payload, charge_id, now))
                cur.execute("DELETE FROM checkout_holds WHERE payload=?", (payload,))
            for event in build(duplicate):
                self._enqueue(cur, event, now)
            return True, duplicate
        return self._run(work)

    def record_refund(self, update_id: int, charge_id: str, payload: str, body: dict[str, Any], now: float,
                      events: list[NewEvent]) -> bool:
        """Record a refund once per charge id (its payload is no longer paid) and enqueue `events`."""
        def work(cur: sqlite3.Cursor) -> bool:
            if not self._mark_seen(cur, update_id, now):
                return False
            self._lock_keys(cur, [_payload_key(payload)])
            if cur.execute("INSERT INTO refunds VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           (charge_id, payload, now, _strict_json(body))).rowcount == 0:
                return False
            cur.execute("DELETE FROM paid_payloads WHERE payload=? AND charge_id=?", (payload, charge_id))
            for event in events:
                self._enqueue(cur, event, now)
            return True
        return self._run(work)

    def payments_count(self) -> int:
        """How many payments are recorded (a kept count, not a scan)."""
        def work(cur: sqlite3.Cursor) -> int:
            return cur.execute(self._PAYMENTS_COUNT).fetchone()[0]
        return self._run(work, write=False)

    def check_writable(self, now: float) -> None:
        """Raise `StoreError` unless a small write commits now (locked, read-only or full: it does not)."""
        def work(cur: sqlite3.Cursor) -> None:
            cur.execute("INSERT INTO meta VALUES ('ready_check', ?) ON CONFLICT (key) DO UPDATE "
                        "SET value=excluded.value", (repr(now),))
        return self._run(work)

    # Small facts

    def get_meta(self, key: str) -> str | None:
        """Read one stored fact, or None."""
        def work(cur: sqlite3.Cursor) -> str | None:
            row = cur.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return row[0] if row else None
        return self._run(work, write=False)

    def set_meta(self, key: str, value: str) -> None:
        """Store one fact."""
        def work(cur: sqlite3.Cursor) -> None:
            cur.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                        (key, value))
        return self._run(work)

    def close(self) -> None:
        """Close the database (and release the instance lock); safe to call twice. Units submitted before are
        committed first (or fail, if that takes more than a few seconds); those submitted after fail."""
        with self._line_lock:
            self._closing = True
        # What was queued is committed first (by its callers, or by the committer, which leaves once the line is
        # empty), a few seconds at most.
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while time.monotonic() < deadline:
            with self._line_lock:
                if not self._line:
                    break
            self._committer_wake.set()
            time.sleep(0.01)
        if self._committer is not None:
            self._committer_wake.set()
            self._committer.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._close_db()

    # Inside a transaction

    @staticmethod
    def _mark_seen(cur: sqlite3.Cursor, update_id: int, now: float) -> bool:
        return cur.execute("INSERT INTO seen_updates VALUES (?, ?) ON CONFLICT DO NOTHING",
                           (update_id, now)).rowcount == 1

    def _enqueue(self, cur: sqlite3.Cursor, event: NewEvent, now: float) -> bool:
        # Strict here (ValueError, nothing written) so that no stored event can fail to serialize when sent.
        payload = _strict_json(event.payload)
        due = now if event.due_at is None else event.due_at
        if event.replace:
            done = cur.execute("UPDATE outbox SET payload=?, next_attempt_at=? WHERE event_id=? AND status='pending'",
                               (payload, due, event.event_id)).rowcount == 1
        else:
            # The first live row of its order key heads the queue; later ones wait to be promoted. (Another
            # instance's transaction may be adding to or emptying the same queue: they take turns.)
            self._lock_keys(cur, [_order_key(event.order_key)])
            head = cur.execute("SELECT 1 FROM outbox WHERE order_key=? AND status IN ('pending', 'inflight') LIMIT 1",
                               (event.order_key,)).fetchone() is None
            done = cur.execute(
                f"INSERT INTO outbox ({_NEW_OUTBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (event.event_id, event.order_key, event.event_type, event.target, payload, now, due,
                 int(head))).rowcount == 1
        if done:
            self._new_work.add(event.target)
        return done

    def _promote(self, cur: sqlite3.Cursor, order_key: str, target: str) -> None:
        """Let the next live event of `order_key` head its queue (its head has just left)."""
        if cur.execute(_PROMOTE_HEAD, (order_key,)).rowcount:
            self._new_work.add(target)

    def _load_batch(self, cur: sqlite3.Cursor, chat_id: int, user_id: int) -> BatchRow | None:
        row = cur.execute("SELECT batch_id, user_json, first_at, last_at, count FROM batches "
                          "WHERE chat_id=? AND user_id=?", (chat_id, user_id)).fetchone()
        if row is None:
            return None
        # One row, not one per message: each row fetched hands the GIL over and back, and the thread closing a
        # batch may be committing everyone's group. An aggregate's order is unspecified, hence the seq to sort by.
        pairs = json.loads(cur.execute(self._BATCH_ITEMS, (row[0],)).fetchone()[0])
        items = [item for _, item in sorted(pairs, key=lambda pair: pair[0])]
        held = cur.execute("SELECT held FROM flood_held WHERE chat_id=? AND user_id=?",
                           (chat_id, user_id)).fetchone()
        return BatchRow(row[0], chat_id, user_id, json.loads(row[1]), row[2], row[3], row[4], items,
                        held[0] if held else 0)

    def _close_built(self, cur: sqlite3.Cursor, batch: BatchRow, event: NewEvent, now: float) -> None:
        """Put the closed batch's event in the outbox and its rows (and the held count it took) away."""
        self._enqueue(cur, event, now)
        cur.execute("DELETE FROM batch_messages WHERE batch_id=?", (batch.batch_id,))
        cur.execute("DELETE FROM batches WHERE batch_id=?", (batch.batch_id,))
        if batch.flood_held:
            cur.execute("UPDATE flood_held SET held = held - ? WHERE chat_id=? AND user_id=?",
                        (batch.flood_held, batch.chat_id, batch.user_id))
            cur.execute("DELETE FROM flood_held WHERE held <= 0")

    @staticmethod
    def _outbox_row(cur: sqlite3.Cursor, row_id: int, was_on_wire: bool = False) -> OutboxRow:
        r = cur.execute("SELECT id, event_id, order_key, event_type, payload, created_at, attempts, last_error, "
                        "lease_token FROM outbox WHERE id=?", (row_id,)).fetchone()
        return _outbox_row_from(r, was_on_wire)

    def _holds(self, cur: sqlite3.Cursor, row_id: int, lease: str | None, lock: bool = True) -> bool:
        """Whether the row is in flight under the claim of `lease` (None: asks nothing), locked until the end
        unless `lock` is False (a question only: nothing will be written)."""
        if lease is None:
            return True
        row = cur.execute(f"SELECT lease_token FROM outbox WHERE id=? AND status='inflight'"
                          f"{self._CHANGING if lock else ''}", (row_id,)).fetchone()
        return row is not None and row[0] == lease

    def _leaving(self, cur: sqlite3.Cursor, row_id: int) -> tuple[str, str] | None:
        """The order key and target of a row about to leave its queue's head, the order key held (`_enqueue`
        must not miss the promotion)."""
        found = cur.execute("SELECT order_key, target FROM outbox WHERE id=?", (row_id,)).fetchone()
        if found is not None:
            self._lock_keys(cur, [_order_key(found[0])])
        return found


class SQLiteStore(Store):
    """The gateway's durable state in one SQLite database.

    Error messages name the problem and what to do, but not the path: the caller says which setting it is
    (`STATE_DB=...: <message>`)."""

    def __init__(self, path: str, exclusive: bool = False, *, existing: bool = False, read_only: bool = False,
                 wal_reset_pages: int = _CHECKPOINT_RESET_PAGES) -> None:
        """Open (creating if needed) the database at `path`; with `exclusive`, refuse if another process
        holds it exclusively (a second gateway on the same state would deliver everything twice).

        With `existing` or `read_only` nothing is created or converted: the file must already be a gateway state
        database of this schema version (`StoreNotFound` if there is none, `StoreError` if it is anything else,
        the file left as it was). `read_only` opens it for reading only (`dead_events`), so a user who may only
        read it can, and no write lock is ever taken. `wal_reset_pages`: how long the WAL may grow under writes
        that never pause before one of them waits for it to start over (see `_Checkpointer`)."""
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StoreError(f"SQLite {'.'.join(map(str, MIN_SQLITE))} or newer is needed (UPSERT ... RETURNING); this "
                             f"Python has {sqlite3.sqlite_version}: run the gateway with a Python built with a newer "
                             "SQLite (python.org's installers and the official Docker images have one)")
        if not _has_json():
            raise StoreError(f"this Python's SQLite {sqlite3.sqlite_version} lacks its JSON functions (JSON1): run the "
                             "gateway with a Python whose SQLite has them (python.org's installers, the official Docker "
                             "images and the Linux distributions' Pythons do)")
        super().__init__()
        self.path = path
        self._instance_lock = None
        self._read_only = read_only
        if existing or read_only:
            self._db = _open_existing(path, read_only)
        else:
            self._db = self._open(path, exclusive)
        if not read_only:
            self._db.executescript(self._ingest_view())
        # SQLite would copy the WAL back into the file inside whichever COMMIT crossed 1,000 pages: a stall of
        # tens of milliseconds for every request of that group. A thread of its own does it instead.
        self._checkpointer: _Checkpointer | None = None
        if path != ":memory:" and not (existing or read_only):
            try:
                self._checkpointer = _Checkpointer(path, wal_reset_pages)
            except sqlite3.Error as err:
                self._db.close()
                if self._instance_lock is not None:
                    self._instance_lock.close()
                raise StoreError(f"cannot open state database: {err}; {_sqlite_hint(err)}") from None

    def _ingest_view(self) -> str:
        """The connection's own (TEMP) view whose INSERT writes a group's new rows, its trigger running the four
        statements of `Store._write_rows`: one statement from Python, one hand-over of the GIL instead of four."""
        body = "".join(f"{self._sql[name].replace('json_each(?)', f'json_each(NEW.{column})')};\n"
                       for name, column in _INGEST_COLUMNS)
        columns = ", ".join(column for _, column in _INGEST_COLUMNS)
        return (f"CREATE TEMP VIEW ingest ({columns}) AS SELECT {', '.join('NULL' for _ in _INGEST_COLUMNS)};\n"
                f"CREATE TEMP TRIGGER ingest_rows INSTEAD OF INSERT ON ingest BEGIN\n{body}END;")

    def _write_rows(self, cur: sqlite3.Cursor, seen: list[tuple[int, float]], held: list[list[int]],
                    batches: list[list[Any]], messages: list[tuple[str, int, str]]) -> None:
        cur.execute("INSERT INTO temp.ingest VALUES (?, ?, ?, ?)",
                    tuple(json.dumps(rows) if rows else None for rows in (seen, held, batches, messages)))

    def _open(self, path: str, exclusive: bool) -> sqlite3.Connection:
        """Open or create the database at `path` and bring its schema up to date (see `__init__`)."""
        if path != ":memory:":
            _make_folder(os.path.dirname(os.path.abspath(path)))
            _check_place(path)
            if exclusive:
                self._instance_lock = lock_instance(path)
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=_BUSY_TIMEOUT_SECONDS)
            # The version is checked before WAL is set: a file that is not ours is refused unchanged.
            version = self._usable_version(db, path)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if path != ":memory:":
                db.execute("PRAGMA wal_autocheckpoint=0")  # the wal-checkpoint thread does it (see __init__)
            self._migrate(db, version)
            return db
        except (sqlite3.Error, StoreError) as err:
            if db is not None:
                db.close()
            if self._instance_lock is not None:
                self._instance_lock.close()
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"cannot open state database: {err}; {_sqlite_hint(err)}") from None

    def _usable_version(self, db: sqlite3.Connection, path: str) -> int:
        """The schema version of `db`, which this gateway may use or upgrade; refuse a file that is not ours."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if version > SCHEMA_VERSION or (version == 0 and has_tables):
            raise StoreError(f"the state database has schema version {version}, this gateway needs "
                             f"{SCHEMA_VERSION}; point STATE_DB at a new file (or keep the gateway that wrote it "
                             "until its outbox is empty)")
        # An older gateway may be running on the file, or be rolled back to: only a gateway starting on it
        # (holding the instance lock) upgrades it, never a command run beside it.
        if 0 < version < SCHEMA_VERSION and self._instance_lock is None and path != ":memory:":
            raise StoreError(_upgrade_first(version))
        return int(version)

    @staticmethod
    def _migrate(db: sqlite3.Connection, version: int) -> None:
        """Bring the schema from `version` to SCHEMA_VERSION, one migration per transaction."""
        for target in range(version + 1, SCHEMA_VERSION + 1):
            # executescript commits first, so a migration and its version number are one explicit transaction.
            db.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[target - 1]}; PRAGMA user_version={target}; COMMIT;")

    def _restart_wal(self) -> None:
        """Start the WAL over, as the `wal-checkpoint` thread asked, between two transactions of this connection:
        it is the only writer, so it waits for no writer. It does not wait at all (busy timeout 0): a reader of
        another process still on an older snapshot makes it give up at once, rather than hold every commit
        behind it; the next turns ask again."""
        assert self._checkpointer is not None
        with self._lock:
            self._checkpointer.restart_wanted.clear()
            try:
                self._db.execute("PRAGMA busy_timeout=0")
                try:
                    busy = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
                    if not busy:
                        self._checkpointer.started_over()
                finally:
                    self._db.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_SECONDS * 1000)}")
            except sqlite3.Error as err:  # locked from outside, closed: the next turns ask again
                log.debug("cannot start the WAL over now: %s", err)

    def _cursor(self) -> sqlite3.Cursor:
        return self._db.cursor()

    def _begin(self, cur: sqlite3.Cursor, write: bool) -> None:
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _in_transaction(self) -> bool:
        return self._db.in_transaction

    def _rows(self, *types: str, extra: str = "") -> str:
        return _json_rows(len(types), *([extra] if extra else []))

    def _after_group(self) -> None:
        if self._checkpointer is not None and self._checkpointer.restart_wanted.is_set():
            self._restart_wal()

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # closed, or the rollback failed too: SQLite discards the transaction anyway

    def _close_db(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()
        if self._instance_lock is not None:
            self._instance_lock.close()


class _Checkpointer:
    """The `wal-checkpoint` thread: copies the WAL back into the database file on a connection of its own, so
    no commit waits for it. A PASSIVE checkpoint never makes a writer wait; under writes that never pause it
    may never catch up with the WAL's end, so past `reset_pages` a RESTART waits for the writer of the moment
    and lets the WAL start over: the file stays bounded."""

    def __init__(self, path: str, reset_pages: int = _CHECKPOINT_RESET_PAGES) -> None:
        self._reset_pages = reset_pages
        self._last_pages = 0  # the WAL's length at the last checkpoint
        self.restart_wanted = threading.Event()  # set when the store's writer should start the WAL over
        self._waited = False  # a turn was skipped for it
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=_BUSY_TIMEOUT_SECONDS)
        self._db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.Lock()  # guards _db: the thread and close()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def started_over(self) -> None:
        """The WAL was started over (by the store's writer): its length at the last turn no longer applies."""
        self._last_pages = 0

    def checkpoint(self) -> tuple[int, int]:
        """Copy what the WAL holds into the file now; return (pages in the WAL, pages copied).

        A RESTART holds the write lock while it waits for readers, so it is tried only when the PASSIVE one
        copied everything (otherwise a read transaction of another process pins the WAL: a RESTART could not
        start it over, and would only stop every writer for the whole busy timeout, again each turn), and with
        a short busy timeout of its own (a reader that began since may still make it wait). When writes never
        pause, the PASSIVE one is always a few frames behind: once it has copied at least all the WAL held at
        the turn before (so no reader pins it), the store's writer is asked to start it over (`restart_wanted`,
        `SQLiteStore._restart_wal`)."""
        with self._lock:
            if self.restart_wanted.is_set():
                if not self._waited:  # the store's writer has not done the last one yet: its next commit will
                    self._waited = True
                    return self._last_pages, 0
                self.restart_wanted.clear()  # no commit came for a whole turn: the writes have paused
            self._waited = False
            _, pages, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # No reader pins the WAL if everything it held at the last turn is copied now: writes that never
            # pause keep the PASSIVE one a few frames behind its end, but not behind the last turn's. Then the
            # store's own writer starts it over between two of its transactions (`restart_wanted`): a RESTART
            # from here would hold every writer while it waited, and SQLite's busy waits step up to 100 ms.
            behind = copied < pages and 0 < self._last_pages <= copied
            self._last_pages = pages
            if pages >= self._reset_pages and behind:
                self.restart_wanted.set()
            elif pages >= self._reset_pages and copied == pages:
                self._db.execute(f"PRAGMA busy_timeout={int(_CHECKPOINT_RESTART_WAIT_SECONDS * 1000)}")
                try:
                    busy, pages, copied = self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                    if not busy:
                        self._last_pages = 0
                finally:
                    self._db.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_SECONDS * 1000)}")
            return pages, copied

    def _run(self) -> None:
        failing = False  # said once when checkpoints start failing and once when they work again, not each turn
        while not self._stopping.wait(_CHECKPOINT_SECONDS):
            try:
                pages, copied = self.checkpoint()
            except sqlite3.Error as err:  # locked from outside, disk full: the next turn tries again
                if not failing:
                    log.warning("cannot copy the state's WAL back into its file (%s); it grows until this works "
                                "again (retrying every %g s)", err, _CHECKPOINT_SECONDS)
                failing = True
                continue
            if failing:
                log.info("the state's WAL is copied back into its file again (%d of %d pages)", copied, pages)
                failing = False

    def close(self) -> None:
        """Stop the thread and close its connection; safe to call twice."""
        self._stopping.set()
        self._thread.join(5)
        with self._lock:
            self._db.close()


class _Unit(Generic[T]):
    """One caller's transaction body, waiting in line for a group commit (see `Store._run`)."""

    __slots__ = ("work", "write", "ready", "taken", "leads", "done", "committed", "result", "error", "then", "many",
                 "args")

    def __init__(self, work: Callable[[sqlite3.Cursor], T], write: bool,
                 then: Callable[["_Unit[T]"], None] | None = None) -> None:
        self.work = work
        self.write = write
        self.then = then  # set for a submitted unit: nobody waits for it, so it has no `ready`
        # Set when its group is done, or when it is this unit's turn to lead.
        self.ready: threading.Event | None = threading.Event() if then is None else None
        self.taken = self.leads = self.done = self.committed = False
        self.result: T | None = None
        self.error: BaseException | None = None
        # A unit that can be done together with the like units next to it: `many(cursor, [their args])` gives
        # each its result or its error (one failing must not change what the others do).
        self.many: Callable[[sqlite3.Cursor, list[Any]], list[Any]] | None = None
        self.args: Any = None

    def outcome(self) -> T:
        """The work's result once committed; else the error that undid it."""
        if self.error is not None:
            raise self.error
        if not self.committed:
            raise StoreError("state database error: the transaction was interrupted")
        return self.result  # type: ignore[return-value]


# JSON as the store writes it (ASCII, no NaN): json.dumps with these options would build a new encoder per call.
_strict_json = json.JSONEncoder(ensure_ascii=True, allow_nan=False).encode


@functools.cache
def _has_json() -> bool:
    """Whether this SQLite has its JSON functions (built in since 3.38, compiled in by nearly every build before)."""
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as db:
            return db.execute("SELECT json_group_array(value) FROM json_each('[1]')").fetchone()[0] == "[1]"
    except sqlite3.Error:
        return False


@functools.cache
def _json_rows(columns: int, *more: str) -> str:
    """A SELECT of one row per element of a JSON array given as its one parameter, each element an array of
    `columns` values (then the constant columns `more`): a statement's rows passed as one value."""
    fields = [f"json_extract(value, '$[{index}]')" for index in range(columns)]
    return f"SELECT {', '.join([*fields, *more])} FROM json_each(?)"


_INTEGER = range(-2 ** 63, 2 ** 63)  # what an SQLite INTEGER holds
# The statements `Store._write_rows` runs, in its order, and the columns of SQLite's `ingest` view that carry
# their rows.
_INGEST_COLUMNS = (("add_seen", "seen"), ("add_held", "held"), ("write_batches", "batches"), ("add_items", "items"))


@dataclass(frozen=True)
class _Adding:
    """One message for `Store._add_messages`, its JSON already written."""

    update_id: int
    chat_id: int
    user_id: int
    user: dict[str, Any] | None
    user_json: str
    item_json: str
    now: float
    max_messages: int
    build: Builder
    admit: Callable[[], bool] | None
    new_batch_id: str  # used only if the message opens a batch


def _column(values: Iterable[Any]) -> str:
    """`values` as the JSON array of one-column rows that a statement's `_rows(type)` reads."""
    return json.dumps([[value] for value in values])


def _outbox_row_from(r: Sequence[Any], was_on_wire: bool) -> OutboxRow:
    """An `OutboxRow` from its columns as read (id, event_id, order_key, event_type, payload, created_at, attempts,
    last_error, lease_token), `created_at` as a number or its exact text."""
    return OutboxRow(r[0], r[1], r[2], r[3], json.loads(r[4]), float(r[5]), r[6], r[7], r[8], was_on_wire)


def _batch_key(chat_id: int, user_id: int) -> str:
    """What transactions about one user's batch in a chat hold (`Store._lock_keys`)."""
    return f"batch:{chat_id}:{user_id}"


def _order_key(order_key: str) -> str:
    """What transactions changing one outbox queue hold."""
    return f"queue:{order_key}"


def _payload_key(payload: str) -> str:
    """What transactions deciding about one invoice payload hold."""
    return f"payload:{payload}"


def _fits(add: _Adding) -> bool:
    """Whether SQLite can hold the message's ids as integers (JSON would turn a bigger one into a REAL)."""
    return add.update_id in _INTEGER and add.chat_id in _INTEGER and add.user_id in _INTEGER


def _only(outcomes: list[Any]) -> Any:
    """The one outcome of a list of one: its result, or its error raised."""
    if isinstance(outcomes[0], Exception):
        raise outcomes[0]
    return outcomes[0]


def _steps(group: list[_Unit[Any]]) -> Iterable[list[_Unit[Any]]]:
    """The group in the order it came, units that can be done together (the same `many`, one after another)
    taken as one step."""
    step: list[_Unit[Any]] = []
    for unit in group:
        if step and (unit.many is None or unit.many != step[0].many):
            yield step
            step = []
        step.append(unit)
    if step:
        yield step


def _fail(group: list[_Unit[Any]], err: BaseException) -> None:
    """The group's transaction is gone: each unit without an error of its own gets this one."""
    for unit in group:
        unit.result = None
        if unit.error is None:
            unit.error = StoreError(f"state database error: {err}")


def _make_folder(folder: str) -> None:
    """Create `folder` and its parents if missing; `StorePathError` says why it cannot be."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        blocker = folder
        while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        if os.path.exists(blocker) and not os.path.isdir(blocker):
            raise StorePathError(f"cannot create folder {folder}: {blocker} is a file, not a folder; set STATE_DB "
                                 "to a file in a folder you can write") from None
        raise StorePathError(f"cannot create folder {folder}: {err.strerror or err}; {_os_hint(err)}") from None


def _check_place(path: str) -> None:
    """Refuse a `path` that exists and is no regular file (a folder, a device such as /dev/null), before
    anything is created beside it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing (it will be created), or unreachable: opening it says why
    if stat.S_ISDIR(mode):
        raise StorePathError(f"it is a folder, not a file; set STATE_DB to a file, e.g. "
                             f"{os.path.join(path, 'state.sqlite3')}")
    if not stat.S_ISREG(mode):
        raise StorePathError("it is not a regular file (a device, a pipe or a socket); set STATE_DB to a file, e.g. "
                             "data/state.sqlite3")


def _os_hint(err: OSError) -> str:
    """What to do about an `OSError` met opening the state files: the setting to change, or the access to give."""
    if err.errno in (errno.EACCES, errno.EPERM):
        return "give this user write access to its folder, or set STATE_DB to a file in a folder you can write"
    if err.errno == errno.EROFS:
        return "set STATE_DB to a file on a writable filesystem (or make this one writable)"
    if err.errno == errno.ENAMETOOLONG:
        return "the name is too long for this filesystem: set STATE_DB to a shorter path"
    return "set STATE_DB to a file in a folder you can write"


def _sqlite_hint(err: sqlite3.Error) -> str:
    """What to do about a SQLite error met opening the state database."""
    text = str(err).lower()
    if "readonly" in text or "read-only" in text:
        return "the gateway writes it: give this user write access to it and its folder, or set STATE_DB elsewhere"
    if "not a database" in text:
        return "it is not a SQLite database: set STATE_DB to a new file (or the gateway's state file)"
    if "locked" in text:
        return "another process holds it (a gateway writing, a tool reading it): try again in a moment"
    return "set STATE_DB to a file in a folder you can write"


def _upgrade_first(version: int) -> str:
    return (f"the state database has schema version {version}; start the gateway (python app.py) once to upgrade "
            f"it to {SCHEMA_VERSION}, then run this command again")


def _open_existing(path: str, read_only: bool) -> sqlite3.Connection:
    """Connect to the gateway state database at `path`, creating and converting nothing until it is known to be
    one of this schema version; `read_only` keeps the read-only connection that checked it."""
    if path == ":memory:":
        raise StoreNotFound("STATE_DB is :memory:, which nothing outlives")
    where = os.path.abspath(path)
    try:
        mode = os.stat(where).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise StoreNotFound(f"no state database at {where}") from None
    except PermissionError:
        raise StoreError(f"permission denied: this user cannot reach {where} (a folder on the way is closed to "
                         "it); run this as the user the gateway runs as") from None
    except OSError as err:
        raise StoreError(f"cannot open state database: {err.strerror or err}; {_os_hint(err)}") from None
    if stat.S_ISDIR(mode):
        raise StoreError("it is a folder, not a state database; set STATE_DB to the gateway's state file")
    if not stat.S_ISREG(mode):
        raise StoreError("it is not a regular file (a device, a pipe or a socket), so no state database; set "
                         "STATE_DB to the gateway's state file")
    uri = Path(where).as_uri()
    # With no -wal file no connection is open and everything is in the file itself: read it as immutable,
    # which creates nothing (a read-only WAL reader would leave -wal and -shm files behind, owned by this user,
    # or fail in a folder it may not write). With one, a gateway is running: its -shm holds where to read.
    reader = f"{uri}?mode=ro" if os.path.exists(where + "-wal") else f"{uri}?mode=ro&immutable=1"
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(reader, uri=True, check_same_thread=False, isolation_level=None,
                             timeout=_BUSY_TIMEOUT_SECONDS)
        _check_current(db)
        if read_only:
            return db
        db.close()
        db = None
    except (sqlite3.Error, StoreError) as err:
        if db is not None:
            db.close()
        if isinstance(err, StoreError):
            raise
        if "not a database" in str(err).lower():
            raise StoreError("it is not a SQLite database, so no state database of the gateway; set STATE_DB to "
                             "the gateway's state file") from None
        raise StoreError(f"cannot open state database: {err}; {_sqlite_hint(err)}") from None
    try:
        # Known to be ours: now for writing (mode=rw: should it vanish meanwhile, nothing new is created).
        db = sqlite3.connect(f"{uri}?mode=rw", uri=True, check_same_thread=False, isolation_level=None,
                             timeout=_BUSY_TIMEOUT_SECONDS)
        db.execute("PRAGMA synchronous=FULL")
        # SQLite opens a file it may not write read-only without a word: ask for the write lock now, so that
        # is said here, with what to do, rather than by the first write.
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return db
    except sqlite3.Error as err:
        if db is not None:
            db.close()
        hint = (_sqlite_hint(err) if "locked" in str(err).lower() else
                "this command writes it: run it as the user the gateway runs as, or give this user write access to "
                "the file and its folder")
        raise StoreError(f"cannot write the state database: {err}; {hint}") from None


def _check_current(db: sqlite3.Connection) -> None:
    """Raise `StoreError` unless `db` is a gateway state database of exactly this schema version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version == 0 and not tables:
        raise StoreError("the file is empty, not a state database of the gateway; set STATE_DB to the gateway's "
                         "state file")
    if version == 0 or "outbox" not in tables:
        raise StoreError("the file is a SQLite database of something else, not of the gateway; set STATE_DB to "
                         "the gateway's state file")
    if version < SCHEMA_VERSION:
        raise StoreError(_upgrade_first(version))
    if version > SCHEMA_VERSION:
        raise StoreError(f"the state database has schema version {version}, written by a newer gateway (this one "
                         f"knows {SCHEMA_VERSION}); run this command with that gateway")


def lock_instance(path: str) -> IO[str]:
    """Hold an exclusive OS lock on `<path>.lock` for this process's life (the OS drops it on any exit)."""
    lock = path + ".lock"
    try:
        handle = open(lock, "a+")
    except OSError as err:
        raise StoreError(f"cannot open state database: cannot open its lock file {lock} "
                         f"({err.strerror or err}); {_os_hint(err)}") from None
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StoreError(f"another gateway is already running on state database (it holds {lock}); stop it first, "
                         "or give this one a STATE_DB of its own (two gateways on one state would deliver every "
                         "event twice)") from None
    return handle


MAX_CLOCK_SKEW_SECONDS = 2.0  # instances sharing a database decide leases and deadlines by their own clocks


def open_store(config: Any, *, existing: bool = False, read_only: bool = False) -> Store:
    """The store the settings name: PostgreSQL with `DATABASE_URL` (several instances may share it), else the
    SQLite file `STATE_DB`, held by this process alone. `existing` / `read_only`: for commands, which create
    nothing (see `SQLiteStore`)."""
    if not config.database_url:
        return SQLiteStore(config.state_db, exclusive=not (existing or read_only), existing=existing,
                           read_only=read_only)
    from store_postgres import PostgresStore  # only a PostgreSQL deployment needs psycopg loaded
    store = PostgresStore(config.database_url, relaxed=config.database_durability == "relaxed", existing=existing,
                          poll_idle_seconds=max(60.0, 2.0 * config.poll_timeout_seconds + 15.0))
    try:
        skew = store.clock_skew()
    except BaseException:
        store.close()
        raise
    if abs(skew) > MAX_CLOCK_SKEW_SECONDS:
        store.close()
        raise StoreError(f"this machine's clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} "
                         f"PostgreSQL's; instances sharing the database time leases and batches by their own clocks, "
                         f"so they must agree within {MAX_CLOCK_SKEW_SECONDS:g} s: synchronize this machine's clock "
                         "(NTP: systemd-timesyncd, chrony)")
    return store


def MemoryStore() -> SQLiteStore:  # noqa: N802 - reads like the class it stands for
    """A throwaway in-memory store with the same behaviour as the file one."""
    return SQLiteStore(":memory:")
