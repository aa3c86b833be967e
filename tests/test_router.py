"""router.py: where each update goes, with a real (in-memory) store and no threads."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from batching import BatchManager
from debounce import DebounceManager, DebounceSettings
from doubles import wait_until
from helpers import text_update
from metrics import GatewayMetrics
from router import UpdateRouter
from store import MemoryStore


class ExplodingPayments:
    """A payments handler with a bug: it raises on every update."""

    def handle(self, update: dict[str, Any]) -> bool:
        raise KeyError("a field nobody expected")


@pytest.fixture
def parts():
    store = MemoryStore()
    batches = BatchManager(store, DebounceSettings(60, 120, 50))
    router = UpdateRouter(store, batches, DebounceManager(30, 60), GatewayMetrics(), ("callback_query",),
                          payments=ExplodingPayments())
    yield store, batches, router
    store.close()


def test_ordinary_message_is_stored_in_its_batch(parts) -> None:
    """A user's text is stored in an open batch and counted as stored."""
    store, batches, router = parts
    assert router.handle(text_update("hi", user_id=5, update_id=1)).outcome == "stored"
    assert batches.active_batches == 1 and store.open_batches()[0].count == 1
    assert router.handle(text_update("hi", user_id=5, update_id=1)).outcome == "duplicate"


def test_invalid_updates_are_refused_without_storing(parts) -> None:
    """Not an object, or no integer update_id that fits in 64 bits: invalid, nothing stored."""
    store, _, router = parts
    for bad in ([], "x", {}, {"update_id": "1"}, {"update_id": True}, {"update_id": 2**63}, {"update_id": 1.0},
                {"update_id": -1}):
        assert router.handle(bad).outcome == "invalid"
    assert store.last_update_id() is None


def test_a_routing_bug_quarantines_the_update_instead_of_losing_it(parts) -> None:
    """An exception while routing still stores the update and forwards it verbatim to Make."""
    store, _, router = parts
    update = {"update_id": 77, "pre_checkout_query": {"id": "q", "invoice_payload": "p"}}
    assert router.handle(update).outcome == "quarantined"
    event = store.claim_due_event(now=10**10)
    assert event is not None and event.payload["update"] == update
    assert router.handle(update).outcome == "duplicate"


def test_unknown_kind_is_acknowledged_and_dropped(parts) -> None:
    """A kind that is not forwarded is stored as seen and ignored, with no event."""
    store, _, router = parts
    assert router.handle({"update_id": 9, "new_update_kind": {"x": 1}}).outcome == "ignored"
    assert store.claim_due_event(now=10**10) is None
    assert store.seen(9)


def test_update_ids_are_remembered_for_at_least_a_day() -> None:
    """A redelivery 23 hours later is still a duplicate; ids older than the window are forgotten."""
    store = MemoryStore()
    hours = 3600.0

    def router_at(wall: float) -> UpdateRouter:
        batches = BatchManager(store, DebounceSettings(60, 120, 50), clock=lambda: wall)
        return UpdateRouter(store, batches, DebounceManager(30, 60), GatewayMetrics(), (), clock=lambda: wall)

    assert router_at(0.0).handle({"update_id": 1, "x": {}}).outcome == "ignored"
    assert router_at(23 * hours).handle({"update_id": 1, "x": {}}).outcome == "duplicate"
    assert router_at(49 * hours).handle({"update_id": 2, "x": {}}).outcome == "ignored"  # prunes
    assert not store.seen(1) and store.seen(2)
    store.close()


def test_each_update_gets_one_info_line_without_its_content(parts, caplog) -> None:
    """One INFO line per update received: id, kind, chat and what became of it; a repeat and a dropped kind
    say so on their own line; the text is never logged."""
    _, _, router = parts
    with caplog.at_level(logging.INFO, logger="gateway.router"):
        router.handle(text_update("secret words", user_id=5, update_id=31))
        router.handle(text_update("secret words", user_id=5, update_id=31))
        router.handle({"update_id": 32, "edited_message": {"chat": {"id": 5}, "from": {"id": 5}, "text": "secret"}})
        router.handle({"update_id": 33, "new\nkind": {}})
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        "update 31 (message) from chat 5: stored",
        "update 31 (message) from chat 5: a repeat; ignored",
        "update 32 (edited_message) from chat 5: acknowledged and dropped: kind not forwarded (see "
        "FORWARD_UPDATE_KINDS)",
        "update 33 (unknown kind 'new\\nkind'): acknowledged and dropped: kind not forwarded (see "
        "FORWARD_UPDATE_KINDS)",
    ]
    assert "secret" not in caplog.text


class BrokenFlood(DebounceManager):
    """Flood control with a bug: it raises when asked."""

    def should_process(self, user_id: int, now: float) -> bool:
        raise KeyError("a field nobody expected")


def _held_line(store: Any) -> tuple[threading.Event, threading.Thread]:
    """A unit that leads a group and stays in its transaction until released."""
    inside, release = threading.Event(), threading.Event()
    thread = threading.Thread(target=store._run, args=(lambda cur: (inside.set(), release.wait(10)),))
    thread.start()
    assert inside.wait(10)
    return release, thread


def test_a_message_handled_later_is_answered_once_committed(parts) -> None:
    """The webhook's path: `handle_later()` returns at once, and the answer comes only after the message's group
    is committed, from the thread that committed it (the caller's thread is free meanwhile)."""
    store, batches, router = parts
    assert router.handle(text_update("first", user_id=4, update_id=0)).outcome == "stored"  # (its hourly prune)
    release, holder = _held_line(store)
    answers: list[tuple[Any, str]] = []
    router.handle_later(text_update("hi", user_id=5, update_id=1),
                        lambda result: answers.append((result, threading.current_thread().name)))
    assert answers == [] and router.last_update_id == 0  # queued behind the held group, not yet stored
    release.set()
    holder.join(10)
    wait_until(lambda: answers, what="the answer")
    assert answers[0][0].outcome == "stored" and answers[0][1] == "store-committer"
    assert [b.count for b in store.open_batches()] == [1, 1] and batches.active_batches == 2
    assert router.last_update_id == 1
    router.handle_later(text_update("hi", user_id=5, update_id=1), answers.append)
    wait_until(lambda: len(answers) == 2, what="the repeat's answer")
    assert answers[1].outcome == "duplicate"


def test_other_updates_handled_later_are_answered_before_it_returns(parts) -> None:
    """Anything but an ordinary message goes the synchronous way: answered before `handle_later()` returns."""
    _, _, router = parts
    answers: list[Any] = []
    router.handle_later({"update_id": 9, "poll": {"id": "p"}}, answers.append)
    router.handle_later({"update_id": "x"}, answers.append)
    assert [answer.outcome for answer in answers] == ["ignored", "invalid"]


def test_a_message_that_breaks_later_is_quarantined_not_lost() -> None:
    """A bug inside the message's unit (here, flood control raising) on the webhook's path stores the update
    anyway, forwarded verbatim to Make, as `handle()` does."""
    store = MemoryStore()
    router = UpdateRouter(store, BatchManager(store, DebounceSettings(60, 120, 50)), BrokenFlood(30, 60),
                          GatewayMetrics(), ())
    answers: list[Any] = []
    update = text_update("hi", user_id=5, update_id=3)
    router.handle_later(update, answers.append)
    wait_until(lambda: answers, what="the answer")
    assert answers[0].outcome == "quarantined"
    event = store.claim_due_event(now=10**10)
    assert event is not None and event.payload["update"] == update and not store.open_batches()
    store.close()


def test_a_message_that_cannot_even_be_forwarded_later_is_still_answered(monkeypatch) -> None:
    """Flood control raising and the forwarding failing too: the webhook's path acknowledges and drops the
    update, as `handle()` does; its caller is answered either way (a request left without an answer would hold
    Telegram's connection, and the stop)."""
    store = MemoryStore()
    router = UpdateRouter(store, BatchManager(store, DebounceSettings(60, 120, 50)), BrokenFlood(30, 60),
                          GatewayMetrics(), ())

    def broken_forward(*args: Any) -> Any:
        raise ValueError("cannot build the event")
    monkeypatch.setattr("router.forward_event", broken_forward)
    answers: list[Any] = []
    router.handle_later(text_update("hi", user_id=5, update_id=3), answers.append)
    wait_until(lambda: answers, what="the answer")
    assert answers[0].outcome == "quarantined" and store.seen(3) and store.claim_due_event(now=10**10) is None
    store.close()
