"""The gateway's wiring, HTTP routes, start/stop, `main()` and the command line.

    python app.py                 run the service (polling or webhook, from the settings)
    python app.py set-webhook     register WEBHOOK_URL with Telegram
    python app.py webhook-info    show Telegram's view of the webhook
    python app.py delete-webhook  remove the webhook (pending updates are kept)
    python app.py dead-letters    list events Make never accepted
    python app.py replay-dead     queue every dead letter for delivery again
    python app.py send-sample     post a sample message_batch to Make (--all: one event of each type)
    python app.py sandbox         try it with no accounts: emulated Telegram, stand-in Make, a chat page
"""

from __future__ import annotations

import _thread
import argparse
import atexit
import collections
import contextlib
import hmac
import json
import logging
import os
import select
import signal
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import urlsplit

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from batching import BatchManager
from config import Config, ConfigError, shown_url
from debounce import DebounceManager, DebounceSettings
from http_server import MAX_BODY_BYTES, BodySlotsTaken, HTTPServer, listen_problem, listening_urls
from delivery import DeliveryWorkers
from make_client import MakeClient
from metrics import GatewayMetrics
from payments import PaymentProcessor, PaymentTexts
from polling import Poller
from replies import (MAX_REPLY_CHARS, MAX_SOURCE_CHARS, PartOutcome, Reply, ReplyError, ReplyResults, message_calls,
                     read_reply)
from retry import BackoffPolicy, backoff
from router import UpdateRouter
from samples import send_samples
from store import SCHEMA_VERSION, BatchRow, SQLiteStore, StoreError, StoreNotFound, lock_instance, open_store
from telegram_api import (BadRequest, InvalidToken, RedactingStream, RetryAfter, TelegramClient,
                          TelegramError, printable, redact)
from telegram_outbox import ANSWERS_TARGET, USER_CHAT_PREFIX, TelegramOutbox, bot_call
from typing_keepalive import TypingKeepAlive
from updates import is_int
from webhook import WebhookRoute, parse_json, read_body

log = logging.getLogger("gateway")

REPLY_WAIT_SECONDS = 4.0  # how long `POST /reply` waits for Telegram before answering 202 (queued)
# How long the first getMe may take before the service starts without it (asking again in the background).
IDENTIFY_TIMEOUT_SECONDS = 5.0
# The background getMe: soon at first (Telegram is usually back in seconds), never more than 30 s apart.
IDENTIFY_POLICY = BackoffPolicy(initial=1.0, maximum=30.0)
# Kinds the gateway always asks Telegram for; the forwarded ones are added from the settings.
HANDLED_KINDS = ("message", "callback_query", "pre_checkout_query")


def allowed_updates(config: Config) -> list[str]:
    """The update kinds to ask Telegram for: those handled plus those forwarded to Make."""
    return sorted(set(HANDLED_KINDS) | set(config.forward_update_kinds))


class StartError(Exception):
    """The service cannot start; the message is the one line that says why and what to change (exit status 2)."""


def bot_name(bot: dict[str, Any]) -> str:
    """The bot as the log names it: `@username (id 123)`; what Telegram sent is cleaned for one log line."""
    username = bot.get("username")
    # Telegram's usernames are 5-32 letters, digits and '_': anything else came from something else.
    shown = printable(username, 64) if isinstance(username, str) else ""
    name = f"@{shown}" if shown else "a bot without a username"
    return f"{name} (id {bot.get('id')})"


def _server_of(url: str) -> str:
    """`scheme://host[:port]` of `url`: never a user, password or path (which could hold a secret)."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else (parts.hostname or "")
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def token_refused(err: InvalidToken, config: Config) -> str:
    """The one line for a BOT_TOKEN that Telegram refuses (401, or 404 for a malformed one); never the token."""
    line = (f"Telegram refused BOT_TOKEN ({err.error_code} {printable(err.description, 100)}): check the token "
            "from @BotFather")
    if err.error_code == 404 and config.telegram_api_url != Config.telegram_api_url:
        line += f" (and that TELEGRAM_API_URL, {_server_of(config.telegram_api_url)}, is a Bot API server)"
    return line


class Gateway:
    """Everything one running gateway owns: store, clients, managers and their threads."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = GatewayMetrics()
        self.store = open_store(config)
        self.telegram = TelegramClient(config.bot_token, config.telegram_api_url, observe=self._count_call)
        self.make = MakeClient(config.make_webhook_url, timeout=config.make_timeout_seconds,
                               max_connections=config.make_max_concurrency)
        self.typing = TypingKeepAlive(self.telegram, config.typing_mode, config.typing_interval_seconds,
                                      config.typing_max_seconds)
        self.reply_results = ReplyResults()
        # At most half the request threads wait for a `/reply` to go out (none of one): the rest are always
        # free for webhooks.
        self.reply_waiters = threading.BoundedSemaphore(config.http_threads // 2)
        self.telegram_outbox = TelegramOutbox(self.store, self.telegram, self.typing,
                                              max_age_seconds=config.make_max_age_hours * 3600,
                                              results=self.reply_results, on_unreachable=self._count_unreachable,
                                              max_rate=config.telegram_max_rate,
                                              chat_interval=config.telegram_chat_interval_seconds)
        # Button answers on slots of their own: a Bot API slow to answer them holds up no reply. They are not
        # paced: one per press, and each must arrive within seconds of it, never behind a backlog of replies.
        self.callback_answers = TelegramOutbox(self.store, self.telegram, self.typing, target=ANSWERS_TARGET,
                                               name="callback-answers")
        self.delivery = DeliveryWorkers(
            self.store, self.make, self.typing, max_in_flight=config.make_max_concurrency,
            max_rate=config.make_max_rate, retry_max_seconds=config.make_retry_max_seconds,
            max_age_seconds=config.make_max_age_hours * 3600, on_outcome=self._count_delivery,
            reply_format=config.reply_format)
        self.batches = BatchManager(
            self.store, DebounceSettings(config.debounce_seconds, config.max_wait_seconds, config.max_batch_messages),
            on_closed=self._batch_closed)
        self.flood = DebounceManager(config.flood_max_messages, config.flood_window_seconds)
        texts = PaymentTexts(config.text_already_paid, config.text_payment_in_progress, config.text_payment_refused,
                             config.text_admin_payment, config.text_admin_duplicate_payment, config.text_admin_refund,
                             config.text_admin_renewal)
        self.make_check = (MakeClient(config.make_webhook_url, timeout=config.payment_check_timeout_seconds)
                           if config.payment_check_with_make else None)
        self.payments = PaymentProcessor(
            self.store, self.telegram, admin_chat_id=config.admin_chat_id, texts=texts,
            hold_seconds=config.payment_hold_seconds, auto_refund_stars=config.payment_auto_refund_stars,
            make_check=self.make_check, make_check_timeout=config.payment_check_timeout_seconds)
        self.router = UpdateRouter(self.store, self.batches, self.flood, self.metrics, config.forward_update_kinds,
                                   payments=self.payments, callback_answer_seconds=config.callback_answer_seconds)
        self.poller: Poller | None = None
        self.webhook_registered = False
        # Telegram's getMe answer once it has accepted BOT_TOKEN; until then `/ready` says why not.
        self.bot: dict[str, Any] | None = None
        self.identify_error: str | None = None  # why the last getMe got no answer
        self.fatal: str | None = None  # why the service must stop (Telegram refused BOT_TOKEN): exit status 2
        self.on_fatal: Callable[[], None] = lambda: None  # serve() sets it to end its server loop
        self._stopping = threading.Event()
        self._registrar: threading.Thread | None = None
        self._identifier: threading.Thread | None = None
        self._register_metrics()

    def identify(self, read_timeout: float = IDENTIFY_TIMEOUT_SECONDS) -> dict[str, Any]:
        """Ask Telegram who the bot is (`getMe`, one attempt), keep and log the answer, and return it. Raises
        `TelegramError`: `InvalidToken` when Telegram refuses BOT_TOKEN, else no answer yet."""
        try:
            bot = self.telegram.get_me(read_timeout=read_timeout, attempts=1)
        except TelegramError as err:
            self.identify_error = str(err)
            raise
        self.bot, self.identify_error = bot, None
        log.info("running as %s", bot_name(bot))
        return bot

    def _identify_until_answered(self) -> None:
        """The `telegram-getme` thread, started when the first `getMe` got no answer: ask again, with backoff,
        until Telegram answers; if it refuses BOT_TOKEN, stop the service (exit status 2)."""
        failures = 1
        delay = backoff(failures, IDENTIFY_POLICY) if self.identify_error else 0.0
        while not self._stopping.wait(delay):
            try:
                self.identify()
                return
            except InvalidToken as err:
                if self._stopping.is_set():  # stopping anyway: the answer came too late to matter
                    return
                self.fatal = token_refused(err, self.config)
                log.error("%s; stopping", self.fatal)
                self.on_fatal()
                return
            except RetryAfter as err:
                # Telegram's wait, but never longer than the policy's: a proxy (or a bug) saying 100000 s
                # must not leave the service unidentified for a day.
                delay = min(err.retry_after, IDENTIFY_POLICY.maximum)
            except Exception as err:  # TelegramError, or anything else: keep asking, never die silently
                failures += 1
                delay = backoff(failures, IDENTIFY_POLICY)
                if not isinstance(err, TelegramError):
                    log.error("getMe failed in the gateway", exc_info=err)
                    self.identify_error = f"{type(err).__name__} in the gateway"
            log.warning("Telegram has not answered getMe yet (%s); asking again in %.1f s (GET /ready answers 503 "
                        "until it does)", self.identify_error, delay)

    def start(self) -> None:
        """Reload open batches, then start the threads of the configured mode."""
        repaired = self.store.repair_heads()
        if repaired:
            log.warning("%d outbox queue(s) had no head; their oldest events head them again", repaired)
        restored = self.batches.restore()
        if restored:
            log.info("reloaded %d open batch(es) from %s", restored, self.config.state_setting())
        self.payments.start()
        self.telegram_outbox.start()
        self.callback_answers.start()
        self.delivery.start()
        self.batches.start()
        self.typing.start_thread()
        if self.config.mode == "polling":
            self.poller = Poller(self.telegram, self.router, timeout=self.config.poll_timeout_seconds,
                                 allowed_updates=allowed_updates(self.config), turn=self.store.poller_turn)
            self.poller.start()
        else:
            self._registrar = threading.Thread(target=self._register_webhook, name="webhook-register", daemon=True)
            self._registrar.start()
        if self.bot is None:
            self._identifier = threading.Thread(target=self._identify_until_answered, name="telegram-getme",
                                                daemon=True)
            self._identifier.start()

    def stop(self) -> None:
        """Stop taking updates, stop every thread within a bounded time, close clients; safe to call twice."""
        self._stopping.set()
        if self.poller is not None:
            self.poller.stop()
        self.batches.stop()
        self.payments.stop()
        self.delivery.stop()
        self.telegram_outbox.stop()
        self.callback_answers.stop()
        self.typing.stop_thread()
        self.telegram.close()
        self.make.close()
        if self.make_check is not None:
            self.make_check.close()

    def close(self) -> None:
        """Stop (see `stop`), then close the state database; safe to call twice."""
        self.stop()
        self.store.close()

    def health(self) -> tuple[dict[str, Any], int]:
        """The `GET /` report and its HTTP status (503 once a thread the service needs has died)."""
        now = time.time()
        problems: list[str] = []
        try:
            outbox: dict[str, Any] = self.store.outbox_stats(now)
            payments: int | None = self.store.payments_count()
        except StoreError as err:
            outbox = dict.fromkeys(("outbox_pending", "outbox_inflight", "outbox_dead", "outbox_oldest_age_seconds",
                                    "stored_open_batches"))
            payments = None
            problems.append(f"state database: {err}")
        d = self.delivery.health
        if d.last_error:
            problems.append(f"Make: {d.last_error}")
        for loop in (self.delivery, self.telegram_outbox, self.callback_answers):
            if loop.dispatch_error:
                problems.append(f"{loop.name}: {loop.dispatch_error}")
        if self.poller is not None and self.poller.last_error:
            problems.append(f"Telegram: {self.poller.last_error}")
        elif self.telegram.network_error:
            problems.append(f"Telegram unreachable: {self.telegram.network_error}")
        elif self.bot is None:
            problems.append(f"Telegram has not answered getMe yet: {self.identify_error or 'asking'}")
        if self.config.mode == "webhook" and not self.webhook_registered:
            problems.append("webhook not registered with Telegram yet")
        oldest = outbox["outbox_oldest_age_seconds"]
        if oldest is not None and oldest > self.config.health_max_outbox_age_seconds:
            problems.append(f"oldest undelivered event is {oldest:.0f} s old "
                            f"(HEALTH_MAX_OUTBOX_AGE_SECONDS={self.config.health_max_outbox_age_seconds:g})")
        if outbox["outbox_dead"]:
            problems.append(f"{outbox['outbox_dead']} dead letter(s): see `python app.py dead-letters`")
        dead_threads = [name for name, alive in self._threads_alive().items() if not alive]
        status = "failing" if dead_threads else ("degraded" if problems else "ok")
        report: dict[str, Any] = {
            "status": status,
            "mode": self.config.mode,
            # Several instances may share PostgreSQL: in polling mode one of them polls, the others stand by.
            "database": "postgresql" if self.config.database_url else "sqlite",
            "polling": self.poller.polling if self.poller is not None else None,
            "last_update_id": self.router.last_update_id,
            "active_batches": self.batches.active_batches,
            "batch_timers": self.batches.scheduled_deadlines,
            **outbox,
            "typing_chats": self.typing.active_chats,
            "payments_recorded": payments,
            "flood_active_users": self.flood.get_active_users_count(),
            "make": {"delivered": d.delivered, "failed_attempts": d.failed_attempts, "last_error": d.last_error,
                     "webhook_gone": d.last_error_permanent, "failing_since": d.failing_since,
                     "last_delivered_at": d.last_delivered_at, "in_flight": self.delivery.in_flight,
                     "max_concurrency": self.delivery.max_in_flight, "threads": self.delivery.threads,
                     "peak_threads": self.delivery.peak_threads},
            "problems": problems,
            "dead_threads": dead_threads,
            "threads": threading.active_count(),
            "uptime_seconds": round(now - self.started_at, 1),
        }
        return report, (HTTPStatus.SERVICE_UNAVAILABLE if dead_threads else HTTPStatus.OK)

    def ready(self) -> tuple[dict[str, Any], int]:
        """The `GET /ready` answer: 200 when updates can be taken now (state writable, threads alive)."""
        reasons = [f"thread {name} is not running" for name, alive in self._threads_alive().items() if not alive]
        if self.bot is None:  # the token is not known to work yet: nothing could be answered
            reasons.append(f"Telegram has not answered getMe yet: {self.identify_error or 'asking'}")
        try:
            self.store.check_writable(time.time())
        except StoreError as err:
            reasons.append(str(err))
        if reasons:
            return {"ready": False, "reasons": reasons}, HTTPStatus.SERVICE_UNAVAILABLE
        return {"ready": True}, HTTPStatus.OK

    def _threads_alive(self) -> dict[str, bool]:
        alive = {"batch-scheduler": self.batches.is_alive(), "payment-answers": self.payments.is_alive(),
                 "make-delivery": self.delivery.alive(),
                 "telegram-outbox": self.telegram_outbox.alive(), "callback-answers": self.callback_answers.alive(),
                 "typing-keepalive": self.typing.is_alive()}
        if self._registrar is not None and not self.webhook_registered:
            alive["webhook-register"] = self._registrar.is_alive()
        if self._identifier is not None and self.bot is None and self.fatal is None:
            alive["telegram-getme"] = self._identifier.is_alive()
        if self.poller is not None:
            alive["telegram-poller"] = self.poller.is_alive()
        return alive

    def _register_webhook(self) -> None:
        """Call `setWebhook` until Telegram accepts it (Telegram may be briefly unreachable at start)."""
        failures = 0
        policy = BackoffPolicy(initial=1.0, maximum=60.0)
        while not self._stopping.is_set():
            try:
                self.telegram.set_webhook(self.config.webhook_url, self.config.webhook_secret, allowed_updates(self.config))
                self.webhook_registered = True
                log.info("webhook registered with Telegram")
                return
            except BadRequest as err:
                log.error("Telegram refused WEBHOOK_URL: %s; fix it and restart", err)
                return
            except Exception as err:  # TelegramError, or anything else: keep trying, never die silently
                failures += 1
                delay = backoff(failures, policy)
                log.warning("setWebhook failed: %s; retrying in %.1f s", redact(str(err)), delay)
                self._stopping.wait(delay)

    def send_reply(self, chat_id: int, reply: Reply) -> tuple[dict[str, Any], int]:
        """`POST /reply`: queue the reply's messages durably in the chat's order, wait a few seconds for them
        to go out, and say what happened (see `reply_answer`)."""
        self.typing.stop(chat_id)
        reply_id = uuid.uuid4().hex
        calls = [bot_call(f"reply-api-{reply_id}-{i}", f"{USER_CHAT_PREFIX}{chat_id}", method, params)
                 for i, (method, params) in enumerate(message_calls(reply, chat_id))]
        event_ids = [call.event_id for call in calls]
        waits = self.reply_waiters.acquire(blocking=False)  # when all may wait already: 202 at once
        try:
            outcomes = self.reply_results.expect(event_ids) if waits else {}
            try:
                self.store.enqueue_events(calls, time.time())
            except Exception:
                self.reply_results.wait(event_ids, outcomes, 0)  # nothing was queued: stop expecting it
                raise
            if waits:
                outcomes = self.reply_results.wait(event_ids, outcomes, REPLY_WAIT_SECONDS)
        finally:
            if waits:
                self.reply_waiters.release()
        return reply_answer(reply_id, event_ids, outcomes)

    def _count_unreachable(self, method: str) -> None:
        self.metrics.chat_unreachable.labels(method).inc()

    def _count_call(self, method: str, outcome: str) -> None:
        self.metrics.telegram_calls.labels(method, outcome).inc()

    def _batch_closed(self, batch: BatchRow, reason: str) -> None:
        self.metrics.batches_closed.labels(reason).inc()
        self.metrics.batch_age.observe(max(0.0, time.time() - batch.first_at))
        self.metrics.batch_size.observe(batch.count)

    def _count_delivery(self, outcome: str, seconds: float) -> None:
        self.metrics.deliveries.labels(outcome).inc()
        if outcome != "error":  # the gateway's own failure: no call to time
            self.metrics.delivery_seconds.observe(seconds)

    def _register_metrics(self) -> None:
        m = self.metrics
        m.gauge("gateway_active_batches", "Open batches", lambda: self.batches.active_batches)
        m.gauge("gateway_outbox_pending", "Events waiting for Make",
                lambda: self.store.outbox_stats(time.time())["outbox_pending"])
        m.gauge("gateway_outbox_dead", "Dead letters", lambda: self.store.outbox_stats(time.time())["outbox_dead"])
        m.gauge("gateway_typing_chats", "Chats shown typing", lambda: self.typing.active_chats)
        m.gauge("gateway_make_in_flight", "Make calls in flight", lambda: self.delivery.in_flight)


def create_app(config: Config) -> Flask:
    """Build the Flask app and its gateway (threads not started: call `app.extensions["gateway"].start()`)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    if not config.webhook_secret:
        raise ValueError("config.webhook_secret must not be empty (Config.from_env derives one from the token)")
    gateway = Gateway(config)
    app.extensions["gateway"] = gateway
    # POST /webhook is bare WSGI in front of Flask (webhook.py): Telegram drives it at full speed.
    app.wsgi_app = WebhookRoute(app.wsgi_app, gateway.router, config.webhook_secret,  # type: ignore[method-assign]
                                MAX_BODY_BYTES)

    @app.get("/")
    def health() -> tuple[Response, int]:
        report, status = gateway.health()
        return jsonify(report), status

    @app.get("/ready")
    def ready() -> tuple[Response, int]:
        report, status = gateway.ready()
        return jsonify(report), status

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(gateway.metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.post("/reply")
    def reply() -> tuple[Response, int]:
        if not config.reply_token:
            return jsonify(ok=False, error="POST /reply is off (REPLY_TOKEN is not set)"), HTTPStatus.NOT_FOUND
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {config.reply_token}".encode()):
            return jsonify(ok=False, error="wrong or missing bearer token"), HTTPStatus.UNAUTHORIZED
        try:
            body = parse_json(read_body(request.environ, MAX_BODY_BYTES))
        except RequestEntityTooLarge:
            return jsonify(ok=False, error="body over the size limit"), HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        except BodySlotsTaken:
            log.warning("POST /reply: every body-reading thread is busy (stalled clients?); answered 503")
            return jsonify(ok=False, error="busy; try again"), HTTPStatus.SERVICE_UNAVAILABLE
        except (ValueError, RecursionError):
            body = None
        try:
            chat_id, reply = read_reply_body(body, config.reply_format)
        except ReplyError as err:
            return jsonify(ok=False, error=str(err)), HTTPStatus.BAD_REQUEST
        except RecursionError:
            return jsonify(ok=False, error="reply_markup is nested too deep"), HTTPStatus.BAD_REQUEST
        try:
            answer, status = gateway.send_reply(chat_id, reply)
        except (StoreError, ValueError) as err:
            log.error("POST /reply not queued: %s", err)
            return jsonify(ok=False, error="cannot queue the reply now; try again"), HTTPStatus.SERVICE_UNAVAILABLE
        if reply.ignored:  # a typo, most likely; refusing would break callers that send extra fields
            log.warning("POST /reply: ignored field(s) %s", ", ".join(reply.ignored))
            answer["ignored_fields"] = list(reply.ignored)
        return jsonify(answer), status

    return app


def reply_answer(reply_id: str, event_ids: list[str], outcomes: dict[str, PartOutcome]) -> tuple[dict[str, Any], int]:
    """The `POST /reply` answer from what became of its parts: 502 if Telegram refused one for its content,
    410 if the chat cannot be reached, 200 once every part went out, else 202 (queued, sent later, in order)."""
    message_ids = [o.message_id for o in outcomes.values() if o.kind == "sent" and o.message_id is not None]
    for kind, status in (("refused", HTTPStatus.BAD_GATEWAY), ("unreachable", HTTPStatus.GONE)):
        found = next((o for o in outcomes.values() if o.kind == kind), None)
        if found is not None:
            answer: dict[str, Any] = {"ok": False, "error": found.description, "message_ids": message_ids}
            if kind == "unreachable":
                answer["chat_unreachable"] = True
            return answer, status
    if len(outcomes) == len(event_ids) and all(o.kind in ("sent", "unconfirmed") for o in outcomes.values()):
        answer = {"ok": True, "message_ids": message_ids}
        unconfirmed = sum(1 for o in outcomes.values() if o.kind == "unconfirmed")
        if unconfirmed:
            answer["unconfirmed_parts"] = unconfirmed  # sent, but Telegram's answer was lost: not sent again
        plain = [o.fallback for o in outcomes.values() if o.fallback]
        if plain:  # Telegram refused their formatting or buttons: sent without them
            answer["sent_without_formatting"] = len(plain)
            answer["formatting_error"] = plain[0]
        return answer, HTTPStatus.OK
    return {"ok": True, "queued": True, "reply_id": reply_id, "message_ids": message_ids}, HTTPStatus.ACCEPTED


def read_reply_body(body: Any, default_format: str = "plain") -> tuple[int, Reply]:
    """The chat and the reply of a `POST /reply` body; raises `ReplyError` saying what is wrong with it."""
    if not isinstance(body, dict):
        raise ReplyError("body must be a JSON object")
    if not is_int(body.get("chat_id")):
        raise ReplyError("chat_id must be an integer (64-bit)")
    for name in ("text", "caption"):
        if isinstance(body.get(name), str) and len(body[name]) > MAX_SOURCE_CHARS:
            raise ReplyError(f"{name} is longer than {MAX_SOURCE_CHARS} characters")
    reply = read_reply({key: value for key, value in body.items() if key != "chat_id"}, default_format)
    if len(reply.text) > MAX_REPLY_CHARS:
        raise ReplyError(f"text is longer than {MAX_REPLY_CHARS} visible characters "
                         f"(it would be {MAX_REPLY_CHARS // 4096}+ messages)")
    return body["chat_id"], reply


def configure_logging(config: Config) -> None:
    """One line per record, with time and level; secrets masked; httpx's URL logging turned down.

    Records are written by one `log-writer` thread: a logging thread only appends its record to a queue, and
    wakes the writer only if it sleeps. Under a burst the writer takes what has gathered every few
    milliseconds and writes it at once, so that a thousand updates a second cost no thousand wake-ups, lock
    hand-overs and writes (with dozens of request threads logging an update each, that was what ingest spent
    most time on). The queue is written out at exit."""
    global _log_writer
    formatter = LineFormatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
    if _log_writer is not None:
        _log_writer.stop()
    _log_writer = _LogWriter(sys.stderr, formatter, config.secrets())
    _log_writer.start()
    root = logging.getLogger()
    root.handlers[:] = [_QueueingHandler(_log_writer)]
    root.setLevel(config.log_level)
    # httpx logs every request URL at INFO, and every Bot API URL holds the token.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # granian's workers say "Started worker-1" and the like at INFO: nothing an operator acts on.
    logging.getLogger("_granian").setLevel(logging.WARNING)
    # The line shows no process: a record (one per update) need not look it up (the logging HOWTO's
    # "Optimization"). The source file and line stay: a log call that cannot be formatted is reported by them.
    logging.logProcesses = logging.logMultiprocessing = False


class _LogWriter:
    """The `log-writer` thread and its queue: writes the records logging threads `put()`, a burst at a time,
    each burst's lines masked at once (`redact`). At `stop()`, what is queued, for a few seconds at most: an
    output nobody reads must not keep the process from exiting.

    To a pipe or a file it writes with `os.write` on a descriptor of its own: stuck in a write to a pipe nobody
    reads, it then holds none of the stream's locks, which the main thread's last flush and the interpreter's
    exit would wait for forever."""

    def __init__(self, stream: Any, formatter: logging.Formatter, secrets: tuple[str, ...]) -> None:
        self._stream = stream
        self._fd, self._encoding = _raw_output(stream)
        # A pipe shared with other writers (stdout and stderr, or a supervisor's) keeps a write whole only up to
        # PIPE_BUF bytes: past that, another's data may land inside a line.
        self._piece = _PIPE_PIECE if self._fd is not None and _is_pipe(self._fd) else 0
        self._formatter = formatter
        self._secrets = secrets
        self._records: collections.deque[logging.LogRecord | None] = collections.deque()  # None: stop
        self._sleeping = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stuck = False  # the writer is gone, or may be stuck in a write: nobody waits for room any more

    def start(self) -> None:
        """Start the thread, named and a daemon (it must never hold the process up)."""
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def put(self, record: logging.LogRecord | None) -> None:
        """Queue `record` (from any thread). While the output is slow and the queue full, wait: a thread that
        logs must not grow memory without bound."""
        while len(self._records) >= _LOG_QUEUE_RECORDS and not self._stuck:
            time.sleep(0.005)
        self._records.append(record)
        # The writer says it sleeps before it looks at the queue a last time, and a record is queued before
        # its thread looks at that: one of the two always sees the other.
        if self._sleeping:
            self._wake.set()

    def _run(self) -> None:
        try:
            while True:
                self._sleeping = True
                if not self._records:
                    self._wake.wait()
                self._sleeping = False
                self._wake.clear()
                while self._records:
                    if not self._write_queued():
                        return
                    time.sleep(_LOG_GATHER_SECONDS)  # a burst goes on: let its next lines gather
        finally:
            self._stuck = True  # whatever ended the writer, no logging thread may wait for it

    def _write_queued(self) -> bool:
        """Write what is queued now (up to `_LOG_WRITE_LINES` records); False once the stop sentinel is among
        them. A failure costs those lines, never the writer."""
        lines, going = [], True
        records = self._records
        for _ in range(min(len(records), _LOG_WRITE_LINES)):
            record = records.popleft()
            if record is None:
                going = False
                break
            try:
                lines.append(self._formatter.format(record))
            except Exception:  # noqa: BLE001 - a record that cannot be formatted costs its line
                lines.append(f"a log line ({record.pathname}:{record.lineno}) could not be written")
        if lines:
            try:
                self._write(redact("\n".join(lines) + "\n", *self._secrets))
            except Exception:  # noqa: BLE001 - a closed, broken or missing output: nothing left to tell it
                pass
        return going

    def _write(self, text: str) -> None:
        if self._fd is None:
            self._stream.write(text)
            self._stream.flush()
            return
        for data in _atomic_pieces(text.encode(self._encoding, "backslashreplace"), self._piece):
            while data:
                data = data[os.write(self._fd, data):]

    def stop(self) -> None:
        """Write what is queued (waiting at most a few seconds), then end the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stuck = True  # from now on nobody waits for room: the writer may be stuck in a write
        self.put(None)
        thread.join(_LOG_STOP_SECONDS)
        if not thread.is_alive() and self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _atomic_pieces(data: bytes, size: int) -> list[bytes]:
    """`data` in pieces of whole lines of at most `size` bytes each (a longer line alone); all of it if `size`
    is 0."""
    if not size or len(data) <= size:
        return [data]
    pieces, start = [], 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + size) + 1
        if end <= start:  # one line longer than a piece: whole, on its own
            end = data.find(b"\n", start) + 1 or len(data)
        pieces.append(data[start:end])
        start = end
    return pieces


def _raw_output(stream: Any) -> tuple[int | None, str]:
    """A descriptor of our own for the file or pipe under `stream` (through a `RedactingStream`), and its
    encoding; (None, "") for a terminal (whoever looks at it reads it) or a stream with no descriptor."""
    target = getattr(stream, "target", stream)
    try:
        fd = target.fileno()
        if os.isatty(fd):
            return None, ""
        return os.dup(fd), getattr(target, "encoding", None) or "utf-8"
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        return None, ""


_log_writer: _LogWriter | None = None
_LOG_STOP_SECONDS = 5.0
_LOG_QUEUE_RECORDS = 10_000  # lines waiting for the writer; more, and a logging thread waits as it used to
_LOG_GATHER_SECONDS = 0.005
_PIPE_PIECE = getattr(select, "PIPE_BUF", 512)  # POSIX guarantees at least 512
_LOG_WRITE_LINES = 1000  # records one write takes at most: a steady flood still reaches the output in steps


class _QueueingHandler(logging.Handler):
    """Hands records to the `log-writer`, their message formatted here (an argument may change later) and
    masked there."""

    def __init__(self, writer: _LogWriter) -> None:
        super().__init__()
        self._writer = writer

    def handle(self, record: logging.LogRecord) -> bool:  # no handler lock: the queue needs none
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.args or record.exc_info:
                record = _copied(record)  # other handlers (pytest's caplog) must see the record as it was
                record.msg, record.args = record.getMessage(), None
                if record.exc_info:
                    record.exc_text = logging.Formatter().formatException(record.exc_info)
                    record.exc_info = None
            self._writer.put(record)
        except Exception:  # noqa: BLE001 - reported as a line of its own, masked like every other
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        """A record that cannot be formatted (an argument whose str() raises, arguments that do not fit the
        format) is reported as a line of its own in the queue, masked by the writer like every other: logging's
        own report would print its arguments and the error's text straight to stderr, secrets and all."""
        try:
            note = logging.makeLogRecord({
                "name": record.name, "levelno": logging.ERROR, "levelname": "ERROR",
                "msg": "a log line (%s:%s) could not be formatted", "args": None,
                "exc_text": logging.Formatter().formatException(sys.exc_info())})  # type: ignore[arg-type]
            note.msg = note.msg % (record.pathname, record.lineno)
            self._writer.put(note)
        except Exception:  # noqa: BLE001 - reporting a logging error must never raise
            pass


def _copied(record: logging.LogRecord) -> logging.LogRecord:
    """A shallow copy of `record` (a fifth of what `copy.copy` costs: one is made per update logged)."""
    copied = logging.LogRecord.__new__(type(record))
    copied.__dict__.update(record.__dict__)
    return copied


class LineFormatter(logging.Formatter):
    """The standard format, with each second's time text made once (a busy gateway logs hundreds of lines a
    second, and `time.strftime` was the costliest part of each)."""

    _stamp: tuple[int, str] = (-1, "")  # (second, its text): one tuple, so threads never see half of it

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, time.strftime(self.default_time_format, self.converter(second)))
        return self.default_msec_format % (stamp[1], record.msecs)


@atexit.register
def _write_queued_log() -> None:
    if _log_writer is not None:
        _log_writer.stop()


class _StopSignal:
    """The SIGTERM (and Ctrl-C) handler: raise KeyboardInterrupt in the main thread, once. After `stopping`
    is set another is ignored, so that a second one cannot break into the shutdown itself. Read and written on
    the main thread only (signal handlers run there)."""

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt


def serve(config: Config, setup: Callable[[Flask, Gateway], None] | None = None,
          on_listening: Callable[[str], None] | None = None, on_stopping: Callable[[], None] | None = None) -> int:
    """Run the service until SIGTERM or Ctrl-C; return the exit status (2 if Telegram refused BOT_TOKEN while it
    ran). Raises `StartError` when it cannot start (state database, port, token). `setup` may add routes before
    it serves (the sandbox's page); `on_listening` gets the base URL once it listens; `on_stopping` is called
    when it stops taking requests, before the gateway's threads are stopped."""
    signals = _StopSignal()
    # From the first moment, so that a stop during the start (getMe may take seconds) is a logged, clean one;
    # Ctrl-C too, so that a second one while stopping does not break into the shutdown (unless the shell that
    # started us in the background told us to ignore it).
    stops = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {sig: signal.signal(sig, signals) for sig in stops}
    try:
        return _serve(config, signals, setup, on_listening, on_stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(config: Config, signals: _StopSignal, setup: Callable[[Flask, Gateway], None] | None,
           on_listening: Callable[[str], None] | None, on_stopping: Callable[[], None] | None) -> int:
    """`serve()` once its SIGTERM handler is in place (SIGTERM and Ctrl-C arrive as KeyboardInterrupt)."""
    try:
        app = create_app(config)
    except StoreError as err:  # a folder, a device, no access, a foreign file, another gateway on it...
        raise StartError(f"{config.state_setting()}: {err}") from None
    except KeyboardInterrupt:  # nothing of the gateway runs yet; the process's exit releases what it opened
        signals.stopping = True
        log.info("stopping")
        log.info("stopped")
        return 0
    gateway: Gateway = app.extensions["gateway"]
    server: HTTPServer | None = None
    try:
        if setup is not None:
            setup(app, gateway)
        try:
            server = HTTPServer(app, config)
        except OSError as err:
            gateway.close()
            raise StartError(listen_problem(err, config.host, config.port)) from None
        # A token refused later (on the telegram-getme thread) ends the server loop the way SIGTERM does.
        gateway.on_fatal = lambda: _thread.interrupt_main(signal.SIGTERM)
        try:
            gateway.identify()
        except InvalidToken as err:  # nothing would ever work: say so before listening, and stop
            signals.stopping = True
            server.close()
            gateway.close()
            raise StartError(token_refused(err, config)) from None
        except TelegramError as err:
            log.warning("Telegram did not answer getMe (%s); starting anyway and asking again in the background "
                        "(GET /ready answers 503 until it answers)", err)
    except KeyboardInterrupt:  # SIGTERM or Ctrl-C while starting: nothing listens yet, nothing is lost
        signals.stopping = True
        log.info("stopping")
        if server is not None:
            server.close()
        gateway.close()
        log.info("stopped")
        return 0
    try:
        for line in config.deprecations():
            log.warning("%s", line)
        if config.admin_chat_id is None:
            log.warning("ADMIN_CHAT_ID is empty: payment notifications will only be logged")
        if not config.make_webhook_url.startswith("https://") and not _loopback(config.make_webhook_url):
            log.warning("MAKE_WEBHOOK_URL is not https://: events (users' messages) travel unencrypted")
        gateway.start()
        server.start()
        # A HOST naming several addresses (localhost: 127.0.0.1 and ::1) has one listening socket each.
        urls = listening_urls(server)
        log.info("listening on %s (mode %s, state %s)", urls[0], config.mode,
                 shown_url(config.database_url) if config.database_url else config.state_db)
        for url in urls[1:]:
            log.info("also listening on %s", url)
        if on_listening is not None:
            on_listening(urls[0])
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signals.stopping = True
        log.info("stopping")
        if not server.close():
            global _requests_abandoned
            _requests_abandoned = True
        if on_stopping is not None:
            on_stopping()
        gateway.close()
        log.info("stopped")
    return 2 if gateway.fatal else 0


@dataclass(frozen=True)
class CommandNeeds:
    """The settings a CLI command reads (`uses`; LOG_LEVEL for all, since every command logs) and those it
    cannot do without (`requires`): a setting it does not read can neither be missing nor stop it."""

    uses: tuple[str, ...]
    requires: tuple[str, ...] = ()


_BOT_API = ("BOT_TOKEN", "TELEGRAM_API_URL", "LOG_LEVEL")
_STATE = ("STATE_DB", "DATABASE_URL", "DATABASE_DURABILITY", "POLL_TIMEOUT_SECONDS", "LOG_LEVEL")
COMMAND_NEEDS = {
    "dead-letters": CommandNeeds(_STATE),
    "migrate": CommandNeeds(_STATE),
    "copy-state": CommandNeeds(_STATE, ("DATABASE_URL",)),
    "replay-dead": CommandNeeds(_STATE),
    "webhook-info": CommandNeeds(_BOT_API, ("BOT_TOKEN",)),
    "delete-webhook": CommandNeeds(_BOT_API, ("BOT_TOKEN",)),
    "set-webhook": CommandNeeds(_BOT_API + ("WEBHOOK_URL", "WEBHOOK_SECRET", "FORWARD_UPDATE_KINDS"),
                                ("BOT_TOKEN", "WEBHOOK_URL")),
    "send-sample": CommandNeeds(("MAKE_WEBHOOK_URL", "MAKE_TIMEOUT_SECONDS", "REPLY_FORMAT", "LOG_LEVEL"),
                                ("MAKE_WEBHOOK_URL",)),
}


def _loopback(url: str) -> bool:
    """Whether `url` points at this machine (traffic that never leaves it needs no TLS)."""
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def _cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="Telegram → Make gateway")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the service (the default)")
    sw = sub.add_parser("set-webhook", help="register WEBHOOK_URL with Telegram, e.g. `python app.py set-webhook`")
    sw.add_argument("--drop-pending-updates", action="store_true", help="discard updates Telegram holds")
    sub.add_parser("webhook-info", help="show Telegram's view of the webhook, e.g. `python app.py webhook-info`")
    dw = sub.add_parser("delete-webhook", help="remove the webhook, e.g. `python app.py delete-webhook`")
    dw.add_argument("--drop-pending-updates", action="store_true", help="discard updates Telegram holds")
    sub.add_parser("dead-letters", help="list events Make never accepted, e.g. `python app.py dead-letters`")
    sub.add_parser("replay-dead", help="queue every dead letter again, e.g. `python app.py replay-dead`")
    sub.add_parser("migrate", help="create or upgrade the state's schema (DATABASE_URL, else STATE_DB) and exit; "
                                   "every start does it too")
    cs = sub.add_parser("copy-state", help="copy a single-instance gateway's state (stop it first) into the empty "
                                           "PostgreSQL database of DATABASE_URL, e.g. `python app.py copy-state "
                                           "--from data/state.sqlite3`")
    cs.add_argument("--from", dest="source", required=True, help="the stopped gateway's STATE_DB file")
    ss = sub.add_parser("send-sample", help="post a sample message_batch event (marked \"sample\": true) to "
                                            "MAKE_WEBHOOK_URL, for Make's \"Redetermine data structure\", e.g. "
                                            "`python app.py send-sample --all`")
    ss.add_argument("--all", action="store_true",
                    help="one event of each type: message_batch, update, payment, payment_refunded, pre_checkout")
    sb = sub.add_parser("sandbox", help="try the gateway with no bot and no Make account: an emulated Telegram, "
                                        "a stand-in Make and a chat page, all on 127.0.0.1")
    sb.add_argument("--make-url", help="send events to this real Make webhook instead of the stand-in")
    sb.add_argument("--make-delay", type=float, default=2.0,
                    help="seconds the stand-in Make 'thinks' before answering (default 2)")
    sb.add_argument("--port", type=int, default=None,
                    help="port of the chat page and the gateway (default 8000, or any free one if taken)")
    return parser.parse_args(argv)


def run_command(args: argparse.Namespace, config: Config) -> int:
    """Run one CLI command other than `serve`; a `TelegramError` prints one line and returns 1 (2 when Telegram
    refuses BOT_TOKEN: a setting to fix, as at start)."""
    try:
        if args.command in ("dead-letters", "replay-dead"):
            return _dead_letters(config, replay=args.command == "replay-dead")
        if args.command == "migrate":
            store = open_store(config)
            store.close()
            print(f"the state's schema is up to date ({config.state_setting()})")
            return 0
        if args.command == "copy-state":
            return _copy_state(config, args.source)
        if args.command == "send-sample":
            return send_samples(config, every_type=args.all)
        client = TelegramClient(config.bot_token, config.telegram_api_url)
        try:
            if args.command == "set-webhook":
                client.set_webhook(config.webhook_url, config.webhook_secret, allowed_updates(config),
                                   args.drop_pending_updates)
                print(f"webhook set to {config.webhook_url}")
            elif args.command == "delete-webhook":
                client.delete_webhook(args.drop_pending_updates)
                print("webhook deleted")
            else:
                print(json.dumps(client.get_webhook_info(), indent=2, ensure_ascii=False))
        finally:
            client.close()
    except InvalidToken as err:
        print(f"error: {token_refused(err, config)}", file=sys.stderr)
        return 2
    except TelegramError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except StoreError as err:
        print(f"error: {config.state_setting()}: {err}", file=sys.stderr)
        return 1
    return 0


def _dead_letters(config: Config, replay: bool) -> int:
    """`dead-letters` (list them) or `replay-dead` (queue them again), on an existing state database of this
    version only: nothing is created or converted, so a command that finds nothing, or a file that is not the
    gateway's, is left as it was. `dead-letters` only reads (a user who may only read the file can list)."""
    if config.state_db == ":memory:" and not config.database_url:
        print("error: STATE_DB is :memory:, which nothing outlives: no gateway has stored anything there; run this "
              "where the gateway runs, with its STATE_DB", file=sys.stderr)
        return 1
    setting = "DATABASE_URL" if config.database_url else "STATE_DB"
    try:
        store = open_store(config, existing=True, read_only=not replay)
    except StoreNotFound as err:
        print(f"error: {config.state_setting()}: {err}: no gateway has stored anything there; run this where the "
              f"gateway runs, with its {setting}", file=sys.stderr)
        return 1
    try:
        if replay:
            count = store.replay_dead(time.time())
            print(f"{count} dead letter(s) queued again" if count else "no dead letters")
            return 0
        rows = store.dead_events()
        for row in rows:
            print(f"{row.event_id}\t{row.event_type}\tattempts={row.attempts}\t{row.last_error}")
        if not rows:
            print("no dead letters")
    finally:
        store.close()
    return 0


def _copy_state(config: Config, source_path: str) -> int:
    """`copy-state --from FILE`: the stopped gateway's SQLite state into the empty database of DATABASE_URL."""
    from store_postgres import copy_state  # only this command and a PostgreSQL deployment need psycopg
    if not os.path.isfile(source_path):
        print(f"error: --from {source_path}: there is no state database there: give the STATE_DB file of the "
              "stopped gateway", file=sys.stderr)
        return 1
    try:
        holder = lock_instance(source_path)  # held while copying: no gateway may start on the file meanwhile
    except StoreError as err:
        print(f"error: --from {source_path}: {err}; copy-state copies a stopped gateway's state", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # A snapshot is read, upgraded if an earlier version wrote it, and copied: the file itself stays as
            # it was, so its own gateway can still start on it whatever becomes of the copy.
            try:
                snapshot = _snapshot(source_path, os.path.join(tmp, "state.sqlite3"))
                source = SQLiteStore(snapshot, exclusive=True)  # (its own, so the snapshot may be upgraded)
            except (sqlite3.Error, StoreError) as err:
                print(f"error: --from {source_path}: {err}", file=sys.stderr)
                return 1
            try:
                target = open_store(config)
                try:
                    copied = copy_state(source, target)
                finally:
                    target.close()
            finally:
                source.close()
    finally:
        holder.close()
    print(f"copied {source_path} into {config.state_setting()}: " + ", ".join(
        f"{count} {table}" for table, count in copied.items() if count) + "; start the gateway with DATABASE_URL "
          "now, and keep the old file until it has run a while")
    return 0


def _snapshot(path: str, to: str) -> str:
    """A copy of the SQLite database at `path` (what its WAL holds included) at `to`; raises StoreError for a file
    that is not a gateway's state of any version."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as source:
        version = source.execute("PRAGMA user_version").fetchone()[0]
        if not 0 < version <= SCHEMA_VERSION:
            raise StoreError(f"not a gateway state database this gateway knows (schema version {version})")
        with contextlib.closing(sqlite3.connect(to)) as copy:
            source.backup(copy)
    return to


def main(argv: list[str] | None = None) -> int:
    """Read the settings (only those the command uses), then serve or run the CLI command; exit status 2 on
    bad settings or a start that cannot be. Everything printed meanwhile (lines, the log) goes through
    `RedactingStream`, the one place that keeps the token, the webhook secret and the reply token out of it."""
    args = _cli(argv)
    if args.command == "sandbox":  # its own made-up token and settings: nothing of the user's to hide
        import sandbox  # only the sandbox needs the emulator and the page
        try:
            return sandbox.run(args)
        except StartError as err:  # its serve() could not start (e.g. --port taken): one line, as for the service
            print(f"error: {err}", file=sys.stderr)
            return 2
    out, err = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return _run(args, (out, err))
    finally:
        out.flush()
        err.flush()


def _run(args: argparse.Namespace, streams: tuple[RedactingStream, ...]) -> int:
    """`main()` behind its redacting streams, which learn the secrets as soon as the settings are read."""
    needs = COMMAND_NEEDS.get(args.command)
    try:
        config = Config.from_env(uses=needs.uses, requires=needs.requires) if needs else Config.from_env()
    except ConfigError as err:
        for stream in streams:
            stream.add_secrets(err.secrets)
        if err.line:
            print(f"error: {err.line}", file=sys.stderr)
            return 2
        print(f"configuration error: {len(err.problems)} problem(s):", file=sys.stderr)
        for problem in err.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    for stream in streams:
        stream.add_secrets(config.secrets())
    configure_logging(config)
    if args.command in (None, "serve"):
        try:
            return serve(config)
        except StartError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except StoreError as err:  # the state failed once open (disk, lock held from outside): not a setting
            log.error("%s", err)
            return 1
    return run_command(args, config)


_requests_abandoned = False  # serve() stopped with requests under way on granian's threads


def exit_process(status: int) -> None:
    """End the process with `status`. After a stop that left requests under way, without the interpreter's
    teardown: granian's threads would call into an interpreter half gone, and abort the process."""
    for stop in (signal.SIGTERM, signal.SIGINT):  # stopped already: a second signal must not cut the exit short
        with contextlib.suppress(ValueError, OSError):
            signal.signal(stop, signal.SIG_IGN)
    if not _requests_abandoned:
        sys.exit(status)
    _write_queued_log()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    # Run the importable copy of this module: `sandbox` imports `app`, and a second copy (this `__main__`)
    # would have classes of its own, so its StartError would not be the one `main()` catches.
    import app
    app.exit_process(app.main())
