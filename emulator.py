"""A Bot API emulator serving real HTTP on 127.0.0.1: the sandbox's Telegram, and the tests' Bot API double.

It answers what the gateway calls, the way Telegram does:

- `getUpdates` with Telegram's offset rules (an offset confirms every update below it; a negative one
  keeps only the last -offset), long polling, and 409 while a webhook is set;
- `setWebhook` / `deleteWebhook` / `getWebhookInfo`, and webhook delivery: pending updates are POSTed in
  order with the `X-Telegram-Bot-Api-Secret-Token` header to `deliver_webhooks_to` (the address a reverse
  proxy in front of the gateway would forward to), kept and retried until the gateway answers 2xx;
- `getMe`, `sendMessage`, `sendPhoto`, `sendDocument`, `sendInvoice`, `sendChatAction`,
  `answerCallbackQuery`, `answerPreCheckoutQuery`; a message Telegram would refuse for its form (empty,
  too long, entities outside the text) gets Telegram's 400;
- failure injection: `fail("sendMessage", 429, retry_after=3)`, `fail("getUpdates", 502)`, or any scripted
  answer with `script()`.

The user's side is here too, for the sandbox: `user_says`, `press`, `checkout` build the updates a
Telegram app would cause, and an approved checkout of an invoice is followed by its `successful_payment`
message, as Telegram sends it. `chat()` and `typing()` say what a user would see in a chat.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import httpx

TYPING_SECONDS = 5.0  # Telegram shows a chat action for 5 s, or until the bot's next message
CHECKOUT_SECONDS = 15.0  # an unanswered checkout no longer blocks another of the same invoice
MAX_KEPT_MESSAGES = 5000  # the chat history the emulator keeps for the sandbox page

Answer = tuple[int, dict[str, str], bytes]


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-request (a service stopping) is no error worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 (port 0: any free one) whose handler calls `self.handle`.

    An exception in `handle` is kept in `errors` (the client sees a 500), so a test can re-raise it with
    `check()` at teardown."""

    def __init__(self, port: int = 0) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this, Nagle's algorithm holds the body
            # until the client's delayed ACK (40 ms), and every call looks 40 ms slow.
            disable_nagle_algorithm = True

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if len(body) < length:  # the client hung up mid-body (killed): no request to answer, as anywhere
                    self.close_connection = True
                    return
                try:
                    status, headers, payload = server.handle(self.command, self.path, dict(self.headers), body)
                except Exception as err:  # kept for check(); the client sees a 500
                    server.errors.append(err)
                    status, headers, payload = 500, {}, b"server failed"
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout); nothing to report

            do_POST = do_GET = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.errors: list[Exception] = []
        self.lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}-http", daemon=True)
        self._thread.start()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        """Answer one request: (status, headers, body)."""
        raise NotImplementedError

    def check(self) -> None:
        """Re-raise the first error the server's threads hit."""
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()


def json_answer(status: int, obj: Any) -> Answer:
    """An HTTP answer carrying `obj` as JSON."""
    # ASCII escapes: a lone surrogate (half an emoji) stays valid JSON instead of failing to encode.
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def utf16_units(text: str) -> int:
    """Telegram's length of `text`: UTF-16 code units."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def telegram_refusal(name: str, params: dict[str, Any]) -> str | None:
    """The description of Telegram's 400 for a message it would refuse for its form (empty or too long text,
    a caption too long, entities outside the text), or None."""
    if name == "sendMessage":
        # Telegram checks the text after parse_mode is read: the markup itself counts for nothing.
        text, entities = _parsed(params.get("text"), params.get("parse_mode"), params.get("entities") or [])
        limit = 4096
        if not isinstance(text, str) or not text.strip():
            return "Bad Request: message text is empty"
    elif name in ("sendPhoto", "sendDocument"):
        text, entities = _parsed(params.get("caption") or "", params.get("parse_mode"),
                                 params.get("caption_entities") or [])
        limit = 1024
        if not params.get(name.removeprefix("send").lower()):
            return "Bad Request: there is no photo in the request"
    else:
        return None
    markup_problem = _markup_refusal(params.get("reply_markup"))
    if markup_problem:
        return markup_problem
    if utf16_units(text) > limit:
        return "Bad Request: message is too long" if name == "sendMessage" else "Bad Request: message caption is too long"
    if params.get("parse_mode") not in (None, "HTML", "MarkdownV2", "Markdown"):
        return "Bad Request: unsupported parse_mode"
    for entity in entities:
        if not (isinstance(entity, dict) and isinstance(entity.get("offset"), int) and entity.get("length", 0) > 0
                and entity["offset"] + entity["length"] <= utf16_units(text)):
            return f"Bad Request: can't parse entities: entity {entity!r} is outside the text"
    return None


_INLINE_ACTIONS = ("callback_data", "url", "switch_inline_query", "switch_inline_query_current_chat",
                   "switch_inline_query_chosen_chat", "login_url", "web_app", "callback_game", "pay", "copy_text")


def _markup_refusal(markup: Any) -> str | None:
    """Telegram's 400 for an inline keyboard it cannot use, or None (other keyboards are not checked)."""
    if markup is None:
        return None
    unreadable = "Bad Request: can't parse reply keyboard markup JSON object"
    if not isinstance(markup, dict):
        return unreadable
    rows = markup.get("inline_keyboard")
    if rows is None:
        return None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        return unreadable
    for button in (b for row in rows for b in row):
        if not isinstance(button, dict) or not isinstance(button.get("text"), str):
            return "Bad Request: can't parse inline keyboard button: Field \"text\" must be of type String"
        data = button.get("callback_data")
        if "callback_data" in button and not (isinstance(data, str) and 1 <= len(data.encode()) <= 64):
            return "Bad Request: BUTTON_DATA_INVALID"
        if "url" in button and not (isinstance(button["url"], str) and re.match(r"(https?|tg)://", button["url"])):
            return "Bad Request: BUTTON_URL_INVALID"
        if not any(action in button for action in _INLINE_ACTIONS):
            return "Bad Request: can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard"
    return None


def _error(code: int, description: str, **parameters: Any) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return code, body


_FAILURES = {
    429: "Too Many Requests: retry after {retry_after}",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def random_token(bot_id: int = 7000000001) -> str:
    """A token of BotFather's shape that no real bot has (the sandbox's)."""
    return f"{bot_id}:SANDBOX{secrets.token_urlsafe(27)}"


class BotApiEmulator(LocalServer):
    """The Bot API over real HTTP: records calls, holds updates for `getUpdates` or delivers them to a
    webhook, answers the sending methods, and plays scripted or injected failures."""

    def __init__(self, token: str, username: str = "sandbox_gateway_bot", first_name: str = "Sandbox bot",
                 deliver_webhooks_to: str | None = None, port: int = 0) -> None:
        self.token = token
        self.bot = {"id": int(token.split(":")[0]), "is_bot": True, "first_name": first_name, "username": username,
                    "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}
        self.deliver_webhooks_to = deliver_webhooks_to
        # `lock` (from LocalServer) guards the call log, scripts, chat history, actions and answers.
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.call_times: list[float] = []  # time.monotonic() of each call, parallel to `calls`
        self._scripts: dict[str, list[tuple]] = {}
        self.messages: deque[dict[str, Any]] = deque(maxlen=MAX_KEPT_MESSAGES)
        self.chat_actions: dict[int, tuple[str, float]] = {}  # chat -> (action, time.monotonic())
        self.callback_answers: dict[str, dict[str, Any]] = {}
        self.checkout_answers: dict[str, dict[str, Any]] = {}
        self._checkouts: dict[str, dict[str, Any]] = {}  # pre-checkout query id -> its invoice message
        self._message_ids = itertools.count(1001)
        self._update_ids = itertools.count(100001)
        self._query_ids = itertools.count(1)
        # When set, a call no scripted answer covers gets the (status, JSON body) pair it returns for the
        # method name and parameters, if any: e.g. to refuse some content as Telegram would.
        self.reject_if: Callable[[str, dict[str, Any]], tuple[int, Any] | None] | None = None
        # _cond guards the pending updates and the webhook, and wakes long polls and the webhook sender.
        self._cond = threading.Condition()
        self._pending: list[dict[str, Any]] = []  # updates not yet confirmed (offset) or delivered (webhook)
        # Telegram ends a long poll with 409 when another getUpdates arrives for the bot meanwhile (two pollers):
        # the number of the latest one, and how many were ended so.
        self._poll_number = 0
        self.overlapping_polls = 0
        self.webhook: dict[str, Any] | None = None
        self.webhook_error: tuple[float, str] | None = None  # (unix time, message) of the last failed delivery
        self._closed = False
        self._sender: threading.Thread | None = None
        super().__init__(port)

    # Test and sandbox controls

    def push_update(self, update: dict[str, Any]) -> None:
        """Make `update` available as Telegram would: to `getUpdates`, or to the webhook."""
        with self._cond:
            self._pending.append(update)
            self._cond.notify_all()

    def script(self, method: str, *replies: tuple) -> None:
        """Answer the next calls of `method` with these (status, JSON body[, delay]), in order; the delay is
        seconds, or a `threading.Event` the answer waits for (a Bot API held until the test lets it go)."""
        with self.lock:
            self._scripts.setdefault(method, []).extend(replies)

    def fail(self, method: str, status: int, times: int = 1, retry_after: int = 3) -> None:
        """Answer the next `times` calls of `method` with Telegram's error of `status` (429 with `retry_after`, or
        a 5xx)."""
        if status not in _FAILURES:
            raise ValueError(f"status {status} is not one of {sorted(_FAILURES)}")
        params = {"retry_after": retry_after} if status == 429 else {}
        self.script(method, *[_error(status, _FAILURES[status].format(retry_after=retry_after), **params)] * times)

    def times_of(self, method: str) -> list[float]:
        """When (time.monotonic()) each call of `method` arrived."""
        with self.lock:
            return [t for (name, _), t in zip(self.calls, self.call_times) if name == method]

    def calls_of(self, method: str) -> list[dict[str, Any]]:
        """The parameters of every call of `method` so far."""
        with self.lock:
            return [params for name, params in self.calls if name == method]

    # The user's side: what a Telegram app sends when its user acts

    def user_says(self, user: dict[str, Any], text: str) -> dict[str, Any]:
        """The user writes `text` in their private chat with the bot; returns the update."""
        message = self._keep({"message_id": next(self._message_ids), "from": _person(user),
                              "chat": _private_chat(user), "date": int(time.time()), "text": text})
        return self._push({"message": message})

    def press(self, user: dict[str, Any], message_id: int, data: str) -> dict[str, Any]:
        """The user presses the inline button with `data` under the bot's message `message_id`."""
        message = self._find(user["id"], message_id)
        rows = (message.get("reply_markup") or {}).get("inline_keyboard") or []
        if not any(isinstance(b, dict) and b.get("callback_data") == data for row in rows for b in row):
            raise ValueError(f"message {message_id} has no button with callback_data {data!r}")
        query_id = f"{self.bot['id']}{next(self._query_ids):08d}"
        return self._push({"callback_query": {"id": query_id, "from": _person(user),
                                              "chat_instance": f"sandbox-{user['id']}", "data": data,
                                              "message": message}})

    def checkout(self, user: dict[str, Any], message_id: int) -> dict[str, Any]:
        """The user presses Pay under the invoice `message_id`: a `pre_checkout_query`. When the bot approves it,
        the `successful_payment` message follows."""
        invoice_message = self._find(user["id"], message_id)
        invoice = invoice_message.get("invoice")
        if invoice is None:
            raise ValueError(f"message {message_id} is not an invoice")
        query_id = f"{self.bot['id']}{next(self._query_ids):08d}"
        query = {"id": query_id, "from": _person(user), "currency": invoice["currency"],
                 "total_amount": invoice["total_amount"], "invoice_payload": invoice["payload"]}
        with self.lock:
            # Telegram's payment form is modal: one checkout of an invoice at a time, however fast one taps.
            # Its form gives up on a bot that does not answer within 10 s; so does this check, after 15.
            if any(c["message_id"] == message_id and c["user"]["id"] == user["id"]
                   and time.monotonic() - c["at"] < CHECKOUT_SECONDS for c in self._checkouts.values()):
                raise ValueError(f"a checkout of invoice {message_id} is under way; wait for the bot's answer")
            self._checkouts[query_id] = {"user": user, "query": query, "message_id": message_id,
                                         "at": time.monotonic()}
        return self._push({"pre_checkout_query": query})

    def chat(self, chat_id: int) -> list[dict[str, Any]]:
        """Every message kept in the chat, oldest first, as Telegram would show them (the user's and the bot's)."""
        with self.lock:
            return [dict(m) for m in self.messages if m["chat"]["id"] == chat_id]

    def typing(self, chat_id: int) -> bool:
        """Whether the chat shows the bot "typing…" now: an action in the last 5 s and no message since."""
        with self.lock:
            action = self.chat_actions.get(chat_id)
        return action is not None and time.monotonic() - action[1] < TYPING_SECONDS

    def stop_waiting(self) -> None:
        """End every long poll now, and webhook delivery, while other calls are still answered (a client
        stopping need not wait out its poll)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop serving, long polls and webhook delivery."""
        self.stop_waiting()
        super().close()

    # The Bot API side

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        found = re.fullmatch(r"/bot([^/]+)/(\w+)", path.split("?")[0])
        if not found:
            return json_answer(404, {"ok": False, "error_code": 404, "description": "Not Found"})
        token, name = found.groups()
        if token != self.token:
            return json_answer(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
        params = json.loads(body) if body else {}
        with self.lock:
            self.calls.append((name, params))
            self.call_times.append(time.monotonic())
            scripted = self._scripts.get(name)
            reply = scripted.pop(0) if scripted else None
        if reply is None and self.reject_if is not None:
            reply = self.reject_if(name, params)
        if reply is None:
            problem = telegram_refusal(name, params)
            reply = (400, {"ok": False, "error_code": 400, "description": problem}) if problem else None
        if reply is None and name == "getUpdates" and self.webhook is not None:
            reply = _error(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        if reply is not None:
            if len(reply) > 2 and isinstance(reply[2], threading.Event):
                reply[2].wait(60)
            elif len(reply) > 2:
                time.sleep(reply[2])  # a slow Bot API, on the server's own thread
            return json_answer(reply[0], reply[1])
        try:
            return json_answer(200, {"ok": True, "result": self._answer(name, params)})
        except _Conflict:
            return json_answer(*_error(409, "Conflict: terminated by other getUpdates request; make sure that only "
                                            "one bot instance is running"))

    def _answer(self, name: str, params: dict[str, Any]) -> Any:
        if name == "getUpdates":
            updates = self._get_updates(params)
            if updates is None:
                raise _Conflict()
            return updates
        if name == "getMe":
            return self.bot
        if name in ("sendMessage", "sendPhoto", "sendDocument", "sendInvoice"):
            return self._bot_sends(name, params)
        if name == "sendChatAction":
            with self.lock:
                self.chat_actions[params.get("chat_id")] = (params.get("action", ""), time.monotonic())
        elif name == "answerCallbackQuery":
            with self.lock:
                self.callback_answers[str(params.get("callback_query_id"))] = params
        elif name == "answerPreCheckoutQuery":
            self._checkout_answered(params)
        elif name in ("setWebhook", "deleteWebhook"):
            self._set_webhook(params if name == "setWebhook" else None, bool(params.get("drop_pending_updates")))
        elif name == "getWebhookInfo":
            return self._webhook_info()
        return True

    def _bot_sends(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"message_id": next(self._message_ids), "from": self.bot,
                                   "chat": {"id": params.get("chat_id"), "type": "private"}, "date": int(time.time())}
        if name == "sendMessage":
            text, entities = _parsed(params.get("text"), params.get("parse_mode"), params.get("entities"))
            message["text"] = text
            if entities:
                message["entities"] = entities
        elif name == "sendInvoice":
            message["invoice"] = {"title": params.get("title", ""), "description": params.get("description", ""),
                                  "currency": params.get("currency", ""),
                                  "total_amount": sum(int(p.get("amount", 0)) for p in params.get("prices") or []),
                                  "payload": params.get("payload", ""), "start_parameter": ""}
        else:
            kind = name.removeprefix("send").lower()
            message[kind] = params.get(kind)
            if params.get("caption"):
                caption, entities = _parsed(params["caption"], params.get("parse_mode"), params.get("caption_entities"))
                message["caption"] = caption
                if entities:
                    message["caption_entities"] = entities
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        with self.lock:
            self.chat_actions.pop(params.get("chat_id"), None)  # a message ends the chat's "typing…"
        return self._keep(message)

    def _checkout_answered(self, params: dict[str, Any]) -> None:
        query_id = str(params.get("pre_checkout_query_id"))
        with self.lock:
            self.checkout_answers[query_id] = params
            checkout = self._checkouts.pop(query_id, None)
        if checkout is None or not params.get("ok"):
            return
        query, user = checkout["query"], checkout["user"]
        charge = secrets.token_hex(8)
        payment = {"currency": query["currency"], "total_amount": query["total_amount"],
                   "invoice_payload": query["invoice_payload"], "telegram_payment_charge_id": f"sandbox-{charge}",
                   "provider_payment_charge_id": f"sandbox-provider-{charge}"}
        message = self._keep({"message_id": next(self._message_ids), "from": _person(user),
                              "chat": _private_chat(user), "date": int(time.time()), "successful_payment": payment})
        self._push({"message": message})

    def _keep(self, message: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.messages.append(message)
        return message

    def _find(self, chat_id: int, message_id: int) -> dict[str, Any]:
        with self.lock:
            for message in reversed(self.messages):
                if message["chat"]["id"] == chat_id and message["message_id"] == message_id:
                    return dict(message)
        raise ValueError(f"no message {message_id} in chat {chat_id}")

    def _push(self, body: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), **body}
        self.push_update(update)
        return update

    def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The updates for a getUpdates, once there are some or its timeout ends; None if a newer getUpdates
        ended it (Telegram's 409)."""
        offset = params.get("offset")
        limit = min(max(int(params.get("limit", 100)), 1), 100)
        deadline = time.monotonic() + min(float(params.get("timeout", 0)), 50.0)
        with self._cond:
            self._poll_number += 1
            mine = self._poll_number
            self._cond.notify_all()  # an older poll still waiting ends now
            if isinstance(offset, int) and offset < 0:
                self._pending = self._pending[offset:]
            elif isinstance(offset, int):
                self._pending = [u for u in self._pending if u["update_id"] >= offset]
            while not self._pending and not self._closed and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
                if self._poll_number != mine:
                    self.overlapping_polls += 1
                    return None
            return list(self._pending[:limit])

    # Webhook

    def _set_webhook(self, params: dict[str, Any] | None, drop_pending: bool) -> None:
        with self._cond:
            self.webhook = params
            self.webhook_error = None
            if drop_pending:
                self._pending.clear()
            if params is not None and self.deliver_webhooks_to and self._sender is None:
                self._sender = threading.Thread(target=self._deliver_webhooks, name="emulator-webhook", daemon=True)
                self._sender.start()
            self._cond.notify_all()

    def _webhook_info(self) -> dict[str, Any]:
        with self._cond:
            info: dict[str, Any] = {"url": (self.webhook or {}).get("url", ""), "has_custom_certificate": False,
                                    "pending_update_count": len(self._pending)}
            if self.webhook is not None:
                info["max_connections"] = self.webhook.get("max_connections", 40)
                if self.webhook.get("allowed_updates") is not None:
                    info["allowed_updates"] = self.webhook["allowed_updates"]
            if self.webhook_error is not None:
                info["last_error_date"], info["last_error_message"] = int(self.webhook_error[0]), self.webhook_error[1]
        return info

    def _deliver_webhooks(self) -> None:
        """Post pending updates in order to the gateway while a webhook is set; keep each until a 2xx."""
        failures = 0
        with httpx.Client(timeout=10) as client:
            while True:
                with self._cond:
                    while not self._closed and (self.webhook is None or not self._pending):
                        self._cond.wait()
                    if self._closed:
                        return
                    update, secret = self._pending[0], (self.webhook or {}).get("secret_token")
                headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
                try:
                    response = client.post(str(self.deliver_webhooks_to), json=update, headers=headers)
                    problem = None if 200 <= response.status_code < 300 else f"Wrong response from the webhook: " \
                                                                              f"{response.status_code}"
                except httpx.HTTPError as err:
                    problem = f"Connection failed: {type(err).__name__}"
                with self._cond:
                    if problem is None:
                        failures = 0
                        if self._pending and self._pending[0] is update:
                            self._pending.pop(0)
                        continue
                    self.webhook_error = (time.time(), problem)
                    failures += 1
                    self._cond.wait(min(0.1 * 2 ** failures, 5.0))


class _Conflict(Exception):
    """A long poll ended by a newer one."""


def _parsed(text: Any, parse_mode: Any, entities: Any) -> tuple[Any, Any]:
    """A sent text as Telegram stores it: `parse_mode` markup read into plain text and entities."""
    if not isinstance(text, str) or parse_mode not in ("HTML", "MarkdownV2"):
        return text, entities
    from markdown_v2 import parse_markdown_v2  # the gateway's own readers, lenient where Telegram would refuse
    from telegram_html import parse_html
    return parse_html(text) if parse_mode == "HTML" else parse_markdown_v2(text)


def _person(user: dict[str, Any]) -> dict[str, Any]:
    return {"id": user["id"], "is_bot": False, "first_name": user.get("first_name", f"User{user['id']}"),
            **{k: user[k] for k in ("last_name", "username", "language_code") if user.get(k)}}


def _private_chat(user: dict[str, Any]) -> dict[str, Any]:
    chat = {"id": user["id"], "type": "private", "first_name": user.get("first_name", f"User{user['id']}")}
    if user.get("username"):
        chat["username"] = user["username"]
    return chat
