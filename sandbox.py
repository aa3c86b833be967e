"""`python app.py sandbox`: the real gateway with no bot and no Make account, and a chat page to try it.

Three things run in one process, all on 127.0.0.1:

- the Bot API emulator (`emulator.py`), standing in for Telegram: the gateway polls it for updates and
  sends its replies, typing, button answers and payment answers to it, exactly as it would to Telegram;
- a Make scenario: the stand-in below (it answers each batch with what it got, after a delay, so the
  typing indicator is visible), or with `--make-url` a real Make webhook, reached through the stand-in
  so that every event and Make's answer still show on the page;
- the gateway itself (`app.serve`), with a throwaway state, plus the routes of the chat page
  (`GET /sandbox`, files in `web/`) that act as Telegram's app: a user writes, presses a button, pays.

Settings come from the environment and `.env` as usual (DEBOUNCE_SECONDS, REPLY_FORMAT, TYPING_MODE…),
except those that wire the sandbox (BOT_TOKEN, MAKE_WEBHOOK_URL, TELEGRAM_API_URL, MODE, HOST, PORT,
STATE_DB, ADMIN_CHAT_ID), which the sandbox sets.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import logging
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from flask import Blueprint, Flask, Response, jsonify, request, send_from_directory

from config import Config, ConfigError
from formatting import clean_text
from emulator import BotApiEmulator, LocalServer, json_answer, random_token

log = logging.getLogger("gateway.sandbox")

WEB = Path(__file__).resolve().parent / "web"
PREFERRED_PORT = 8000
ADMIN_CHAT_ID = 900000001  # the admin's chat: payment notices show in the page's second pane
FIRST_USERS = ({"id": 111111111, "first_name": "Anna", "username": "anna_sandbox", "language_code": "ru"},
               {"id": 222222222, "first_name": "Boris", "username": "boris_sandbox", "language_code": "en"})
KEPT_EVENTS = 200  # the events the page can show
SHOWN_ANSWER_BYTES = 20_000  # of each Make answer, on the page (the gateway gets it whole)
KEPT_QUERIES = 50  # per user: the button presses and checkouts whose answers the page shows
TEST_PRICE = 10000  # minor units: 100.00 RUB
FAILABLE_METHODS = ("sendMessage", "sendChatAction", "getUpdates", "answerCallbackQuery")
_FORWARDED_HEADERS = ("Content-Type", "X-Event-Id", "User-Agent")


class MakeStandIn(LocalServer):
    """A Make custom webhook on 127.0.0.1 that records every event and its answer for the page. It answers
    like a small scenario would, or, given `forward_to`, passes each event to that real Make webhook and
    its answer back unchanged."""

    def __init__(self, telegram: BotApiEmulator, delay: float = 2.0, forward_to: str | None = None) -> None:
        self.telegram = telegram
        self.delay = delay
        self.forward_to = forward_to
        self.timeout = 60.0
        self._client = httpx.Client(follow_redirects=False) if forward_to else None
        self._numbers = itertools.count(1)
        self._stopping = threading.Event()
        # `lock` (from LocalServer) guards `events`: dicts the handler fills in as Make answers.
        self.events: deque[dict[str, Any]] = deque(maxlen=KEPT_EVENTS)
        super().__init__()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        try:
            event = json.loads(body)
        except ValueError:
            event = {"unreadable body": body[:2000].decode("utf-8", "replace")}
        record = {"n": next(self._numbers), "at": time.time(), "event": event, "status": None, "answer": None,
                  "seconds": None}
        with self.lock:
            self.events.append(record)
        started = time.monotonic()
        status, reply_headers, payload = self._forward(headers, body) if self.forward_to else self._answer(event)
        content_type = {k.lower(): v for k, v in reply_headers.items()}.get("content-type", "")
        shown: Any = payload[:SHOWN_ANSWER_BYTES].decode("utf-8", "replace")
        if len(payload) > SHOWN_ANSWER_BYTES:
            shown += f"\n… ({len(payload):,} bytes in all; the gateway got them all)"
        elif "json" in content_type:
            try:
                shown = json.loads(payload)
            except (ValueError, RecursionError):  # shown as text: what the gateway gets is unchanged
                pass
        with self.lock:
            record.update(status=status, answer=shown, seconds=round(time.monotonic() - started, 3))
        return status, reply_headers, payload

    def recent(self, count: int = 50) -> list[dict[str, Any]]:
        """The last `count` events, oldest first, each with Make's answer once it came."""
        with self.lock:
            return [dict(r) for r in list(self.events)[-count:]]

    def give_up_after(self, seconds: float) -> None:
        """Give up on the real Make when the gateway would (its MAKE_TIMEOUT_SECONDS), so the page shows what the
        gateway saw."""
        self.timeout = seconds

    def stop_waiting(self) -> None:
        """Answer every batch the stand-in is "thinking" about now: the sandbox is stopping."""
        self._stopping.set()

    def close(self) -> None:
        """Stop serving; close the connection to the real Make."""
        self.stop_waiting()
        super().close()
        if self._client is not None:
            self._client.close()

    def _forward(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._client is not None and self.forward_to is not None
        sent = {name: headers[name] for name in _FORWARDED_HEADERS if name in headers}
        try:
            response = self._client.post(self.forward_to, content=body, headers=sent, timeout=self.timeout)
        except httpx.TimeoutException:
            log.warning("the real Make webhook did not answer within %g s", self.timeout)
            return 504, {"Content-Type": "text/plain"}, \
                f"sandbox: Make did not answer within {self.timeout:g} s; the gateway gives up too".encode()
        except Exception as err:  # any failure is Make's silence to the gateway, never a stuck record
            log.warning("the real Make webhook did not answer: %s", type(err).__name__)
            return 502, {"Content-Type": "text/plain"}, f"sandbox: Make did not answer ({type(err).__name__})".encode()
        kept = {"Content-Type": response.headers.get("Content-Type", "text/plain")}
        for name in ("Retry-After", "Location"):
            if name in response.headers:
                kept[name] = response.headers[name]
        return response.status_code, kept, response.content

    def _answer(self, event: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """What a small scenario answers: the batch it got, a button's answer, a thank-you for a payment."""
        kind = event.get("event_type")
        if kind == "message_batch":
            self._stopping.wait(self.delay)  # a scenario asking an AI model takes seconds: the chat shows "typing…"
            return json_answer(200, {"reply": batch_reply(event)})
        if kind == "update" and event.get("update_type") == "callback_query":
            query = (event.get("update") or {}).get("callback_query") or {}
            if query.get("data") == "buy":
                self._send_invoice(query)
                return json_answer(200, {"callback_answer": {"text": "Here is a test invoice"}})
            return json_answer(200, {"callback_answer": {"text": f"You pressed “{query.get('data')}”"},
                                     "reply": f"Noted: you pressed “{query.get('data')}”."})
        if kind == "payment":
            payment = event.get("payment") or {}
            return json_answer(200, {"reply": f"✅ Payment of {payment.get('amount')} {payment.get('currency')} "
                                              "received. Thank you!"})
        if kind == "pre_checkout":
            return json_answer(200, {"ok": True})
        return 200, {"Content-Type": "text/plain"}, b"Accepted"

    def _send_invoice(self, query: dict[str, Any]) -> None:
        """Send an invoice the way a scenario's Telegram module would: straight to the Bot API."""
        chat = ((query.get("message") or {}).get("chat") or {}).get("id")
        send_test_invoice(self.telegram, chat)


def send_test_invoice(telegram: BotApiEmulator, chat_id: Any) -> int:
    """Send a 100 RUB test invoice to `chat_id` through the emulated Bot API; its message id."""
    params = {"chat_id": chat_id, "title": "Test product", "description": "A sandbox invoice: nothing is charged",
              "payload": f"sandbox-order-{int(time.time() * 1000)}", "provider_token": "sandbox", "currency": "RUB",
              "prices": [{"label": "Test product", "amount": TEST_PRICE}]}
    response = httpx.post(f"{telegram.url}/bot{telegram.token}/sendInvoice", json=params, timeout=10)
    return int(response.json()["result"]["message_id"])


def batch_reply(event: dict[str, Any]) -> dict[str, Any]:
    """The stand-in's answer to a batch: what arrived, in Telegram's HTML, with two buttons."""
    messages = event.get("messages") or []
    lines = []
    for message in messages[:10]:
        shown = message.get("text") or message.get("caption") or f"[{message.get('type', 'message')}]"
        lines.append(f"• {html.escape(shown[:200])}")
    if len(messages) > 10:
        lines.append(f"• … and {len(messages) - 10} more")
    count = len(messages)
    text = (f"<b>Got {count} message{'s' if count != 1 else ''}</b> in one batch "
            f"(closed: <code>{html.escape(str(event.get('reason')))}</code>):\n" + "\n".join(lines) +
            "\n\n<i>This is the stand-in Make. A real scenario would ask an AI model here.</i>")
    buttons = [[{"text": "👍 Helpful", "callback_data": "helpful"},
                {"text": "💳 Buy (test payment)", "callback_data": "buy"}]]
    return {"text": text, "format": "html", "reply_markup": {"inline_keyboard": buttons}}


class Sandbox:
    """The chat page's routes: they act as Telegram's app (a user writes, presses, pays) on the emulator."""

    def __init__(self, telegram: BotApiEmulator, make: MakeStandIn, config: Config, make_url: str | None) -> None:
        self.telegram = telegram
        self.make = make
        self.config = config
        self.make_url = make_url
        # _lock guards `users` and `_queries` (per user: ids of their latest presses and checkouts).
        self._lock = threading.Lock()
        self.users: dict[int, dict[str, Any]] = {user["id"]: dict(user) for user in FIRST_USERS}
        self._queries: dict[int, deque[str]] = {}
        self._hosts = {f"127.0.0.1:{config.port}", f"localhost:{config.port}"}

    def install(self, app: Flask, gateway: Any) -> None:
        """Add the page and its API to the gateway's Flask app."""
        app.register_blueprint(self.blueprint())

    def stop_waiting(self) -> None:
        """The gateway is stopping: end the emulator's long polls and the stand-in's thinking now."""
        self.make.stop_waiting()
        self.telegram.stop_waiting()

    def announce(self, base_url: str) -> None:
        """Tell the person at the terminal where to look."""
        page = f"{base_url}/sandbox"
        make = f"the real Make webhook {_short(self.make_url)}" if self.make_url else \
            f"a stand-in Make that answers after {self.make.delay:g} s"
        print(f"\n  Sandbox ready: open {page}\n"
              f"  Telegram is emulated (bot @{self.telegram.bot['username']}); events go to {make}.\n"
              f"  Health: {base_url}/   Stop: Ctrl-C\n", flush=True)
        log.info("sandbox page at %s", page)

    def blueprint(self) -> Blueprint:
        """The routes under /sandbox."""
        bp = Blueprint("sandbox", __name__, url_prefix="/sandbox")

        @bp.before_request
        def local_only() -> tuple[Response, int] | None:
            # A page elsewhere could make the browser post here, or rebind its own name to 127.0.0.1 and read
            # the chats: only this address, and only JSON (which a plain form cannot send), are answered.
            if request.host not in self._hosts:
                return jsonify(ok=False, error="the sandbox answers only at 127.0.0.1 or localhost"), 403
            if request.method == "POST" and not request.is_json:
                return jsonify(ok=False, error="send JSON (Content-Type: application/json)"), 415
            return None

        @bp.get("")
        @bp.get("/")
        def page() -> Response:
            return send_from_directory(WEB, "sandbox.html")

        @bp.get("/static/<path:name>")
        def static_file(name: str) -> Response:
            return send_from_directory(WEB, name)

        @bp.get("/api/state")
        def state() -> Response:
            user_id = _int(request.args.get("user"), FIRST_USERS[0]["id"])
            # json.dumps keeps each event's keys in the order Make gets them (jsonify would sort them), and its
            # ASCII escapes keep a lone surrogate (half an emoji, from a user or from Make) valid JSON.
            return Response(json.dumps(self.state(user_id)), mimetype="application/json")

        @bp.post("/api/users")
        def add_user() -> tuple[Response, int]:
            return jsonify(self.add_user(_body().get("first_name"))), 200

        @bp.post("/api/say")
        def say() -> tuple[Response, int]:
            body = _body()
            text = body.get("text")
            if not isinstance(text, str) or not text.strip():
                return jsonify(ok=False, error="text must be a non-empty string"), 400
            update = self.telegram.user_says(self._user(body), clean_text(text[:4096]))
            return jsonify(ok=True, update_id=update["update_id"]), 200

        @bp.post("/api/press")
        def press() -> tuple[Response, int]:
            body = _body()
            if not isinstance(body.get("data"), str):
                raise ValueError("data must be the button's callback_data (a string)")
            user = self._user(body)
            update = self.telegram.press(user, _int(body.get("message_id"), 0), body["data"])
            return jsonify(ok=True, query_id=self._remember(user, update["callback_query"]["id"])), 200

        @bp.post("/api/invoice")
        def invoice() -> tuple[Response, int]:
            user = self._user(_body())
            return jsonify(ok=True, message_id=send_test_invoice(self.telegram, user["id"])), 200

        @bp.post("/api/pay")
        def pay() -> tuple[Response, int]:
            body = _body()
            user = self._user(body)
            update = self.telegram.checkout(user, _int(body.get("message_id"), 0))
            return jsonify(ok=True, query_id=self._remember(user, update["pre_checkout_query"]["id"])), 200

        @bp.post("/api/fail")
        def fail() -> tuple[Response, int]:
            body = _body()
            method = str(body.get("method", "sendMessage"))
            if method not in FAILABLE_METHODS:
                raise ValueError(f"method must be one of {', '.join(FAILABLE_METHODS)}")
            self.telegram.fail(method, _int(body.get("status"), 429), retry_after=3)
            return jsonify(ok=True), 200

        @bp.errorhandler(ValueError)
        def bad_request(err: ValueError) -> tuple[Response, int]:
            return jsonify(ok=False, error=str(err)), 400

        return bp

    def state(self, user_id: int) -> dict[str, Any]:
        """What the page shows: the user's chat, the admin's, "typing…", answers, and the events Make got."""
        with self._lock:
            users = list(self.users.values())
            queries = list(self._queries.get(user_id, ()))
        return {
            "bot": self.telegram.bot,
            "make": {"real": bool(self.make_url), "url": _short(self.make_url) if self.make_url else None,
                     "delay": self.make.delay},
            "settings": {"debounce_seconds": self.config.debounce_seconds,
                         "max_wait_seconds": self.config.max_wait_seconds, "typing_mode": self.config.typing_mode,
                         "reply_format": self.config.reply_format},
            "users": users,
            "user": user_id,
            "chat": [_shown(m, self.telegram.bot["id"]) for m in self.telegram.chat(user_id)[-200:]],
            "typing": self.telegram.typing(user_id),
            "admin": [_shown(m, self.telegram.bot["id"]) for m in self.telegram.chat(ADMIN_CHAT_ID)[-50:]],
            "callback_answers": {q: self.telegram.callback_answers[q] for q in queries
                                 if q in self.telegram.callback_answers},
            "checkout_answers": {q: self.telegram.checkout_answers[q] for q in queries
                                 if q in self.telegram.checkout_answers},
            "events": self.make.recent(),
        }

    def add_user(self, first_name: Any) -> dict[str, Any]:
        """One more simulated user, with a chat of their own."""
        with self._lock:
            number = len(self.users) + 1
            given = clean_text(first_name).strip()[:64] if isinstance(first_name, str) else ""
            name = given or f"User {number}"
            user = {"id": 100000000 + number * 111, "first_name": name, "username": f"user{number}_sandbox",
                    "language_code": "en"}
            self.users[user["id"]] = user
        return user

    def _remember(self, user: dict[str, Any], query_id: str) -> str:
        with self._lock:
            self._queries.setdefault(user["id"], deque(maxlen=KEPT_QUERIES)).append(query_id)
        return query_id

    def _user(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            user = self.users.get(_int(body.get("user"), 0))
        if user is None:
            raise ValueError("no such user")
        return user


def _shown(message: dict[str, Any], bot_id: int) -> dict[str, Any]:
    """A message as the page draws it."""
    keyboard = (message.get("reply_markup") or {}).get("inline_keyboard") or \
        (message.get("reply_markup") or {}).get("keyboard") or []
    shown = {"id": message["message_id"], "from_bot": (message.get("from") or {}).get("id") == bot_id,
             "date": message.get("date"), "buttons": keyboard,
             "text": message.get("text") or message.get("caption") or "",
             "entities": message.get("entities") or message.get("caption_entities") or []}
    for kind in ("photo", "document", "invoice", "successful_payment"):
        if message.get(kind) is not None:
            shown[kind] = message[kind]
    return shown


def _short(url: str | None) -> str:
    """A webhook URL without its secret path, fit to print."""
    if not url:
        return ""
    head, _, rest = url.partition("://")
    host = rest.split("/")[0]
    return f"{head}://{host}/…"


def _is_web_url(url: str) -> bool:
    """Whether `url` is an http(s) URL with a host that httpx can call."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (reading it checks it: a port out of range raises)
    except ValueError:  # e.g. a bracketed host that is no IPv6 address
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def choose_port(wanted: int | None) -> int:
    """`wanted` if given; else 8000 when it is free on 127.0.0.1, else any free port. Raises `ValueError`
    saying so when `wanted` is taken."""
    if wanted is not None and not 0 <= wanted <= 65535:
        raise ValueError(f"--port {wanted}: a port is a number from 1 to 65535 (0: any free one)")
    for port in (PREFERRED_PORT, 0) if wanted is None else (wanted,):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as err:
                if wanted is not None:
                    raise ValueError(f"--port {wanted}: cannot listen there ({err.strerror or err}); choose "
                                     "another port, or leave --port out to take any free one") from None
                continue
            return port if port else probe.getsockname()[1]
    return 0


def sandbox_config(token: str, make_url: str, telegram_url: str, state_db: str, port: int) -> Config:
    """The settings of the environment and `.env`, with the sandbox's wiring over them."""
    return Config.from_env(overrides={
        "BOT_TOKEN": token, "MAKE_WEBHOOK_URL": make_url, "TELEGRAM_API_URL": telegram_url, "MODE": "polling",
        "WEBHOOK_URL": "", "WEBHOOK_SECRET": "", "HOST": "127.0.0.1", "PORT": str(port), "STATE_DB": state_db,
        "ADMIN_CHAT_ID": str(ADMIN_CHAT_ID)})


def run(args: argparse.Namespace) -> int:
    """Start the sandbox and serve until Ctrl-C or SIGTERM; the exit status."""
    from app import configure_logging, serve  # app imports this module lazily, for this command only

    if args.make_url is not None and not _is_web_url(args.make_url):
        print("error: --make-url is not an http(s) URL with a host (copy it from Make's Custom webhook)",
              file=sys.stderr)
        return 2
    if not 0 <= args.make_delay <= 60:
        print("error: --make-delay must be between 0 and 60 seconds", file=sys.stderr)
        return 2
    try:
        port = choose_port(args.port)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    telegram = BotApiEmulator(random_token())
    make = MakeStandIn(telegram, delay=args.make_delay, forward_to=args.make_url)
    workdir = tempfile.mkdtemp(prefix="gateway-sandbox-")
    try:
        try:
            config = sandbox_config(telegram.token, f"{make.url}/hook", telegram.url,
                                    str(Path(workdir) / "state.sqlite3"), port)
        except ConfigError as err:
            print("configuration error (from your environment or .env):", file=sys.stderr)
            for problem in err.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 2
        if not args.make_url and args.make_delay >= config.make_timeout_seconds:
            print(f"error: --make-delay {args.make_delay:g} is not shorter than MAKE_TIMEOUT_SECONDS "
                  f"({config.make_timeout_seconds:g}): the gateway would give up on every answer", file=sys.stderr)
            return 2
        # A little before the gateway: the page then shows the timeout the gateway meets.
        make.give_up_after(max(0.5, config.make_timeout_seconds - 0.5))
        configure_logging(config)
        sandbox = Sandbox(telegram, make, config, args.make_url)
        return serve(config, setup=sandbox.install, on_listening=sandbox.announce, on_stopping=sandbox.stop_waiting)
    finally:
        make.close()
        telegram.close()
        shutil.rmtree(workdir, ignore_errors=True)
