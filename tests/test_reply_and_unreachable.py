"""`POST /reply` never holds the service behind a slow or flood-controlled Bot API (202, durably queued,
in the chat's order), and users who blocked the bot are a fact to count, not a fault."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from doubles import MakeDouble, TelegramDouble, wait_until
from helpers import deliver, pre_checkout_update, start_in_mode, text_update

AUTH = {"Authorization": "Bearer reply-token"}


def _flood(seconds: int) -> tuple:
    return (429, {"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {seconds}",
                  "parameters": {"retry_after": seconds}})


def test_reply_burst_against_a_stalled_bot_api_never_delays_a_webhook_or_a_checkout(
        start_service, telegram: TelegramDouble) -> None:
    """Eight `/reply` calls while the Bot API holds every sendMessage: each is answered 202 (queued) while
    Telegram still holds them, a webhook update is taken and its pre-checkout answered meanwhile, and
    once the Bot API lets go every text reaches its chat exactly once."""
    stalled = threading.Event()
    telegram.script("sendMessage", *[(200, {"ok": True, "result": {"message_id": 1}}, stalled)] * 8)
    service = start_in_mode(start_service, "webhook", REPLY_TOKEN="reply-token", HTTP_THREADS="4")
    answers: dict[int, httpx.Response] = {}

    def reply(chat: int) -> None:
        answers[chat] = service.post("/reply", json={"chat_id": chat, "text": f"to {chat}"}, headers=AUTH)

    threads = [threading.Thread(target=reply, args=(chat,)) for chat in range(1, 9)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(telegram.calls_of("sendMessage")) >= 2, what="the Bot API to hold two sends")
    deliver(service, telegram, "webhook", pre_checkout_update("q-during-burst", "order-77"))
    wait_until(lambda: telegram.calls_of("answerPreCheckoutQuery"), what="the checkout's answer")
    for thread in threads:
        thread.join(15)
    assert not stalled.is_set()  # everything above happened while Telegram held every send
    assert {chat: a.status_code for chat, a in answers.items()} == {chat: 202 for chat in range(1, 9)}
    assert all(a.json()["queued"] is True and a.json()["reply_id"] for a in answers.values())
    stalled.set()
    wait_until(lambda: len(telegram.calls_of("sendMessage")) == 8 and service.health()["outbox_pending"] == 0,
               what="every queued reply to go out")
    assert sorted(p["text"] for p in telegram.calls_of("sendMessage")) == sorted(f"to {c}" for c in range(1, 9))


def test_reply_behind_flood_control_is_queued_survives_a_crash_and_keeps_the_chats_order(
        start_service, telegram: TelegramDouble) -> None:
    """A `/reply` Telegram answers with 429 gets 202 at once; the next ones for the chat wait behind it;
    the service is killed (-9) before the flood wait ends, and after the restart all three are sent, once
    each, in order."""
    telegram.script("sendMessage", _flood(10))
    service = start_service(REPLY_TOKEN="reply-token")
    first = service.post("/reply", json={"chat_id": 5, "text": "one"}, headers=AUTH)
    assert first.status_code == 202 and first.json()["queued"] is True
    for text in ("two", "three"):
        assert service.post("/reply", json={"chat_id": 5, "text": text}, headers=AUTH).status_code == 202
    assert len(telegram.calls_of("sendMessage")) == 1  # only "one" was tried, and refused
    service.kill()
    start_service(REPLY_TOKEN="reply-token")
    wait_until(lambda: len(telegram.calls_of("sendMessage")) == 4, timeout=20, what="the three replies")
    assert [p["text"] for p in telegram.calls_of("sendMessage")] == ["one", "one", "two", "three"]


@pytest.mark.parametrize("mode", ["polling", "webhook"])
@pytest.mark.parametrize("refusal", [
    (403, "Forbidden: bot was blocked by the user"),
    (403, "Forbidden: user is deactivated"),
    (400, "Bad Request: chat not found"),
])
def test_reply_to_a_user_who_blocked_the_bot_is_counted_not_a_fault(
        mode: str, refusal: tuple[int, str], start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """Make's reply to a user Telegram says is unreachable: tried once, no dead letter, typing stopped,
    counted in /metrics, and `GET /` stays ok."""
    code, description = refusal
    telegram.script("sendMessage", (code, {"ok": False, "error_code": code, "description": description}))
    make.script((200, {"reply": "answer", "replies": ["second part"]}, {}, 0.3))
    service = start_in_mode(start_service, mode, DEBOUNCE_SECONDS="0.1", TYPING_MODE="until_reply",
                            TYPING_INTERVAL_SECONDS="0.5")
    deliver(service, telegram, mode, text_update("hello", user_id=31))
    wait_until(lambda: len(telegram.calls_of("sendMessage")) == 2 and service.health()["outbox_pending"] == 0,
               what="both parts to be tried")
    health = service.health()
    assert (health["outbox_dead"], health["typing_chats"]) == (0, 0)
    metrics = service.get("/metrics").text
    assert 'gateway_chat_unreachable_total{method="sendMessage"} 1.0' in metrics
    wait_until(lambda: service.health()["status"] == "ok", what="health to say ok")
    assert "dead letter" not in service.text


def test_a_reply_in_flight_at_a_crash_is_not_sent_again(start_service, telegram: TelegramDouble) -> None:
    """A `/reply` part Telegram holds when the service is killed (-9) may have arrived: after the restart
    it is recorded as done, not sent a second time, and the chat's next reply goes out."""
    stalled = threading.Event()
    telegram.script("sendMessage", (200, {"ok": True, "result": {"message_id": 1}}, stalled))
    service = start_service(REPLY_TOKEN="reply-token")
    assert service.post("/reply", json={"chat_id": 5, "text": "in flight"}, headers=AUTH).status_code == 202
    service.kill()
    stalled.set()
    service = start_service(REPLY_TOKEN="reply-token")
    assert service.post("/reply", json={"chat_id": 5, "text": "after"}, headers=AUTH).status_code == 200
    assert [p["text"] for p in telegram.calls_of("sendMessage")] == ["in flight", "after"]
    assert "not sent again, so it is never sent twice" in service.text


def test_a_flood_wait_longer_than_the_age_limit_ends_in_a_dead_letter_and_the_chat_goes_on(
        start_service, telegram: TelegramDouble) -> None:
    """Telegram asking to wait a day does not hide a reply past MAKE_MAX_AGE_HOURS: it is tried again at
    that age, becomes a dead letter when refused again, and the chat's next reply goes out."""
    telegram.script("sendMessage", _flood(86400), _flood(86400))
    service = start_service(REPLY_TOKEN="reply-token", MAKE_MAX_AGE_HOURS="0.001")  # 3.6 s
    assert service.post("/reply", json={"chat_id": 5, "text": "stuck"}, headers=AUTH).status_code == 202
    assert service.post("/reply", json={"chat_id": 5, "text": "next"}, headers=AUTH).status_code in (200, 202)
    wait_until(lambda: [p["text"] for p in telegram.calls_of("sendMessage")] == ["stuck", "stuck", "next"],
               timeout=20, what="the stuck reply's last try, then the next one")
    wait_until(lambda: service.health()["outbox_dead"] == 1, what="the dead letter")


def test_with_one_request_thread_a_reply_never_waits(start_service, telegram: TelegramDouble) -> None:
    """HTTP_THREADS=1: a `/reply` is answered 202 at once (its one thread is never spent waiting), and a
    webhook is taken while the Bot API still holds the message."""
    stalled = threading.Event()
    telegram.script("sendMessage", (200, {"ok": True, "result": {"message_id": 1}}, stalled))
    service = start_in_mode(start_service, "webhook", REPLY_TOKEN="reply-token", HTTP_THREADS="1")
    assert service.post("/reply", json={"chat_id": 5, "text": "hi"}, headers=AUTH).status_code == 202
    deliver(service, telegram, "webhook", text_update("meanwhile", user_id=6))
    assert not stalled.is_set()
    stalled.set()
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the reply to go out")


def test_reply_markup_with_half_an_emoji_is_repaired(start_service, telegram: TelegramDouble) -> None:
    """A lone surrogate in a button's text reaches Telegram as U+FFFD, not as an escape it would refuse."""
    service = start_service(REPLY_TOKEN="reply-token")
    body = (b'{"chat_id": 5, "text": "pick", "reply_markup": {"inline_keyboard": '
            b'[[{"text": "yes \\ud83d", "callback_data": "y"}]]}}')
    answer = service.post("/reply", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    button = telegram.calls_of("sendMessage")[-1]["reply_markup"]["inline_keyboard"][0][0]
    assert button == {"text": "yes \ufffd", "callback_data": "y"}


def test_a_reply_a_crash_caught_before_it_left_is_sent_after_the_restart(start_service,
                                                                         telegram: TelegramDouble) -> None:
    """During a Telegram outage a `/reply` waits for a connection that never opens (202); the service is
    killed (-9) then. Nothing of the message left, so after the restart it is sent, once."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    filler = socket.create_connection(hole.getsockname())  # the accept queue is full: connects now hang
    try:
        outage = f"http://127.0.0.1:{hole.getsockname()[1]}"
        service = start_in_mode(start_service, "webhook", REPLY_TOKEN="reply-token", TELEGRAM_API_URL=outage)
        answer = service.post("/reply", json={"chat_id": 5, "text": "during the outage"}, headers=AUTH)
        assert answer.status_code == 202
        service.kill()
    finally:
        filler.close()
        hole.close()
    service = start_in_mode(start_service, "webhook", REPLY_TOKEN="reply-token")
    wait_until(lambda: telegram.calls_of("sendMessage"), what="the reply after the restart")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="nothing left to send")
    assert [p["text"] for p in telegram.calls_of("sendMessage")] == ["during the outage"]
