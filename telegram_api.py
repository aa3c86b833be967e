"""Bot API calls over one pooled `httpx.Client`, with typed errors and bounded retries.

Errors raised here::

    TelegramError                 anything the Bot API call did not do
     ├── NetworkError             worth retrying: no answer, or a 5xx
     │    └── TimedOut            `sent` tells whether the request may have reached Telegram
     ├── RetryAfter               429 flood control; `retry_after` seconds
     ├── BadRequest               400: the request itself is wrong (not worth retrying)
     ├── Forbidden                403: e.g. the user blocked the bot
     ├── InvalidToken             401/404 in the Bot API's own shape: the token is wrong or revoked
     ├── Conflict                 409: another poller, or a webhook is set
     └── ChatMigrated             the group became a supergroup; `new_chat_id`

The token is part of every Bot API URL, so no message here is built from a URL or from a foreign
exception's text without `redact()`.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import threading
import time
import unicodedata
from typing import IO, Any, Callable, Iterable

import httpx

from config import BOT_TOKEN_SHAPE, MIN_SECRET_CHARS
from retry import BackoffPolicy, backoff
from updates import is_int

log = logging.getLogger("gateway.telegram")

# The shape config.py accepts as BOT_TOKEN, so every token the gateway can run with is masked.
_TOKEN_SHAPE = re.compile(BOT_TOKEN_SHAPE)
_RETRY_AFTER_TEXT = re.compile(r"retry after (\d+)", re.IGNORECASE)

# Methods that do the same thing when repeated, so a request that may have been sent can be retried.
# (A repeated refundStarPayment is refused with CHARGE_ALREADY_REFUNDED; a repeated answer to a query
# is refused as already answered: neither does anything twice.)
_IDEMPOTENT = {
    "getMe", "getUpdates", "setWebhook", "deleteWebhook", "getWebhookInfo", "sendChatAction",
    "answerPreCheckoutQuery", "answerCallbackQuery", "refundStarPayment",
}


def may_repeat(method: str) -> bool:
    """Whether `method` may be sent again after an attempt whose answer was lost (it would not act twice)."""
    return method in _IDEMPOTENT


# 400 answers that are about the chat, not the request: the user or group is gone for this bot.
_GONE_CHAT = ("chat not found", "user not found", "peer_id_invalid", "group chat was deactivated",
              "group chat was deleted")


def chat_unreachable(err: "TelegramError") -> bool:
    """Whether `err` says the chat cannot be reached at all (blocked bot, deactivated user, chat gone, bot
    kicked): a fact about the user, not a fault of the gateway, and repeating will not change it."""
    if isinstance(err, Forbidden):
        return True
    return isinstance(err, BadRequest) and any(text in err.description.lower() for text in _GONE_CHAT)


def redact(text: str, *secrets: str) -> str:
    """Return `text` with anything shaped like a bot token, and each given secret, masked."""
    text = _TOKEN_SHAPE.sub("<redacted-token>", text)
    for secret in _maskable(secrets):
        if secret in text:
            text = text.replace(secret, "<redacted>")
    return text


@functools.lru_cache(maxsize=64)
def _maskable(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """The secrets worth masking, longest first (a whole token before its secret half); cached, as every log
    line asks with the same few."""
    return tuple(sorted((s for s in secrets if s and len(s) >= MIN_SECRET_CHARS), key=len, reverse=True))


def printable(text: str, limit: int = 300) -> str:
    """`text` from outside (Telegram's descriptions, a bot's username) made safe for one log line: runs of
    whitespace (newlines too) become one space, control and format characters go, and it is cut at `limit`."""
    text = " ".join(text.split())
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Cs"))
    return text if len(text) <= limit else text[:limit - 1] + "…"


class RedactingStream(io.TextIOBase):
    """A text stream that writes whole lines to `target`, each through `redact()` with the secrets it was given
    (`add_secrets`); what `main()` and the CLI print goes through one, so no line can carry the token."""

    def __init__(self, target: IO[str], *secrets: str) -> None:
        super().__init__()
        self._target = target
        self._secrets: tuple[str, ...] = secrets
        self._pending = ""  # a line not finished yet: a secret may still be split across two writes
        self._lock = threading.Lock()  # log records come from every thread

    @property
    def target(self) -> IO[str]:
        """The stream this one writes to (the log-writer writes there itself, masking as this does)."""
        return self._target

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Mask these too from now on (the settings are read after the first line may be printed)."""
        self._secrets = tuple(dict.fromkeys((*self._secrets, *(s for s in secrets if s))))

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            done, newline, rest = (self._pending + text).rpartition("\n")
            self._pending = rest
            if newline:
                self._target.write(redact(done + newline, *self._secrets))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._target.write(redact(self._pending, *self._secrets))
                self._pending = ""
            self._target.flush()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")

    def isatty(self) -> bool:
        return bool(getattr(self._target, "isatty", lambda: False)())


class RedactingFilter(logging.Filter):
    """Masks token shapes and the given secrets in every record it sees (message, arguments, traceback)."""

    def __init__(self, *secrets: str) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = redact(message, *self._secrets), None
        return True


# httpx logs every request URL at INFO, and every Bot API URL holds the token: mask it at the source,
# whoever configured logging (app.main() also turns httpx down to WARNING).
_HTTPX_FILTER = RedactingFilter()
logging.getLogger("httpx").addFilter(_HTTPX_FILTER)


class TelegramError(Exception):
    """A Bot API call failed; the message names the method and Telegram's description only."""

    def __init__(self, method: str, description: str, error_code: int | None = None) -> None:
        self.method = method
        # Telegram's words (or a proxy's) go into log lines: masked, on one line, of bounded length.
        self.description = printable(redact(description), 500)
        self.error_code = error_code
        # True when this call may have taken effect anyway: some earlier attempt, or this one, was sent
        # and its answer lost. Set by NetworkError and by `TelegramClient.call()`.
        self.sent = getattr(self, "sent", False)
        code = f" {error_code}" if error_code is not None else ""
        super().__init__(f"{method} failed{code}: {self.description}")


class NetworkError(TelegramError):
    """No usable answer (connection failed, 5xx): worth retrying. `sent` is True when the request may
    have reached Telegram (the connection broke or timed out after sending), so repeating a method
    that is not idempotent, like `sendMessage`, may do it twice."""

    def __init__(self, method: str, description: str, error_code: int | None = None, sent: bool = False) -> None:
        self.sent = sent
        super().__init__(method, description, error_code)


class TimedOut(NetworkError):
    """No answer in time; `sent` is False when the request certainly never left (connect/pool timeout)."""

    def __init__(self, method: str, description: str, sent: bool) -> None:
        super().__init__(method, description, sent=sent)


class RetryAfter(TelegramError):
    """Flood control (429): wait `retry_after` seconds before calling again."""

    def __init__(self, method: str, description: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(method, description, 429)


class BadRequest(TelegramError):
    """400: the request is wrong (bad chat, bad markup, text too long); repeating it will not help."""


class Forbidden(TelegramError):
    """403: the bot may not do this, e.g. the user blocked it."""


class InvalidToken(TelegramError):
    """401/404: the bot token is wrong or was revoked."""


class Conflict(TelegramError):
    """409: another instance is polling, or a webhook is set while we poll."""


class ChatMigrated(TelegramError):
    """The group became a supergroup; use `new_chat_id` from now on."""

    def __init__(self, method: str, description: str, new_chat_id: int) -> None:
        self.new_chat_id = new_chat_id
        super().__init__(method, description, 400)


def _bot_api_answer(body: Any) -> bool:
    """Whether `body` is shaped as the Bot API answers: `{"ok": true, ...}`, or `{"ok": false, "error_code": N}`.
    A proxy, captive portal or load balancer in the way answers otherwise, and its status says nothing
    about the bot (a proxy's 401 is not Telegram refusing the token)."""
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        return False
    return body["ok"] or is_int(body.get("error_code"))


def _raise_for_reply(method: str, status: int, body: Any) -> Any:
    """Return the `result` of a successful Bot API reply, or raise the typed error it describes."""
    if not _bot_api_answer(body):
        what = "a body that is not JSON" if not isinstance(body, (dict, list)) else "an answer not from the Bot API"
        if status >= 500 or status == 0:
            raise NetworkError(method, f"HTTP {status} with {what}", status)
        raise TelegramError(method, f"HTTP {status} with {what} (a proxy in the way?)", status)
    if body["ok"] is True and 200 <= status < 300:
        return body.get("result")
    code = body.get("error_code") if isinstance(body.get("error_code"), int) else status
    description = str(body.get("description") or f"HTTP {status}")
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    if isinstance(params.get("migrate_to_chat_id"), int):
        raise ChatMigrated(method, description, params["migrate_to_chat_id"])
    if code == 429 or status == 429:
        retry_after = params.get("retry_after")
        if not isinstance(retry_after, (int, float)):
            found = _RETRY_AFTER_TEXT.search(description)
            retry_after = int(found.group(1)) if found else 1
        raise RetryAfter(method, description, float(retry_after))
    if code in (401, 404):
        raise InvalidToken(method, description, code)
    if code == 403:
        raise Forbidden(method, description, code)
    if code == 409:
        raise Conflict(method, description, code)
    if code >= 500 or status >= 500:
        raise NetworkError(method, description, code)
    if code == 400:
        raise BadRequest(method, description, code)
    raise TelegramError(method, description, code)


def _on_headers(callback: Callable[[], None]) -> Callable[[str, dict[str, Any]], None]:
    """An httpcore trace hook calling `callback` once, as the request's headers start to go out."""
    def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith("send_request_headers.started"):
            callback()
    return trace


class TelegramClient:
    """Calls the Bot API; one instance (one connection pool) is shared by every thread."""

    def __init__(
        self,
        token: str,
        base_url: str = "https://api.telegram.org",
        *,
        timeout: float = 10.0,
        max_attempts: int = 4,
        max_retry_after: float = 60.0,
        policy: BackoffPolicy = BackoffPolicy(initial=0.5, maximum=10.0, jitter=0.5),
        observe: Callable[[str, str], None] = lambda method, outcome: None,
    ) -> None:
        self._url = f"{base_url.rstrip('/')}/bot{token}/"
        self._timeout = httpx.Timeout(timeout, connect=5.0, pool=5.0)
        self._http = httpx.Client(timeout=self._timeout, limits=httpx.Limits(max_connections=32))
        self._max_attempts = max_attempts
        self._max_retry_after = max_retry_after
        self._policy = policy
        self._observe = observe  # (method, outcome) after every attempt, for metrics
        # Written by every thread, read by health; a str and a float assigned whole, so no lock is needed.
        self.network_error: str | None = None  # the last "Telegram unreachable" seen, cleared by any success
        self._stopping = threading.Event()
        self._closed = False

    def call(self, method: str, params: dict[str, Any] | None = None, *, read_timeout: float | None = None,
             attempts: int | None = None, deadline: float | None = None,
             on_wire: Callable[[], None] | None = None) -> Any:
        """Call `method` and return its `result`, retrying what is worth retrying; raise `TelegramError`.

        With `deadline` (a `time.monotonic()` value) no retry is started that could not finish by then.
        `on_wire` is called just before a request's first byte goes out (a connection is open by then);
        if it raises, nothing is sent and its exception propagates."""
        attempts = attempts or self._max_attempts
        maybe_sent = False
        for attempt in range(1, attempts + 1):
            try:
                return self._attempt(method, params or {}, read_timeout, on_wire)
            except TelegramError as err:
                maybe_sent = maybe_sent or err.sent
                err.sent = maybe_sent  # a later clear refusal does not undo an earlier attempt that got through
                if attempt == attempts or not self._worth_retrying(method, err):
                    raise
                delay = err.retry_after if isinstance(err, RetryAfter) else backoff(attempt, self._policy)
                log.info("%s: %s; retrying in %.1f s", method, err.description, delay)
                if deadline is not None and time.monotonic() + delay + (read_timeout or 1.0) > deadline:
                    raise
            if self._stopping.wait(delay):
                raise NetworkError(method, "client is shutting down", sent=maybe_sent)
        raise AssertionError("unreachable")

    def _worth_retrying(self, method: str, err: TelegramError) -> bool:
        """Flood waits Telegram names (within reason) and network errors, unless a repeat could act twice."""
        if isinstance(err, RetryAfter):
            return err.retry_after <= self._max_retry_after
        return isinstance(err, NetworkError) and not (err.sent and not may_repeat(method))

    def _attempt(self, method: str, params: dict[str, Any], read_timeout: float | None,
                 on_wire: Callable[[], None] | None = None) -> Any:
        """One request: its result, or the typed error; either way counted by `observe`."""
        try:
            result = _raise_for_reply(method, *self._send(method, params, read_timeout, on_wire))
        except TelegramError as err:
            self._observe(method, type(err).__name__)
            if isinstance(err, NetworkError):
                self.network_error = str(err)
            raise
        self._observe(method, "ok")
        self.network_error = None
        return result

    def _send(self, method: str, params: dict[str, Any], read_timeout: float | None,
              on_wire: Callable[[], None] | None = None) -> tuple[int, Any]:
        """Send one request; return (HTTP status, parsed JSON or None). Only transport failures (and `on_wire`) raise."""
        if self._closed:
            raise NetworkError(method, "client is closed")
        timeout = self._timeout if read_timeout is None else httpx.Timeout(
            self._timeout.connect, read=read_timeout, write=self._timeout.write, pool=self._timeout.pool)
        try:
            # ASCII JSON: a lone surrogate (valid in JSON, not in UTF-8) is sent escaped instead of crashing.
            content = json.dumps(params, ensure_ascii=True, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            raise BadRequest(method, f"parameters are not valid JSON: {err}") from None
        try:
            response = self._http.post(self._url + method, content=content, timeout=timeout,
                                       headers={"Content-Type": "application/json"},
                                       extensions={"trace": _on_headers(on_wire)} if on_wire else None)
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as err:
            raise TimedOut(method, f"no connection in time ({type(err).__name__})", sent=False) from None
        except httpx.TimeoutException as err:
            raise TimedOut(method, f"no answer in time ({type(err).__name__})", sent=True) from None
        except httpx.ConnectError as err:
            raise NetworkError(method, f"cannot connect: {redact(str(err))}") from None
        except httpx.TransportError as err:  # the request may have gone out before the connection broke
            raise NetworkError(method, f"{type(err).__name__}: {redact(str(err))}", sent=True) from None
        except httpx.HTTPError as err:
            raise NetworkError(method, f"{type(err).__name__}: {redact(str(err))}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        return response.status_code, body

    # The methods the gateway uses, named as in the Bot API.

    def get_me(self, read_timeout: float | None = None, attempts: int | None = None) -> dict[str, Any]:
        """Who the bot is (its `User`: id, username...); `InvalidToken` if Telegram refuses the token, and
        `TelegramError` if the answer names no bot (no object with an integer id: not the Bot API's answer)."""
        result = self.call("getMe", read_timeout=read_timeout, attempts=attempts)
        if not (isinstance(result, dict) and is_int(result.get("id"))):
            raise TelegramError("getMe", f"the answer names no bot (result is {type(result).__name__}, not a "
                                         "user with an integer id)")
        return result

    def get_updates(self, offset: int | None, timeout: int, limit: int = 100,
                    allowed_updates: list[str] | None = None) -> list[dict[str, Any]]:
        """Long-poll for updates after `offset`; one attempt (the poller owns the retry loop)."""
        params: dict[str, Any] = {"timeout": timeout, "limit": limit}
        if offset is not None:
            params["offset"] = offset
        if allowed_updates is not None:
            params["allowed_updates"] = allowed_updates
        result = self.call("getUpdates", params, read_timeout=timeout + 10, attempts=1)
        return result if isinstance(result, list) else []

    def set_webhook(self, url: str, secret_token: str, allowed_updates: list[str],
                    drop_pending_updates: bool = False) -> None:
        """Register `url` as the webhook; Telegram will send `secret_token` back in a header."""
        self.call("setWebhook", {"url": url, "secret_token": secret_token,
                                 "allowed_updates": allowed_updates,
                                 "drop_pending_updates": drop_pending_updates})

    def delete_webhook(self, drop_pending_updates: bool = False) -> None:
        """Remove the webhook so that `getUpdates` works; pending updates are kept unless asked."""
        self.call("deleteWebhook", {"drop_pending_updates": drop_pending_updates})

    def get_webhook_info(self) -> dict[str, Any]:
        """Return Telegram's view of the webhook (URL, pending count, last error)."""
        return self.call("getWebhookInfo")

    def send_message(self, chat_id: int, text: str, **extra: Any) -> dict[str, Any]:
        """Send one text message (at most 4096 characters) and return the sent Message."""
        return self.call("sendMessage", {"chat_id": chat_id, "text": text, **extra})

    def send_chat_action(self, chat_id: int, action: str = "typing") -> None:
        """Show `action` in the chat for up to 5 seconds; one attempt, since a late one is useless."""
        self.call("sendChatAction", {"chat_id": chat_id, "action": action}, read_timeout=5.0, attempts=1)

    def answer_pre_checkout_query(self, query_id: str, ok: bool, error_message: str | None = None,
                                  deadline: float | None = None) -> None:
        """Approve or refuse a checkout; Telegram needs this within 10 seconds (retries stop at `deadline`)."""
        params: dict[str, Any] = {"pre_checkout_query_id": query_id, "ok": ok}
        if not ok:
            params["error_message"] = error_message or "Payment refused"
        self.call("answerPreCheckoutQuery", params, read_timeout=3.0, attempts=3, deadline=deadline)

    def close(self) -> None:
        """Stop pending retries and close the connection pool; safe to call twice."""
        self._stopping.set()
        if not self._closed:
            self._closed = True
            self._http.close()
