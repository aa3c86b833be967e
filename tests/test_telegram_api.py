"""telegram_api.py: Bot API replies turned into typed errors, redaction, and the client against a real HTTP double."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import pytest

from doubles import TOKEN, RawServer, TelegramDouble, free_port
from retry import BackoffPolicy
from telegram_api import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RedactingStream,
    RetryAfter,
    TelegramClient,
    TelegramError,
    TimedOut,
    _raise_for_reply,
    printable,
    redact,
)

FAST = BackoffPolicy(initial=0.01, base=2.0, maximum=0.05, jitter=0.0)
TOKEN_SECRET_PART = TOKEN.split(":")[1]


def err(code: int, description: str, **parameters: Any) -> dict[str, Any]:
    """A Bot API error body."""
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return body


# _raise_for_reply: (status, body) -> result or typed error

ERROR_TABLE = [
    pytest.param(429, err(429, "Too Many Requests: retry after 7", retry_after=7), RetryAfter,
                 {"retry_after": 7.0, "error_code": 429}, id="429-parameters"),
    pytest.param(429, err(429, "Too Many Requests: retry after 13"), RetryAfter,
                 {"retry_after": 13.0}, id="429-description-only"),
    pytest.param(400, err(400, "Bad Request: group chat was upgraded to a supergroup chat",
                          migrate_to_chat_id=-1001234567890), ChatMigrated,
                 {"new_chat_id": -1001234567890}, id="migrated"),
    pytest.param(400, err(400, "Bad Request: group chat was upgraded to a supergroup chat",
                          migrate_to_chat_id=-(2**52 - 1)), ChatMigrated,
                 {"new_chat_id": -(2**52 - 1)}, id="migrated-52-bit-id"),
    pytest.param(401, err(401, "Unauthorized"), InvalidToken, {"error_code": 401}, id="401"),
    pytest.param(404, err(404, "Not Found"), InvalidToken, {"error_code": 404}, id="404"),
    pytest.param(403, err(403, "Forbidden: bot was blocked by the user"), Forbidden, {"error_code": 403}, id="403"),
    pytest.param(409, err(409, "Conflict: terminated by other getUpdates request; make sure that only one bot "
                               "instance is running"), Conflict, {"error_code": 409}, id="409"),
    pytest.param(400, err(400, "Bad Request: chat not found"), BadRequest, {"error_code": 400}, id="400"),
    pytest.param(502, err(502, "Bad Gateway"), NetworkError, {"error_code": 502}, id="502-json"),
    pytest.param(502, None, NetworkError, {}, id="502-not-json"),
    pytest.param(500, None, NetworkError, {}, id="500-not-json"),
    pytest.param(200, None, TelegramError, {}, id="200-not-json"),
    pytest.param(200, ["not", "an", "object"], TelegramError, {}, id="200-json-list"),
]


def test_successful_reply_returns_its_result() -> None:
    """An `ok` reply gives back its `result`, whatever its shape."""
    assert _raise_for_reply("getMe", 200, {"ok": True, "result": {"id": 1, "is_bot": True}}) == {"id": 1,
                                                                                               "is_bot": True}
    assert _raise_for_reply("sendChatAction", 200, {"ok": True, "result": True}) is True
    assert _raise_for_reply("getUpdates", 200, {"ok": True, "result": []}) == []


@pytest.mark.parametrize("status,body,error,attributes", ERROR_TABLE)
def test_reply_becomes_its_typed_error(status: int, body: Any, error: type[TelegramError],
                                       attributes: dict[str, Any]) -> None:
    """Each kind of failed reply raises its own error type, carrying what the caller needs to act on."""
    with pytest.raises(TelegramError) as caught:
        _raise_for_reply("sendMessage", status, body)
    assert type(caught.value) is error, f"{status} {body!r} gave {type(caught.value).__name__}"
    for name, value in attributes.items():
        assert getattr(caught.value, name) == value, name
    assert caught.value.method == "sendMessage"
    assert str(caught.value).startswith("sendMessage failed")
    if isinstance(body, dict):
        assert body["description"] in str(caught.value)


def test_bad_request_is_not_worth_retrying() -> None:
    """`except NetworkError` means "worth retrying": a BadRequest (and the other refusals) are not in it."""
    for refusal in (BadRequest, Forbidden, InvalidToken, Conflict, ChatMigrated, RetryAfter):
        assert issubclass(refusal, TelegramError)
        assert not issubclass(refusal, NetworkError), refusal.__name__
    assert issubclass(TimedOut, NetworkError)
    with pytest.raises(TelegramError) as caught:
        _raise_for_reply("sendMessage", 400, err(400, "Bad Request: message text is empty"))
    assert not isinstance(caught.value, NetworkError)


def test_redact_masks_token_shapes_and_given_secrets() -> None:
    """`redact` hides anything shaped like a bot token and every secret it is given, and leaves the rest."""
    url = f"https://api.telegram.org/bot{TOKEN}/sendMessage?secret=hunter2_secret"
    masked = redact(url, "hunter2_secret")
    assert TOKEN not in masked and TOKEN_SECRET_PART not in masked and "hunter2_secret" not in masked
    assert masked.startswith("https://api.telegram.org/bot") and masked.endswith("/sendMessage?secret=<redacted>")
    other = "987654321:ZZZyyyXXXwwwVVVuuuTTTsssRRRqqqPPP"
    assert other not in redact(f"two tokens: {TOKEN} and {other}")
    assert redact("nothing secret here", "") == "nothing secret here"


def test_error_description_is_redacted() -> None:
    """A description that echoes the token never puts it in the error message."""
    with pytest.raises(BadRequest) as caught:
        _raise_for_reply("sendMessage", 400, err(400, f"Bad Request: bad url /bot{TOKEN}/x"))
    assert TOKEN not in str(caught.value) and TOKEN_SECRET_PART not in str(caught.value)


# TelegramClient against the Bot API double


@pytest.fixture
def clients() -> Iterator[Callable[..., TelegramClient]]:
    """Build TelegramClients with fast retries; each is closed at teardown."""
    made: list[TelegramClient] = []

    def build(base_url: str, token: str = TOKEN, **kwargs: Any) -> TelegramClient:
        kwargs.setdefault("policy", FAST)
        client = TelegramClient(token, base_url, **kwargs)
        made.append(client)
        return client

    yield build
    for client in made:
        client.close()


def test_flood_control_waits_retry_after_then_succeeds(telegram: TelegramDouble, clients) -> None:
    """A 429 with retry_after 1 is retried after waiting that second, and the call then succeeds."""
    telegram.script("getMe", (429, err(429, "Too Many Requests: retry after 1", retry_after=1)))
    client = clients(telegram.url)
    started = time.monotonic()
    assert client.call("getMe")["id"] == 123456789  # the bot user, as Telegram answers
    assert time.monotonic() - started >= 0.95
    assert len(telegram.calls_of("getMe")) == 2


def test_server_error_is_retried(telegram: TelegramDouble, clients) -> None:
    """A 500 followed by a 200 gives the 200's result after one retry."""
    telegram.script("sendMessage", (500, err(500, "Internal Server Error")))
    client = clients(telegram.url)
    sent = client.send_message(42, "hello")
    assert sent["text"] == "hello"
    assert [c["text"] for c in telegram.calls_of("sendMessage")] == ["hello", "hello"]


def test_bad_request_is_not_retried(telegram: TelegramDouble, clients) -> None:
    """A 400 is raised at once, without a second attempt."""
    telegram.script("sendMessage", (400, err(400, "Bad Request: chat not found")))
    with pytest.raises(BadRequest):
        clients(telegram.url).send_message(1, "x")
    assert len(telegram.calls_of("sendMessage")) == 1


def test_connection_refused_raises_network_error(clients) -> None:
    """With nothing listening on the port, the call fails with NetworkError after its attempts."""
    client = clients(f"http://127.0.0.1:{free_port()}", max_attempts=2)
    with pytest.raises(NetworkError):
        client.call("getMe")


def test_close_is_safe_twice_and_later_calls_fail_cleanly(telegram: TelegramDouble) -> None:
    """After `close()` (twice) a call raises NetworkError instead of using a closed pool."""
    client = TelegramClient(TOKEN, telegram.url, policy=FAST, max_attempts=1)
    client.close()
    client.close()
    with pytest.raises(NetworkError):
        client.call("getMe")


# Every error, with logging fully on: the token reaches neither the message nor a log line.

FAILURES: dict[str, Callable[[TelegramDouble, Callable[..., TelegramClient]], None]] = {
    "connection-refused": lambda tg, mk: mk(f"http://127.0.0.1:{free_port()}", max_attempts=2).call("getMe"),
    "5xx-until-giving-up": lambda tg, mk: (
        tg.script("getMe", *[(502, err(502, "Bad Gateway"))] * 2), mk(tg.url, max_attempts=2).call("getMe")),
    "flood-control-too-long": lambda tg, mk: (
        tg.script("getMe", (429, err(429, "Too Many Requests: retry after 3600", retry_after=3600))),
        mk(tg.url).call("getMe")),
    "bad-request": lambda tg, mk: (
        tg.script("sendMessage", (400, err(400, "Bad Request: chat not found"))),
        mk(tg.url).send_message(1, "x")),
    "forbidden": lambda tg, mk: (
        tg.script("sendMessage", (403, err(403, "Forbidden: bot was blocked by the user"))),
        mk(tg.url).send_message(1, "x")),
    "conflict": lambda tg, mk: (
        tg.script("getUpdates", (409, err(409, "Conflict: terminated by other getUpdates request"))),
        mk(tg.url).get_updates(None, 0)),
    "invalid-token": lambda tg, mk: mk(tg.url, token=TOKEN.replace("AAH", "BBH")).call("getMe"),
    "read-timeout": lambda tg, mk: mk(tg.url).call("getUpdates", {"timeout": 2}, read_timeout=0.3, attempts=1),
}
EXPECTED = {
    "connection-refused": NetworkError, "5xx-until-giving-up": NetworkError, "flood-control-too-long": RetryAfter,
    "bad-request": BadRequest, "forbidden": Forbidden, "conflict": Conflict, "invalid-token": InvalidToken,
    "read-timeout": TimedOut,
}
TOKENS = (TOKEN, TOKEN_SECRET_PART, TOKEN.replace("AAH", "BBH"), TOKEN.replace("AAH", "BBH").split(":")[1])


@pytest.fixture(scope="module")
def shared_telegram() -> Iterator[TelegramDouble]:
    """One Bot API double for the whole table below (each case consumes its own scripted replies)."""
    double = TelegramDouble()
    yield double
    double.close()
    double.check()


def _trigger(name: str, telegram: TelegramDouble, clients, caplog: pytest.LogCaptureFixture) -> TelegramError:
    """Run failure `name` with every logger at DEBUG and return the error it raised."""
    caplog.set_level(logging.DEBUG)
    for logger in ("httpx", "httpcore", "gateway", "gateway.telegram"):
        caplog.set_level(logging.DEBUG, logger=logger)
    with pytest.raises(TelegramError) as caught:
        FAILURES[name](telegram, clients)
    assert type(caught.value) is EXPECTED[name]
    return caught.value


@pytest.mark.parametrize("name", list(FAILURES))
def test_token_is_not_in_the_error(name: str, shared_telegram: TelegramDouble, clients,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """Whatever goes wrong, the raised error's text never contains the bot token."""
    error = _trigger(name, shared_telegram, clients, caplog)
    for text in (str(error), repr(error), error.description, str(error.__cause__ or "")):
        for secret in TOKENS:
            assert secret not in text, f"{name}: token in the error: {text}"


@pytest.mark.parametrize("name", list(FAILURES))
def test_token_is_not_in_any_log_line(name: str, shared_telegram: TelegramDouble, clients,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Whatever goes wrong, with every logger at DEBUG, no log line contains the bot token."""
    _trigger(name, shared_telegram, clients, caplog)
    leaked = [f"{r.name}: {r.getMessage()}" for r in caplog.records if any(s in r.getMessage() for s in TOKENS)]
    assert not leaked, (f"{name}: the token reached the log through {sorted({line.split(':')[0] for line in leaked})}"
                        f" (TelegramClient leaves httpx's INFO request log on, and it holds the URL): {leaked[0]}")
    for secret in TOKENS:
        assert secret not in caplog.text


def test_connection_dropped_after_sending_is_not_repeated_for_send_message() -> None:
    """A connection that breaks after the request went out may have delivered it: sendMessage is not
    sent again (the user would get it twice), while an idempotent method is retried."""
    from telegram_api import NetworkError as _NetworkError
    from telegram_api import TelegramClient as _Client

    server = RawServer()
    client = _Client(TOKEN, server.url, max_attempts=3)
    try:
        with pytest.raises(_NetworkError) as caught:
            client.send_message(1, "hello")
        assert caught.value.sent is True
        assert sum(b"/sendMessage" in r for r in server.received) == 1
        with pytest.raises(_NetworkError):
            client.call("getWebhookInfo")
        assert sum(b"/getWebhookInfo" in r for r in server.received) == 3
        assert TOKEN not in str(caught.value)
    finally:
        client.close()
        server.close()


def test_refusal_after_an_attempt_that_may_have_landed_keeps_the_maybe_sent_mark() -> None:
    """When one attempt may have reached Telegram and the retry is refused, the error still says `sent`,
    so a payment hold is not released for an approval Telegram may have taken."""
    import json as _json

    from telegram_api import BadRequest as _BadRequest
    from telegram_api import TelegramClient as _Client

    body = _json.dumps({"ok": False, "error_code": 400, "description": "Bad Request: query is too old"}).encode()
    refusal = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    # The first attempt's answer is lost; the retry gets a clear refusal.
    server = RawServer(lambda n, request: refusal if n > 1 else None)
    client = _Client(TOKEN, server.url)
    try:
        with pytest.raises(_BadRequest) as caught:
            client.answer_pre_checkout_query("q", True)
        assert caught.value.sent is True and len(server.received) == 2
    finally:
        client.close()
        server.close()


def test_get_me_names_the_bot_and_refuses_a_wrong_token(telegram: TelegramDouble, clients) -> None:
    """`get_me()` returns the bot's User; a token Telegram does not know raises InvalidToken, without the token."""
    assert clients(telegram.url).get_me()["username"] == "sandbox_gateway_bot"
    with pytest.raises(InvalidToken) as caught:
        clients(telegram.url, token=TOKEN.replace("AAH", "BBH")).get_me()
    assert caught.value.error_code == 401 and "BBH" not in str(caught.value)



@pytest.mark.parametrize("status,body", [
    (401, {"error": "proxy authentication required"}),
    (404, {"detail": "Not Found"}),
    (401, {"ok": False, "description": "Unauthorized"}),  # no error_code: not how the Bot API answers
    (404, {"ok": "false", "error_code": 404}),
], ids=["proxy-401", "router-404", "no-error-code", "ok-not-a-bool"])
def test_a_refusal_not_shaped_like_the_bot_apis_is_not_the_tokens_fault(status: int, body: Any) -> None:
    """Only a Bot API answer (`ok: false` with an `error_code`) can say the token is wrong; a proxy's or a
    router's 401/404 is a TelegramError saying it came from something else."""
    with pytest.raises(TelegramError) as caught:
        _raise_for_reply("getMe", status, body)
    assert not isinstance(caught.value, InvalidToken)
    assert "not from the Bot API" in str(caught.value)


@pytest.mark.parametrize("result", [None, [1, 2], {"username": "x_bot"}, {"id": "1"}, {"id": True}],
                         ids=["null", "list", "no-id", "string-id", "bool-id"])
def test_get_me_answer_naming_no_bot_is_an_error(result: Any, telegram: TelegramDouble, clients) -> None:
    """A getMe `result` that is not a user with an integer id is a TelegramError, never an empty bot."""
    telegram.script("getMe", (200, {"ok": True, "result": result}))
    with pytest.raises(TelegramError) as caught:
        clients(telegram.url).get_me(attempts=1)
    assert "names no bot" in str(caught.value) and not isinstance(caught.value, InvalidToken)


def test_printable_keeps_what_telegram_says_on_one_bounded_line() -> None:
    """Newlines and other whitespace runs become one space, control and format characters go, length is capped."""
    assert printable("evil\n2026-01-01 INFO forged\r\n\x1b[2Jx\u202e", 100) == "evil 2026-01-01 INFO forged [2Jx"
    assert printable("u" * 500, 10) == "u" * 9 + "…"
    with pytest.raises(InvalidToken) as caught:  # a refusal whose description runs over lines is one line
        _raise_for_reply("getMe", 401, err(401, "Unauthorized\n" * 50))
    assert "\n" not in str(caught.value)


def test_redacting_stream_masks_secrets_even_split_across_writes() -> None:
    """A `RedactingStream` writes whole lines, each with token shapes and its secrets masked, even when a secret
    arrives in two writes; what is left at `flush()` is masked too; secrets added later count from then on."""
    import io
    target = io.StringIO()
    stream = RedactingStream(target, "hunter2_secret")
    stream.write("a hunter2_")
    assert target.getvalue() == ""  # not a whole line yet
    stream.write("secret b\nc " + TOKEN + "\n")
    stream.add_secrets(["later-secret"])
    stream.write("d later-secret")
    stream.flush()
    assert target.getvalue() == "a <redacted> b\nc <redacted-token>\nd <redacted>"
