"""store.py: durable state (seen updates, open batches, the outbox), the same behaviour in a file and in memory."""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import psycopg
import pytest

from batching import build_batch_event
from debounce import DebounceSettings, deadline
from doubles import wait_until
from store import (AddResult, BatchRow, MemoryStore, NewEvent, SQLiteStore, Store, StoreError, StoreNotFound,
                   StorePathError)
from store_postgres import PostgresStore

T0 = 1_763_900_000.0  # wall-clock seconds, as the store keeps them
SETTINGS = DebounceSettings(debounce_seconds=4.0, max_wait_seconds=15.0, max_messages=50)
ALICE = {"id": 42, "username": "alice", "first_name": "Alice", "last_name": None, "language_code": "ru"}


@pytest.fixture(params=["file", "memory", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store: a SQLite file in tmp_path, `:memory:`, or a new database on the tests' PostgreSQL."""
    if request.param == "postgres":
        db: Store = PostgresStore(request.getfixturevalue("postgres_url"))
    elif request.param == "file":
        db = SQLiteStore(str(tmp_path / "state" / "state.sqlite3"))
    else:
        db = MemoryStore()
    yield db
    db.close()


def item(update_id: int, text: str) -> dict[str, Any]:
    """A text message's batch entry."""
    return {"update_id": update_id, "message_id": update_id, "date": int(T0), "type": "text", "text": text}


def add(store: SQLiteStore, update_id: int, text: str, now: float, chat_id: int = 42, user_id: int = 42,
        max_messages: int = 50):
    """Add a text message from Alice (or another user) to her open batch."""
    return store.add_message(update_id, chat_id, user_id, ALICE, item(update_id, text), now, max_messages,
                             build_batch_event)


def hold(store: SQLiteStore, update_id: int, user_id: int, now: float) -> AddResult:
    """A message from `user_id` in their private chat that flood control holds back."""
    return store.add_message(update_id, user_id, user_id, ALICE, item(update_id, "held"), now, 50, build_batch_event,
                             lambda: False)


def stored_batch(store: SQLiteStore, chat_id: int, user_id: int) -> BatchRow | None:
    """The user's open batch as stored, with its messages and held count."""
    return store._run(lambda cur: store._load_batch(cur, chat_id, user_id), write=False)


def event(event_id: str, order_key: str, **payload: Any) -> NewEvent:
    """An outbox event with a small payload."""
    return NewEvent(event_id, order_key, "update", {"event_id": event_id, **payload})


def due(batch: BatchRow) -> tuple[float, str]:
    """The batch's deadline under SETTINGS."""
    return deadline(batch.first_at, batch.last_at, batch.count, SETTINGS)


# Seen updates


def test_duplicate_update_id_is_stored_once(store: SQLiteStore) -> None:
    """Recording the same update_id twice stores it once and says the second one was not new."""
    assert store.record_update(1001, T0)
    assert not store.record_update(1001, T0 + 1)
    assert store.seen(1001) and not store.seen(1002)
    assert store.last_update_id() == 1001


def test_event_recorded_with_a_duplicate_update_is_not_enqueued_twice(store: SQLiteStore) -> None:
    """An update carrying an event enqueues it once, however often the update is redelivered."""
    assert store.record_update(7, T0, [event("upd-7", "chat:1")])
    assert not store.record_update(7, T0, [event("upd-7-again", "chat:1")])
    assert store.outbox_stats(T0)["outbox_pending"] == 1


def test_enqueue_event_is_idempotent_per_event_id(store: SQLiteStore) -> None:
    """The same event_id is enqueued once."""
    assert store.enqueue_event(event("e1", "chat:1"), T0)
    assert not store.enqueue_event(event("e1", "chat:1"), T0)
    assert store.outbox_stats(T0)["outbox_pending"] == 1


def test_prune_seen_forgets_only_old_update_ids(store: SQLiteStore) -> None:
    """Pruning drops update ids received before the cutoff; newer ones still count as seen."""
    store.record_update(1, T0)
    store.record_update(2, T0 + 100)
    assert store.prune_seen(T0 + 50) == 1
    assert not store.seen(1) and store.seen(2)
    assert store.record_update(1, T0 + 200)  # forgotten, so new again
    assert not store.record_update(2, T0 + 200)


# Open batches


def test_first_message_opens_a_batch_and_later_ones_append_in_order(store: SQLiteStore) -> None:
    """Messages from one user go into one open batch, in arrival order, with first and last arrival times."""
    first = add(store, 1, "hi", T0)
    assert first.new and not first.closed and first.batch is not None
    add(store, 2, "I need", T0 + 1)
    third = add(store, 3, "a refund", T0 + 2.5)
    assert third.batch is not None and third.batch.batch_id == first.batch.batch_id
    assert (third.batch.count, third.batch.first_at, third.batch.last_at) == (3, T0, T0 + 2.5)
    batch = stored_batch(store, 42, 42)
    assert batch is not None and batch.batch_id == first.batch.batch_id
    assert [m["text"] for m in batch.messages] == ["hi", "I need", "a refund"]
    assert (batch.count, batch.first_at, batch.last_at) == (3, T0, T0 + 2.5)
    assert batch.user == ALICE
    assert [b.batch_id for b in store.open_batches()] == [batch.batch_id]
    assert store.outbox_stats(T0)["outbox_pending"] == 0


def test_repeated_update_does_not_change_the_batch(store: SQLiteStore) -> None:
    """A redelivered update is reported as not new and adds nothing to the batch."""
    add(store, 1, "hi", T0)
    again = add(store, 1, "hi", T0 + 1)
    assert not again.new and not again.closed
    second = add(store, 2, "there", T0 + 2)
    assert second.batch is not None and second.batch.count == 2


def test_users_have_separate_batches(store: SQLiteStore) -> None:
    """Two users, or one user in two chats, each get their own batch."""
    add(store, 1, "a", T0, chat_id=1, user_id=1)
    add(store, 2, "b", T0, chat_id=2, user_id=2)
    add(store, 3, "c", T0, chat_id=-100, user_id=1)
    assert sorted((b.chat_id, b.user_id) for b in store.open_batches()) == [(-100, 1), (1, 1), (2, 2)]


def test_batch_reaching_max_messages_closes_in_the_same_call(store: SQLiteStore) -> None:
    """The message that fills a batch closes it into one outbox event built by the given builder."""
    add(store, 1, "one", T0, max_messages=3)
    add(store, 2, "two", T0 + 1, max_messages=3)
    result = add(store, 3, "three", T0 + 2, max_messages=3)
    assert result.new and result.closed and result.batch is not None
    assert store.open_batches() == []
    claimed = store.claim_due_event(T0 + 2)
    assert claimed is not None and store.claim_due_event(T0 + 2) is None
    expected = build_batch_event(result.batch, "max_messages")
    assert (claimed.event_id, claimed.order_key, claimed.event_type) == (
        expected.event_id, expected.order_key, "message_batch")
    assert claimed.payload == expected.payload
    assert claimed.payload["reason"] == "max_messages" and claimed.payload["batch_size"] == 3
    assert claimed.payload["text"] == "one\ntwo\nthree"
    fresh = add(store, 4, "four", T0 + 3, max_messages=3)
    assert fresh.batch is not None and fresh.batch.count == 1 and fresh.batch.batch_id != result.batch.batch_id


def test_failing_builder_leaves_nothing_half_written(store: SQLiteStore) -> None:
    """If building the closing event fails, the whole add is rolled back: the update is not even seen."""
    add(store, 1, "one", T0, max_messages=2)

    def broken(batch: BatchRow, reason: str) -> NewEvent:
        raise RuntimeError("builder failed")

    with pytest.raises(RuntimeError):
        store.add_message(2, 42, 42, ALICE, item(2, "two"), T0 + 1, 2, broken)
    assert not store.seen(2)
    (batch,) = store.open_batches()
    assert batch.count == 1
    assert store.outbox_stats(T0)["outbox_pending"] == 0


def test_close_batch_if_due_waits_until_the_deadline(store: SQLiteStore) -> None:
    """Before its deadline a batch stays open and the deadline is returned; at it, the batch becomes one event."""
    add(store, 1, "hi", T0)
    add(store, 2, "there", T0 + 1)
    at = T0 + 1 + SETTINGS.debounce_seconds
    assert store.close_batch_if_due(42, 42, at - 0.5, due, build_batch_event) == (False, at)
    assert len(store.open_batches()) == 1
    assert store.close_batch_if_due(42, 42, at, due, build_batch_event) == (True, None)
    assert store.open_batches() == []
    claimed = store.claim_due_event(at)
    assert claimed is not None
    assert claimed.payload["reason"] == "quiet"
    assert [m["text"] for m in claimed.payload["messages"]] == ["hi", "there"]
    assert store.close_batch_if_due(42, 42, at + 10, due, build_batch_event) == (False, None)


def test_batches_closed_together_end_as_if_closed_one_by_one(store: SQLiteStore) -> None:
    """`close_batches_if_due` looks at several users' batches in one transaction: the due ones become events
    with their messages, in the keys' order; one not due yet stays open, its deadline returned; a user with no
    batch gets (False, None)."""
    add(store, 1, "a1", T0, chat_id=1, user_id=1)
    add(store, 2, "a2", T0 + 1, chat_id=1, user_id=1)
    add(store, 3, "b1", T0, chat_id=2, user_id=2)
    add(store, 4, "c1", T0 + 3, chat_id=3, user_id=3)
    at = T0 + 1 + SETTINGS.debounce_seconds
    outcomes = store.close_batches_if_due([(2, 2), (3, 3), (1, 1), (9, 9)], at, due, build_batch_event)
    assert outcomes == [(True, None), (False, T0 + 3 + SETTINGS.debounce_seconds), (True, None), (False, None)]
    assert [(b.chat_id, b.count) for b in store.open_batches()] == [(3, 1)]
    claimed = store.claim_due_events(at, limit=5)
    assert [(r.event_id.startswith("batch-"), r.payload["chat_id"], [m["text"] for m in r.payload["messages"]])
            for r in claimed] == [(True, 2, ["b1"]), (True, 1, ["a1", "a2"])]


# The outbox


def test_events_of_one_chat_are_claimed_in_order_and_other_chats_go_ahead(store: SQLiteStore) -> None:
    """A chat's second event waits while its first is in flight; another chat's event is claimable meanwhile."""
    for event_id, key in (("a1", "chat:1"), ("a2", "chat:1"), ("b1", "chat:2")):
        store.enqueue_event(event(event_id, key), T0)
    first = store.claim_due_event(T0)
    assert first is not None and first.event_id == "a1" and first.attempts == 1
    other = store.claim_due_event(T0)
    assert other is not None and other.event_id == "b1"
    assert store.claim_due_event(T0) is None  # a2 waits behind the in-flight a1
    store.mark_delivered(first.id)
    second = store.claim_due_event(T0)
    assert second is not None and second.event_id == "a2"


def test_a_delivered_event_can_hold_back_the_next_of_its_queue(store: SQLiteStore) -> None:
    """`next_not_before` makes the queue's next event due no earlier than that (pacing a chat): other queues
    go ahead meanwhile, and an event already due later is not made due sooner."""
    for event_id, key in (("a1", "chat:1"), ("a2", "chat:1"), ("b1", "chat:2")):
        store.enqueue_event(event(event_id, key), T0)
    store.enqueue_event(NewEvent("c1", "chat:3", "update", {}), T0)
    store.enqueue_event(NewEvent("c2", "chat:3", "update", {}, due_at=T0 + 5), T0)
    a1, b1, c1 = store.claim_due_events(T0, limit=10)
    assert [a1.event_id, b1.event_id, c1.event_id] == ["a1", "b1", "c1"]
    store.mark_delivered(a1.id, next_not_before=T0 + 1)
    store.mark_delivered(c1.id, next_not_before=T0 + 1)
    store.enqueue_event(event("b2", "chat:2"), T0)
    store.mark_delivered(b1.id)
    b2 = store.claim_due_event(T0)
    assert b2 is not None and b2.event_id == "b2"  # its queue was not held back
    assert store.claim_due_event(T0 + 0.99) is None
    assert store.next_attempt_at() == T0 + 1
    a2 = store.claim_due_event(T0 + 1)
    assert a2 is not None and a2.event_id == "a2"
    assert store.next_attempt_at() == T0 + 5  # c2 kept its own, later time


def test_failed_event_waits_for_its_next_attempt_and_holds_its_chat(store: SQLiteStore) -> None:
    """A failed event is not claimable before `next_attempt_at`, nor is the next event of its chat."""
    store.enqueue_event(event("a1", "chat:1"), T0)
    store.enqueue_event(event("a2", "chat:1"), T0)
    claimed = store.claim_due_event(T0)
    assert claimed is not None
    store.mark_failed(claimed.id, T0 + 10, "HTTP 500: oops")
    assert store.claim_due_event(T0 + 9.9) is None  # a1 not due, a2 behind a pending a1
    again = store.claim_due_event(T0 + 10)
    assert again is not None and again.event_id == "a1"
    assert again.attempts == 2 and again.last_error == "HTTP 500: oops"


def test_dead_letter_is_kept_and_its_chat_moves_on(store: SQLiteStore) -> None:
    """A dead letter no longer blocks its chat: the next event goes ahead, and the dead one stays listed."""
    store.enqueue_event(event("a1", "chat:1"), T0)
    store.enqueue_event(event("a2", "chat:1"), T0)
    claimed = store.claim_due_event(T0)
    assert claimed is not None
    store.mark_failed(claimed.id, T0 + 1, "too old", dead=True)
    nxt = store.claim_due_event(T0)
    assert nxt is not None and nxt.event_id == "a2"
    assert [d.event_id for d in store.dead_events()] == ["a1"]
    assert store.dead_events()[0].last_error == "too old"
    assert store.outbox_stats(T0)["outbox_dead"] == 1
    store.mark_delivered(nxt.id)
    assert store.claim_due_event(T0 + 10_000) is None  # a dead letter is never claimed by itself


def test_replay_dead_makes_dead_letters_deliverable_again(store: SQLiteStore) -> None:
    """Replaying queues every dead letter again, due at once."""
    store.enqueue_event(event("a1", "chat:1"), T0)
    claimed = store.claim_due_event(T0)
    assert claimed is not None
    store.mark_failed(claimed.id, T0 + 3600, "gone", dead=True)
    assert store.replay_dead(T0 + 50) == 1
    assert store.dead_events() == []
    again = store.claim_due_event(T0 + 50)
    assert again is not None and again.event_id == "a1"
    assert store.outbox_stats(T0 + 60)["outbox_oldest_age_seconds"] == 10  # its age starts again at the replay
    assert store.replay_dead(T0 + 60) == 0


def test_reset_inflight_returns_events_a_crash_left_in_flight(store: SQLiteStore) -> None:
    """Events in flight when the process died become claimable again."""
    store.enqueue_event(event("a1", "chat:1"), T0)
    store.enqueue_event(event("b1", "chat:2"), T0)
    assert store.claim_due_event(T0) is not None and store.claim_due_event(T0) is not None
    assert store.claim_due_event(T0) is None
    assert store.reset_inflight() == 2
    assert {store.claim_due_event(T0).event_id, store.claim_due_event(T0).event_id} == {"a1", "b1"}
    assert store.reset_inflight() == 2 and store.reset_inflight() == 0


def test_replayed_letter_waits_behind_the_event_in_flight_of_its_chat(store: SQLiteStore) -> None:
    """A dead letter replayed while a later event of its chat is in flight goes next, never beside it."""
    store.enqueue_event(event("a1", "chat:1"), T0)
    store.enqueue_event(event("a2", "chat:1"), T0)
    store.enqueue_event(event("a3", "chat:1"), T0)
    first = store.claim_due_event(T0)
    assert first is not None
    store.mark_failed(first.id, T0, "too old", dead=True)
    second = store.claim_due_event(T0)
    assert second is not None and second.event_id == "a2"
    assert store.replay_dead(T0) == 1
    assert store.claim_due_event(T0) is None  # a2 is in flight: nothing else of chat 1 may start
    store.mark_delivered(second.id)
    assert [store.claim_due_event(T0).event_id] == ["a1"]


def test_claims_take_one_head_per_chat_earliest_due_first(store: SQLiteStore) -> None:
    """One claim of many rows hands out the head of each chat's queue once, the earliest due first."""
    store.enqueue_events([event(f"{c}{n}", f"chat:{c}") for n in (1, 2) for c in "abc"], T0)
    store.enqueue_event(NewEvent("d1", "chat:d", "update", {}, due_at=T0 - 5), T0)
    store.enqueue_event(NewEvent("e1", "chat:e", "update", {}, due_at=T0 + 5), T0)
    claimed = store.claim_due_events(T0, limit=10)
    assert [r.event_id for r in claimed] == ["d1", "a1", "b1", "c1"]
    assert store.claim_due_events(T0, limit=10) == []
    assert store.next_attempt_at() == T0 + 5  # e1; a2, b2, c2 wait behind their heads


def test_replacing_a_waiting_row_changes_it_and_a_sent_one_stays_sent(store: SQLiteStore) -> None:
    """A `replace` event rewrites a still-waiting row (payload and due time) and adds nothing once it has gone."""
    store.enqueue_event(NewEvent("ans", "cb:1", "x", {"v": "empty"}, due_at=T0 + 5), T0)
    row = store.claim_due_event(T0 + 1)
    assert row is None
    store.enqueue_event(NewEvent("x1", "chat:1", "update", {}), T0)
    x1 = store.claim_due_event(T0)
    assert x1 is not None
    written = store.mark_delivered(x1.id, [NewEvent("ans", "cb:1", "x", {"v": "make"}, due_at=T0, replace=True)], T0)
    assert written == {"ans"}
    ans = store.claim_due_event(T0)
    assert ans is not None and ans.payload == {"v": "make"}
    store.mark_delivered(ans.id)
    assert store.enqueue_event(NewEvent("ans", "cb:1", "x", {"v": "late"}, replace=True), T0) is False
    assert store.outbox_stats(T0)["outbox_pending"] == 0


def test_new_work_is_announced_after_the_commit(store: SQLiteStore) -> None:
    """Listeners hear the target of each commit that gave it a row to send, and nothing for a rolled-back one."""
    heard: list[str] = []
    store.on_new_work(heard.append)
    store.enqueue_event(event("a1", "chat:1"), T0)
    store.enqueue_event(NewEvent("t1", "chat:1", "sendMessage", {}, target="telegram"), T0)
    assert heard == ["make", "telegram"]
    store.enqueue_event(event("a1", "chat:1"), T0)  # already there: nothing new
    assert heard == ["make", "telegram"]
    with pytest.raises(RuntimeError):
        store.add_message(9, 1, 1, ALICE, item(9, "x"), T0, 1, lambda b, r: (_ for _ in ()).throw(RuntimeError()))
    assert heard == ["make", "telegram"]


def test_outbox_statements_read_an_index_never_the_whole_queue(tmp_path: Path) -> None:
    """Every statement the store runs on the outbox to enqueue, claim, settle, find the next due time and
    count is an index search, so a backlog of 100,000 events costs none of them anything."""
    import sqlite3

    db = SQLiteStore(str(tmp_path / "s.sqlite3"))
    statements: list[str] = []
    db._db.set_trace_callback(statements.append)
    db.enqueue_events([event("a1", "chat:1"), event("a2", "chat:1")], T0)
    a1 = db.claim_due_event(T0)
    assert a1 is not None
    db.mark_failed(a1.id, T0, "x")
    a1 = db.claim_due_event(T0)
    assert a1 is not None
    db.mark_failed(a1.id, T0, "x", dead=True)
    db.enqueue_events([event("b1", "chat:2"), event("b2", "chat:2")], T0)
    b1 = db.claim_due_event(T0)
    assert b1 is not None
    db.mark_delivered(b1.id, next_not_before=T0 + 1)
    db.next_attempt_at()
    db.outbox_stats(T0)
    db.payments_count()
    db.close()
    outbox = {s for s in statements if "outbox" in s and not s.startswith(("BEGIN", "COMMIT"))}
    assert len(outbox) >= 8, outbox
    with sqlite3.connect(tmp_path / "s.sqlite3") as conn:
        for statement in outbox:
            plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + statement)]
            assert not [step for step in plan if step.startswith("SCAN") and "INDEX" not in step], (statement, plan)


def _backlog(chats: int, per_chat: int) -> SQLiteStore:
    """A store whose every chat has `per_chat` queued events, each chat's head failed and due only later:
    what a long Make outage leaves behind."""
    db = MemoryStore()
    db.enqueue_events([event(f"c{c}-{n}", f"chat:{c}") for c in range(chats) for n in range(per_chat)], T0)
    for row in db.claim_due_events(T0, limit=chats):
        db.mark_failed(row.id, T0 + 3600, "HTTP 503")
    return db


def _vm_steps(db: SQLiteStore, work: Callable[[], Any]) -> int:
    """How many SQLite virtual-machine instructions `work` runs on `db` (deterministic, unlike a timing)."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    db._db.set_progress_handler(count, 1)
    try:
        work()
    finally:
        db._db.set_progress_handler(None, 1)
    return steps[0]


@pytest.mark.parametrize("operation", ["claim", "next_attempt_at", "outbox_stats", "enqueue"])
def test_a_backlog_costs_the_outbox_nothing(operation: str) -> None:
    """Claiming, the next due time, the counts and enqueueing run as many SQLite instructions with 20,000
    queued events over 2,000 chats as with 20 over 2 (Make down: every head waits for its retry)."""
    work: dict[str, Callable[[SQLiteStore], Any]] = {
        "claim": lambda db: db.claim_due_events(T0 + 1, limit=50),
        "next_attempt_at": lambda db: db.next_attempt_at(),
        "outbox_stats": lambda db: db.outbox_stats(T0),
        "enqueue": lambda db: db.enqueue_event(event("new", "chat:1"), T0),
    }
    small, big = _backlog(2, 10), _backlog(2000, 10)
    cost_small = _vm_steps(small, lambda: work[operation](small))
    cost_big = _vm_steps(big, lambda: work[operation](big))
    assert cost_big <= cost_small * 1.5 + 50, (cost_small, cost_big)
    assert big.claim_due_events(T0 + 1, limit=50) == []  # nothing was due: the heads wait, the rest queue


def test_counts_follow_every_change_of_the_outbox() -> None:
    """The kept counts (pending, in flight, dead) always equal a count of the rows, whatever happens."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.tuples(st.sampled_from(["add", "claim", "deliver", "retry", "dead", "replay", "reset"]),
                             st.integers(0, 3)), max_size=40)

    @settings(max_examples=150, deadline=None)
    @given(ops)
    def run(steps: list[tuple[str, int]]) -> None:
        db = MemoryStore()
        claimed: list = []
        model: dict[str, list[str]] = {}  # order key -> live event ids in creation order
        for n, (op, key) in enumerate(steps):
            if op == "add":
                db.enqueue_event(event(f"e{n}", f"chat:{key}"), T0)
                model.setdefault(f"chat:{key}", []).append(f"e{n}")
            elif op == "claim":
                for row in db.claim_due_events(T0 + 1, limit=key + 1):
                    live = model[row.order_key]
                    # The head of its queue: the oldest live event of its chat (a replay may put an older
                    # letter behind an event that was in flight at the time, see the replay test).
                    assert row.event_id in live
                    assert not any(c.order_key == row.order_key for c in claimed)
                    claimed.append(row)
            elif op in ("deliver", "retry", "dead") and claimed:
                row = claimed.pop(key % len(claimed))
                if op == "deliver":
                    db.mark_delivered(row.id)
                    model[row.order_key].remove(row.event_id)
                else:
                    db.mark_failed(row.id, T0, "x", dead=op == "dead")
                    if op == "dead":
                        model[row.order_key].remove(row.event_id)
            elif op == "replay":
                for dead in db.dead_events():
                    model[dead.order_key].append(dead.event_id)
                db.replay_dead(T0)
            elif op == "reset":
                db.reset_inflight()
                claimed.clear()
            stats = db.outbox_stats(T0)
            actual = dict(db._run(lambda cur: cur.execute(
                "SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall()))
            heads = db._run(lambda cur: cur.execute("SELECT order_key, COUNT(*) FROM outbox WHERE is_head = 1 "
                                                    "GROUP BY order_key").fetchall())
            live_keys = db._run(lambda cur: {r[0] for r in cur.execute(
                "SELECT DISTINCT order_key FROM outbox WHERE status IN ('pending', 'inflight')")})
            assert stats["outbox_inflight"] == actual.get("inflight", 0) == len(claimed)
            assert stats["outbox_pending"] == actual.get("pending", 0) + actual.get("inflight", 0)
            assert stats["outbox_dead"] == actual.get("dead", 0)
            assert {k for k, c in heads} == live_keys and all(c == 1 for _, c in heads)  # one head per live queue
        # Everything left drains, each queue in its order, with nothing stuck.
        db.reset_inflight()
        drained: list[str] = []
        while (row := db.claim_due_event(T0 + 1)) is not None:
            drained.append(row.event_id)
            db.mark_delivered(row.id)
        assert sorted(drained) == sorted(e for live in model.values() for e in live)
        db.close()

    run()


def test_a_version_1_state_is_upgraded_in_place_keeping_its_queues(tmp_path: Path) -> None:
    """A state file written by the previous gateway (schema 1) with a backlog, an event in flight and a dead
    letter opens: every queue keeps its order and its head, what was in flight is due again, the counts
    are right, nothing is lost."""
    import sqlite3

    import store as store_module
    path = tmp_path / "v1.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(store_module._MIGRATIONS[0])
        db.execute("PRAGMA user_version=1")
        rows = [("a1", "chat:1", "pending"), ("a2", "chat:1", "pending"), ("b1", "chat:2", "inflight"),
                ("b2", "chat:2", "pending"), ("c1", "chat:3", "dead"), ("c2", "chat:3", "pending")]
        for event_id, key, status in rows:
            db.execute("INSERT INTO outbox (event_id, order_key, event_type, payload, created_at, status, "
                       "next_attempt_at) VALUES (?, ?, 'update', '{}', ?, ?, ?)", (event_id, key, T0, status, T0))
        db.execute("INSERT INTO payments VALUES ('ch', 'p', 1, 'RUB', 100, 0, ?, '{}')", (T0,))
    upgraded = SQLiteStore(str(path), exclusive=True)
    stats = upgraded.outbox_stats(T0)
    assert (stats["outbox_pending"], stats["outbox_inflight"], stats["outbox_dead"]) == (5, 0, 1)  # b1 due again
    assert upgraded.payments_count() == 1
    order: list[str] = []
    while (row := upgraded.claim_due_event(T0)) is not None:
        order.append(row.event_id)
        upgraded.mark_delivered(row.id)
    assert [e for e in order if e.startswith("a")] == ["a1", "a2"]
    assert [e for e in order if e.startswith("b")] == ["b1", "b2"]
    assert "c2" in order and "c1" not in order
    upgraded.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION


def _v1_file(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """A state file as the previous gateway (schema 1) left it, with these outbox rows (id order)."""
    import sqlite3

    import store as store_module
    with sqlite3.connect(path) as db:
        db.executescript(store_module._MIGRATIONS[0])
        db.execute("PRAGMA user_version=1")
        for event_id, key, status in rows:
            db.execute("INSERT INTO outbox (event_id, order_key, event_type, payload, created_at, status, "
                       "next_attempt_at) VALUES (?, ?, 'update', '{}', ?, ?, ?)", (event_id, key, T0, status, T0))


def test_only_the_gateway_upgrades_a_version_1_state_never_a_command(tmp_path: Path) -> None:
    """`python app.py dead-letters` on a version 1 file (its gateway may be running, or be rolled back to)
    stops with one line saying to start the gateway and leaves the file as it was; the gateway's start
    (the instance lock held) upgrades it."""
    import os
    import sqlite3
    import subprocess
    import sys

    from doubles import ROOT, TOKEN
    path = tmp_path / "v1.sqlite3"
    _v1_file(path, [("a1", "chat:1", "pending")])
    env = {**os.environ, "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": "https://hook.eu1.make.com/x", "STATE_DB": str(path)}
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "dead-letters"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "start the gateway (python app.py) once to upgrade it" in done.stderr
    assert done.stderr.count("\n") == 1 and TOKEN not in done.stderr + done.stdout
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    upgraded = SQLiteStore(str(path), exclusive=True)
    assert [upgraded.claim_due_event(T0).event_id] == ["a1"]
    upgraded.close()
    SQLiteStore(str(path)).close()  # upgraded: commands open it again


def test_a_version_1_chat_left_with_two_rows_in_flight_is_upgraded_in_order(tmp_path: Path) -> None:
    """Version 1 could leave two rows of one chat in flight (a replayed letter claimed beside a later
    event); the upgrade makes both due again, and the chat's events go out in their order."""
    path = tmp_path / "v1.sqlite3"
    _v1_file(path, [("a1", "chat:1", "inflight"), ("a2", "chat:1", "inflight"), ("a3", "chat:1", "pending")])
    upgraded = SQLiteStore(str(path), exclusive=True)
    order = []
    while (row := upgraded.claim_due_event(T0)) is not None:
        order.append(row.event_id)
        upgraded.mark_delivered(row.id)
    assert order == ["a1", "a2", "a3"]
    upgraded.close()


def test_a_queue_left_without_a_head_is_repaired(store: SQLiteStore) -> None:
    """A queue whose head mark was lost (a file changed by hand) gets its oldest event as head again."""
    store.enqueue_events([event("a1", "chat:1"), event("a2", "chat:1"), event("b1", "chat:2")], T0)
    store._run(lambda cur: cur.execute("UPDATE outbox SET is_head = 0 WHERE order_key = 'chat:1'"))
    assert [r.event_id for r in store.claim_due_events(T0, limit=5)] == ["b1"]
    assert store.repair_heads() == 1 and store.repair_heads() == 0
    assert [r.event_id for r in store.claim_due_events(T0, limit=5)] == ["a1"]


def test_outbox_stats_count_each_state(store: SQLiteStore) -> None:
    """Health sees pending (with in-flight), in-flight, dead, the oldest undelivered age and open batches."""
    assert store.outbox_stats(T0)["outbox_oldest_age_seconds"] is None
    store.enqueue_event(event("a1", "chat:1"), T0)
    store.enqueue_event(event("b1", "chat:2"), T0 + 5)
    store.enqueue_event(event("c1", "chat:3"), T0 + 6)
    a1 = store.claim_due_event(T0 + 10)
    b1 = store.claim_due_event(T0 + 10)
    assert a1 is not None and b1 is not None and (a1.event_id, b1.event_id) == ("a1", "b1")
    store.mark_failed(a1.id, T0 + 20, "gone", dead=True)
    add(store, 1, "open", T0)
    stats = store.outbox_stats(T0 + 10)
    assert stats["outbox_inflight"] == 1  # b1
    assert stats["outbox_pending"] == 2  # b1 in flight and c1 waiting
    assert stats["outbox_dead"] == 1  # a1
    assert stats["outbox_oldest_age_seconds"] == 5  # b1, enqueued at T0+5; the dead a1 does not count
    assert stats["stored_open_batches"] == 1


def test_meta_facts_are_stored(store: SQLiteStore) -> None:
    """A small fact is read back, and overwritten in place."""
    assert store.get_meta("offset") is None
    store.set_meta("offset", "10")
    store.set_meta("offset", "11")
    assert store.get_meta("offset") == "11"


# Flood control


def test_held_messages_are_counted_in_the_next_batch(store: SQLiteStore) -> None:
    """Messages held back by flood control are counted once each, and the user's next batch reports them."""
    assert hold(store, 10, 42, T0).held
    assert hold(store, 11, 42, T0 + 1).held
    assert not hold(store, 11, 42, T0 + 2).new  # a redelivered held update counts once
    assert store.seen(10) and store.seen(11)
    result = add(store, 12, "later", T0 + 3, max_messages=1)
    assert result.closed and result.batch is not None and result.batch.flood_held == 2
    claimed = store.claim_due_event(T0 + 3)
    assert claimed is not None and claimed.payload["flood_held"] == 2
    following = add(store, 13, "after", T0 + 4, max_messages=1)
    assert following.batch is not None and following.batch.flood_held == 0


def test_held_messages_of_other_users_are_not_mixed(store: SQLiteStore) -> None:
    """One user's held messages do not appear in another user's batch."""
    hold(store, 10, 1, T0)
    result = add(store, 11, "hi", T0, chat_id=2, user_id=2)
    stored = stored_batch(store, 2, 2)
    assert result.new and stored is not None and stored.flood_held == 0


# Durability


def test_everything_survives_reopening_the_file(tmp_path: Path) -> None:
    """Seen updates, open batches, the outbox and meta are all there after closing and reopening the file."""
    path = str(tmp_path / "state.sqlite3")
    first = SQLiteStore(path)
    add(first, 1, "hi", T0)
    add(first, 2, "there", T0 + 1)
    first.enqueue_event(event("a1", "chat:1"), T0)
    first.enqueue_event(event("b1", "chat:2"), T0)
    assert first.claim_due_event(T0) is not None  # in flight when the process "dies"
    first.set_meta("offset", "3")
    first.close()
    first.close()  # safe twice

    second = SQLiteStore(path)
    try:
        assert second.seen(1) and second.seen(2)
        (batch,) = second.open_batches()
        assert (batch.count, batch.first_at, batch.last_at) == (2, T0, T0 + 1)
        assert second.close_batch_if_due(42, 42, T0 + 100, due, build_batch_event) == (True, None)
        assert second.reset_inflight() == 1
        claimed = [second.claim_due_event(T0 + 100) for _ in range(3)]
        assert [c.event_id for c in claimed if c] == ["a1", "b1", f"batch-{batch.batch_id}"]
        assert claimed[2].payload["messages"] == [item(1, "hi"), item(2, "there")]
        assert second.get_meta("offset") == "3"
    finally:
        second.close()


def test_database_of_another_schema_version_is_refused_clearly(tmp_path) -> None:
    """A state file with a different schema version stops the start with a StoreError naming both versions."""
    import sqlite3

    import pytest as _pytest

    from store import SCHEMA_VERSION, SQLiteStore, StoreError
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY)")
    with _pytest.raises(StoreError, match=f"schema version 0, this gateway needs {SCHEMA_VERSION}"):
        SQLiteStore(str(path))
    fresh = SQLiteStore(str(tmp_path / "new.sqlite3"))
    fresh.close()
    SQLiteStore(str(tmp_path / "new.sqlite3")).close()  # its own file reopens fine


def _payment_events(duplicate: bool) -> list[NewEvent]:
    return [NewEvent("payment-x" + ("-dup" if duplicate else ""), "chat:1", "payment", {"duplicate": duplicate})]


def test_checkout_hold_refuses_another_buyer_until_it_expires(store: SQLiteStore) -> None:
    """An approved checkout holds its payload for its buyer: another buyer is `busy` until the hold expires."""
    assert store.decide_checkout(1, "q1", "order", user_id=7, now=100.0, hold_seconds=30) == "ok"
    assert store.decide_checkout(2, "q2", "order", user_id=8, now=110.0, hold_seconds=30) == "busy"
    assert store.decide_checkout(3, "q3", "other", user_id=8, now=110.0, hold_seconds=30) == "ok"
    assert store.decide_checkout(4, "q4", "order", user_id=8, now=131.0, hold_seconds=30) == "ok"  # expired
    assert store.decide_checkout(4, "q4", "order", user_id=8, now=131.0, hold_seconds=30) == "duplicate"


def test_the_same_buyer_may_check_out_again_while_holding(store: SQLiteStore) -> None:
    """A buyer whose card was declined checks out again at once: their new query replaces their hold (so
    releasing the old one later leaves it), and another buyer stays refused for the new hold's life."""
    assert store.decide_checkout(1, "q1", "order", user_id=7, now=100.0, hold_seconds=30) == "ok"
    assert store.decide_checkout(2, "q2", "order", user_id=7, now=105.0, hold_seconds=30) == "ok"
    assert store.holds("order", "q2", 106.0) and not store.holds("order", "q1", 106.0)
    store.release_checkout("order", "q1")  # the first one's late refusal must not free the second
    assert store.decide_checkout(3, "q3", "order", user_id=8, now=132.0, hold_seconds=30) == "busy"
    assert store.decide_checkout(4, "q4", "order", user_id=8, now=135.0, hold_seconds=30) == "ok"


def test_released_hold_lets_the_next_checkout_through(store: SQLiteStore) -> None:
    """A refused checkout's hold is released, so another buyer can check out at once."""
    assert store.decide_checkout(1, "q1", "order", user_id=7, now=100.0, hold_seconds=30) == "ok"
    store.release_checkout("order", "q1")
    assert store.decide_checkout(2, "q2", "order", user_id=8, now=101.0, hold_seconds=30) == "ok"


def test_texts_with_nul_characters_are_stored_and_matched(store: Store) -> None:
    """An invoice payload, query id and charge id may hold a NUL character (JSON allows it; PostgreSQL's text does
    not): checkouts, holds and payments still match them, and nothing fails."""
    payload, query = "order\x00-1", "q\x00"
    assert store.decide_checkout(1, query, payload, 42, T0, 30) == "ok"
    assert store.holds(payload, query, T0 + 1) and not store.holds("order-1", query, T0 + 1)
    assert store.decide_checkout(2, "q2", payload, 43, T0 + 1, 30) == "busy"
    assert store.record_payment(3, "charge\x00", payload, 42, "XTR", 5, {"payload": payload}, T0 + 2,
                                lambda dup: []) == (True, False)
    assert store.record_payment(4, "charge\x00", payload, 42, "XTR", 5, {}, T0 + 3, lambda dup: []) == (False, False)
    assert store.decide_checkout(5, "q3", payload, 44, T0 + 4, 30) == "paid"
    store.enqueue_event(NewEvent("e\x00", "chat:\x00", "update", {"text": "a\x00b"}), T0)
    row = store.claim_due_event(T0)
    assert row is not None and row.payload == {"text": "a\x00b"}
    store.mark_failed(row.id, T0, "Make said \x00", dead=True)
    assert store.dead_events()[0].payload == {"text": "a\x00b"}


def test_payment_is_recorded_once_per_charge_id_even_under_a_new_update_id(store: SQLiteStore) -> None:
    """The same charge id arriving in another update changes nothing; a new charge for a paid payload is a duplicate."""
    assert store.record_payment(1, "charge-1", "order", 7, "RUB", 100, {}, 100.0, _payment_events) == (True, False)
    assert store.record_payment(2, "charge-1", "order", 7, "RUB", 100, {}, 101.0, _payment_events) == (False, False)
    assert store.record_payment(3, "charge-2", "order", 7, "RUB", 100, {}, 102.0, _payment_events) == (True, True)
    assert store.payments_count() == 2
    assert store.decide_checkout(4, "q", "order", user_id=7, now=103.0, hold_seconds=30) == "paid"
    events = [store.claim_due_event(10**10) for _ in range(1)]
    assert events[0] is not None and events[0].event_id == "payment-x"


def test_paid_payload_and_holds_survive_a_restart(tmp_path: Path) -> None:
    """A paid payload and a live hold are still there after the file is reopened."""
    path = str(tmp_path / "state.sqlite3")
    first = SQLiteStore(path)
    first.record_payment(1, "charge-1", "paid-order", 7, "XTR", 50, {}, 100.0, _payment_events)
    assert first.decide_checkout(2, "q1", "held-order", user_id=7, now=100.0, hold_seconds=30) == "ok"
    first.close()
    second = SQLiteStore(path)
    assert second.decide_checkout(3, "q2", "paid-order", user_id=8, now=101.0, hold_seconds=30) == "paid"
    assert second.decide_checkout(4, "q3", "held-order", user_id=8, now=101.0, hold_seconds=30) == "busy"
    second.close()


def test_refund_unmarks_the_payload_once(store: SQLiteStore) -> None:
    """A refund of the paying charge makes the payload payable again; a repeated refund changes nothing."""
    store.record_payment(1, "charge-1", "order", 7, "XTR", 50, {}, 100.0, _payment_events)
    refund = [NewEvent("refund-charge-1", "chat:7", "payment_refunded", {})]
    assert store.record_refund(2, "charge-1", "order", {}, 101.0, refund) is True
    assert store.record_refund(3, "charge-1", "order", {}, 102.0, refund) is False
    assert store.decide_checkout(4, "q", "order", user_id=7, now=103.0, hold_seconds=30) == "ok"


def test_subscription_payments_are_never_duplicates_and_never_mark_the_payload_paid(store: SQLiteStore) -> None:
    """A subscription's renewals and other subscribers' first payments share its payload: none is a duplicate,
    the payload stays payable, and nobody's checkout of it holds it against another; a one-off payload paid
    twice is still a duplicate."""
    def pay(update_id: int, charge: str, payload: str, user: int, recurring: bool) -> tuple[bool, bool]:
        return store.record_payment(update_id, charge, payload, user, "XTR", 50, {}, 100.0 + update_id,
                                    _payment_events, recurring=recurring)

    assert pay(1, "a-first", "club", 7, True) == (True, False)
    assert pay(2, "a-renewal", "club", 7, True) == (True, False)
    assert pay(3, "b-first", "club", 8, True) == (True, False)
    assert pay(3, "b-first", "club", 8, True) == (False, False)  # redelivered
    assert store.decide_checkout(4, "q1", "club", user_id=9, now=110.0, hold_seconds=30) == "ok"
    assert store.decide_checkout(5, "q2", "club", user_id=10, now=111.0, hold_seconds=30) == "ok"
    assert pay(6, "once-1", "order", 7, False) == (True, False)
    assert pay(7, "once-2", "order", 8, False) == (True, True)
    assert store.decide_checkout(8, "q3", "order", user_id=9, now=120.0, hold_seconds=30) == "paid"


def test_checkout_decisions_follow_the_rules_whatever_the_sequence() -> None:
    """Whatever buyers check out, pay (once or by subscription), and have refused, each decision is the rule's:
    `paid` once a one-off payment paid the payload, else `busy` while another buyer holds a payload no
    subscription paid, else `ok`; and only a one-off payment of a paid payload is a duplicate."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    hold = 30.0
    ops = st.lists(st.tuples(st.sampled_from(["checkout", "checkout", "pay", "subscribe", "release", "wait"]),
                             st.integers(1, 3), st.sampled_from(["p", "q"])), max_size=30)

    @settings(max_examples=200, deadline=None)
    @given(ops)
    def run(steps: list[tuple[str, int, str]]) -> None:
        db = MemoryStore()
        now = T0
        paid: set[str] = set()
        subscribed: set[str] = set()
        holds: dict[tuple[str, int], tuple[str, float]] = {}  # (payload, buyer) -> (query, expires_at)
        for n, (op, buyer, payload) in enumerate(steps):
            if op == "wait":
                now += 11.0
            elif op == "checkout":
                others = any(p == payload and b != buyer and exp > now for (p, b), (_, exp) in holds.items())
                expected = ("paid" if payload in paid else "busy" if others and payload not in subscribed else "ok")
                assert db.decide_checkout(n, f"query-{n}", payload, buyer, now, hold) == expected
                assert db.decide_checkout(n, f"query-{n}", payload, buyer, now, hold) == "duplicate"
                if expected == "ok":
                    holds[(payload, buyer)] = (f"query-{n}", now + hold)
            elif op == "release":  # the buyer's latest checkout was refused by Make, or never answered
                query = holds.get((payload, buyer), ("none", 0.0))[0]
                db.release_checkout(payload, query)
                holds.pop((payload, buyer), None)
            else:
                recurring = op == "subscribe"
                duplicate = not recurring and payload in paid
                assert db.record_payment(n, f"charge-{n}", payload, buyer, "XTR", 50, {}, now, _payment_events,
                                         recurring=recurring) == (True, duplicate)
                if recurring:
                    subscribed.add(payload)
                    holds.pop((payload, buyer), None)
                else:
                    paid.add(payload)
                    holds = {k: v for k, v in holds.items() if k[0] != payload}
        db.close()

    run()


def _v2_file(path: Path) -> None:
    """A state file as the previous gateway (schema 2) left it: a live hold on `held`, and the Stars club
    subscription's first payment (which marked `club` paid) and its renewal (flagged a duplicate)."""
    import json
    import sqlite3

    import store as store_module
    with sqlite3.connect(path) as db:
        db.executescript(store_module._MIGRATIONS[0])
        db.executescript(store_module._MIGRATIONS[1])
        db.execute("PRAGMA user_version=2")
        db.execute("INSERT INTO checkout_holds VALUES ('held', 'q-old', ?)", (T0 + 30,))
        first = {"invoice_payload": "club", "is_recurring": True, "is_first_recurring": True}
        renewal = {"invoice_payload": "club", "is_recurring": True}
        db.execute("INSERT INTO payments VALUES ('c1', 'club', 7, 'XTR', 50, 0, ?, ?)", (T0 - 60, json.dumps(first)))
        db.execute("INSERT INTO payments VALUES ('c2', 'club', 7, 'XTR', 50, 1, ?, ?)", (T0 - 30, json.dumps(renewal)))
        db.execute("INSERT INTO paid_payloads VALUES ('club', 'c1', ?)", (T0 - 60,))
        db.execute("INSERT INTO payments VALUES ('c3', 'once', 7, 'XTR', 50, 0, ?, '{}')", (T0 - 10,))
        db.execute("INSERT INTO paid_payloads VALUES ('once', 'c3', ?)", (T0 - 10,))


def test_a_version_2_state_with_a_live_hold_is_upgraded(tmp_path: Path) -> None:
    """A version 2 file opens at the current version: its live hold (which names no buyer) still refuses every
    other checkout of its payload until it expires and is still its query's; the payload a subscription paid is
    no longer "paid", and the next renewal is no duplicate; a one-off paid payload stays paid."""
    import sqlite3

    import store as store_module
    path = tmp_path / "v2.sqlite3"
    _v2_file(path)
    upgraded = SQLiteStore(str(path), exclusive=True)
    assert upgraded.holds("held", "q-old", T0 + 1)  # a redelivered update of its query is answered again
    assert upgraded.decide_checkout(1, "q-new", "held", user_id=7, now=T0 + 1, hold_seconds=30) == "busy"
    assert upgraded.decide_checkout(2, "q-late", "held", user_id=7, now=T0 + 31, hold_seconds=30) == "ok"
    assert upgraded.decide_checkout(3, "q-club", "club", user_id=8, now=T0 + 1, hold_seconds=30) == "ok"
    assert upgraded.decide_checkout(4, "q-club2", "club", user_id=9, now=T0 + 2, hold_seconds=30) == "ok"
    assert upgraded.decide_checkout(5, "q-once", "once", user_id=8, now=T0 + 1, hold_seconds=30) == "paid"
    assert upgraded.record_payment(6, "c4", "club", 7, "XTR", 50, {}, T0 + 5, _payment_events,
                                   recurring=True) == (True, False)
    assert upgraded.payments_count() == 4
    upgraded.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION


def test_a_version_3_state_counts_its_sendmessages_in_flight_as_on_the_wire(tmp_path: Path) -> None:
    """Upgrading to version 4: a sendMessage an older gateway left in flight may have gone out, so it is
    on the wire (recorded as done at start, never sent twice); an answer to a button in flight, which may
    be repeated, and a pending sendMessage are not."""
    import json
    import sqlite3

    import store as store_module
    path = tmp_path / "v3.sqlite3"
    with sqlite3.connect(path) as db:
        for migration in store_module._MIGRATIONS[:3]:
            db.executescript(migration)
        db.execute("PRAGMA user_version=3")
        for event_id, key, method, status in (("m1", "reply:1", "sendMessage", "inflight"),
                                              ("a1", "callback:q", "answerCallbackQuery", "inflight"),
                                              ("m2", "reply:2", "sendMessage", "pending")):
            db.execute("INSERT INTO outbox (event_id, order_key, event_type, target, payload, created_at, status, "
                       "next_attempt_at, is_head) VALUES (?, ?, ?, 'telegram', ?, ?, ?, ?, 1)",
                       (event_id, key, method, json.dumps({"method": method, "params": {}}), T0, status, T0))
    upgraded = SQLiteStore(str(path), exclusive=True)
    assert [row.event_id for row in upgraded.interrupted_on_wire("telegram")] == ["m1"]
    upgraded.close()



# Opening: nothing that is not the gateway's is changed


def _foreign_file(path: Path) -> bytes:
    """A SQLite database of another program (rollback journal), and its bytes."""
    import sqlite3
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (x)")
    db.commit()
    db.close()
    return path.read_bytes()


def test_a_foreign_database_is_refused_unchanged_even_by_the_gateway(tmp_path: Path) -> None:
    """The gateway's own open refuses another program's SQLite file before anything is set on it: its bytes stay
    the same (it is not turned into a WAL database)."""
    path = tmp_path / "other.sqlite3"
    before = _foreign_file(path)
    with pytest.raises(StoreError, match="schema version 0"):
        SQLiteStore(str(path), exclusive=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite3", "other.sqlite3.lock"]


@pytest.mark.parametrize("read_only", [True, False], ids=["read", "write"])
def test_opening_an_existing_state_creates_and_converts_nothing(read_only: bool, tmp_path: Path) -> None:
    """With `existing`/`read_only`: no file is a StoreNotFound and none is made; an empty or foreign file is
    refused as it was; the gateway's file opens, read-only if asked (a write then fails)."""
    missing = tmp_path / "none" / "state.sqlite3"
    with pytest.raises(StoreNotFound):
        SQLiteStore(str(missing), existing=True, read_only=read_only)
    assert not missing.parent.exists()
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    with pytest.raises(StoreError, match="the file is empty"):
        SQLiteStore(str(empty), existing=True, read_only=read_only)
    assert empty.read_bytes() == b""
    foreign = tmp_path / "foreign.sqlite3"
    before = _foreign_file(foreign)
    with pytest.raises(StoreError, match="of something else"):
        SQLiteStore(str(foreign), existing=True, read_only=read_only)
    assert foreign.read_bytes() == before
    ours = tmp_path / "state.sqlite3"
    SQLiteStore(str(ours)).close()
    opened = SQLiteStore(str(ours), existing=True, read_only=read_only)
    try:
        assert opened.dead_events() == []
        if read_only:
            with pytest.raises(StoreError):
                opened.replay_dead(T0)
        else:
            assert opened.replay_dead(T0) == 0
    finally:
        opened.close()


def test_a_state_db_that_is_a_folder_or_a_device_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    """STATE_DB naming a folder or a device is a StorePathError saying so; no lock file is made beside it."""
    folder = tmp_path / "state.sqlite3"
    folder.mkdir()
    with pytest.raises(StorePathError, match="it is a folder, not a file"):
        SQLiteStore(str(folder), exclusive=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.sqlite3"]
    import os
    if os.name == "posix":
        with pytest.raises(StorePathError, match="not a regular file"):
            SQLiteStore(os.devnull, exclusive=True)


# Group commit


def _hold_the_line(store: SQLiteStore) -> tuple[threading.Event, threading.Thread]:
    """A unit that leads a group and stays in its transaction until released: what queues behind it
    meanwhile forms the next group."""
    inside, release = threading.Event(), threading.Event()

    def stay(cur: Any) -> None:
        inside.set()
        release.wait(10)

    thread = threading.Thread(target=store._run, args=(stay,))
    thread.start()
    assert inside.wait(10)
    return release, thread


def _commits(path: Path) -> tuple[SQLiteStore, list[str]]:
    """A file store whose statements are recorded (SQLite's trace callback: what really ran)."""
    store = SQLiteStore(str(path))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    return store, statements


def _one_group(store: SQLiteStore, statements: list[str], call: Callable[[int], Any], ids: Iterable[int],
               meanwhile: Callable[[], None] = lambda: None) -> list[str]:
    """`call(id)` for each of `ids`, each from a thread of its own, all queued behind a held transaction so that
    they form the next group; `meanwhile()` runs while they wait. The statements that ran after that."""
    release, leader = _hold_the_line(store)
    callers = [threading.Thread(target=call, args=(n,)) for n in ids]
    for caller in callers:
        caller.start()
    wait_until(lambda: len(store._line) == len(callers) + 1, what="every unit waiting behind the first")
    meanwhile()
    statements.clear()
    release.set()
    for thread in (leader, *callers):
        thread.join(10)
    return list(statements)


def test_units_that_wait_together_share_one_commit(tmp_path: Path) -> None:
    """Twelve messages that arrive while a transaction is under way are stored by one transaction with one
    COMMIT, written together (each statement hands the GIL over and back: one to read what is stored, one to
    write every table for all twelve, not one per message or per table), and each caller gets its own result
    after that commit."""
    store, statements = _commits(tmp_path / "state.sqlite3")
    results: dict[int, Any] = {}

    def send(update_id: int) -> None:
        results[update_id] = add(store, update_id, f"m{update_id}", T0 + update_id, user_id=update_id)

    def nobody_answered() -> None:
        assert results == {}  # nobody answered before their group is committed

    ran = _one_group(store, statements, send, range(1, 13), nobody_answered)
    assert ran.count("COMMIT") == 2  # the first group (the holder), then all twelve at once
    assert "SAVEPOINT unit" not in ran  # the twelve are one step: if it failed, the transaction is undone whole
    # (SQLite's trace repeats a statement for each row its triggers fire on, and shows a trigger's statements
    # as "-- " and their text)
    issued = [statement for statement in dict.fromkeys(ran[ran.index("COMMIT") + 1:]) if not statement.startswith("--")]
    assert [statement.split()[0] for statement in issued] == ["BEGIN", "SELECT", "INSERT", "COMMIT"], issued
    assert issued[2].startswith("INSERT INTO temp.ingest")
    assert all(results[n].new and results[n].batch.count == 1 for n in range(1, 13))
    assert len(store.open_batches()) == 12 and all(store.seen(n) for n in range(1, 13))


def test_a_group_written_together_that_fails_is_undone_whole(tmp_path: Path) -> None:
    """Messages of one group are one step without a savepoint: when their joint write fails (a batch that fills
    up there and cannot be made into its event), every caller gets the error, the transaction is rolled back
    with nothing of it stored, and the next group is stored as usual."""
    store, statements = _commits(tmp_path / "state.sqlite3")
    outcomes: dict[int, Any] = {}

    def broken(batch: Any, reason: str) -> Any:
        raise ValueError("cannot build the event")

    def send(update_id: int) -> None:
        try:
            outcomes[update_id] = store.add_message(update_id, update_id, update_id, ALICE, item(update_id, "hi"),
                                                    T0, 1, broken)
        except ValueError as err:
            outcomes[update_id] = err

    ran = _one_group(store, statements, send, range(1, 5))
    assert ran.count("COMMIT") == 1 and ran.count("ROLLBACK") == 1 and "SAVEPOINT unit" not in ran
    assert all(isinstance(outcomes[n], ValueError) for n in range(1, 5)), outcomes
    assert not any(store.seen(n) for n in range(1, 5)) and store.open_batches() == []
    assert add(store, 9, "later", T0).new and store.seen(9)


def test_a_unit_that_hides_a_rollback_is_not_reported_stored(store: Store) -> None:
    """A unit whose work swallows an error after which the database rolled the whole transaction back (SQLite)
    or will only roll it back (PostgreSQL, whose COMMIT of a failed transaction says nothing) is not told its work
    is stored: its caller gets a StoreError saying so, and the store goes on."""
    assert store.record_update(1, T0)
    # SQLite goes on after a failed statement unless told to roll back; PostgreSQL never goes on.
    conflict = "INSERT OR ROLLBACK INTO" if isinstance(store, SQLiteStore) else "INSERT INTO"

    def hides_it(cur: Any) -> bool:
        cur.execute("INSERT INTO seen_updates (update_id, received_at) VALUES (2, 0)")
        try:
            cur.execute(f"{conflict} seen_updates (update_id, received_at) VALUES (1, 0)")
        except (sqlite3.IntegrityError, psycopg.IntegrityError):
            pass
        return True

    with pytest.raises(StoreError, match="rolled back"):
        store._run(hides_it)
    assert not store.seen(2) and store.record_update(3, T0)


def test_a_unit_that_fails_is_undone_alone_and_its_group_commits(tmp_path: Path) -> None:
    """One unit of a group raises after writing (an event that cannot be serialized): its caller gets the
    error and nothing of it is stored, while the others of its group are stored and answered."""
    store, statements = _commits(tmp_path / "state.sqlite3")
    outcomes: dict[int, Any] = {}

    def record(update_id: int) -> None:
        payload = {"value": float("nan")} if update_id == 3 else {"value": update_id}
        try:
            outcomes[update_id] = store.record_update(update_id, T0, [event(f"e{update_id}", "chat:1", **payload)])
        except ValueError as err:
            outcomes[update_id] = err

    ran = _one_group(store, statements, record, range(1, 6))
    assert ran.count("COMMIT") == 2 and ran.count("ROLLBACK TO unit") == 1
    assert isinstance(outcomes[3], ValueError)
    assert [outcomes[n] for n in (1, 2, 4, 5)] == [True] * 4
    assert not store.seen(3) and all(store.seen(n) for n in (1, 2, 4, 5))
    assert [r.event_id for r in store.claim_due_events(T0, limit=10)] == ["e1"]  # one queue: its head


def test_a_transaction_lost_midway_fails_every_unit_of_its_group(tmp_path: Path) -> None:
    """When SQLite itself drops the transaction (as it does on an I/O error), no unit of the group is
    reported stored, including those that ran before the failure: none of them is acknowledged."""
    store, _ = _commits(tmp_path / "state.sqlite3")
    release, leader = _hold_the_line(store)
    outcomes: dict[str, Any] = {}

    def run(name: str, work: Callable[[Any], Any]) -> None:
        try:
            outcomes[name] = store._run(work)
        except StoreError as err:
            outcomes[name] = err

    def lose_the_transaction(cur: Any) -> None:
        cur.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    def before(cur: Any) -> bool:
        return store._mark_seen(cur, 1, T0)

    threads = [threading.Thread(target=run, args=("before", before))]
    threads[0].start()
    wait_until(lambda: len(store._line) == 2, what="the first unit waiting")
    threads.append(threading.Thread(target=run, args=("lost", lose_the_transaction)))
    threads[1].start()
    wait_until(lambda: len(store._line) == 3, what="the second unit waiting")
    release.set()
    for thread in (leader, *threads):
        thread.join(10)
    assert isinstance(outcomes["before"], StoreError) and isinstance(outcomes["lost"], StoreError)
    assert "disk I/O error" in str(outcomes["lost"])
    assert not store.seen(1)
    assert store.record_update(2, T0)  # the store goes on working


def test_work_inside_a_unit_may_use_the_store_again(store: SQLiteStore) -> None:
    """A unit's own work calling another store method (a callback that reads) runs in the same transaction
    instead of waiting for itself."""
    def work(cur: Any) -> tuple[bool, bool]:
        store._mark_seen(cur, 7, T0)
        return store.seen(7), store.seen(8)

    assert store._run(work) == (True, False)


def test_flood_control_is_asked_only_for_a_new_update(store: SQLiteStore) -> None:
    """`admit` is asked inside the storing transaction, once the update is known to be new: a repeat does not
    use up the user's allowance, and a refused message is counted for the next batch instead of stored."""
    asked: list[int] = []

    def admit_first_only() -> bool:
        asked.append(1)
        return len(asked) == 1

    first = store.add_message(1, 42, 42, ALICE, item(1, "a"), T0, 50, build_batch_event, admit_first_only)
    repeat = store.add_message(1, 42, 42, ALICE, item(1, "a"), T0, 50, build_batch_event, admit_first_only)
    held = store.add_message(2, 42, 42, ALICE, item(2, "b"), T0, 50, build_batch_event, admit_first_only)
    assert (first.new, first.held) == (True, False) and not repeat.new and (held.new, held.held) == (True, True)
    assert len(asked) == 2  # the repeat was not counted
    batch = stored_batch(store, 42, 42)
    assert batch is not None and [m["text"] for m in batch.messages] == ["a"] and batch.flood_held == 1


class _InterruptAt:
    """The store's connection, with a KeyboardInterrupt (SIGTERM's, in the gateway) arriving in the leader as
    it runs `sql`: `before` the statement reaches SQLite, or just after it returned."""

    def __init__(self, db: sqlite3.Connection, sql: str, after: bool) -> None:
        self._db, self._sql, self._after, self.armed = db, sql, after, True

    def cursor(self) -> Any:
        outer, cur = self, self._db.cursor()

        class Cursor:
            def execute(self, sql: str, *args: Any) -> Any:
                hit = sql == outer._sql and outer.armed
                if hit and not outer._after:
                    outer.armed = False
                    raise KeyboardInterrupt
                result = cur.execute(sql, *args)
                if hit:
                    outer.armed = False
                    raise KeyboardInterrupt
                return result

            def __getattr__(self, name: str) -> Any:
                return getattr(cur, name)

        return Cursor()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@pytest.mark.parametrize("sql, after", [("BEGIN IMMEDIATE", True), ("COMMIT", False), ("COMMIT", True)])
def test_an_interrupt_in_the_leader_leaves_no_transaction_open(tmp_path: Path, sql: str, after: bool) -> None:
    """A KeyboardInterrupt reaching the leader between its statements goes on in the leader, and the store keeps
    working: no transaction is left open (which would refuse every later group until a restart). What a COMMIT
    that went through stored stays stored; otherwise nothing of the group is."""
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))
    real = store._db
    store._db = _InterruptAt(real, sql, after)  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            store.record_update(1, T0)
    finally:
        store._db = real
    assert not real.in_transaction
    assert store.record_update(2, T0)
    assert store.seen(1) == (sql == "COMMIT" and after)



def test_a_stop_signal_reaching_the_leader_inside_another_threads_unit_stops_the_leader(tmp_path: Path) -> None:
    """SIGTERM arrives as a KeyboardInterrupt in the main thread, wherever it is: also inside the work of another
    thread's unit that the main thread runs as its group's leader. The interrupt is the main thread's (it must
    stop), not that other thread's: the group is undone, its units are told they were not stored, and the
    store goes on working."""
    import os
    import signal

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        pytest.skip("needs a POSIX signal handled in the main thread")

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        store = SQLiteStore(str(tmp_path / "state.sqlite3"))
        release, holder = _hold_the_line(store)
        other: dict[str, Any] = {}

        def signalled_meanwhile(cur: Any) -> bool:
            store._mark_seen(cur, 2, T0)
            os.kill(os.getpid(), signal.SIGUSR1)  # handled in the main thread, the one running this work
            for _ in range(1000):
                threading.Event().wait(0.001)
            return True

        def other_thread() -> None:
            try:
                other["outcome"] = store._run(signalled_meanwhile)
            except BaseException as err:  # noqa: B036 - what this thread got is what the test checks
                other["outcome"] = err

        def main_then_other() -> None:
            wait_until(lambda: len(store._line) == 2, what="the main thread's unit waiting")
            threading.Thread(target=other_thread).start()
            wait_until(lambda: len(store._line) == 3, what="the other thread's unit waiting")
            release.set()

        threading.Thread(target=main_then_other).start()
        with pytest.raises(KeyboardInterrupt):
            store._run(lambda cur: store._mark_seen(cur, 1, T0))  # leads the group after the holder's
        holder.join(10)
        wait_until(lambda: "outcome" in other, what="the other thread's answer")
        assert isinstance(other["outcome"], StoreError)
        assert not store.seen(1) and not store.seen(2)
        assert store.record_update(3, T0)
    finally:
        signal.signal(signal.SIGUSR1, previous)


# The WAL checkpoint


def _wal_pages(path: Path) -> int:
    """How many pages the WAL holds now, asked from a connection of its own (a PASSIVE checkpoint waits for
    nobody; on a WAL already copied back it copies nothing)."""
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_no_commit_copies_the_wal_back_a_thread_of_its_own_does(tmp_path: Path) -> None:
    """Commits never checkpoint (SQLite would, inside whichever commit crossed 1,000 pages, stalling its whole
    group): the `wal-checkpoint` thread copies the WAL back, after which the next write starts it over."""
    path = tmp_path / "state.sqlite3"
    store = SQLiteStore(str(path))
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    checkpointer = store._checkpointer
    assert checkpointer is not None and checkpointer._thread.name == "wal-checkpoint" and checkpointer._thread.is_alive()
    for n in range(1, 400):
        store.record_update(n, T0, [event(f"e{n}", f"chat:{n}", text="x" * 500)])
    pages, copied = checkpointer.checkpoint()
    assert pages > 100 and copied == pages  # everything was copied back
    store.record_update(400, T0)  # the first write after that starts the WAL over
    assert _wal_pages(path) < 10
    store.close()
    assert not checkpointer._thread.is_alive()


def test_a_wal_past_its_limit_is_started_over_even_under_writes_that_never_pause(tmp_path: Path) -> None:
    """Eight threads writing without a pause seldom leave the WAL fully copied for a PASSIVE checkpoint; past
    `wal_reset_pages`, once a turn has copied all the WAL held at the turn before, the checkpoint waits for the
    writer of the moment and the WAL starts over, so it stays bounded instead of growing with everything ever
    written. The test takes the `wal-checkpoint` thread's turns itself."""
    path = tmp_path / "state.sqlite3"
    store = SQLiteStore(str(path), wal_reset_pages=200)
    assert store._checkpointer is not None
    store._checkpointer._stopping.set()
    store._checkpointer._thread.join(10)
    stop = threading.Event()
    written = [0]

    def write(first: int) -> None:
        n = first
        while not stop.is_set():
            store.record_update(n, T0, [event(f"e{n}", f"chat:{n}", text="x" * 500)])
            n += 8
            written[0] += 1

    writers = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: written[0] >= 2000, timeout=60, what="2,000 updates written")
        before = store._checkpointer.checkpoint()[0]  # past 200 pages: copied back (all, or nearly)
        after = before
        for _ in range(5):  # the next turns (every half second in the thread): the WAL starts over in one
            at = written[0]
            wait_until(lambda: written[0] >= at + 50, timeout=60, what="writes going on between turns")
            store._checkpointer.checkpoint()
            at = written[0]
            wait_until(lambda: written[0] >= at + 50, timeout=60, what="writes going on after the turn")
            after = _wal_pages(path)
            if after < before / 2:
                break
        assert stop.is_set() is False  # still writing: the WAL started over under the writers
    finally:
        stop.set()
        for writer in writers:
            writer.join(10)
    assert before >= 200 and after < before / 2
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM seen_updates").fetchone()[0] == written[0]


def test_a_reader_pinning_the_wal_does_not_make_the_checkpoint_stop_the_writers(tmp_path: Path) -> None:
    """Another process's read transaction pins the WAL past `wal_reset_pages`: a RESTART could not start it
    over and, holding the write lock while it waited for that reader, stopped every commit for the whole busy
    timeout (2 s), again each turn. The checkpoint leaves it alone and commits go on at once."""
    path = tmp_path / "state.sqlite3"
    store = SQLiteStore(str(path), wal_reset_pages=20)
    for n in range(1, 50):
        store.record_update(n, T0, [event(f"e{n}", f"chat:{n}", text="x" * 500)])
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM seen_updates").fetchone()
        for n in range(50, 150):
            store.record_update(n, T0, [event(f"e{n}", f"chat:{n}", text="x" * 500)])
        assert store._checkpointer is not None
        started = time.monotonic()
        pages, copied = store._checkpointer.checkpoint()
        assert time.monotonic() - started < 0.5 and pages >= 20 and copied < pages
    finally:
        reader.close()
    store.close()


def test_a_sqlite_without_returning_is_refused_at_start_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python linked to a SQLite older than 3.35 (Debian 11, Ubuntu 20.04's system SQLite) could not store a
    single message (UPSERT ... RETURNING): it is refused when the store opens, saying what to do."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(StoreError, match=r"SQLite 3\.35 or newer is needed .*this Python has 3\.34\.1"):
        SQLiteStore(":memory:")


def _state(store: SQLiteStore) -> dict[str, Any]:
    """Everything the message path writes, batch ids replaced by their order of appearance (they are drawn
    afresh by each store)."""
    db = store._db
    names: dict[str, str] = {}

    def name(batch_id: str) -> str:
        return names.setdefault(batch_id, f"batch{len(names)}")
    batches = db.execute("SELECT batch_id, chat_id, user_id, user_json, first_at, last_at, count FROM batches "
                         "ORDER BY first_at, chat_id, user_id").fetchall()
    messages = db.execute("SELECT batch_id, seq, item_json FROM batch_messages ORDER BY rowid").fetchall()
    events = [json.loads(row[0]) for row in db.execute("SELECT payload FROM outbox ORDER BY id")]
    for event in events:
        event["event_id"] = name(event["event_id"].removeprefix("batch-"))
    return {"batches": [(name(b[0]), *b[1:]) for b in batches],
            "messages": [(name(m[0]), *m[1:]) for m in messages],
            "events": events,
            "seen": db.execute("SELECT update_id, received_at FROM seen_updates ORDER BY update_id").fetchall(),
            "held": db.execute("SELECT chat_id, user_id, held FROM flood_held ORDER BY chat_id, user_id").fetchall()}


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        result = call()
    except Exception as err:  # noqa: BLE001 - compared as the error's type
        return type(err).__name__
    if isinstance(result, Exception):
        return type(result).__name__
    batch = result.batch
    return (result.new, result.held, result.closed, batch and (batch.chat_id, batch.count, len(batch.messages)))


def test_messages_written_together_end_as_if_written_one_by_one(tmp_path: Path) -> None:
    """A group's messages are written with a few statements for them all: what it stores, and what each caller
    is told, is what storing them one after another gives. The group has repeats (of a stored update and within
    the group), messages held back and one whose flood check fails, a batch that fills up (closed into the
    outbox) with the user's next message opening a new one, several users, and an id too big for SQLite."""
    def refuse() -> bool:
        raise RuntimeError("flood control broke")
    plan: list[tuple[int, int, Callable[[], bool] | None]] = [(1, 7, None), (2, 8, None)]
    plan += [(10 + n, 7, None) for n in range(4)]  # fills user 7's batch (max 5) with update 1 ...
    plan += [(20, 7, None), (2, 8, None), (1, 7, None), (21, 9, lambda: False), (22, 9, refuse), (23, 9, None),
             (2 ** 63, 8, None), (24, 8, None), (25, 9, lambda: False)]
    one_by_one, together = SQLiteStore(str(tmp_path / "a.sqlite3")), SQLiteStore(str(tmp_path / "b.sqlite3"))
    # Update 1 is stored before, in both: its repeats later are repeats.
    for store in (one_by_one, together):
        store.add_message(1, 7, 7, ALICE, item(1, "m1"), T0, 5, build_batch_event)
    plan = plan[1:]

    def adding(store: SQLiteStore, n: int, update_id: int, user_id: int, admit: Callable[[], bool] | None) -> Any:
        return store._adding(update_id, user_id, user_id, {"id": user_id}, item(update_id, f"m{update_id}"),
                             T0 + n, 5, build_batch_event, admit)

    expected = [_outcome(lambda: one_by_one._run(
        lambda cur, args=adding(one_by_one, n, *step): one_by_one._add_messages(cur, [args])[0]))
        for n, step in enumerate(plan)]
    got = together._run(lambda cur: together._add_messages(cur, [adding(together, n, *step)
                                                                   for n, step in enumerate(plan)]))
    assert [_outcome(lambda result=result: result) for result in got] == expected
    assert expected[4] == (True, False, True, (7, 5, 5))  # the batch that filled up, and it was closed
    assert "RuntimeError" in expected and "OverflowError" in expected and (False, False, False, None) in expected
    assert _state(together) == _state(one_by_one)
    assert len(_state(together)["events"]) == 1 and _state(together)["held"] == [(9, 9, 2)]


def test_random_groups_end_as_if_written_one_by_one(tmp_path: Path) -> None:
    """Random groups of messages from a few users, with batches of 1 to 3 messages (so that a user's batches fill
    up, are closed and open again several times in one group), messages held back before and after those
    closings, repeats, and state left by earlier groups (open batches, held counts, events still queued): what
    each group stores, and what each caller is told, is what storing its messages one after another gives."""
    closed: list[BatchRow] = []
    for seed in range(12):
        rng = random.Random(seed)
        one_by_one = SQLiteStore(str(tmp_path / f"a{seed}.sqlite3"))
        together = SQLiteStore(str(tmp_path / f"b{seed}.sqlite3"))
        update_ids = itertools.count(1)
        stored: list[int] = []
        for group in range(4):
            maximum = rng.randint(1, 3)
            plan = []
            for _ in range(rng.randint(1, 14)):
                update_id = rng.choice(stored) if stored and rng.random() < 0.1 else next(update_ids)
                stored.append(update_id)
                plan.append((update_id, rng.choice((7, 8, 9)), rng.random() < 0.25))

            def adding(store: SQLiteStore, n: int, update_id: int, user_id: int, hold: bool) -> Any:
                return store._adding(update_id, user_id, user_id, {"id": user_id, "n": n},
                                     item(update_id, f"m{update_id}"), T0 + group * 100 + n, maximum,
                                     build_batch_event, (lambda: False) if hold else None)

            expected = [_outcome(lambda: one_by_one._run(
                lambda cur, args=adding(one_by_one, n, *step): one_by_one._add_messages(cur, [args])[0]))
                for n, step in enumerate(plan)]
            got = together._run(lambda cur: together._add_messages(cur, [adding(together, n, *step)
                                                                           for n, step in enumerate(plan)]))
            assert [_outcome(lambda result=result: result) for result in got] == expected, (seed, group, plan)
            assert _state(together) == _state(one_by_one), (seed, group, plan)
            closed += [result.batch for result in got if result.closed]
        heads = together._db.execute("SELECT order_key, COUNT(*) FROM outbox WHERE is_head = 1 GROUP BY order_key")
        assert all(count == 1 for _, count in heads)  # every queue has one head
        one_by_one.close()
        together.close()
    # The plans did what they are for: batches closed with messages held before them, in their order.
    assert any(batch.flood_held for batch in closed)
    assert all([m["update_id"] for m in batch.messages] == sorted(m["update_id"] for m in batch.messages)
               for batch in closed)


def test_events_queued_together_keep_a_head_when_one_of_them_was_already_stored(store: Store) -> None:
    """Events closed together are queued with two statements, the first of a queue made its head. If that one's
    id was already stored (it is then left out), the next event of its queue heads it instead: a queue without
    a head would never be sent."""
    store.record_update(1, T0, [event("taken", "chat:1")])
    store._run(lambda cur: store._enqueue_new(cur, [(event("taken", "chat:2"), T0), (event("fresh", "chat:2"), T0),
                                                    (event("other", "chat:3"), T0)]))
    claimed = store.claim_due_events(T0 + 1, "make", 10)
    assert sorted(row.event_id for row in claimed) == ["fresh", "other", "taken"]


def test_deliveries_settled_together_end_as_if_settled_one_by_one(tmp_path: Path) -> None:
    """Calls that end together are settled with three statements for them all: each delivered row leaves, its
    queue's next row becomes the head; a settle whose lease is no longer the row's writes nothing; one without a
    lease removes the row whatever its state. The outbox ends as settling them one by one leaves it."""
    def outbox(store: SQLiteStore) -> list[tuple[Any, ...]]:
        return store._db.execute("SELECT event_id, status, is_head, attempts FROM outbox ORDER BY id").fetchall()

    stores = SQLiteStore(str(tmp_path / "a.sqlite3")), SQLiteStore(str(tmp_path / "b.sqlite3"))
    settles = []
    for store in stores:
        for chat in range(4):
            store.record_update(chat + 1, T0, [event(f"e{chat}-{n}", f"chat:{chat}") for n in range(3)])
        claimed = {row.event_id: row for row in store.claim_due_events(T0, "make", 10)}
        assert sorted(claimed) == ["e0-0", "e1-0", "e2-0", "e3-0"]
        pending = store._db.execute("SELECT id FROM outbox WHERE event_id='e3-1'").fetchone()[0]
        settles.append([(claimed["e0-0"].id, claimed["e0-0"].lease), (claimed["e1-0"].id, claimed["e1-0"].lease),
                        (claimed["e2-0"].id, "a lease taken over since"), (pending, None)])
    one_by_one, together = stores
    expected = [one_by_one.mark_delivered(row_id, now=T0, next_not_before=0.0, lease=lease)  # the unit-by-unit way
                for row_id, lease in settles[0]]
    assert together._run(lambda cur: together._delivered(cur, settles[1])) == expected
    assert outbox(together) == outbox(one_by_one)
    assert [row.event_id for row in together.claim_due_events(T0 + 1, "make", 10)] == ["e0-1", "e1-1"]


def test_deliveries_settled_at_once_from_many_threads_all_move_their_queues_on(tmp_path: Path) -> None:
    """Forty calls ending at once, from forty threads: every row settled, every queue's next row claimed next."""
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))
    for chat in range(40):
        store.record_update(chat + 1, T0, [event(f"{which}-{chat}", f"chat:{chat}") for which in ("first", "next")])
    rows = store.claim_due_events(T0, "make", 100)
    assert len(rows) == 40
    start = threading.Barrier(40)

    def settle(row: Any) -> None:
        start.wait(10)
        store.mark_delivered(row.id, now=T0, lease=row.lease)
    threads = [threading.Thread(target=settle, args=(row,)) for row in rows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(row.event_id for row in store.claim_due_events(T0 + 1, "make", 100)) == sorted(
        f"next-{chat}" for chat in range(40))
    assert store._db.execute("SELECT COUNT(*) FROM outbox WHERE event_id LIKE 'first-%'").fetchone()[0] == 0


def test_a_group_with_several_held_messages_of_one_user_and_batches_closing_is_stored(store: Store) -> None:
    """One group: a user's message held back, another user's batch filling up (closed), the first user's next
    message held too, then a third user's batch filling up a few seconds later. Every message is stored (on
    PostgreSQL too, which refuses a statement that changes one row twice: the held counts are one row per user),
    both held ones are counted, and each closed batch's event is queued at its own time."""
    adds = [store._adding(1, 7, 7, ALICE, item(1, "held"), T0, 1, build_batch_event, lambda: False),
            store._adding(2, 8, 8, ALICE, item(2, "fills"), T0 + 1, 1, build_batch_event, None),
            store._adding(3, 7, 7, ALICE, item(3, "held too"), T0 + 2, 1, build_batch_event, lambda: False),
            store._adding(4, 9, 9, ALICE, item(4, "fills later"), T0 + 5, 1, build_batch_event, None)]
    results = store._run(lambda cur: store._add_messages(cur, adds))
    assert [(r.new, r.held, r.closed) for r in results] == [(True, True, False), (True, False, True),
                                                            (True, True, False), (True, False, True)]
    rows = {row.order_key: row for row in store.claim_due_events(T0 + 10, "make", 10)}
    assert (rows["chat:8"].created_at, rows["chat:9"].created_at) == (T0 + 1, T0 + 5)
    assert add(store, 5, "next", T0 + 6, chat_id=7, user_id=7).batch is not None
    closed = store.close_batch_if_due(7, 7, T0 + 100, lambda batch: (T0, "quiet"), build_batch_event)
    assert closed == (True, None)
    rows = store.claim_due_events(T0 + 101, "make", 10)  # (on a shared database the two above again: leases ran out)
    assert [row.payload["flood_held"] for row in rows if row.order_key == "chat:7"] == [2]


def test_a_message_held_after_a_batch_fills_up_in_the_same_group_counts_for_the_next_batch(tmp_path: Path) -> None:
    """In one group: a message that fills its user's batch (closed), then one of theirs that flood control holds
    back. The closed batch reports no held message; the held one is left for the user's next batch, as when
    they are written one by one."""
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))
    adds = [store._adding(1, 7, 7, ALICE, item(1, "fills"), T0, 1, build_batch_event, None),
            store._adding(2, 7, 7, ALICE, item(2, "held"), T0 + 1, 1, build_batch_event, lambda: False)]
    results = store._run(lambda cur: store._add_messages(cur, adds))
    assert results[0].closed and results[0].batch.flood_held == 0 and results[1].held
    assert store._db.execute("SELECT held FROM flood_held WHERE chat_id=7 AND user_id=7").fetchall() == [(1,)]


def test_a_batch_opened_earlier_keeps_its_first_time_to_the_microsecond(tmp_path: Path) -> None:
    """The second message of a batch, written in a later group, is told the batch's first time exactly (read back
    through JSON, a REAL would keep only 15 digits)."""
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))
    first = T0 + 0.123456789
    add(store, 1, "one", first)
    assert add(store, 2, "two", first + 1).batch.first_at == first


def test_close_commits_what_was_queued_without_waiting(tmp_path: Path) -> None:
    """A unit queued without waiting behind a blocking one, just as the store closes, is still committed and its
    continuation called (its request is answered)."""
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))
    release, holder = _hold_the_line(store)
    outcomes: list[Any] = []
    store.record_update_later(5, T0, [], lambda unit: outcomes.append(unit.outcome()))
    closer = threading.Thread(target=store.close)
    closer.start()
    release.set()
    holder.join(10)
    closer.join(10)
    assert outcomes == [True]


def test_a_continuation_that_exits_does_not_stop_the_committer(tmp_path: Path) -> None:
    """A continuation raising even SystemExit is logged, and the committer goes on: the next queued unit is
    committed and its continuation called (a dead committer would leave every later request unanswered)."""
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))

    def exits(unit: Any) -> None:
        raise SystemExit("a continuation exits")
    store.record_update_later(1, T0, [], exits)
    outcomes: list[Any] = []
    store.record_update_later(2, T0, [], lambda unit: outcomes.append(unit.outcome()))
    wait_until(lambda: outcomes, what="the second unit's continuation")
    assert outcomes == [True] and store.seen(1) and store.seen(2)
    store.close()


def test_the_store_s_writer_starts_the_wal_over_when_the_checkpoint_asks(tmp_path: Path) -> None:
    """Under writes that never pause, the checkpoint thread does not RESTART itself (it would hold every writer
    while it waited); it asks, and the store's writer starts the WAL over right after its next commit."""
    path = tmp_path / "state.sqlite3"
    store = SQLiteStore(str(path), wal_reset_pages=20)
    assert store._checkpointer is not None
    store._checkpointer._stopping.set()
    store._checkpointer._thread.join(10)
    for n in range(1, 101):
        store.record_update(n, T0, [event(f"e{n}", f"chat:{n}", text="x" * 500)])
    big = _wal_pages(path)
    store._checkpointer.restart_wanted.set()
    store.record_update(1000, T0)  # its group's leader starts the WAL over after the commit
    store.record_update(1001, T0)  # written from the WAL's beginning
    assert big >= 100 and _wal_pages(path) < big / 4
    assert not store._checkpointer.restart_wanted.is_set()
    store.close()
