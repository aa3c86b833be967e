"""telegram_outbox.py: durable Bot API calls, in process, against the Bot API double over real HTTP."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import pytest

from doubles import TOKEN, FloodControl, TelegramDouble, wait_until
from store import MemoryStore, NewEvent, SQLiteStore
from telegram_api import TelegramClient
from telegram_outbox import (ANSWER_WINDOW_SECONDS, ANSWERS_TARGET, TARGET, USER_CHAT_PREFIX, TelegramOutbox, bot_call,
                             callback_answer)
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


@pytest.fixture
def paced(telegram: TelegramDouble) -> Iterator[Callable[..., tuple[SQLiteStore, TelegramOutbox]]]:
    """Make the messages loop (target `telegram`) with the given pacing, on a fresh store, talking to the double."""
    made: list[tuple[SQLiteStore, TelegramClient, TelegramOutbox]] = []

    def make(**pacing: Any) -> tuple[SQLiteStore, TelegramOutbox]:
        store, client = MemoryStore(), TelegramClient(TOKEN, telegram.url)
        outbox = TelegramOutbox(store, client, TypingKeepAlive(client, "off"), **pacing)
        outbox.start()
        made.append((store, client, outbox))
        return store, outbox

    yield make
    for store, client, outbox in made:
        outbox.stop()
        client.close()
        store.close()


def reply_part(chat_id: int, n: int) -> NewEvent:
    """Part `n` of a reply to `chat_id`, in the chat's queue, its text `<chat>:<n>`."""
    return bot_call(f"reply-{chat_id}-{n}", f"{USER_CHAT_PREFIX}{chat_id}", "sendMessage",
                    {"chat_id": chat_id, "text": f"{chat_id}:{n}"})


def sent_texts(telegram: TelegramDouble) -> list[str]:
    return [params["text"] for params in telegram.calls_of("sendMessage")]


def test_a_chats_next_part_waits_its_interval_while_a_quiet_chat_goes_at_once(paced, telegram) -> None:
    """With a frozen clock, each chat's first part goes at once; the second part of the same chat becomes due
    one interval after the answer to the first, and goes only once the clock gets there."""
    clock = [T0]
    store, outbox = paced(chat_interval=1.0, clock=lambda: clock[0])
    store.enqueue_events([reply_part(1, 0), reply_part(1, 1), reply_part(2, 0)], T0)
    wait_until(lambda: len(sent_texts(telegram)) == 2, what="both chats' first parts")
    wait_until(lambda: store.next_attempt_at(TARGET) == T0 + 1.0, what="the second part due an interval later")
    assert sorted(sent_texts(telegram)) == ["1:0", "2:0"]
    clock[0] = T0 + 1.0
    outbox.wakeup()
    wait_until(lambda: len(sent_texts(telegram)) == 3, what="the second part")
    assert [t for t in sent_texts(telegram) if t.startswith("1:")] == ["1:0", "1:1"]


def test_a_part_queued_after_its_chat_went_quiet_still_waits_its_interval(paced, telegram) -> None:
    """A part queued just after its chat's queue emptied (a second `POST /reply`, an admin notice to the
    same chat) is put back until the interval has passed, not sent early."""
    clock = [T0]
    store, outbox = paced(chat_interval=1.0, clock=lambda: clock[0])
    store.enqueue_event(reply_part(1, 0), T0)
    wait_until(lambda: store.outbox_stats(T0)["outbox_pending"] == 0, what="the first part sent")
    store.enqueue_event(bot_call("admin-1", "admin", "sendMessage", {"chat_id": 1, "text": "1:1"}), T0)
    wait_until(lambda: store.next_attempt_at(TARGET) == T0 + 1.0, what="the late part put back until its turn")
    assert sent_texts(telegram) == ["1:0"]
    clock[0] = T0 + 1.0
    outbox.wakeup()
    wait_until(lambda: sent_texts(telegram) == ["1:0", "1:1"], what="the late part sent in its turn")


def test_a_paced_outbox_gets_no_429_from_a_bot_api_enforcing_the_limits(paced, telegram) -> None:
    """Against a double that refuses more than 4 messages a second or two within 1 s to one chat, 5 chats'
    3 parts each all arrive, each chat's in order, without a single 429."""
    flood = FloodControl(overall=4, chat_gap=1.0)
    telegram.reject_if = flood
    store, _ = paced(max_rate=4, chat_interval=1.0)
    store.enqueue_events([reply_part(chat, n) for chat in range(1, 6) for n in range(3)], time.time())
    wait_until(lambda: len(flood.accepted) == 15, timeout=30, what="every part sent")
    assert flood.refused == []
    for chat in range(1, 6):
        assert [p["text"] for _, c, p in flood.accepted if c == chat] == [f"{chat}:{n}" for n in range(3)]
    assert min(flood.gaps()) >= 1.0 and flood.most_in_window() <= 4
    wait_until(lambda: store.outbox_stats(time.time())["outbox_pending"] == 0, what="the outbox empty")


def test_an_unpaced_outbox_provokes_429s_from_the_same_bot_api(paced, telegram) -> None:
    """The same burst unpaced is refused in part (the double does enforce the limits), and still arrives
    whole and in order after Telegram's waits."""
    flood = FloodControl(overall=4, chat_gap=1.0)
    telegram.reject_if = flood
    store, _ = paced()
    store.enqueue_events([reply_part(chat, n) for chat in range(1, 6) for n in range(3)], time.time())
    wait_until(lambda: len(flood.accepted) == 15, timeout=60, what="every part sent")
    assert flood.refused
    for chat in range(1, 6):
        assert [p["text"] for _, c, p in flood.accepted if c == chat] == [f"{chat}:{n}" for n in range(3)]
