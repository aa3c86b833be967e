"""Delivery to Make (outbox.py, delivery.py): chats in flight together, one call per chat, pacing, threads
that follow the calls in flight, typing once per batch, the user's order, and answered buttons."""

from __future__ import annotations

import pytest

from doubles import MakeDouble, TelegramDouble, wait_until
from helpers import callback_update, deliver, payment_update, start_in_mode, text_update


# Concurrency across chats, one call per chat


def test_chats_are_in_flight_together(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """20 chats' batches are all open at Make at once (the double answers none until 20 are open), and
    every chat then gets its reply."""
    make.gather(20)
    make.reject_if = lambda event: (200, {"reply": f"hi {event['chat_id']}"})
    service = start_service(MAKE_MAX_RATE="0")
    for user in range(1, 21):
        telegram.push_update(text_update("hello", user_id=user))
    wait_until(lambda: len(telegram.calls_of("sendMessage")) == 20, what="20 replies")
    assert make.max_open == 20
    assert sorted(c["chat_id"] for c in telegram.calls_of("sendMessage")) == list(range(1, 21))
    assert service.health()["make"]["peak_threads"] >= 20


def test_one_chats_events_never_overlap_and_keep_their_order(start_service, telegram: TelegramDouble,
                                                            make: MakeDouble) -> None:
    """Five events of one chat, each slow at Make, go one at a time, in the order they were created,
    while another chat's event goes ahead beside them."""
    make.reject_if = lambda event: (200, "Accepted") if event["chat_id"] == 7 else None
    make.script(*[(200, "Accepted", {}, 0.2)] * 5)
    service = start_service(MAKE_MAX_RATE="0", FORWARD_UPDATE_KINDS="callback_query,edited_message")
    for n in range(5):
        edit = text_update(f"edit {n}", user_id=5)
        telegram.push_update({"update_id": edit["update_id"], "edited_message": edit["message"]})
    telegram.push_update(text_update("other chat", user_id=7))
    wait_until(lambda: len(make.accepted()) == 6, what="six events")
    chat5 = [e["update"]["edited_message"]["text"] for e in make.accepted() if e["chat_id"] == 5]
    assert chat5 == [f"edit {n}" for n in range(5)]
    assert make.overlapping_chats == []
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")


def test_calls_in_flight_never_exceed_the_limit_and_the_old_setting_is_read(start_service,
                                                                            telegram: TelegramDouble,
                                                                            make: MakeDouble) -> None:
    """With MAKE_DELIVERY_WORKERS=3 (the deprecated name), 10 chats reach Make three at a time: three are
    open together, never four; a deprecation line says to rename the setting."""
    make.gather(3)
    make.script(*[(200, "Accepted", {}, 0.2)] * 10)
    service = start_service(MAKE_DELIVERY_WORKERS="3", MAKE_MAX_RATE="0")
    for user in range(1, 11):
        telegram.push_update(text_update("hello", user_id=user))
    wait_until(lambda: len(make.accepted()) == 10, what="ten events")
    assert make.max_open == 3
    assert service.text.count("MAKE_DELIVERY_WORKERS is deprecated") == 1
    assert service.health()["make"]["max_concurrency"] == 3


def test_calls_are_paced_to_the_rate(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """With MAKE_MAX_RATE=5, eight chats' calls start at least 1/5 s apart, however many are due."""
    start_service(MAKE_MAX_RATE="5")
    for user in range(1, 9):
        telegram.push_update(text_update("hello", user_id=user))
    wait_until(lambda: len(make.accepted()) == 8, what="eight events")
    starts = sorted(r["at"] for r in make.requests)
    # Sent 0.2 s apart; measured on arrival, where one late receipt can shift a gap by a little.
    assert starts[-1] - starts[0] >= 1.2, starts
    assert max(sum(1 for t in starts if s <= t < s + 0.5) for s in starts) <= 3, starts


# The user's order and answered buttons


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_text_then_button_reaches_make_in_the_users_order_and_the_spinner_stops(
        mode: str, start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A text followed by a button press reaches Make as [batch (reason flushed), update], not the other
    way round, and the press is answered empty once Make's answer carries no callback_answer."""
    service = start_in_mode(start_service, mode, DEBOUNCE_SECONDS="5", CALLBACK_ANSWER_SECONDS="0.5")
    deliver(service, telegram, mode, text_update("I want the blue one", user_id=42))
    wait_until(lambda: service.health()["active_batches"] == 1, what="the open batch")
    deliver(service, telegram, mode, callback_update("cb-1", "blue", user_id=42))
    wait_until(lambda: len(make.accepted()) == 2, what="the batch and the button press")
    batch, press = make.accepted()
    assert (batch["event_type"], batch["reason"], batch["text"]) == ("message_batch", "flushed", "I want the blue one")
    assert (press["event_type"], press["update_type"]) == ("update", "callback_query")
    answer = wait_until(lambda: telegram.calls_of("answerCallbackQuery"), what="the empty answer")
    assert answer == [{"callback_query_id": "cb-1"}]
    wait_until(lambda: service.health()["active_batches"] == 0, what="the flushed batch to be forgotten")
    assert 'gateway_batches_closed_total{reason="flushed"} 1.0' in service.get("/metrics").text


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_makes_callback_answer_is_sent_once(mode: str, start_service, telegram: TelegramDouble,
                                            make: MakeDouble) -> None:
    """Make's `callback_answer` reaches answerCallbackQuery with its fields, once: the empty answer it
    replaced is never sent."""
    make.script((200, {"callback_answer": {"text": "Added to cart", "show_alert": True, "cache_time": 5}}))
    service = start_in_mode(start_service, mode, CALLBACK_ANSWER_SECONDS="10")
    deliver(service, telegram, mode, callback_update("cb-2", user_id=9))
    answer = wait_until(lambda: telegram.calls_of("answerCallbackQuery"), what="Make's answer")
    assert answer == [{"callback_query_id": "cb-2", "text": "Added to cart", "show_alert": True, "cache_time": 5}]
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="nothing left to send")
    assert len(telegram.calls_of("answerCallbackQuery")) == 1


def test_button_is_answered_while_make_is_down_and_a_too_old_query_is_not_retried(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """With Make failing, a press is still answered empty after CALLBACK_ANSWER_SECONDS; Telegram's
    "query is too old" ends that answer (no retry, no dead letter)."""
    make.reject_if = lambda event: (503, "Service Unavailable")
    telegram.script("answerCallbackQuery", (400, {"ok": False, "error_code": 400, "description":
                    "Bad Request: query is too old and response timeout expired or query ID is invalid"}))
    service = start_service(CALLBACK_ANSWER_SECONDS="0.3")
    telegram.push_update(callback_update("cb-3", user_id=11))
    wait_until(lambda: telegram.calls_of("answerCallbackQuery"), what="the empty answer")
    wait_until(lambda: "cb-3" in service.text and "too late to try again" in service.text, what="the refusal logged")
    health = service.health()
    assert health["outbox_dead"] == 0
    assert health["outbox_pending"] == 1  # the press itself, waiting for Make
    assert telegram.calls_of("answerCallbackQuery") == [{"callback_query_id": "cb-3"}]


def test_button_not_forwarded_is_answered_at_once(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A press whose kind is not forwarded to Make is still answered, at once, so its spinner stops."""
    service = start_service(FORWARD_UPDATE_KINDS="edited_message", CALLBACK_ANSWER_SECONDS="10")
    telegram.push_update(callback_update("cb-4", user_id=12))
    assert wait_until(lambda: telegram.calls_of("answerCallbackQuery"), what="the answer") == [
        {"callback_query_id": "cb-4"}]
    assert make.events == [] and service.health()["outbox_pending"] == 0


def test_bad_callback_answer_fields_are_dropped_and_logged(start_service, telegram: TelegramDouble,
                                                           make: MakeDouble) -> None:
    """A `callback_answer` with fields Telegram would refuse is sent with the good ones only."""
    make.script((200, {"callback_answer": {"text": "x" * 201, "show_alert": "yes", "url": "https://t.me/x",
                                           "color": "red"}}))
    service = start_service(CALLBACK_ANSWER_SECONDS="10")
    telegram.push_update(callback_update("cb-5", user_id=13))
    answer = wait_until(lambda: telegram.calls_of("answerCallbackQuery"), what="the answer")
    assert answer == [{"callback_query_id": "cb-5", "url": "https://t.me/x"}]
    assert "ignored text, show_alert, color" in service.text


def test_payment_after_text_flushes_the_batch_first(start_service, telegram: TelegramDouble,
                                                    make: MakeDouble) -> None:
    """A payment from a user with an open batch reaches Make after that batch, which is closed `flushed`."""
    service = start_service(DEBOUNCE_SECONDS="5")
    telegram.push_update(text_update("paying now", user_id=42))
    wait_until(lambda: service.health()["active_batches"] == 1, what="the open batch")
    telegram.push_update(payment_update("charge-f", "order-f", user_id=42))
    wait_until(lambda: len(make.accepted()) == 2, what="the batch and the payment")
    assert [(e["event_type"], e.get("reason")) for e in make.accepted()] == [("message_batch", "flushed"),
                                                                             ("payment", None)]


# Typing once per batch


def test_typing_is_shown_once_per_batch_not_on_every_retry(start_service, telegram: TelegramDouble,
                                                          make: MakeDouble) -> None:
    """A batch that fails five times before Make accepts it shows "typing…" on its first attempt only."""
    make.script((503, "down", {}, 1.0), *[(503, "down")] * 4, (200, {"reply": "finally"}))
    service = start_service(TYPING_MODE="until_reply", TYPING_INTERVAL_SECONDS="4")
    telegram.push_update(text_update("hello?", user_id=21))
    wait_until(lambda: telegram.calls_of("sendMessage"), timeout=20, what="the reply after the outage")
    assert len(make.requests) == 6
    assert [c["chat_id"] for c in telegram.calls_of("sendChatAction")] == [21]
    assert service.health()["make"]["failed_attempts"] == 5


def test_a_callback_answer_telegram_refuses_is_sent_again_empty(start_service, telegram: TelegramDouble,
                                                                 make: MakeDouble) -> None:
    """Make's `callback_answer` refused for its content (a url Telegram will not open) is followed by an
    empty answer, so the button still stops spinning."""
    make.script((200, {"callback_answer": {"url": "https://example.com/not-a-game"}}))
    telegram.script("answerCallbackQuery", (400, {"ok": False, "error_code": 400,
                                                  "description": "Bad Request: URL_INVALID"}))
    service = start_service(CALLBACK_ANSWER_SECONDS="5")
    telegram.push_update(callback_update("cb-6", user_id=14))
    answers = wait_until(lambda: (a := telegram.calls_of("answerCallbackQuery")) and len(a) == 2 and a,
                         what="the refused answer and the empty one")
    assert answers == [{"callback_query_id": "cb-6", "url": "https://example.com/not-a-game"},
                       {"callback_query_id": "cb-6"}]
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="nothing left to send")
    assert service.health()["outbox_dead"] == 0


def test_a_bot_api_slow_to_answer_buttons_holds_up_no_reply(start_service, telegram: TelegramDouble,
                                                            make: MakeDouble) -> None:
    """With Telegram taking 4 s over every button answer and ten presses waiting, Make's reply to another
    chat goes out while the answers still hang (answers have slots of their own)."""
    telegram.script("answerCallbackQuery", *[(200, {"ok": True, "result": True}, 4.0)] * 10)
    make.reject_if = lambda event: (200, {"reply": "here"}) if event["event_type"] == "message_batch" else None
    service = start_service(FORWARD_UPDATE_KINDS="edited_message")  # presses answered at once, not forwarded
    for n in range(10):
        telegram.push_update(callback_update(f"slow-{n}", user_id=100 + n))
    wait_until(lambda: len(telegram.calls_of("answerCallbackQuery")) == 8, what="eight answers hanging")
    telegram.push_update(text_update("anyone there?", user_id=30))
    wait_until(lambda: telegram.calls_of("sendMessage"), what="the reply")
    assert len(telegram.calls_of("answerCallbackQuery")) == 8  # the first eight still hang: the reply did not wait
    wait_until(lambda: len(telegram.calls_of("answerCallbackQuery")) == 10, what="the other two answers")
    assert service.health()["outbox_dead"] == 0


def test_makes_rate_limit_pauses_every_chat(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A 429 from Make (its limit is per webhook) pauses the next chats' calls for its Retry-After too,
    instead of collecting more 429s."""
    make.script((429, "Too many requests", {"Retry-After": "2"}))
    service = start_service(MAKE_MAX_CONCURRENCY="1", MAKE_MAX_RATE="0", MAKE_RETRY_MAX_SECONDS="5")
    for user in range(1, 4):
        telegram.push_update(text_update("hello", user_id=user))
    wait_until(lambda: len(make.accepted()) == 3, timeout=20, what="all three events after the pause")
    starts = [r["at"] for r in make.requests]
    assert [r["status"] for r in make.requests][:2] == [429, 200]
    assert starts[1] - starts[0] >= 1.5  # Retry-After: 2, waited by the next chat too (receipt jitter allowed)
    assert service.health()["make"]["failed_attempts"] == 1


def test_typing_shows_again_when_make_refused_a_batch_without_running_it(start_service, telegram: TelegramDouble,
                                                                           make: MakeDouble) -> None:
    """A batch Make first refuses with 429 (its scenario never ran) shows "typing…" again while the
    scenario really runs."""
    make.script((429, "Too many requests", {"Retry-After": "0"}), (200, {"reply": "thought about it"}, {}, 1.5))
    start_service(TYPING_MODE="until_reply", TYPING_INTERVAL_SECONDS="4")
    telegram.push_update(text_update("hard question", user_id=22))
    wait_until(lambda: len(make.requests) == 2, what="the second call")
    # The 429 pauses calls for a second; typing for the first try was sent (if at all) right after it.
    first_call = make.requests[0]["at"]
    wait_until(lambda: [t for t in telegram.times_of("sendChatAction") if t >= first_call + 0.5],
               what="typing for the real run")
    wait_until(lambda: telegram.calls_of("sendMessage"), what="the reply")
