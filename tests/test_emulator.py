"""The Bot API emulator behaves like Telegram where the gateway and the sandbox depend on it.

Every test talks to the emulator over real HTTP, as the gateway does; the user's side (`user_says`,
`press`, `checkout`) is called directly, as the sandbox does.
"""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import pytest

from doubles import wait_until
from emulator import BotApiEmulator, LocalServer

TOKEN = "987654321:AAE-emulatorTEST_token-abcdefghijklmnop"
BOT_ID = 987654321
ALICE = {"id": 4201, "first_name": "Alice", "username": "alice"}
BOB = {"id": 4202, "first_name": "Bob"}
SECRET = "s3cret_Token-1"
LONG_POLL = 50  # seconds: the emulator's cap; a poll that really waited this long would hit the client's timeout
CLIENT_TIMEOUT = 20.0  # seconds: a call that should return at once but does not fails the test with a timeout


# Helpers

def call(emulator: BotApiEmulator, method: str, token: str | None = None, **params: Any) -> tuple[int, dict]:
    """POST `params` as JSON to `method`, as the gateway does; (HTTP status, JSON body)."""
    response = httpx.post(f"{emulator.url}/bot{token or emulator.token}/{method}", json=params,
                          timeout=CLIENT_TIMEOUT)
    return response.status_code, response.json()


def ok(emulator: BotApiEmulator, method: str, **params: Any) -> Any:
    """The `result` of a call that must succeed."""
    status, body = call(emulator, method, **params)
    assert (status, body.get("ok")) == (200, True), body
    return body["result"]


def ids(updates: list[dict[str, Any]]) -> list[int]:
    return [u["update_id"] for u in updates]


def push(emulator: BotApiEmulator, *update_ids: int) -> None:
    """Queue plain text updates with these ids."""
    for update_id in update_ids:
        emulator.push_update({"update_id": update_id, "message": {
            "message_id": update_id, "date": 0, "chat": {"id": 1, "type": "private"}, "text": f"u{update_id}"}})


def in_background(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` on a thread; returns its future (the pool is not waited for at exit)."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def webhook_error(emulator: BotApiEmulator) -> dict[str, Any] | None:
    """getWebhookInfo, once it tells of a failed delivery."""
    info = ok(emulator, "getWebhookInfo")
    return info if "last_error_message" in info else None


class Receiver(LocalServer):
    """The gateway's webhook endpoint: records every delivery and answers the statuses in `statuses` in turn,
    then 200."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.got: list[dict[str, Any]] = []  # {"request", "update", "headers" (lower-case names), "status"}
        self.arrived = threading.Condition()
        super().__init__()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        with self.arrived:
            status = self.statuses.pop(0) if self.statuses else 200
            self.got.append({"request": f"{method} {path}", "update": json.loads(body), "status": status,
                             "headers": {k.lower(): v for k, v in headers.items()}})
            self.arrived.notify_all()
        return status, {}, b""

    def wait_for(self, accepted: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Every delivery so far, once `accepted` of them were answered 200."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: sum(g["status"] == 200 for g in self.got) >= accepted, timeout):
                raise AssertionError(f"only {len(self.got)} deliveries: {self.got}")
            return list(self.got)


@pytest.fixture
def bot() -> Iterator[BotApiEmulator]:
    emulator = BotApiEmulator(TOKEN, username="emulated_bot")
    yield emulator
    emulator.close()
    emulator.check()


@pytest.fixture
def hooked() -> Iterator[tuple[BotApiEmulator, Receiver]]:
    """An emulator delivering webhooks to a receiver (at /webhook)."""
    receiver = Receiver()
    emulator = BotApiEmulator(TOKEN, deliver_webhooks_to=receiver.url + "/webhook")
    yield emulator, receiver
    emulator.close()
    receiver.close()
    emulator.check()
    receiver.check()


# Addressing

def test_wrong_token_is_401_unauthorized(bot: BotApiEmulator) -> None:
    assert call(bot, "getMe", token="987654321:wrong") == (
        401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
    assert bot.calls_of("getMe") == []


@pytest.mark.parametrize("path", ["/", "/getMe", f"/bot{TOKEN}", f"/bot{TOKEN}/getMe/extra", "/favicon.ico"])
def test_unknown_path_is_404(bot: BotApiEmulator, path: str) -> None:
    response = httpx.post(bot.url + path, json={}, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 404
    assert response.json()["ok"] is False


def test_get_me_is_the_bot_of_the_token(bot: BotApiEmulator) -> None:
    me = ok(bot, "getMe")
    assert (me["id"], me["is_bot"], me["username"]) == (BOT_ID, True, "emulated_bot")
    assert me["first_name"]


# getUpdates

def test_updates_stay_until_an_offset_above_their_id_confirms_them(bot: BotApiEmulator) -> None:
    push(bot, 10, 11, 12)
    assert ids(ok(bot, "getUpdates")) == [10, 11, 12]
    assert ids(ok(bot, "getUpdates")) == [10, 11, 12], "reading does not confirm"
    assert ids(ok(bot, "getUpdates", offset=11)) == [11, 12], "offset 11 confirms 10 only"
    assert ids(ok(bot, "getUpdates")) == [11, 12], "a confirmed update is gone for good"
    assert ids(ok(bot, "getUpdates", offset=13)) == []
    push(bot, 13)
    assert ids(ok(bot, "getUpdates")) == [13]


@pytest.mark.parametrize("offset, left", [(-1, [14]), (-2, [13, 14]), (-10, [10, 11, 12, 13, 14])])
def test_a_negative_offset_keeps_only_the_last_updates(bot: BotApiEmulator, offset: int, left: list[int]) -> None:
    push(bot, 10, 11, 12, 13, 14)
    assert ids(ok(bot, "getUpdates", offset=offset)) == left
    assert ids(ok(bot, "getUpdates")) == left, "the earlier ones are forgotten"


@pytest.mark.parametrize("limit, got", [(1, [10]), (2, [10, 11]), (100, [10, 11, 12])])
def test_limit_caps_the_updates_returned(bot: BotApiEmulator, limit: int, got: list[int]) -> None:
    push(bot, 10, 11, 12)
    assert ids(ok(bot, "getUpdates", limit=limit)) == got
    assert ids(ok(bot, "getUpdates")) == [10, 11, 12], "a limit confirms nothing"


def test_a_long_poll_returns_as_soon_as_an_update_comes(bot: BotApiEmulator) -> None:
    poll = in_background(ok, bot, "getUpdates", timeout=LONG_POLL)
    wait_until(lambda: bot.calls_of("getUpdates"), what="the long poll to reach the emulator")
    assert not poll.done()
    push(bot, 77)
    assert ids(poll.result(timeout=CLIENT_TIMEOUT)) == [77]


def test_a_long_poll_with_nothing_to_return_ends_empty_after_its_timeout(bot: BotApiEmulator) -> None:
    assert ok(bot, "getUpdates", timeout=1) == []


def test_close_ends_a_waiting_long_poll(bot: BotApiEmulator) -> None:
    poll = in_background(call, bot, "getUpdates", timeout=LONG_POLL)
    wait_until(lambda: bot.calls_of("getUpdates"), what="the long poll to reach the emulator")
    bot.close()
    assert poll.result(timeout=CLIENT_TIMEOUT) == (200, {"ok": True, "result": []})


def test_a_second_poller_ends_the_first_one_s_long_poll_with_409(bot: BotApiEmulator) -> None:
    """Two pollers of one bot: Telegram ends the waiting long poll when another getUpdates arrives, with 409, and
    the newer one gets the updates (the emulator counts such overlaps)."""
    first = in_background(call, bot, "getUpdates", timeout=LONG_POLL)
    wait_until(lambda: bot.calls_of("getUpdates"), what="the first long poll to reach the emulator")
    second = in_background(ok, bot, "getUpdates", timeout=LONG_POLL)
    status, body = first.result(timeout=CLIENT_TIMEOUT)
    assert (status, body["error_code"]) == (409, 409)
    assert body["description"].startswith("Conflict: terminated by other getUpdates request")
    assert bot.overlapping_polls == 1 and not second.done()
    push(bot, 5)
    assert ids(second.result(timeout=CLIENT_TIMEOUT)) == [5]


# Webhook or getUpdates

def test_get_updates_is_409_while_a_webhook_is_set(bot: BotApiEmulator) -> None:
    push(bot, 10)
    assert ok(bot, "setWebhook", url="https://gateway.example.test/webhook") is True
    status, body = call(bot, "getUpdates")
    assert (status, body["ok"], body["error_code"]) == (409, False, 409)
    assert body["description"].startswith("Conflict: can't use getUpdates method while webhook is active")
    assert ok(bot, "deleteWebhook") is True
    assert ids(ok(bot, "getUpdates")) == [10], "deleteWebhook without drop_pending_updates keeps them"


@pytest.mark.parametrize("method, params", [
    ("deleteWebhook", {}),
    ("setWebhook", {"url": "https://gateway.example.test/webhook"}),
])
@pytest.mark.parametrize("drop", [True, False])
def test_drop_pending_updates(bot: BotApiEmulator, method: str, params: dict, drop: bool) -> None:
    push(bot, 10, 11)
    ok(bot, method, drop_pending_updates=drop, **params)
    assert ok(bot, "getWebhookInfo")["pending_update_count"] == (0 if drop else 2)
    ok(bot, "deleteWebhook")
    assert ids(ok(bot, "getUpdates")) == ([] if drop else [10, 11])
    push(bot, 12)
    assert ids(ok(bot, "getUpdates")) == ([12] if drop else [10, 11, 12]), "later updates still come"


def test_webhook_info_without_a_webhook(bot: BotApiEmulator) -> None:
    push(bot, 10)
    info = ok(bot, "getWebhookInfo")
    assert (info["url"], info["pending_update_count"]) == ("", 1)
    assert "last_error_message" not in info


# Webhook delivery

def test_webhook_delivers_updates_in_order_with_the_secret(hooked: tuple[BotApiEmulator, Receiver]) -> None:
    bot, receiver = hooked
    first = bot.user_says(ALICE, "before the webhook")  # waits, then goes first
    ok(bot, "setWebhook", url="https://gateway.example.test/webhook", secret_token=SECRET)
    later = [bot.user_says(ALICE, f"message {n}") for n in range(3)]
    got = receiver.wait_for(4)
    assert [g["update"] for g in got] == [first, *later]
    assert {g["request"] for g in got} == {"POST /webhook"}
    assert {g["headers"].get("x-telegram-bot-api-secret-token") for g in got} == {SECRET}
    assert wait_until(lambda: ok(bot, "getWebhookInfo")["pending_update_count"] == 0, what="no pending update")


def test_webhook_without_secret_sends_no_secret_header(hooked: tuple[BotApiEmulator, Receiver]) -> None:
    bot, receiver = hooked
    ok(bot, "setWebhook", url="https://gateway.example.test/webhook")
    bot.user_says(ALICE, "hi")
    assert "x-telegram-bot-api-secret-token" not in receiver.wait_for(1)[0]["headers"]


def test_a_failed_delivery_is_repeated_until_accepted_in_order(hooked: tuple[BotApiEmulator, Receiver]) -> None:
    bot, receiver = hooked
    receiver.statuses = [500, 500]
    ok(bot, "setWebhook", url="https://gateway.example.test/webhook", secret_token=SECRET)
    first, second = bot.user_says(ALICE, "one"), bot.user_says(BOB, "two")
    got = receiver.wait_for(2)
    assert [(g["update"]["update_id"], g["status"]) for g in got] == [
        (first["update_id"], 500), (first["update_id"], 500), (first["update_id"], 200), (second["update_id"], 200)]
    assert all(g["update"] == first for g in got[:3]), "the same update each time"


def test_webhook_info_shows_the_url_pending_count_and_last_error(hooked: tuple[BotApiEmulator, Receiver]) -> None:
    bot, receiver = hooked
    receiver.statuses = [500] * 1000  # refuses until the test says otherwise
    url = "https://gateway.example.test/webhook"
    ok(bot, "setWebhook", url=url, secret_token=SECRET)
    bot.user_says(ALICE, "one")
    bot.user_says(ALICE, "two")
    info = wait_until(lambda: webhook_error(bot), what="a delivery error in getWebhookInfo")
    assert (info["url"], info["pending_update_count"]) == (url, 2)
    assert info["last_error_message"] == "Wrong response from the webhook: 500"
    assert isinstance(info["last_error_date"], int)
    with receiver.arrived:
        receiver.statuses = []
    receiver.wait_for(2)
    assert wait_until(lambda: ok(bot, "getWebhookInfo")["pending_update_count"] == 0, what="no pending update")


def test_an_unreachable_webhook_is_a_connection_error_in_webhook_info() -> None:
    receiver = Receiver()
    receiver.close()  # nothing listens there any more
    emulator = BotApiEmulator(TOKEN, deliver_webhooks_to=receiver.url + "/webhook")
    try:
        ok(emulator, "setWebhook", url="https://gateway.example.test/webhook")
        emulator.user_says(ALICE, "hello?")
        info = wait_until(lambda: webhook_error(emulator), what="a delivery error in getWebhookInfo")
        assert info["last_error_message"].startswith("Connection failed")
        assert info["pending_update_count"] == 1
    finally:
        emulator.close()
    emulator.check()


# Injected failures

def test_fail_429_is_telegrams_flood_control_body(bot: BotApiEmulator) -> None:
    bot.fail("sendMessage", 429, retry_after=7)
    assert call(bot, "sendMessage", chat_id=1, text="hi") == (429, {
        "ok": False, "error_code": 429, "description": "Too Many Requests: retry after 7",
        "parameters": {"retry_after": 7}})
    assert ok(bot, "sendMessage", chat_id=1, text="hi")["text"] == "hi", "only once"
    assert [m.get("text") for m in bot.chat(1)] == ["hi"], "the refused call sent nothing"


@pytest.mark.parametrize("status, description", [
    (500, "Internal Server Error"), (502, "Bad Gateway"), (503, "Service Unavailable"), (504, "Gateway Timeout")])
def test_fail_5xx_times(bot: BotApiEmulator, status: int, description: str) -> None:
    bot.fail("getUpdates", status, times=2)
    expected = (status, {"ok": False, "error_code": status, "description": description})
    assert [call(bot, "getUpdates") for _ in range(2)] == [expected, expected]
    assert call(bot, "getUpdates") == (200, {"ok": True, "result": []})


def test_a_failure_is_for_its_method_only(bot: BotApiEmulator) -> None:
    bot.fail("sendMessage", 502)
    assert ok(bot, "getMe")["id"] == BOT_ID
    assert call(bot, "sendMessage", chat_id=1, text="x")[0] == 502


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 409, 418])
def test_fail_refuses_a_status_it_does_not_offer(bot: BotApiEmulator, status: int) -> None:
    with pytest.raises(ValueError):
        bot.fail("sendMessage", status)


# sendMessage

def test_send_message_returns_the_message(bot: BotApiEmulator) -> None:
    first = ok(bot, "sendMessage", chat_id=ALICE["id"], text="hello")
    second = ok(bot, "sendMessage", chat_id=BOB["id"], text="hi Bob")
    third = ok(bot, "sendMessage", chat_id=ALICE["id"], text="again")
    assert first["message_id"] < second["message_id"] < third["message_id"]
    assert (first["chat"]["id"], first["text"], first["from"]["id"]) == (ALICE["id"], "hello", BOT_ID)
    assert "entities" not in first
    assert [m["text"] for m in bot.chat(ALICE["id"])] == ["hello", "again"]


def test_send_message_keeps_entities_and_buttons(bot: BotApiEmulator) -> None:
    entities = [{"type": "bold", "offset": 0, "length": 5}]
    markup = {"inline_keyboard": [[{"text": "Buy", "callback_data": "buy"}]]}
    sent = ok(bot, "sendMessage", chat_id=1, text="hello world", entities=entities, reply_markup=markup)
    assert (sent["entities"], sent["reply_markup"]) == (entities, markup)


SMILE = "\U0001F600"  # two UTF-16 code units


@pytest.mark.parametrize("params, description", [
    ({"text": ""}, "Bad Request: message text is empty"),
    ({"text": "  \n "}, "Bad Request: message text is empty"),
    ({}, "Bad Request: message text is empty"),
    ({"text": "a" * 4097}, "Bad Request: message is too long"),
    ({"text": SMILE * 2048 + "a"}, "Bad Request: message is too long"),  # 2049 characters, 4097 units
    ({"text": "hi", "entities": [{"type": "bold", "offset": 1, "length": 2}]}, "Bad Request: can't parse entities"),
    ({"text": SMILE, "entities": [{"type": "bold", "offset": 0, "length": 3}]}, "Bad Request: can't parse entities"),
])
def test_send_message_refusals(bot: BotApiEmulator, params: dict, description: str) -> None:
    status, body = call(bot, "sendMessage", chat_id=1, **params)
    assert (status, body["ok"], body["error_code"]) == (400, False, 400)
    assert body["description"].startswith(description)
    assert bot.chat(1) == []


@pytest.mark.parametrize("text", ["a" * 4096, SMILE * 2048, "a" + SMILE * 2047 + "b"])
def test_4096_utf16_units_are_accepted(bot: BotApiEmulator, text: str) -> None:
    assert ok(bot, "sendMessage", chat_id=1, text=text)["text"] == text


def test_an_entity_on_an_emoji_counts_utf16_units(bot: BotApiEmulator) -> None:
    entities = [{"type": "bold", "offset": 0, "length": 2}]
    assert ok(bot, "sendMessage", chat_id=1, text=SMILE, entities=entities)["entities"] == entities


@pytest.mark.parametrize("parse_mode, source", [
    ("HTML", "<b>hi</b> there"),
    ("MarkdownV2", "*hi* there"),
])
def test_parse_mode_text_is_kept_as_text_and_entities(bot: BotApiEmulator, parse_mode: str, source: str) -> None:
    sent = ok(bot, "sendMessage", chat_id=1, text=source, parse_mode=parse_mode)
    assert sent["text"] == "hi there"
    assert sent["entities"] == [{"type": "bold", "offset": 0, "length": 2}]
    assert bot.chat(1)[0]["text"] == "hi there"


@pytest.mark.parametrize("parse_mode, source, text, entity", [
    ("HTML", "a &lt;b&gt; &amp; <i>c</i>", "a <b> & c", {"type": "italic", "offset": 8, "length": 1}),
    ("HTML", '<a href="https://example.com">link</a>', "link",
     {"type": "text_link", "offset": 0, "length": 4, "url": "https://example.com"}),
    ("MarkdownV2", "_it_ 1\\.5", "it 1.5", {"type": "italic", "offset": 0, "length": 2}),
    ("MarkdownV2", f"{SMILE} `code`", f"{SMILE} code", {"type": "code", "offset": 3, "length": 4}),
])
def test_parse_mode_markup(bot: BotApiEmulator, parse_mode: str, source: str, text: str, entity: dict) -> None:
    sent = ok(bot, "sendMessage", chat_id=1, text=source, parse_mode=parse_mode)
    assert (sent["text"], sent["entities"]) == (text, [entity])


@pytest.mark.parametrize("parse_mode, markup", [("HTML", "<b>{}</b>"), ("MarkdownV2", "*{}*")])
def test_the_length_limit_counts_the_text_after_parsing(bot: BotApiEmulator, parse_mode: str, markup: str) -> None:
    """Telegram's limit is 1-4096 characters after entities parsing: the markup itself does not count."""
    sent = ok(bot, "sendMessage", chat_id=1, text=markup.format("a" * 4096), parse_mode=parse_mode)
    assert (len(sent["text"]), sent["entities"]) == (4096, [{"type": "bold", "offset": 0, "length": 4096}])
    status, body = call(bot, "sendMessage", chat_id=1, text=markup.format("a" * 4097), parse_mode=parse_mode)
    assert (status, body["description"]) == (400, "Bad Request: message is too long")
    status, body = call(bot, "sendMessage", chat_id=1, text=markup.format(" "), parse_mode=parse_mode)
    assert (status, body["description"]) == (400, "Bad Request: message text is empty")


def test_a_caption_is_counted_after_parsing_up_to_1024(bot: BotApiEmulator) -> None:
    sent = ok(bot, "sendPhoto", chat_id=1, photo="https://example.com/a.jpg",
              caption="<i>" + "a" * 1024 + "</i>", parse_mode="HTML")
    assert (len(sent["caption"]), sent["caption_entities"][0]["type"]) == (1024, "italic")
    status, body = call(bot, "sendPhoto", chat_id=1, photo="https://example.com/a.jpg", caption="a" * 1025)
    assert (status, body["description"]) == (400, "Bad Request: message caption is too long")


def test_an_unknown_parse_mode_is_refused(bot: BotApiEmulator) -> None:
    status, body = call(bot, "sendMessage", chat_id=1, text="hi", parse_mode="BBCode")
    assert (status, body["description"]) == (400, "Bad Request: unsupported parse_mode")


# Typing

def test_a_chat_action_shows_typing_until_the_bots_message(bot: BotApiEmulator) -> None:
    assert not bot.typing(ALICE["id"])
    assert ok(bot, "sendChatAction", chat_id=ALICE["id"], action="typing") is True
    assert bot.typing(ALICE["id"])
    assert not bot.typing(BOB["id"]), "only in that chat"
    ok(bot, "sendMessage", chat_id=BOB["id"], text="to Bob")
    assert bot.typing(ALICE["id"]), "a message elsewhere does not end it"
    ok(bot, "sendMessage", chat_id=ALICE["id"], text="done")
    assert not bot.typing(ALICE["id"])


# The user's side (the sandbox)

def test_user_says_pushes_a_message_and_keeps_it_in_the_chat(bot: BotApiEmulator) -> None:
    update = bot.user_says(ALICE, "hello bot")
    message = update["message"]
    assert (message["text"], message["chat"]["id"], message["chat"]["type"]) == ("hello bot", ALICE["id"], "private")
    assert message["from"] == {"id": ALICE["id"], "is_bot": False, "first_name": "Alice", "username": "alice"}
    assert ok(bot, "getUpdates") == [update]
    reply = ok(bot, "sendMessage", chat_id=ALICE["id"], text="hello Alice")
    assert [m["message_id"] for m in bot.chat(ALICE["id"])] == [message["message_id"], reply["message_id"]]
    assert bot.chat(BOB["id"]) == []


def test_update_ids_rise_across_kinds(bot: BotApiEmulator) -> None:
    said = bot.user_says(ALICE, "one")
    sent = ok(bot, "sendMessage", chat_id=ALICE["id"], text="menu",
              reply_markup={"inline_keyboard": [[{"text": "X", "callback_data": "x"}]]})
    pressed = bot.press(ALICE, sent["message_id"], "x")
    other = bot.user_says(BOB, "two")
    got = ids(ok(bot, "getUpdates"))
    assert got == ids([said, pressed, other])
    assert got[0] < got[1] < got[2]


def send_invoice(bot: BotApiEmulator, **overrides: Any) -> dict[str, Any]:
    params = {"chat_id": ALICE["id"], "title": "Course", "description": "Ten lessons", "payload": "order-17",
              "provider_token": "", "currency": "RUB",
              "prices": [{"label": "Course", "amount": 150000}, {"label": "Tax", "amount": 2500}], **overrides}
    return ok(bot, "sendInvoice", **params)


def test_send_invoice_appears_in_the_chat(bot: BotApiEmulator) -> None:
    sent = send_invoice(bot)
    invoice = sent["invoice"]
    assert (invoice["title"], invoice["currency"], invoice["total_amount"]) == ("Course", "RUB", 152500)
    assert bot.chat(ALICE["id"])[-1]["invoice"] == invoice
    assert bot.chat(ALICE["id"])[-1]["message_id"] == sent["message_id"]


def test_an_approved_checkout_is_followed_by_the_payment(bot: BotApiEmulator) -> None:
    invoice = send_invoice(bot)
    query = bot.checkout(ALICE, invoice["message_id"])["pre_checkout_query"]
    assert (query["currency"], query["total_amount"], query["invoice_payload"]) == ("RUB", 152500, "order-17")
    assert query["from"]["id"] == ALICE["id"]
    assert [u.get("pre_checkout_query") for u in ok(bot, "getUpdates")] == [query]

    assert ok(bot, "answerPreCheckoutQuery", pre_checkout_query_id=query["id"], ok=True) is True
    updates = ok(bot, "getUpdates")
    assert len(updates) == 2
    paid = updates[1]["message"]
    payment = paid["successful_payment"]
    assert (payment["currency"], payment["total_amount"], payment["invoice_payload"]) == ("RUB", 152500, "order-17")
    assert payment["telegram_payment_charge_id"] and payment["provider_payment_charge_id"]
    assert (paid["from"]["id"], paid["chat"]["id"], "text" in paid) == (ALICE["id"], ALICE["id"], False)
    assert bot.chat(ALICE["id"])[-1]["successful_payment"] == payment
    assert bot.checkout_answers[query["id"]]["ok"] is True


def test_each_payment_has_its_own_charge_id(bot: BotApiEmulator) -> None:
    invoice = send_invoice(bot)
    charges = []
    for _ in range(2):
        query = bot.checkout(ALICE, invoice["message_id"])["pre_checkout_query"]
        ok(bot, "answerPreCheckoutQuery", pre_checkout_query_id=query["id"], ok=True)
        charges.append(bot.chat(ALICE["id"])[-1]["successful_payment"]["telegram_payment_charge_id"])
    assert charges[0] != charges[1]


def test_a_refused_checkout_pushes_nothing(bot: BotApiEmulator) -> None:
    invoice = send_invoice(bot)
    query = bot.checkout(ALICE, invoice["message_id"])["pre_checkout_query"]
    ok(bot, "getUpdates", offset=ok(bot, "getUpdates")[-1]["update_id"] + 1)
    assert ok(bot, "answerPreCheckoutQuery", pre_checkout_query_id=query["id"], ok=False,
              error_message="Sold out") is True
    assert ok(bot, "getUpdates") == []
    assert bot.checkout_answers[query["id"]]["error_message"] == "Sold out"
    assert not any("successful_payment" in m for m in bot.chat(ALICE["id"]))


def test_checkout_of_a_message_that_is_no_invoice_raises(bot: BotApiEmulator) -> None:
    plain = ok(bot, "sendMessage", chat_id=ALICE["id"], text="no invoice here")
    with pytest.raises(ValueError):
        bot.checkout(ALICE, plain["message_id"])
    with pytest.raises(ValueError):
        bot.checkout(BOB, send_invoice(bot)["message_id"])  # Alice's invoice is not in Bob's chat
    assert ok(bot, "getUpdates") == []


def test_press_pushes_a_callback_query_on_the_bots_message(bot: BotApiEmulator) -> None:
    markup = {"inline_keyboard": [[{"text": "Buy", "callback_data": "buy:17"}]]}
    sent = ok(bot, "sendMessage", chat_id=ALICE["id"], text="Pick one", reply_markup=markup)
    update = bot.press(ALICE, sent["message_id"], "buy:17")
    query = update["callback_query"]
    assert (query["data"], query["from"]["id"]) == ("buy:17", ALICE["id"])
    assert query["message"] == sent
    assert ok(bot, "getUpdates") == [update]

    assert ok(bot, "answerCallbackQuery", callback_query_id=query["id"], text="Done") is True
    assert bot.callback_answers[query["id"]]["text"] == "Done"


def test_press_on_a_message_not_in_the_chat_raises(bot: BotApiEmulator) -> None:
    with pytest.raises(ValueError):
        bot.press(ALICE, 999999, "x")


def test_one_checkout_of_an_invoice_at_a_time(bot: BotApiEmulator) -> None:
    """Telegram's payment form is modal: a second tap on Pay while the first checkout awaits the bot's answer is
    no second checkout; once answered, the user may pay again (the bot decides)."""
    invoice = send_invoice(bot)
    first = bot.checkout(ALICE, invoice["message_id"])
    with pytest.raises(ValueError, match="under way"):
        bot.checkout(ALICE, invoice["message_id"])
    ok(bot, "answerPreCheckoutQuery", pre_checkout_query_id=first["pre_checkout_query"]["id"], ok=False,
       error_message="declined")
    again = bot.checkout(ALICE, invoice["message_id"])
    assert again["pre_checkout_query"]["id"] != first["pre_checkout_query"]["id"]


def test_a_request_whose_client_hangs_up_mid_body_is_dropped_unanswered() -> None:
    """A client killed between its headers and the end of its body (a gateway stopped by kill -9 mid-call)
    leaves no request to handle: the server records nothing and no error, and goes on serving."""
    receiver = Receiver()
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as sock:
            sock.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"update_id\": 1")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1024) == b""  # closed unanswered
        assert httpx.post(receiver.url + "/hook", json={"update_id": 2}).status_code == 200
        assert [got["update"] for got in receiver.got] == [{"update_id": 2}]
        receiver.check()
    finally:
        receiver.close()
