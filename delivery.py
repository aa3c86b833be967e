"""Delivers outbox events to Make: the `make-delivery` claim loop and a `make-delivery-N` thread per call in flight.

Calls for different chats run at once (up to `max_in_flight`, started at most `max_rate` per second);
one chat's events go one at a time, in order, and a chat stuck on retries does not hold up the others.
A batch shows typing when it first goes to Make (not again on each retry). Make's replies and its
`callback_answer` for a button press go to the Telegram outbox in the transaction that marks the event
delivered; a failure is retried with backoff, and an event older than `max_age_seconds` that still fails
becomes a dead letter and its chat moves on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from make_client import Delivered, MakeClient, Outcome, RetryLater
from outbox import IDLE_SECONDS, OutboxWorkers
from replies import (MAX_REPLY_CHARS, MAX_REPLY_MESSAGES, MAX_SOURCE_CHARS, REPLY_METHODS, ReplyError, message_calls,
                     read_reply, source_size)
from retry import BackoffPolicy, backoff
from store import NewEvent, OutboxRow, Store, StoreError
from telegram_outbox import USER_CHAT_PREFIX, bot_call, callback_answer, callback_answer_fields
from typing_keepalive import TypingKeepAlive
from updates import is_int

log = logging.getLogger("gateway.delivery")


@dataclass
class DeliveryHealth:
    """What the workers last saw of Make, for `GET /`."""

    delivered: int = 0
    failed_attempts: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    last_error_permanent: bool = False
    failing_since: float | None = None
    last_delivered_at: float | None = None


class DeliveryWorkers(OutboxWorkers):
    """Drains the outbox to Make, one call per chat at a time, up to `max_in_flight` chats at once."""

    def __init__(self, store: Store, make: MakeClient, typing: TypingKeepAlive,
                 *, max_in_flight: int = 50, max_rate: float = 30.0,
                 retry_max_seconds: float = 30.0, max_age_seconds: float = 72 * 3600,
                 clock: Callable[[], float] = time.time,
                 on_outcome: Callable[[str, float], None] = lambda outcome, seconds: None,
                 idle_seconds: float = IDLE_SECONDS, reply_format: str = "plain") -> None:
        super().__init__(store, "make", "make-delivery", max_in_flight, max_rate, clock, idle_seconds)
        self._make = make
        self._typing = typing
        self._policy = BackoffPolicy(initial=1.0, base=2.0, maximum=retry_max_seconds, jitter=1.0)
        self._max_age = max_age_seconds
        self._on_outcome = on_outcome
        self._reply_format = reply_format
        # _lock guards health, written by every worker, and _typed: the batches that have shown typing and
        # are not delivered yet (one run of "typing…" per batch, not one per retry).
        self._lock = threading.Lock()
        self.health = DeliveryHealth()
        self._typed: set[str] = set()

    def _handle(self, row: OutboxRow) -> None:
        """Deliver a claimed event; whatever goes wrong, it leaves the in-flight state (or its chat would stall)."""
        if self._store.shared and not self._still_ours(row):
            return
        try:
            outcome, elapsed, shows_typing = self._call(row)
        except Exception as err:
            self._own_failure(row, err)
            return
        if isinstance(outcome, Delivered):
            try:
                self._accepted(row, outcome, elapsed)
            except Exception:
                # Make has run the scenario: posting the event again would run it twice. Whatever the
                # gateway could not do with the answer is lost, loudly, and the chat moves on.
                log.exception("Make accepted %s, but its answer could not be handled; recorded as delivered "
                              "without its replies", row.event_id)
                self._settle(lambda: self._store.mark_delivered(row.id, lease=row.lease), row)
                self._forget_typing(row)
            return
        try:
            self._retry_later(row, outcome, self._clock(), elapsed)
        except Exception as err:
            self._own_failure(row, err)
            return
        if shows_typing:
            self._typing.stop(row.payload["chat_id"])

    def _still_ours(self, row: OutboxRow) -> bool:
        """Whether the row is still this claim's, asked just before posting it: a claim that waited past its lease
        (the process stopped between claiming and posting) must not post an event another instance has taken."""
        try:
            if self._store.holds_lease(row.id, row.lease):
                return True
        except StoreError as err:
            log.warning("event %s not posted: cannot tell whether it is still ours (%s); it is posted once "
                        "claimed again", row.event_id, err)
            return False
        log.warning("event %s not posted: another instance claimed it again after this one's lease ran out",
                    row.event_id)
        return False

    def _own_failure(self, row: OutboxRow, err: Exception) -> None:
        """The gateway failed before Make took the event: retried like a failed call, a dead letter once too old."""
        log.error("delivering event %s failed in the gateway", row.event_id, exc_info=err)
        now = self._clock()
        dead = now - row.created_at >= self._max_age
        retry_at = now + backoff(row.attempts, self._policy)
        reason = f"{type(err).__name__} in the gateway"
        self._settle(lambda: self._store.mark_failed(row.id, retry_at, reason, dead=dead, lease=row.lease), row)
        self._on_outcome("error", 0.0)
        with self._lock:
            self.health.failed_attempts += 1
            self.health.last_error = reason
            if dead:
                self.health.dead_letters += 1
        self._forget_typing(row)

    def _forget_typing(self, row: OutboxRow) -> None:
        """Stop typing in the row's chat; its next attempt shows typing again."""
        with self._lock:
            self._typed.discard(row.event_id)
        chat_id = row.payload.get("chat_id")
        if is_int(chat_id):
            self._typing.stop(chat_id)

    def _call(self, row: OutboxRow) -> tuple[Outcome, float, bool]:
        """Show typing (once per batch) and post the event: Make's outcome, the call's seconds, whether it typed."""
        chat_id = row.payload.get("chat_id")
        # Typing once per batch: a chat must not see "typing…" on every retry while Make is down.
        with self._lock:
            shows_typing = (row.event_type == "message_batch" and is_int(chat_id)
                            and row.event_id not in self._typed)
            if shows_typing:
                self._typed.add(row.event_id)
        if shows_typing:
            self._typing.start(chat_id)
        started = time.monotonic()
        outcome = self._make.deliver(row.event_id, row.payload)
        return outcome, time.monotonic() - started, shows_typing

    def _accepted(self, row: OutboxRow, outcome: Delivered, elapsed: float) -> None:
        """Make took the event: it leaves the outbox, and the calls its answer asks for enter it, in one step."""
        now = self._clock()
        if outcome.problem:
            log.warning("Make's answer to %s: %s; no reply sent. Build the Webhook response body with a JSON "
                        "module rather than by hand", row.event_id, outcome.problem)
        try:
            followups = answer_calls(row, outcome, self._reply_format)
        except Exception:  # Make accepted it: trouble with its answer must not post the event again
            log.exception("Make's answer to %s could not be read; delivered without replies", row.event_id)
            followups = []
        replies = sum(1 for f in followups if f.event_type in REPLY_METHODS)
        written: set[str] = set()

        def settle() -> None:
            written.update(self._store.mark_delivered(row.id, followups, now, lease=row.lease))

        self._settle(settle, row)
        if any(f.replace and f.event_id not in written for f in followups):
            log.warning("Make's callback_answer for %s came after the button was answered empty "
                        "(CALLBACK_ANSWER_SECONDS); dropped", row.event_id)
        self._on_outcome("delivered", elapsed)
        with self._lock:
            self._typed.discard(row.event_id)
            self.health.delivered += 1
            self.health.last_delivered_at = now
            self.health.failing_since = None
            self.health.last_error = None
            self.health.last_error_permanent = False
        log.info("event %s delivered to Make (HTTP %s, attempt %d, %d reply part(s))", row.event_id,
                 outcome.status, row.attempts, replies)
        if (outcome.replies or outcome.problem) and not replies and is_int(row.payload.get("chat_id")):
            # The scenario answered, but nothing in it could be sent: nothing else would end "typing…".
            self._typing.stop(row.payload["chat_id"])

    def _retry_later(self, row: OutboxRow, outcome: RetryLater, now: float, elapsed: float) -> None:
        dead = now - row.created_at >= self._max_age
        if outcome.throttled:
            # Make's limit is per webhook: every other chat's call would be refused too, so all wait.
            self.pause(min(outcome.retry_after or 1.0, self._policy.maximum))
        if outcome.retry_after is not None:
            # Make's wait is honoured, but attempts are never further apart than the configured maximum.
            delay = min(outcome.retry_after, self._policy.maximum)
        elif outcome.permanent:
            delay = self._policy.maximum
        else:
            delay = backoff(row.attempts, self._policy)
        self._settle(lambda: self._store.mark_failed(row.id, now + delay, outcome.reason, dead=dead, lease=row.lease),
                     row)
        self._on_outcome("dead" if dead else ("rejected" if outcome.permanent else "retry"), elapsed)
        with self._lock:
            if dead or outcome.throttled:  # throttled: Make never ran it, so its real run shows typing again
                self._typed.discard(row.event_id)
            self.health.failed_attempts += 1
            self.health.last_error = outcome.reason
            self.health.last_error_permanent = outcome.permanent
            if self.health.failing_since is None:
                self.health.failing_since = now
            if dead:
                self.health.dead_letters += 1
        if dead:
            log.error("event %s is a dead letter after %d attempts (%s); its chat moves on",
                      row.event_id, row.attempts, outcome.reason)
        else:
            level = logging.ERROR if outcome.permanent else logging.WARNING
            log.log(level, "event %s not delivered (attempt %d): %s; next try in %.1f s",
                    row.event_id, row.attempts, outcome.reason, delay)


def answer_calls(row: OutboxRow, outcome: Delivered, reply_format: str = "plain") -> list[NewEvent]:
    """The Bot API calls Make's answer to `row` asks for: its replies (a text without a format of its own read
    in `reply_format`), and its `callback_answer` to a button press."""
    chat_id = row.payload.get("chat_id")
    calls = reply_calls(row.event_id, chat_id, outcome.replies, reply_format) if is_int(chat_id) else []
    update = row.payload.get("update") if row.payload.get("update_type") == "callback_query" else None
    query = update.get("callback_query") if isinstance(update, dict) else None
    if isinstance(outcome.body, dict) and "callback_answer" in outcome.body:
        if not isinstance(query, dict) or not isinstance(query.get("id"), str):
            log.warning("Make's answer to %s has a callback_answer, but the event is not a button press; ignored",
                        row.event_id)
        else:
            answer, dropped = callback_answer_fields(outcome.body["callback_answer"])
            if dropped:
                log.warning("Make's callback_answer to %s: ignored %s (expected text of at most 200 characters, "
                            "show_alert, url, cache_time)", row.event_id, ", ".join(dropped))
            # The forwarded press was stored when it arrived: its creation is the press's time.
            calls.append(callback_answer(query["id"], row.created_at, answer, replace=True))
    return calls


def reply_calls(event_id: str, chat_id: int, replies: list[Any], default_format: str = "plain") -> list[NewEvent]:
    """Make's reply items as durable Bot API calls, in order for the chat (see `replies.message_calls`); an item
    that cannot be sent is logged and skipped. At most `MAX_REPLY_MESSAGES` messages and `MAX_REPLY_CHARS`
    characters in all: a scenario's mistake must not flood the chat."""
    kept: list[NewEvent] = []
    chars, source_left = 0, MAX_SOURCE_CHARS
    for i, item in enumerate(replies):
        if source_left <= 0:  # reading markup costs time: a huge answer must not hold a delivery thread
            log.warning("Make's answer to %s holds more than %d characters of reply sources; the rest is dropped",
                        event_id, MAX_SOURCE_CHARS)
            return kept
        source_left -= source_size(item)
        try:
            reply = read_reply(item, default_format)
            calls = message_calls(reply, chat_id)
        except ReplyError as err:
            log.warning("Make's answer to %s: reply %d skipped: %s", event_id, i, err)
            continue
        except Exception:  # a fault of ours in reading one item must not cost the others
            log.exception("Make's answer to %s: reply %d skipped: it could not be read", event_id, i)
            continue
        if reply.ignored:
            log.warning("Make's answer to %s: reply %d: ignored %s (not a reply field)", event_id, i,
                        ", ".join(reply.ignored))
        for j, (method, params) in enumerate(calls):
            size = len(params.get("text") or params.get("caption") or "")
            if len(kept) == MAX_REPLY_MESSAGES or chars + size > MAX_REPLY_CHARS:
                log.warning("Make's answer to %s holds more than %d messages or %d characters of replies; the "
                            "rest is dropped", event_id, MAX_REPLY_MESSAGES, MAX_REPLY_CHARS)
                if j > 0 and reply.reply_markup is not None:  # the buttons stay, under the last part sent
                    kept[-1].payload["params"]["reply_markup"] = reply.reply_markup
                return kept
            kept.append(bot_call(f"reply-{event_id}-{i}-{j}", f"{USER_CHAT_PREFIX}{chat_id}", method, params))
            chars += size
    return kept
