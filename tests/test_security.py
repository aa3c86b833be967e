"""Security and bad input against the running service: no way in, no leak, no crash."""

from __future__ import annotations

import ssl
from http.server import ThreadingHTTPServer
from typing import Any

import httpx
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import derive_webhook_secret
from doubles import TOKEN, MakeDouble, TelegramDouble, free_port, wait_until
from helpers import text_update
from updates import is_int

WEBHOOK = {"WEBHOOK_URL": "https://gateway.example.test/webhook"}
SECRET = derive_webhook_secret(TOKEN)

# Values of the wrong type for any field, as a hostile or broken sender might put them.
junk = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
user = st.fixed_dictionaries({"id": st.one_of(st.integers(1, 2**40), junk)},
                             optional={"is_bot": st.one_of(st.booleans(), junk), "first_name": junk,
                                       "username": junk, "language_code": junk})
chat = st.fixed_dictionaries({"id": st.one_of(st.integers(-2**52, 2**40), junk)},
                             optional={"type": st.one_of(st.sampled_from(["private", "group", "supergroup",
                                                                          "channel"]), junk)})
message = st.fixed_dictionaries({}, optional={
    "message_id": st.one_of(st.integers(1, 2**31), junk), "date": st.one_of(st.integers(0, 2**31), junk),
    "from": st.one_of(user, junk), "chat": st.one_of(chat, junk), "text": st.one_of(st.text(max_size=50), junk),
    "caption": junk, "photo": st.one_of(st.lists(st.fixed_dictionaries({"file_id": junk}), max_size=2), junk),
    "document": junk, "sticker": junk, "location": junk, "venue": junk, "contact": junk, "poll": junk,
    "dice": junk, "media_group_id": junk, "reply_to_message": junk, "is_automatic_forward": junk,
    "successful_payment": st.one_of(st.fixed_dictionaries({}, optional={
        "currency": st.one_of(st.sampled_from(["RUB", "XTR", "JPY"]), junk),
        "total_amount": st.one_of(st.integers(0, 10**9), junk), "invoice_payload": junk,
        "telegram_payment_charge_id": junk, "order_info": junk}), junk),
    "refunded_payment": junk})
pre_checkout = st.fixed_dictionaries({}, optional={
    "id": junk, "from": st.one_of(user, junk), "currency": junk, "total_amount": junk, "invoice_payload": junk})
body = st.one_of(
    st.fixed_dictionaries({"message": st.one_of(message, junk)}),
    st.fixed_dictionaries({"edited_message": st.one_of(message, junk)}),
    st.fixed_dictionaries({"callback_query": st.one_of(st.fixed_dictionaries(
        {}, optional={"id": junk, "from": st.one_of(user, junk), "message": st.one_of(message, junk),
                      "data": junk}), junk)}),
    st.fixed_dictionaries({"pre_checkout_query": st.one_of(pre_checkout, junk)}),
    st.dictionaries(st.text(min_size=1, max_size=20), junk, max_size=2),
)


def test_generated_hostile_updates_never_get_a_500_or_kill_a_thread(start_service, make: MakeDouble) -> None:
    """Updates of Telegram's shapes with wrong types anywhere get 200 or 400, never 500, and every thread lives."""
    service = start_service(**WEBHOOK, FORWARD_UPDATE_KINDS="callback_query,edited_message,message",
                            DEBOUNCE_SECONDS="0.05", MAX_WAIT_SECONDS="0.1", LOG_LEVEL="INFO")
    client = httpx.Client(base_url=service.url, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}, timeout=10)
    update_ids = iter(range(10**6, 2 * 10**6))
    statuses: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=body, bad_id=st.one_of(st.none(), junk))
    def post(body: dict[str, Any], bad_id: Any) -> None:
        update = {"update_id": next(update_ids) if bad_id is None else bad_id, **body}
        response = client.post("/webhook", json=update)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400), (update, response.text)
        if not is_int(update["update_id"]) or update["update_id"] < 0:
            assert response.status_code == 400

    post()
    client.close()
    assert statuses.get(200, 0) > 50  # the generator did reach the storing path
    health = service.health()
    assert not health["dead_threads"], health
    assert "Traceback" not in service.text


def test_token_and_secrets_never_printed_even_at_debug_with_failing_bot_api(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """With every Bot API call failing (401, 500, 409, refused connections) at DEBUG, neither the token,
    the webhook secret nor the reply token appears in the output, health, metrics or Make events."""
    unauthorized = (401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
    server_error = (500, {"ok": False, "error_code": 500, "description": "Internal Server Error"})
    conflict = (409, {"ok": False, "error_code": 409, "description": "Conflict: terminated by other getUpdates"})
    telegram.script("deleteWebhook", server_error)
    telegram.script("getUpdates", server_error, conflict)
    telegram.script("sendChatAction", unauthorized, server_error)
    telegram.script("sendMessage", server_error, unauthorized)
    make.script((200, {"reply": "answer"}))
    service = start_service(LOG_LEVEL="DEBUG", REPLY_TOKEN="reply-secret-123", TYPING_MODE="until_reply",
                            TYPING_INTERVAL_SECONDS="0.5")
    telegram.push_update(text_update("hi", user_id=3))
    wait_until(lambda: make.accepted(), timeout=20, what="the batch despite failing calls")
    wait_until(lambda: len(telegram.calls_of("sendMessage")) >= 2, timeout=20, what="the reply attempts")
    unreachable = start_service(LOG_LEVEL="DEBUG", TELEGRAM_API_URL=f"http://127.0.0.1:{free_port()}",
                                STATE_DB=str(service.workdir / "other.sqlite3"))
    wait_until(lambda: "Telegram unreachable" in unreachable.text or "deleteWebhook failed" in unreachable.text,
               what="a failing call to be logged")
    seen = service.text + unreachable.text + service.get("/").text + service.get("/metrics").text
    seen += unreachable.get("/").text + str(make.events)
    for secret in (TOKEN, TOKEN.split(":")[1], SECRET, "reply-secret-123"):
        assert secret not in seen
    assert "Unauthorized" in service.text  # the failures were logged, without the secrets


def _tls_make_double(tmp_path) -> tuple[MakeDouble, str]:
    """A Make double serving HTTPS with a certificate from a CA nobody trusts."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    make = MakeDouble()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    httpd: ThreadingHTTPServer = make._httpd
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    return make, f"https://127.0.0.1:{make.port}/hook"


def test_self_signed_make_is_not_trusted(start_service, telegram: TelegramDouble, tmp_path) -> None:
    """TLS verification stays on: an event is never delivered to a Make URL with an untrusted certificate."""
    make, url = _tls_make_double(tmp_path)
    try:
        service = start_service(MAKE_WEBHOOK_URL=url, DEBOUNCE_SECONDS="0.1")
        telegram.push_update(text_update("secret business", user_id=8))
        health = wait_until(lambda: (h := service.health())["make"]["failed_attempts"] >= 1 and h,
                            what="a failed delivery")
        assert "CERTIFICATE_VERIFY_FAILED" in health["make"]["last_error"]
        assert make.requests == [] and health["make"]["delivered"] == 0
        assert health["status"] == "degraded" and health["outbox_pending"] == 1
    finally:
        make.close()


def test_reply_route_refuses_oversized_text_and_compares_token_safely(start_service,
                                                                     telegram: TelegramDouble) -> None:
    """POST /reply: over 32768 characters is a 400 naming the limit; a token differing in length is a 401."""
    service = start_service(REPLY_TOKEN="r" * 40)
    auth = {"Authorization": "Bearer " + "r" * 40}
    too_long = service.post("/reply", json={"chat_id": 1, "text": "x" * 32769}, headers=auth)
    assert too_long.status_code == 400 and "32768" in too_long.json()["error"]
    assert service.post("/reply", json={"chat_id": 1, "text": "x"},
                        headers={"Authorization": "Bearer r"}).status_code == 401
    assert telegram.calls_of("sendMessage") == []


def test_nan_and_lone_surrogates_neither_crash_nor_stall_a_chat(start_service, make: MakeDouble) -> None:
    """NaN (not JSON for anyone downstream) is refused with 400; a lone surrogate in a text is stored,
    sent to Make escaped, and the chat's next batch follows."""
    service = start_service(**WEBHOOK, DEBOUNCE_SECONDS="0.1")
    headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
    nan = b'{"update_id": 2, "callback_query": {"id": "c", "data": NaN, "message": {"chat": {"id": 7}}}}'
    assert service.post("/webhook", content=nan, headers=headers).status_code == 400
    surrogate = b'{"update_id": 3, "message": {"message_id": 1, "date": 1, "chat": {"id": 7, "type": "private"},' \
                b' "from": {"id": 7, "is_bot": false, "first_name": "S"}, "text": "bad \\ud800 text"}}'
    assert service.post("/webhook", content=surrogate, headers=headers).status_code == 200
    event = wait_until(lambda: make.accepted(), what="the batch with the surrogate")[0]
    assert event["text"] == "bad \ud800 text"
    assert service.post("/webhook", json=text_update("next", user_id=7), headers=headers).status_code == 200
    wait_until(lambda: len(make.accepted()) == 2, what="the chat's next batch")
    assert service.health()["outbox_inflight"] == 0


def test_setwebhook_failures_at_debug_never_print_the_token(start_service, telegram: TelegramDouble) -> None:
    """Webhook mode with setWebhook failing (500, then 401) logs the failures without the token, then registers."""
    telegram.script("setWebhook", (500, {"ok": False, "error_code": 500, "description": "Internal Server Error"}),
                    (401, {"ok": False, "error_code": 401, "description": "Unauthorized"}))
    service = start_service(**WEBHOOK, LOG_LEVEL="DEBUG")
    wait_until(lambda: service.health()["status"] == "ok", timeout=20, what="the webhook to be registered")
    assert len(telegram.calls_of("setWebhook")) == 3 and service.printed("Unauthorized")
    for secret in (TOKEN, TOKEN.split(":")[1], SECRET):
        assert secret not in service.text + service.get("/").text + service.get("/metrics").text


def test_telegram_with_an_untrusted_certificate_is_never_called(start_service, tmp_path) -> None:
    """TLS verification stays on for the Bot API: a server with an untrusted certificate gets no request."""
    telegram = TelegramDouble()
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    telegram._httpd.socket = context.wrap_socket(telegram._httpd.socket, server_side=True)
    try:
        service = start_service(TELEGRAM_API_URL=f"https://127.0.0.1:{telegram.port}")
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in service.text, what="the refused certificate")
        assert telegram.calls == []
    finally:
        telegram.close()
