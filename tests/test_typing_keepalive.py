"""typing_keepalive.py: the typing rhythm per mode, on one thread, against a Bot API double."""

from __future__ import annotations

from typing import Iterator

import pytest

from doubles import TOKEN, TelegramDouble, wait_until
from telegram_api import TelegramClient
from typing_keepalive import TypingKeepAlive, action_offsets


def test_simulate_is_the_original_rhythm() -> None:
    """simulate: typing at 0 s (shown 3 s), a 2 s pause, typing again at 5 s for the last 2 s."""
    assert action_offsets("simulate", 4, 120) == [0.0, 5.0]


def test_until_reply_renews_every_interval_up_to_the_maximum() -> None:
    """until_reply: an action every interval, the last one before the maximum."""
    assert action_offsets("until_reply", 4, 12) == [0, 4, 8]
    assert action_offsets("until_reply", 4, 13) == [0, 4, 8, 12]


def test_off_sends_nothing() -> None:
    """off: no action at all."""
    assert action_offsets("off", 4, 120) == []


@pytest.fixture
def client(telegram: TelegramDouble) -> Iterator[TelegramClient]:
    c = TelegramClient(TOKEN, telegram.url)
    yield c
    c.close()


def test_simulate_sends_two_actions_five_seconds_apart(client: TelegramClient, telegram: TelegramDouble) -> None:
    """In simulate mode a chat gets typing now and again 5 s later, then nothing more is scheduled."""
    keepalive = TypingKeepAlive(client, "simulate")
    keepalive.start_thread()
    try:
        keepalive.start(7)
        wait_until(lambda: len(telegram.calls_of("sendChatAction")) == 2, timeout=10, what="two actions")
        wait_until(lambda: keepalive.active_chats == 0, what="the run to end")
        first, second = telegram.times_of("sendChatAction")
        assert second - first == pytest.approx(5.0, abs=0.5)
        assert telegram.calls_of("sendChatAction")[0] == {"chat_id": 7, "action": "typing"}
    finally:
        keepalive.stop_thread()


def test_until_reply_renews_until_stopped(client: TelegramClient, telegram: TelegramDouble) -> None:
    """until_reply renews typing for every waiting chat on one thread, and stop() ends a chat's run."""
    keepalive = TypingKeepAlive(client, "until_reply", interval=0.5, max_seconds=60)
    keepalive.start_thread()
    try:
        keepalive.start(1)
        keepalive.start(2)
        wait_until(lambda: sum(c["chat_id"] == 1 for c in telegram.calls_of("sendChatAction")) >= 3,
                   what="three renewals in chat 1")
        assert keepalive.active_chats == 2
        keepalive.stop(1)
        assert keepalive.active_chats == 1
        sent_to_1 = sum(c["chat_id"] == 1 for c in telegram.calls_of("sendChatAction"))
        # Chat 2 keeps being renewed; by its next two renewals chat 1's run is certainly over.
        seen_2 = sum(c["chat_id"] == 2 for c in telegram.calls_of("sendChatAction"))
        wait_until(lambda: sum(c["chat_id"] == 2 for c in telegram.calls_of("sendChatAction")) >= seen_2 + 2,
                   what="two more renewals in chat 2")
        assert sum(c["chat_id"] == 1 for c in telegram.calls_of("sendChatAction")) <= sent_to_1 + 1
    finally:
        keepalive.stop_thread()


def test_blocked_chat_stops_its_typing(client: TelegramClient, telegram: TelegramDouble) -> None:
    """A 403 (the user blocked the bot) ends that chat's typing run at once."""
    telegram.script("sendChatAction", (403, {"ok": False, "error_code": 403,
                                             "description": "Forbidden: bot was blocked by the user"}))
    keepalive = TypingKeepAlive(client, "until_reply", interval=0.5, max_seconds=60)
    keepalive.start_thread()
    try:
        keepalive.start(9)
        wait_until(lambda: keepalive.active_chats == 0, what="the blocked chat to stop")
        assert len(telegram.calls_of("sendChatAction")) == 1
    finally:
        keepalive.stop_thread()
