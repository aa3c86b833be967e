"""telegram_outbox.py: durable Bot API calls, in process, against the Bot API double over real HTTP."""

from __future__ import annotations

from typing import Iterator

import pytest

from doubles import TOKEN, TelegramDouble, wait_until
from store import MemoryStore, SQLiteStore
from telegram_api import TelegramClient
from telegram_outbox import ANSWER_WINDOW_SECONDS, ANSWERS_TARGET, TelegramOutbox, callback_answer
from typing_keepalive import TypingKeepAlive

T0 = 1_763_900_000.0


@pytest.fixture
def parts(telegram: TelegramDouble) -> Iterator[tuple[SQLiteStore, list[float], TelegramOutbox]]:
    """A store, a settable wall clock, and the callback-answers loop on them, talking to the double."""
    store, clock = MemoryStore(), [T0]
    client = TelegramClient(TOKEN, telegram.url)
    answers = TelegramOutbox(store, client, TypingKeepAlive(client, "off"), target=ANSWERS_TARGET,
                             name="callback-answers", clock=lambda: clock[0])
    answers.start()
    yield store, clock, answers
    answers.stop()
    client.close()
    store.close()


def test_an_answer_past_telegrams_window_is_never_sent(parts, telegram: TelegramDouble) -> None:
    """An answer still waiting when the press is older than Telegram's window (a slow Bot API, a restart)
    is dropped, not sent to be refused, and not kept as a dead letter."""
    store, clock, answers = parts
    clock[0] = T0 + ANSWER_WINDOW_SECONDS + 1
    store.enqueue_event(callback_answer("late", pressed_at=T0), clock[0])
    wait_until(lambda: store.outbox_stats(clock[0])["outbox_pending"] == 0, what="the answer dropped")
    assert telegram.calls_of("answerCallbackQuery") == []
    assert store.outbox_stats(clock[0])["outbox_dead"] == 0


def test_an_answer_held_by_flood_control_past_the_window_is_not_sent_again(parts, telegram: TelegramDouble) -> None:
    """A 429 whose retry_after ends after the window: the answer is tried once and then dropped."""
    store, clock, answers = parts
    telegram.script("answerCallbackQuery", (429, {"ok": False, "error_code": 429, "description":
                                                  "Too Many Requests: retry after 25",
                                                  "parameters": {"retry_after": 25}}))
    store.enqueue_event(callback_answer("flooded", pressed_at=T0), T0)
    wait_until(lambda: telegram.calls_of("answerCallbackQuery"), what="the first try")
    wait_until(lambda: store.next_attempt_at(ANSWERS_TARGET) == T0 + 25, what="the retry set after the wait")
    clock[0] = T0 + 26
    answers.wakeup()
    wait_until(lambda: store.outbox_stats(clock[0])["outbox_pending"] == 0, what="the answer dropped")
    assert len(telegram.calls_of("answerCallbackQuery")) == 1


def test_an_answer_within_the_window_is_retried_after_a_network_error(parts, telegram: TelegramDouble) -> None:
    """A 502 from the Bot API inside the window is retried, and the press is answered."""
    store, clock, answers = parts
    telegram.script("answerCallbackQuery", (502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}))
    store.enqueue_event(callback_answer("flaky", pressed_at=T0), T0)
    wait_until(lambda: telegram.calls_of("answerCallbackQuery"), what="the first try")
    # Move the clock only once the retry is set, or the retry would be timed from the new clock.
    wait_until(lambda: (at := store.next_attempt_at(ANSWERS_TARGET)) is not None and at <= T0 + 1,
               what="the retry set")
    clock[0] = T0 + 2
    answers.wakeup()
    wait_until(lambda: len(telegram.calls_of("answerCallbackQuery")) == 2, what="the retry")
    wait_until(lambda: store.outbox_stats(clock[0])["outbox_pending"] == 0, what="the answer done")
