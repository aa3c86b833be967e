"""End to end: a `kill -9` while a batch is open loses nothing and sends nothing twice."""

from __future__ import annotations

import pytest

from doubles import MakeDouble, TelegramDouble, wait_until
from helpers import deliver, start_in_mode, text_update


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_kill_9_with_open_batch_then_restart_delivers_it_once(
        mode: str, start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """Messages acknowledged before a `kill -9` reach Make once, in one batch, after the restart."""
    env = {"DEBOUNCE_SECONDS": "1.5", "MAX_WAIT_SECONDS": "10"}
    first = start_in_mode(start_service, mode, **env)
    for text in ("before", "the crash"):
        deliver(first, telegram, mode, text_update(text, user_id=31))
    wait_until(lambda: first.health()["active_batches"] == 1, what="the batch to be open")
    first.kill()
    assert make.events == []

    second = start_in_mode(start_service, mode, **env)
    event = wait_until(lambda: make.accepted(), timeout=15, what="the reloaded batch")[0]
    assert [m["text"] for m in event["messages"]] == ["before", "the crash"]
    assert event["reason"] in ("quiet", "restart")
    deliver(second, telegram, mode, text_update("after", user_id=31))
    wait_until(lambda: len(make.accepted()) == 2, what="the next batch")
    assert [e["text"] for e in make.accepted()] == ["before\nthe crash", "after"]
    assert second.stop() == 0


def test_overdue_batch_found_at_restart_is_closed_with_reason_restart(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A batch whose deadline passed while the service was down is sent at start with reason `restart`."""
    first = start_service(DEBOUNCE_SECONDS="5", MAX_WAIT_SECONDS="10")
    telegram.push_update(text_update("left behind", user_id=12))
    wait_until(lambda: first.health()["active_batches"] == 1, what="the batch to be open")
    first.kill()
    # Restarted with a 10 ms limit, the batch (opened well over 10 ms ago) is overdue at start.
    start_service(DEBOUNCE_SECONDS="0.01", MAX_WAIT_SECONDS="0.01")
    event = wait_until(lambda: make.accepted(), what="the overdue batch")[0]
    assert event["reason"] == "restart" and event["text"] == "left behind"


def test_sigterm_keeps_open_batch_for_next_start(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """SIGTERM exits 0 within a bounded time, and the batch still open then is delivered after restart."""
    first = start_service(DEBOUNCE_SECONDS="3", MAX_WAIT_SECONDS="10")
    telegram.push_update(text_update("graceful", user_id=13))
    wait_until(lambda: first.health()["active_batches"] == 1, what="the batch to be open")
    assert first.stop() == 0
    start_service(DEBOUNCE_SECONDS="0.3", MAX_WAIT_SECONDS="10")
    event = wait_until(lambda: make.accepted(), what="the batch after restart")[0]
    assert event["text"] == "graceful"
