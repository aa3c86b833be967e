"""End to end: the real service in a subprocess, Bot API and Make doubles on 127.0.0.1, both modes."""

from __future__ import annotations

import pytest

from doubles import FloodControl, MakeDouble, TelegramDouble, wait_until
from helpers import deliver, start_in_mode, text_update


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_burst_of_three_messages_is_one_make_event_in_order(
        mode: str, start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """Three quick messages from one user reach Make as one message_batch with all three, in order."""
    service = start_in_mode(start_service, mode)
    for text in ("hi", "I need", "a refund"):
        deliver(service, telegram, mode, text_update(text, user_id=42))
    events = wait_until(lambda: make.accepted(), what="a Make event")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    events = make.accepted()
    assert len(events) == 1
    event = events[0]
    assert event["event_type"] == "message_batch"
    assert event["chat_id"] == 42 and event["user_id"] == 42
    assert [m["text"] for m in event["messages"]] == ["hi", "I need", "a refund"]
    assert event["text"] == "hi\nI need\na refund"
    assert event["batch_size"] == 3 and event["reason"] == "quiet" and event["flood_held"] == 0
    assert event["user"] == {"id": 42, "username": "user42", "first_name": "User42", "last_name": None,
                             "language_code": "ru"}
    assert [m["type"] for m in event["messages"]] == ["text"] * 3
    assert make.requests[0]["headers"]["X-Event-Id"] == event["event_id"]
    assert 'gateway_batches_closed_total{reason="quiet"} 1.0' in service.get("/metrics").text
    assert service.stop() == 0


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_two_users_at_once_give_two_events(mode: str, start_service, telegram: TelegramDouble,
                                           make: MakeDouble) -> None:
    """Interleaved messages from two users become one batch each, each with only its own messages."""
    service = start_in_mode(start_service, mode)
    for text, user in (("a1", 1), ("b1", 2), ("a2", 1), ("b2", 2)):
        deliver(service, telegram, mode, text_update(text, user_id=user))
    wait_until(lambda: len(make.accepted()) >= 2, what="two Make events")
    by_user = {e["user_id"]: e["text"] for e in make.accepted()}
    assert by_user == {1: "a1\na2", 2: "b1\nb2"}
    assert len(make.accepted()) == 2


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_repeated_update_is_processed_once(mode: str, start_service, telegram: TelegramDouble,
                                           make: MakeDouble) -> None:
    """An update delivered three times appears once in the batch sent to Make."""
    # A debounce long enough that the four deliveries land in one batch even on a loaded machine.
    service = start_in_mode(start_service, mode, DEBOUNCE_SECONDS="2")
    update = text_update("only once", user_id=7)
    for _ in range(3):
        deliver(service, telegram, mode, update)
    deliver(service, telegram, mode, text_update("second", user_id=7))
    event = wait_until(lambda: make.accepted(), what="a Make event")[0]
    assert [m["text"] for m in event["messages"]] == ["only once", "second"]
    assert service.health()["last_update_id"] is not None
    assert 'gateway_updates_total{kind="message",outcome="duplicate"} 2.0' in service.get("/metrics").text


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_chat_sees_typing_and_make_reply_reaches_chat(mode: str, start_service, telegram: TelegramDouble,
                                                      make: MakeDouble) -> None:
    """While Make prepares the answer the chat sees typing; Make's `reply` is sent to the chat."""
    make.script((200, {"reply": "Refund approved"}, {}, 0.3))
    service = start_in_mode(start_service, mode)
    deliver(service, telegram, mode, text_update("refund please", user_id=77))
    sent = wait_until(lambda: telegram.calls_of("sendMessage"), what="the reply to be sent")
    assert sent[0]["chat_id"] == 77 and sent[0]["text"] == "Refund approved"
    typing = telegram.calls_of("sendChatAction")
    assert typing and all(c == {"chat_id": 77, "action": "typing"} for c in typing)


def test_long_make_reply_is_split_at_telegram_limit(start_service, telegram: TelegramDouble,
                                                    make: MakeDouble) -> None:
    """A 9000-character reply arrives as three messages, none over 4096 characters, nothing lost."""
    text = ("word " * 1800).strip()
    make.script((200, {"replies": [text]}))
    start_service()
    telegram.push_update(text_update("tell me everything", user_id=5))
    parts = wait_until(lambda: len(telegram.calls_of("sendMessage")) >= 3 and telegram.calls_of("sendMessage"),
                       what="three reply parts")
    assert all(len(p["text"]) <= 4096 for p in parts)
    assert " ".join(p["text"].strip() for p in parts).split() == text.split()


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_make_failing_twice_then_ok_delivers_once(mode: str, start_service, telegram: TelegramDouble,
                                                  make: MakeDouble) -> None:
    """Make answering 500 twice and then 200 gets the same event three times and accepts it once."""
    make.script((500, "Scenario failed to complete."), (500, "Scenario failed to complete."))
    service = start_in_mode(start_service, mode)
    deliver(service, telegram, mode, text_update("retry me", user_id=9))
    wait_until(lambda: make.accepted(), timeout=15, what="the event to be accepted")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    assert [r["status"] for r in make.requests] == [500, 500, 200]
    assert len({e["event_id"] for e in make.events}) == 1
    assert len(make.accepted()) == 1
    metrics = service.get("/metrics").text
    assert 'gateway_make_deliveries_total{outcome="retry"} 2.0' in metrics
    assert 'gateway_make_deliveries_total{outcome="delivered"} 1.0' in metrics
    assert "gateway_outbox_pending 0.0" in metrics


def test_callback_query_is_forwarded_at_once(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A callback_query goes to Make as an `update` event carrying the update verbatim."""
    start_service()
    update = {"update_id": 880001, "callback_query": {
        "id": "cb1", "from": {"id": 3, "is_bot": False, "first_name": "C"}, "chat_instance": "x", "data": "buy",
        "message": {"message_id": 5, "date": 1, "chat": {"id": 3, "type": "private"}, "text": "menu"}}}
    telegram.push_update(update)
    event = wait_until(lambda: make.accepted(), what="the forwarded update")[0]
    assert event["event_type"] == "update" and event["update_type"] == "callback_query"
    assert event["update"] == update and event["chat_id"] == 3


def test_every_sample_update_is_acknowledged_without_a_crash(start_service, telegram: TelegramDouble,
                                                            samples: list[dict]) -> None:
    """All 80 real updates of 21 kinds posted to the webhook get 200 and the service stays healthy."""
    from config import derive_webhook_secret
    from doubles import TOKEN
    service = start_service(WEBHOOK_URL="https://gateway.example.test/webhook", FORWARD_UPDATE_KINDS=
                            "callback_query,edited_message,my_chat_member,message")
    headers = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}
    for sample in samples:
        response = service.post("/webhook", json=sample["update"], headers=headers)
        assert response.status_code == 200, (sample["kind"], response.text)
    again = service.post("/webhook", json=samples[0]["update"], headers=headers)
    assert again.json()["outcome"] == "duplicate"
    health = service.health()
    assert health["status"] in ("ok", "degraded") and not health["dead_threads"]
    assert "Traceback" not in service.text


def test_events_of_one_chat_stay_in_order_while_another_chat_goes_ahead(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A chat whose first event Make refuses keeps its order; a second chat is not held up by it."""
    make.script((503, "busy"), (503, "busy"), (503, "busy"))
    service = start_service(DEBOUNCE_SECONDS="0.2", MAX_BATCH_MESSAGES="1", MAKE_RETRY_MAX_SECONDS="1")
    for text in ("first", "second", "third"):
        telegram.push_update(text_update(text, user_id=21))
    wait_until(lambda: len(make.requests) >= 1, what="the first attempt")
    telegram.push_update(text_update("other chat", user_id=22))
    wait_until(lambda: len(make.accepted()) == 4, timeout=20, what="all four events")
    chat21 = [e["text"] for e in make.accepted() if e["chat_id"] == 21]
    assert chat21 == ["first", "second", "third"]
    accepted = [e["text"] for e in make.accepted()]
    assert accepted.index("other chat") < accepted.index("first")  # not held up by chat 21's retries
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")


def test_thread_count_does_not_grow_with_users(start_service, telegram: TelegramDouble) -> None:
    """200 users with open batches use the same threads as one user: the timers share one scheduler."""
    service = start_service(DEBOUNCE_SECONDS="60", MAX_WAIT_SECONDS="120")
    telegram.push_update(text_update("hello", user_id=1))
    one = wait_until(lambda: (h := service.health())["active_batches"] == 1 and h, what="one open batch")
    for user in range(2, 201):
        telegram.push_update(text_update("hello", user_id=user))
    many = wait_until(lambda: (h := service.health())["active_batches"] == 200 and h, what="200 open batches")
    assert many["batch_timers"] == 200
    assert many["threads"] == one["threads"]


def test_polling_conflict_is_explained_and_polling_resumes(start_service, telegram: TelegramDouble,
                                                           make: MakeDouble) -> None:
    """A 409 from another poller and a 502 are logged clearly, backed off, and polling then goes on."""
    telegram.script("getUpdates",
                    (409, {"ok": False, "error_code": 409,
                           "description": "Conflict: terminated by other getUpdates request; make sure that only "
                                          "one bot instance is running"}),
                    (502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}))
    service = start_service()
    telegram.push_update(text_update("still here", user_id=4))
    wait_until(lambda: make.accepted(), timeout=15, what="the message after the errors")
    assert service.printed("another process is polling with this bot token")
    assert "Telegram unreachable" in service.text
    assert len(telegram.calls_of("getUpdates")) >= 3


def test_make_reply_survives_telegram_flood_control_and_is_sent_once(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A reply Telegram first refuses with 429 (retry_after 1) is sent after the wait, exactly once."""
    telegram.script("sendMessage", (429, {"ok": False, "error_code": 429, "description": "Too Many Requests: "
                                          "retry after 1", "parameters": {"retry_after": 1}}))
    make.script((200, {"replies": ["first answer", "second answer"]}))
    service = start_service()
    telegram.push_update(text_update("question", user_id=15))
    wait_until(lambda: len([m for m in telegram.calls_of("sendMessage")]) >= 3, what="the replies")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the replies to leave the outbox")
    texts = [m["text"] for m in telegram.calls_of("sendMessage")]
    assert texts == ["first answer", "first answer", "second answer"]  # the 429'd one once more, in order
    first, second = telegram.times_of("sendMessage")[:2]
    assert second - first >= 1.0  # Telegram's retry_after was honoured


def test_typing_stops_once_the_reply_is_sent(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """In until_reply mode typing is renewed while Make works and ends when the reply goes out."""
    make.script((200, {"reply": "done thinking"}, {}, 1.5))
    service = start_service(TYPING_MODE="until_reply", TYPING_INTERVAL_SECONDS="0.5", TYPING_MAX_SECONDS="120")
    telegram.push_update(text_update("think hard", user_id=16))
    wait_until(lambda: len(telegram.calls_of("sendChatAction")) >= 2, what="typing renewed while Make works")
    wait_until(lambda: telegram.calls_of("sendMessage"), what="the reply")
    wait_until(lambda: service.health()["typing_chats"] == 0, what="typing to stop")
    reply_at = telegram.times_of("sendMessage")[0]
    late = [t for t in telegram.times_of("sendChatAction") if t > reply_at]
    assert len(late) <= 1  # at most one renewal already on the wire when the reply was sent


def test_typing_off_sends_no_chat_action(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """TYPING_MODE=off: the batch goes to Make and the reply comes back without any sendChatAction."""
    make.script((200, {"reply": "quiet answer"}))
    start_service(TYPING_MODE="off")
    telegram.push_update(text_update("hello", user_id=17))
    wait_until(lambda: telegram.calls_of("sendMessage"), what="the reply")
    assert telegram.calls_of("sendChatAction") == []


def test_configured_kind_is_forwarded_and_unknown_kinds_counted(start_service, telegram: TelegramDouble,
                                                                make: MakeDouble) -> None:
    """A kind listed in FORWARD_UPDATE_KINDS reaches Make; an unknown kind is acknowledged and counted as other."""
    service = start_service(FORWARD_UPDATE_KINDS="callback_query,poll_answer")
    telegram.push_update({"update_id": 880100, "poll_answer": {"poll_id": "p", "user": {"id": 9, "is_bot": False,
                                                                                      "first_name": "P"},
                                                              "option_ids": [1]}})
    telegram.push_update({"update_id": 880101, "brand_new_kind": {"x": 1}})
    event = wait_until(lambda: make.accepted(), what="the poll answer")[0]
    assert event["update_type"] == "poll_answer" and event["user_id"] == 9
    metrics = wait_until(lambda: "brand" not in (m := service.get("/metrics").text)
                         and 'kind="other",outcome="ignored"} 1.0' in m and m, what="the unknown kind counted")
    assert 'gateway_updates_total{kind="poll_answer",outcome="stored"} 1.0' in metrics


def test_replies_are_paced_to_telegrams_limits_without_a_429(start_service, telegram: TelegramDouble,
                                                                make: MakeDouble) -> None:
    """Four users write at once and Make answers each with three replies; against a Bot API that refuses more
    than 4 messages a second, or two within 1 s to one chat, all twelve arrive in order without a 429."""
    flood = FloodControl(overall=4, chat_gap=1.0)
    telegram.reject_if = flood
    make.reject_if = lambda event: (200, {"replies": [f"{event['chat_id']}:{n}" for n in range(3)]})
    service = start_in_mode(start_service, "webhook", TELEGRAM_MAX_RATE="4")
    for user in range(1, 5):
        deliver(service, telegram, "webhook", text_update("hi", user_id=user))
    wait_until(lambda: len(flood.accepted) == 12, timeout=30, what="every reply sent")
    assert flood.refused == []
    for user in range(1, 5):
        assert [p["text"] for _, chat, p in flood.accepted if chat == user] == [f"{user}:{n}" for n in range(3)]
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
