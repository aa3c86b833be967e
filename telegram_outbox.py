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
_NOT_REPEATABLE = {"sendMessage", "refundStarPayment"}


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
            self._store.mark_delivered(row.id)
            self.sent += 1
            log.info("%s done (%s)", method, row.event_id)
        except RetryAfter as err:
            self._retry(row, now, err.retry_after, err.description)
        except NetworkError as err:
            if err.sent and method in _NOT_REPEATABLE:
                self._store.mark_delivered(row.id)
                log.warning("%s for %s may or may not have arrived (%s); not repeated, so it is not sent twice",
                            method, row.event_id, err.description)
            else:
                self._retry(row, now, backoff(row.attempts, self._policy), err.description)
        except ChatMigrated as err:
            self._store.mark_failed(row.id, now, err.description, dead=True)
            log.error("%s for %s: the group moved to chat %s; update the chat id (kept as a dead letter)",
                      method, row.event_id, err.new_chat_id)
        except TelegramError as err:
            # Refused for its content or its chat (400, 403, 401): repeating will not help.
            self._store.mark_failed(row.id, now, err.description, dead=True)
            log.error("%s for %s refused: %s (kept as a dead letter)", method, row.event_id, err)
        except Exception as err:
            self._retry(row, now, backoff(row.attempts, self._policy), type(err).__name__)
            log.exception("%s for %s failed unexpectedly", method, row.event_id)

    def _retry(self, row: OutboxRow, now: float, delay: float, reason: str) -> None:
        dead = now - row.created_at >= self._max_age
        self._store.mark_failed(row.id, now + delay, reason, dead=dead)
        if dead:
            log.error("%s is a dead letter after %d attempts (%s)", row.event_id, row.attempts, reason)
        else:
            log.warning("%s not sent (%s); next try in %.1f s", row.event_id, reason, delay)
