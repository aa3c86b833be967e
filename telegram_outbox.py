"""Durable Bot API calls: Make's replies, the admin's payment notices, Stars refunds.

Each is an outbox row with `target="telegram"` and a payload `{"method", "params"}`, written in the
same transaction as what caused it. The `telegram-outbox-N` threads send them, one order key at a
time (a chat's reply parts stay in order), without ever sleeping through a flood wait: a 429 or a
network error puts the row back with its next attempt time. A `sendMessage` that may have reached
Telegram is not sent again (the user would get it twice); content Telegram refuses becomes a dead
letter, kept and visible.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from outbox import OutboxWorkers
from retry import BackoffPolicy, backoff
from store import NewEvent, OutboxRow, SQLiteStore
from telegram_api import ChatMigrated, NetworkError, RetryAfter, TelegramClient, TelegramError
from typing_keepalive import TypingKeepAlive

log = logging.getLogger("gateway.telegram_outbox")

TARGET = "telegram"
# Repeating these after a lost answer would do them twice. (A repeated refundStarPayment is refused by
# Telegram with CHARGE_ALREADY_REFUNDED, so a refund is retried rather than risked.)
_NOT_REPEATABLE = {"sendMessage"}


def bot_call(event_id: str, order_key: str, method: str, params: dict) -> NewEvent:
    """An outbox row that makes one Bot API call."""
    return NewEvent(event_id, order_key, method, {"method": method, "params": params}, target=TARGET)


class TelegramOutbox(OutboxWorkers):
    """A few `telegram-outbox-N` threads sending the durable Bot API calls."""

    def __init__(self, store: SQLiteStore, client: TelegramClient, typing: TypingKeepAlive, *,
                 workers: int = 2, max_age_seconds: float = 72 * 3600,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(store, TARGET, "telegram-outbox", workers, clock)
        self._client = client
        self._typing = typing
        self._max_age = max_age_seconds
        self._policy = BackoffPolicy(initial=1.0, maximum=60.0)
        self.sent = 0

    def _handle(self, row: OutboxRow) -> None:
        method, params = row.payload["method"], row.payload["params"]
        now = self._clock()
        try:
            if method == "sendMessage":
                self._typing.stop(params.get("chat_id"))
            self._client.call(method, params, attempts=1)
        except RetryAfter as err:
            outcome = self._retry(row, now, err.retry_after, err.description)
        except TelegramError as err:
            outcome = self._after_error(row, method, err, now)
        except Exception as err:
            log.exception("%s for %s failed unexpectedly", method, row.event_id)
            outcome = self._retry(row, now, backoff(row.attempts, self._policy), type(err).__name__)
        else:
            self.sent += 1
            log.info("%s done (%s)", method, row.event_id)
            outcome = lambda: self._store.mark_delivered(row.id)  # noqa: E731
        self._settle(outcome, row)

    def _after_error(self, row: OutboxRow, method: str, err: TelegramError, now: float) -> Callable[[], None]:
        """What to record after Telegram did not confirm the call."""
        if err.sent and method in _NOT_REPEATABLE:
            log.warning("%s for %s may or may not have arrived (%s); not repeated, so it is not sent twice",
                        method, row.event_id, err.description)
            return lambda: self._store.mark_delivered(row.id)
        if isinstance(err, NetworkError):
            return self._retry(row, now, backoff(row.attempts, self._policy), err.description)
        if method == "refundStarPayment" and "CHARGE_ALREADY_REFUNDED" in err.description.upper():
            log.info("%s: already refunded", row.event_id)
            return lambda: self._store.mark_delivered(row.id)
        if isinstance(err, ChatMigrated):
            log.error("%s for %s: the group moved to chat %s; update the chat id (kept as a dead letter)",
                      method, row.event_id, err.new_chat_id)
        else:  # refused for its content or its chat (400, 403, 401): repeating will not help
            log.error("%s for %s refused: %s (kept as a dead letter)", method, row.event_id, err)
        return lambda: self._store.mark_failed(row.id, now, err.description, dead=True)

    def _retry(self, row: OutboxRow, now: float, delay: float, reason: str) -> Callable[[], None]:
        dead = now - row.created_at >= self._max_age
        if dead:
            log.error("%s is a dead letter after %d attempts (%s)", row.event_id, row.attempts, reason)
        else:
            log.warning("%s not sent (%s); next try in %.1f s", row.event_id, reason, delay)
        return lambda: self._store.mark_failed(row.id, now + delay, reason, dead=dead)
