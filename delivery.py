"""Delivers outbox events to Make on a small pool of `make-delivery-N` threads.

Each thread claims the oldest due event that heads its chat's queue (so one chat's events go out in
order, and a chat stuck on retries does not hold up the others), shows typing for a batch, posts it,
and then sends Make's replies, or schedules the next attempt with backoff. An event older than
`max_age_seconds` that still fails becomes a dead letter and its chat moves on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from make_client import Delivered, MakeClient, RetryLater
from outbox import OutboxWorkers
from replies import split_text
from retry import BackoffPolicy, backoff
from store import NewEvent, OutboxRow, SQLiteStore
from telegram_outbox import bot_call
from typing_keepalive import TypingKeepAlive

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
    """A fixed pool of `make-delivery-N` threads draining the outbox to Make."""

    def __init__(self, store: SQLiteStore, make: MakeClient, typing: TypingKeepAlive,
                 *, on_replies: Callable[[], None] = lambda: None, workers: int = 2,
                 retry_max_seconds: float = 30.0, max_age_seconds: float = 72 * 3600,
                 clock: Callable[[], float] = time.time,
                 on_outcome: Callable[[str, float], None] = lambda outcome, seconds: None) -> None:
        super().__init__(store, "make", "make-delivery", workers, clock)
        self._make = make
        self._typing = typing
        self._on_replies = on_replies
        self._policy = BackoffPolicy(initial=1.0, base=2.0, maximum=retry_max_seconds, jitter=1.0)
        self._max_age = max_age_seconds
        self._on_outcome = on_outcome
        # _lock guards health, written by every worker.
        self._lock = threading.Lock()
        self.health = DeliveryHealth()

    def _handle(self, row: OutboxRow) -> None:
        """Deliver a claimed event; whatever goes wrong, it leaves the in-flight state (or its chat would stall)."""
        try:
            self._deliver(row)
        except Exception as err:
            log.exception("delivering event %s failed unexpectedly", row.event_id)
            retry_at = self._clock() + backoff(row.attempts, self._policy)
            self._settle(lambda: self._store.mark_failed(row.id, retry_at, f"{type(err).__name__} in the gateway"),
                         row)
            chat_id = row.payload.get("chat_id")
            if isinstance(chat_id, int):
                self._typing.stop(chat_id)

    def _deliver(self, row: OutboxRow) -> None:
        chat_id = row.payload.get("chat_id")
        shows_typing = row.event_type == "message_batch" and isinstance(chat_id, int)
        if shows_typing:
            self._typing.start(chat_id)
        started = time.monotonic()
        outcome = self._make.deliver(row.event_id, row.payload)
        elapsed = time.monotonic() - started
        now = self._clock()
        if isinstance(outcome, Delivered):
            replies = reply_calls(row.event_id, chat_id, outcome.replies) if isinstance(chat_id, int) else []
            self._settle(lambda: self._store.mark_delivered(row.id, replies, now), row)
            if replies:
                self._on_replies()
            self._on_outcome("delivered", elapsed)
            with self._lock:
                self.health.delivered += 1
                self.health.last_delivered_at = now
                self.health.failing_since = None
                self.health.last_error = None
                self.health.last_error_permanent = False
            log.info("event %s delivered to Make (HTTP %s, attempt %d, %d reply part(s))", row.event_id,
                     outcome.status, row.attempts, len(replies))
            return
        self._retry_later(row, outcome, now, elapsed)
        if shows_typing:
            self._typing.stop(chat_id)

    def _retry_later(self, row: OutboxRow, outcome: RetryLater, now: float, elapsed: float) -> None:
        dead = now - row.created_at >= self._max_age
        if outcome.retry_after is not None:
            # Make's wait is honoured, but attempts are never further apart than the configured maximum.
            delay = min(outcome.retry_after, self._policy.maximum)
        elif outcome.permanent:
            delay = self._policy.maximum
        else:
            delay = backoff(row.attempts, self._policy)
        self._settle(lambda: self._store.mark_failed(row.id, now + delay, outcome.reason, dead=dead), row)
        self._on_outcome("dead" if dead else ("rejected" if outcome.permanent else "retry"), elapsed)
        with self._lock:
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


def reply_calls(event_id: str, chat_id: int, replies: list[str]) -> list[NewEvent]:
    """Make's replies as durable sendMessage calls, split at Telegram's limit, in order for the chat."""
    return [bot_call(f"reply-{event_id}-{i}-{j}", f"reply:{chat_id}", "sendMessage",
                     {"chat_id": chat_id, "text": part})
            for i, text in enumerate(replies) for j, part in enumerate(split_text(text))]
