"""Two stores on one database, as two gateway instances have them: leases and fencing, batches and queues
written from both at once, one poller, the sweep, and copying a single instance's state into PostgreSQL.

Each test runs on a SQLite file opened twice (one writer at a time, by its lock) and on PostgreSQL (two
connections, every instance's transactions at once)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest

from batching import build_batch_event
from debounce import DebounceSettings, deadline
from doubles import wait_until
from store import BatchRow, NewEvent, SQLiteStore, Store, StoreError, _batch_key, open_store
from store_postgres import PostgresStore, copy_state

T0 = 1_763_900_000.0
ALICE = {"id": 42, "first_name": "Alice"}
SETTINGS = DebounceSettings(debounce_seconds=4.0, max_wait_seconds=15.0, max_messages=7)


@pytest.fixture(params=["file", "postgres"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two stores on one database: two instances' views of it."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        stores: tuple[Store, Store] = (PostgresStore(url), PostgresStore(url))
    else:
        path = str(tmp_path / "state.sqlite3")
        stores = (SQLiteStore(path), SQLiteStore(path))
    yield stores
    for store in stores:
        store.close()


def event(event_id: str, order_key: str = "chat:1") -> NewEvent:
    return NewEvent(event_id, order_key, "update", {"event_id": event_id})


def item(update_id: int) -> dict[str, Any]:
    return {"update_id": update_id, "type": "text", "text": f"m{update_id}"}


DEADLOCKS: list[str] = []  # what `retried` met that was a deadlock: there must be none


def retried(call: Callable[[], Any]) -> Any:
    """`call()` until the store takes it, as Telegram resends an update answered 503 (a SQLite file opened twice
    is locked by one writer at a time, and a wait for it may time out)."""
    for _ in range(200):
        try:
            return call()
        except StoreError as err:
            if "deadlock" in str(err):
                DEADLOCKS.append(str(err))
            continue
    raise AssertionError("the store kept failing")


def alongside(workers: list[threading.Thread], helpers: list[threading.Thread], stop: threading.Event) -> None:
    """Run `workers` with `helpers` beside them; once the workers are done, set `stop` and wait for the helpers."""
    for thread in workers + helpers:
        thread.start()
    for thread in workers:
        thread.join(60)
    stop.set()
    for thread in helpers:
        thread.join(60)


def test_an_answer_under_a_lost_lease_writes_nothing(pair: tuple[Store, Store]) -> None:
    """A row claimed again (its first claimer looked dead) is settled only by the new claim: the first
    claimer's late answer, failure or on-the-wire mark changes nothing."""
    a, b = pair
    a.enqueue_event(event("e1"), T0)
    first = a.claim_due_events(T0, "make", 1, lease_seconds=30)[0]
    assert b.claim_due_events(T0 + 29, "make", 10) == []  # a live lease is nobody else's
    assert b.reset_inflight("make", T0 + 31) == 1  # one process: every row in flight; shared: the expired ones
    second = b.claim_due_events(T0 + 31, "make", 1, lease_seconds=30)[0]
    assert second.id == first.id and second.lease != first.lease and second.attempts == 2
    assert a.mark_delivered(first.id, [event("reply-1", "telegram:1")], T0, lease=first.lease) == set()
    assert a.mark_failed(first.id, T0 + 5, "late", dead=True, lease=first.lease) is False
    a.retry_with(first.id, {"event_id": "e1", "changed": True}, T0 + 5, "late", lease=first.lease)
    a.release_claims([first.id], T0, lease=first.lease)
    with pytest.raises(StoreError, match="claimed again"):
        a.mark_on_wire(first.id, lease=first.lease)
    assert b.outbox_stats(T0)["outbox_inflight"] == 1 and b.dead_events() == []
    assert b.mark_delivered(second.id, [event("reply-1", "telegram:1")], T0, lease=second.lease) == {"reply-1"}
    stats = a.outbox_stats(T0)
    assert (stats["outbox_pending"], stats["outbox_inflight"], stats["outbox_dead"]) == (1, 0, 0)  # the reply only


def test_a_row_whose_claimer_died_is_claimed_again_only_on_a_shared_database(pair: tuple[Store, Store]) -> None:
    """On PostgreSQL an instance claims a row whose lease ran out (its instance died) and learns whether its call
    had begun to go out; with one process, a row in flight waits for that process's next start."""
    a, b = pair
    a.enqueue_event(NewEvent("m1", "telegram:1", "sendMessage", {"method": "sendMessage"}, target="telegram"), T0)
    first = a.claim_due_events(T0, "telegram", 1, lease_seconds=30)[0]
    a.mark_on_wire(first.id, lease=first.lease)
    again = b.claim_due_events(T0 + 31, "telegram", 5)
    if not b.shared:
        assert again == []
        return
    assert [row.id for row in again] == [first.id] and again[0].was_on_wire and again[0].lease != first.lease
    assert b.interrupted_on_wire("telegram", T0 + 32) == []  # claimed again: live once more
    # That claimer dies too before recording anything: the next one still learns the call may have arrived.
    third = a.claim_due_events(T0 + 32 + 46, "telegram", 5)
    assert [row.id for row in third] == [first.id] and third[0].was_on_wire


def test_two_instances_adding_to_one_users_batches_lose_and_repeat_nothing(pair: tuple[Store, Store]) -> None:
    """Messages of one user reach two instances at once while both close the user's batches (by size, by
    deadline, by the sweep): every message ends in exactly one closed batch, each batch counting what it holds."""
    a, b = pair
    closed: list[BatchRow] = []
    lock = threading.Lock()

    def build(batch: BatchRow, reason: str) -> NewEvent:
        with lock:
            closed.append(batch)
        return build_batch_event(batch, reason)

    ids = iter(range(1, 241))
    take = threading.Lock()

    def sender(store: Store) -> None:
        while True:
            with take:
                update_id = next(ids, None)
            if update_id is None:
                return
            retried(lambda: store.add_message(update_id, 7, 42, ALICE, item(update_id), T0 + update_id, 7, build))

    def closer(store: Store, stop: threading.Event) -> None:
        while not stop.is_set():
            retried(lambda: store.close_batch_if_due(7, 42, T0 + 10_000, lambda batch: (0.0, "flushed"), build))
            retried(lambda: store.close_due_batches(T0 + 10_000, 0.0, 0.0, lambda batch, now: (0.0, "restart"), build))

    stop = threading.Event()
    alongside([threading.Thread(target=sender, args=(store,)) for store in (a, b, a, b)],
              [threading.Thread(target=closer, args=(store, stop)) for store in (a, b)], stop)
    retried(lambda: a.close_batch_if_due(7, 42, T0 + 10_000, lambda batch: (0.0, "flushed"), build))
    got = [message["update_id"] for batch in closed for message in batch.messages]
    assert sorted(got) == list(range(1, 241))  # each once: none lost, none in two batches
    assert DEADLOCKS == []  # units of different kinds never share a transaction on a shared database
    for batch in closed:
        assert 1 <= batch.count == len(batch.messages) <= 7
    assert a.outbox_stats(T0)["outbox_pending"] == len(closed) and a.open_batches() == []


def test_events_of_one_chat_stay_in_order_when_two_instances_queue_and_deliver_them(pair: tuple[Store, Store]) -> None:
    """Two instances add events to one chat's queue while two others deliver its head: one event in flight at a
    time, delivered in the order of the queue, none lost, and the queue never left without a head."""
    a, b = pair
    delivered: list[str] = []
    in_flight = threading.Semaphore(1)
    stop = threading.Event()

    def producer(store: Store, prefix: str) -> None:
        for n in range(40):
            retried(lambda: store.enqueue_event(event(f"{prefix}{n:02d}"), T0))

    def deliverer(store: Store) -> None:
        while not stop.is_set() or store.outbox_stats(T0)["outbox_pending"]:
            rows = retried(lambda: store.claim_due_events(T0, "make", 5, lease_seconds=600))
            for row in rows:
                assert in_flight.acquire(blocking=False), "two events of one chat in flight at once"
                delivered.append(row.event_id)
                in_flight.release()
                assert retried(lambda: store.mark_delivered(row.id, (), T0, lease=row.lease)) == set()

    alongside([threading.Thread(target=producer, args=(store, prefix)) for store, prefix in ((a, "a"), (b, "b"))],
              [threading.Thread(target=deliverer, args=(store,)) for store in (a, b)], stop)
    assert sorted(delivered) == sorted([f"a{n:02d}" for n in range(40)] + [f"b{n:02d}" for n in range(40)])
    for prefix in "ab":  # each instance's events in the order it queued them
        mine = [e for e in delivered if e.startswith(prefix)]
        assert mine == sorted(mine)
    assert a.repair_heads() == 0 and a.outbox_stats(T0)["outbox_pending"] == 0


def test_two_buyers_at_two_instances_never_both_hold_one_invoice(pair: tuple[Store, Store]) -> None:
    """Two buyers' pre-checkouts of one invoice reach two instances at the same moment: exactly one is held."""
    a, b = pair
    for round_ in range(15):
        payload = f"invoice-{round_}"
        decisions: dict[int, str] = {}
        start = threading.Barrier(2)

        def decide(store: Store, buyer: int) -> None:
            start.wait()
            decisions[buyer] = retried(lambda: store.decide_checkout(round_ * 10 + buyer, f"q{buyer}", payload,
                                                                     buyer, T0, 30))

        threads = [threading.Thread(target=decide, args=(store, buyer)) for store, buyer in ((a, 1), (b, 2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(decisions.values()) == ["busy", "ok"], decisions


def test_only_one_instance_polls_and_another_takes_over_when_it_goes(pair: tuple[Store, Store]) -> None:
    """On PostgreSQL one instance holds the poller's turn until its connection goes, then another takes it;
    one process alone always has it (the state's lock file keeps any other away)."""
    a, b = pair
    assert a.poller_turn()
    if not a.shared:
        return
    assert not b.poller_turn() and a.poller_turn() and not b.poller_turn()
    a.close()
    wait_until(b.poller_turn, timeout=10)
    assert b.poller_turn()


def test_the_sweep_closes_overdue_batches_of_any_instance(pair: tuple[Store, Store]) -> None:
    """A batch stored by an instance that then died is closed by another's sweep once overdue, not before."""
    a, b = pair
    a.add_message(1, 7, 42, ALICE, item(1), T0, 50, build_batch_event)
    a.add_message(2, 7, 43, ALICE, item(2), T0 + 3, 50, build_batch_event)

    def due(batch: BatchRow, now: float) -> tuple[float, str]:
        return deadline(batch.first_at, batch.last_at, batch.count, SETTINGS)[0] + 5, "restart"

    assert b.close_due_batches(T0 + 8, 9.0, 20.0, due, build_batch_event) == []
    closed = b.close_due_batches(T0 + 9.5, 9.0, 20.0, due, build_batch_event)
    assert [(batch.user_id, [m["update_id"] for m in batch.messages]) for batch in closed] == [(42, [1])]
    row = b.claim_due_events(T0 + 10, "make", 5)[0]
    assert row.payload["reason"] == "restart" and row.payload["messages"][0]["update_id"] == 1
    assert [batch.user_id for batch in b.open_batches()] == [43]


def test_the_sweep_leaves_a_batch_another_transaction_is_busy_with(postgres_url: str) -> None:
    """The sweep skips a batch whose user another instance's transaction holds (it will close it or add to it),
    rather than wait for it."""
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    try:
        a.add_message(1, 7, 42, ALICE, item(1), T0, 50, build_batch_event)
        holding, release = threading.Event(), threading.Event()

        def hold(cur: Any) -> None:
            a._lock_keys(cur, [_batch_key(7, 42)])
            holding.set()
            release.wait(30)

        holder = threading.Thread(target=lambda: a._run(hold))
        holder.start()
        assert holding.wait(30)
        try:
            assert b.close_due_batches(T0 + 100, 4.0, 15.0, lambda batch, now: (0.0, "restart"),
                                       build_batch_event) == []
        finally:
            release.set()
            holder.join(30)
        assert len(b.close_due_batches(T0 + 100, 4.0, 15.0, lambda batch, now: (0.0, "restart"),
                                       build_batch_event)) == 1
    finally:
        a.close()
        b.close()


def test_a_single_instance_state_is_copied_whole_into_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """copy-state's copy: open batches, queues (heads, retries, dead letters, rows left in flight), the de-dup
    window and payments arrive as they were, and the copy goes on where the old gateway stopped."""
    path = str(tmp_path / "state.sqlite3")
    old = SQLiteStore(path)
    old.add_message(1, 7, 42, ALICE, item(1), T0, 50, build_batch_event)
    old.add_message(2, 7, 42, ALICE, item(2), T0 + 1, 50, build_batch_event)
    old.enqueue_events([event("q1", "chat:1"), event("q2", "chat:1"), event("d1", "chat:2"),
                        event("f1", "chat:3")], T0)
    dead = old.claim_due_events(T0, "make", 10)
    for row in dead:
        if row.event_id == "d1":
            old.mark_failed(row.id, T0, "gone", dead=True)
        elif row.event_id == "f1":
            old.mark_failed(row.id, T0 + 60, "Make down")
    old.enqueue_event(NewEvent("m1", "telegram:5", "sendMessage", {"method": "sendMessage"}, target="telegram"), T0)
    wire = old.claim_due_events(T0, "telegram", 1)[0]
    old.mark_on_wire(wire.id)
    assert old.decide_checkout(3, "qa", "invoice", 42, T0, 30) == "ok"
    old.record_payment(4, "charge-1", "paid-invoice", 42, "XTR", 5, {"total_amount": 5}, T0, lambda dup: [])
    before = old.outbox_stats(T0)
    old.close()

    source = SQLiteStore(path, existing=True, read_only=True)
    target = PostgresStore(postgres_url)
    try:
        copied = copy_state(source, target)
        assert copied["outbox"] == 5 and copied["batch_messages"] == 2 and copied["payments"] == 1
        assert target.outbox_stats(T0) == before
        assert [(batch.user_id, batch.count) for batch in target.open_batches()] == [(42, 2)]
        assert [row.event_id for row in target.dead_events()] == ["d1"]
        assert not target.record_update(1, T0) and target.payments_count() == 1
        assert target.decide_checkout(5, "qb", "invoice", 43, T0 + 1, 30) == "busy"
        assert target.decide_checkout(6, "qc", "paid-invoice", 43, T0 + 1, 30) == "paid"
        # q1 was in flight when the old gateway stopped: claimed again at once; the sendMessage that had begun
        # to go out says so, and is not sent twice.
        assert [row.event_id for row in target.claim_due_events(T0 + 1, "make", 10)] == ["q1"]
        sent = target.claim_due_events(T0 + 1, "telegram", 10)
        assert [(row.event_id, row.was_on_wire) for row in sent] == [("m1", True)]
        target.enqueue_event(event("new"), T0 + 2)  # ids go on after the copied ones
        with pytest.raises(StoreError, match="already holds gateway state"):
            copy_state(source, target)
    finally:
        source.close()
        target.close()


def test_a_postgresql_that_may_lose_commits_is_refused_unless_relaxed(postgres_url: str) -> None:
    """With synchronous_commit off a confirmed commit may be lost in a crash: the store refuses, saying how to
    fix it, unless the operator said DATABASE_DURABILITY=relaxed."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        database = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    with pytest.raises(StoreError, match="synchronous_commit=off.*DATABASE_DURABILITY=relaxed"):
        PostgresStore(postgres_url)
    PostgresStore(postgres_url, relaxed=True).close()


def test_settings_open_the_store_they_name(tmp_path: Path, postgres_url: str) -> None:
    """DATABASE_URL opens PostgreSQL (the clocks agree here); without it the SQLite file, held exclusively."""
    from config import Config
    shared = open_store(Config("1:x", "http://x", database_url=postgres_url, state_db=str(tmp_path / "unused")))
    try:
        assert shared.shared and abs(shared.clock_skew()) < 1.0  # type: ignore[attr-defined]
        assert not (tmp_path / "unused").exists()
    finally:
        shared.close()
    alone = open_store(Config("1:x", "http://x", state_db=str(tmp_path / "state.sqlite3")))
    try:
        assert not alone.shared
        with pytest.raises(StoreError, match="another gateway"):
            open_store(Config("1:x", "http://x", state_db=str(tmp_path / "state.sqlite3")))
    finally:
        alone.close()
    assert sqlite3.connect(str(tmp_path / "state.sqlite3")).execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


def test_an_instance_stopped_inside_a_transaction_holds_the_others_up_for_seconds_only(postgres_url: str) -> None:
    """An instance paused in the middle of a transaction (holding a user's batch): another instance's write of
    that user fails after a short wait (503, Telegram resends) instead of hanging; once the server has ended
    the stalled transaction the write goes through, and the paused instance, resumed, finds its work undone
    and goes on with a new connection."""
    a = PostgresStore(postgres_url, lock_wait_seconds=0.5, stalled_seconds=1.5)
    b = PostgresStore(postgres_url, lock_wait_seconds=0.5, stalled_seconds=1.5)
    try:
        holding, resume = threading.Event(), threading.Event()
        outcome: list[Any] = []

        def paused(cur: Any) -> None:
            a._lock_keys(cur, [_batch_key(7, 42)])
            cur.execute("INSERT INTO meta VALUES ('paused', 'yes')")
            holding.set()
            resume.wait(30)  # the process stopped: no statement, the transaction open

        def run_paused() -> None:
            try:
                outcome.append(a._run(paused))
            except StoreError as err:
                outcome.append(err)

        thread = threading.Thread(target=run_paused)
        thread.start()
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(StoreError, match="lock timeout"):
            b.add_message(1, 7, 42, ALICE, item(1), T0, 50, build_batch_event)
        assert time.monotonic() - started < 5
        wait_until(lambda: _stored(b, 2), timeout=10, what="the write once the stalled transaction is ended")
        resume.set()
        thread.join(30)
        assert isinstance(outcome[0], StoreError) and a.get_meta("paused") is None
        assert a.record_update(3, T0) and b.seen(3)
    finally:
        a.close()
        b.close()


def _stored(store: Store, update_id: int) -> bool:
    try:
        return store.add_message(update_id, 7, 42, ALICE, item(update_id), T0, 50, build_batch_event).new
    except StoreError:
        return False


def test_a_renewed_lease_stays_its_claimer_s(pair: tuple[Store, Store]) -> None:
    """A claimer working on a row renews its lease: nobody else claims it meanwhile, and a renewal after another
    claim took the row changes nothing."""
    a, b = pair
    a.enqueue_event(event("e1"), T0)
    mine = a.claim_due_events(T0, "make", 1, lease_seconds=30)[0]
    assert a.renew_leases([(mine.id, mine.lease or "")], T0 + 55) == 1 and a.holds_lease(mine.id, mine.lease)
    assert b.claim_due_events(T0 + 31, "make", 5) == []
    if not b.shared:
        return
    theirs = b.claim_due_events(T0 + 56, "make", 5)[0]
    assert a.renew_leases([(mine.id, mine.lease or "")], T0 + 90) == 0 and not a.holds_lease(mine.id, mine.lease)
    assert b.holds_lease(theirs.id, theirs.lease)


def test_a_call_longer_than_the_lease_is_made_once_and_a_stale_claim_posts_nothing(postgres_url: str) -> None:
    """Two instances' delivery loops on one database with a 1 s lease and a Make that takes 2.5 s: the event is
    posted once (its claimer renews the lease while the call lasts). A claim that lost its row before posting
    (its process stopped between the two) posts nothing."""
    from delivery import DeliveryWorkers
    from doubles import MakeDouble
    from make_client import MakeClient
    from telegram_api import TelegramClient
    from typing_keepalive import TypingKeepAlive
    make = MakeDouble()
    make.latency = 2.5
    stores = [PostgresStore(postgres_url), PostgresStore(postgres_url)]
    clients = [MakeClient(make.url + "/hook", timeout=10) for _ in stores]
    telegram = TelegramClient("1:x", "http://127.0.0.1:9")
    loops = [DeliveryWorkers(store, client, TypingKeepAlive(telegram, "off"), max_rate=0) for store, client in
             zip(stores, clients)]
    try:
        for loop in loops:
            loop._lease = 1.0
            loop.start()
        stores[0].enqueue_event(NewEvent("batch-1", "chat:1", "message_batch", {"event_id": "batch-1",
                                                                                 "chat_id": 1}), time.time())
        wait_until(lambda: stores[0].outbox_stats(time.time())["outbox_pending"] == 0, timeout=20,
                   what="the event delivered")
        assert [e["event_id"] for e in make.events] == ["batch-1"]
        for loop in loops:
            loop.stop()
        stores[0].enqueue_event(event("stale"), time.time())
        stale = stores[0].claim_due_events(time.time(), "make", 1, lease_seconds=0.1)[0]
        # The claimer stopped past its lease: the row is claimed again.
        taken = wait_until(lambda: stores[1].claim_due_events(time.time(), "make", 1), timeout=5)[0]
        loops[0]._handle(stale)
        assert [e["event_id"] for e in make.events] == ["batch-1"] and stores[1].holds_lease(taken.id, taken.lease)
    finally:
        for loop in loops:
            loop.stop()
        for store in stores:
            store.close()
        for client in clients:
            client.close()
        telegram.close()
        make.close()


def test_two_instances_closing_batches_of_the_same_chats_together_never_wait_for_each_other(
        pair: tuple[Store, Store]) -> None:
    """Two instances each close two users' batches in one transaction, the users of two group chats taken in
    opposite orders, both having built their events when the other starts queueing them: each queues its
    events with every chat's queue held at once, in one order, so neither waits for the other in a circle
    (PostgreSQL would end one transaction as a deadlock)."""
    a, b = pair
    for n, (chat, user) in enumerate([(-100, 1), (-200, 2), (-100, 3), (-200, 4)], start=1):
        a.add_message(n, chat, user, {"id": user}, {"type": "text", "text": "x"}, T0, 50, build_batch_event)
    both_built = threading.Barrier(2, timeout=5)
    outcomes: list[Any] = []

    def closing(store: Store, keys: list[tuple[int, int]]) -> None:
        built: list[NewEvent] = []

        def build(batch: BatchRow, reason: str) -> NewEvent:
            built.append(build_batch_event(batch, reason))
            if len(built) == 2 and isinstance(store, PostgresStore):  # (SQLite: one writer at a time)
                both_built.wait()
            return built[-1]
        try:
            outcomes.append(store.close_batches_if_due(keys, T0 + 60, lambda batch: (0.0, "quiet"), build))
        except Exception as err:  # noqa: BLE001 - the test's verdict
            outcomes.append(err)

    threads = [threading.Thread(target=closing, args=(a, [(-200, 2), (-100, 1)])),
               threading.Thread(target=closing, args=(b, [(-100, 3), (-200, 4)]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes == [[(True, None), (True, None)]] * 2
    assert a.open_batches() == [] and a.outbox_stats(T0 + 60)["outbox_pending"] == 4


def test_the_sweep_and_an_instance_closing_batches_of_the_same_chats_never_wait_for_each_other(
        pair: tuple[Store, Store], request: pytest.FixtureRequest) -> None:
    """One instance sweeps two overdue batches of two group chats while another closes two batches of the same
    chats together, in the other order, both having built their events when the other starts queueing them:
    both lock every queue at once, in one order, so neither waits for the other in a circle. (Each chat pair
    is tried both ways round: which order is the hashes' decides.)"""
    a, b = pair
    shared = isinstance(a, PostgresStore)  # (SQLite: one writer at a time, nothing to interleave)
    watch = psycopg.connect(request.getfixturevalue("postgres_url"), autocommit=True) if shared else None
    update_id = 0
    for x, y in ((-100, -200), (-200, -100), (-300, -400), (-400, -300)):
        for user, chat, at in ((1, x, T0), (2, y, T0 + 1), (3, y, T0 + 30), (4, x, T0 + 31)):
            update_id += 1
            a.add_message(update_id, chat, user, {"id": user}, {"type": "text", "text": "x"}, at, 50,
                          build_batch_event)
        both_built = threading.Barrier(2, timeout=5)
        outcomes: dict[str, Any] = {}

        def building(store: Store) -> Callable[[BatchRow, str], NewEvent]:
            built: list[NewEvent] = []

            def build(batch: BatchRow, reason: str) -> NewEvent:
                built.append(build_batch_event(batch, reason))
                if len(built) == 2 and watch is not None:
                    both_built.wait()
                    if store is a:  # the sweep goes on once the other has taken its queues, or waits for one
                        wait_until(lambda: "together" in outcomes or watch.execute(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0],
                            timeout=10, what="the other transaction at its queues")
                return built[-1]
            return build

        def sweep() -> None:
            try:  # only users 1 and 2 are quiet for 25 s
                outcomes["sweep"] = sorted(batch.user_id for batch in a.close_due_batches(
                    T0 + 27, 25.0, 3600.0, lambda batch, now: (0.0, "restart"), building(a)))
            except Exception as err:  # noqa: BLE001 - the test's verdict
                outcomes["sweep"] = err

        def together() -> None:
            try:
                outcomes["together"] = b.close_batches_if_due([(y, 3), (x, 4)], T0 + 60,
                                                              lambda batch: (0.0, "quiet"), building(b))
            except Exception as err:  # noqa: BLE001 - the test's verdict
                outcomes["together"] = err

        threads = [threading.Thread(target=sweep), threading.Thread(target=together)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert outcomes == {"sweep": [1, 2], "together": [(True, None), (True, None)]}, (x, y)
        assert a.open_batches() == []
    if watch is not None:
        watch.close()
