"""End to end: the real service in a subprocess, Bot API and Make doubles on 127.0.0.1, both modes."""

from __future__ import annotations

from typing import Callable

import pytest

from doubles import MakeDouble, Service, TelegramDouble, wait_until
from helpers import text_update


def _deliver(service: Service, telegram: TelegramDouble, mode: str, update: dict) -> None:
    """Hand one update to the service the way `mode` does."""
    if mode == "polling":
        telegram.push_update(update)
    else:
        from config import derive_webhook_secret
        from doubles import TOKEN
        response = service.post("/webhook", json=update,
                                headers={"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)})
        assert response.status_code == 200, response.text


def _start(start_service: Callable[..., Service], mode: str, **env: str) -> Service:
    if mode == "webhook":
        env.setdefault("WEBHOOK_URL", "https://gateway.example.test/webhook")
    return start_service(**env)


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_burst_of_three_messages_is_one_make_event_in_order(
        mode: str, start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """Three quick messages from one user reach Make as one message_batch with all three, in order."""
    service = _start(start_service, mode)
    for text in ("hi", "I need", "a refund"):
        _deliver(service, telegram, mode, text_update(text, user_id=42))
    events = wait_until(lambda: make.accepted(), what="a Make event")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    events = make.accepted()
    assert len(events) == 1
    event = events[0]
    assert event["event_type"] == "message_batch"
    assert event["chat_id"] == 42 and event["user_id"] == 42
    assert [m["text"] for m in event["messages"]] == ["hi", "I need", "a refund"]
    assert event["text"] == "hi\nI need\na refund"
    assert event["batch_size"] == 3 and event["reason"] == "quiet"
    assert make.requests[0]["headers"]["X-Event-Id"] == event["event_id"]
    assert service.stop() == 0
