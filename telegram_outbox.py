"""Durable Bot API calls: Make's replies, answers to button presses, the admin's payment notices, Stars refunds.

Each is an outbox row with `target="telegram"` and a payload `{"method", "params"}`, written in the
same transaction as what caused it. The `telegram-outbox-N` threads send them, one order key at a
time (a chat's reply parts stay in order), without ever sleeping through a flood wait: a 429 or a
network error puts the row back with its next attempt time (never past the row's age limit). A
`sendMessage` that may have reached Telegram is not sent again (the user would get it twice), nor is one
a crash interrupted mid-call. A reply Telegram refuses with its formatting or buttons is sent once more
without them, in its place in the chat's queue; content Telegram refuses even so becomes a dead letter,
kept and visible (or, for a `POST /reply` still waiting, is told to its caller). A message to a user's
chat that Telegram says is unreachable (blocked bot, deactivated user, chat gone) is counted and
dropped, not kept. Messages are paced to Telegram's limits: at most `max_rate` calls a second overall
(never more as Telegram counts them, see `pacing.py`), and `chat_interval` seconds between two messages
to one chat (three in a group), measured from the answer; a chat's first message after a quiet spell goes
at once. A button press's answer is a row due `CALLBACK_ANSWER_SECONDS` after the press, sent
by a loop of its own; Make's `callback_answer` replaces it while it waits. It is never sent after
Telegram's window for it; one refused for its content is followed by an empty answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from outbox import OutboxWorkers
from formatting import clean_text
from pacing import CallWindow, ChatSpacing
from replies import REPLY_METHODS, PartOutcome, ReplyResults, bare
from retry import BackoffPolicy, backoff
from store import NewEvent, OutboxRow, Store, StoreError
from telegram_api import (BadRequest, ChatMigrated, NetworkError, RetryAfter, TelegramClient, TelegramError,
                          chat_unreachable, may_repeat)
from typing_keepalive import TypingKeepAlive
from updates import is_int

log = logging.getLogger("gateway.telegram_outbox")

TARGET = "telegram"
ANSWERS_TARGET = "telegram-answers"  # answers to button presses, on slots of their own
USER_CHAT_PREFIX = "reply:"  # order keys of messages to users' chats: `reply:<chat id>`
# Bot API calls at once: a slow call holds up no other chat. Enough for TELEGRAM_MAX_RATE's 30 a second
# while Telegram answers within 8/30 s; a slower Bot API is sent to more slowly.
MAX_IN_FLIGHT = 8
# Telegram takes an answer to a button press for a short, undocumented time after the press (10-15 s
# in reports); after it, an answer is refused as too old, so there is no point in sending it.
ANSWER_WINDOW_SECONDS = 15.0
_ANSWER_READ_TIMEOUT = 5.0
_CALLBACK_ANSWER_FIELDS = {"text": str, "show_alert": bool, "url": str, "cache_time": int}


def bot_call(event_id: str, order_key: str, method: str, params: dict, *, due_at: float | None = None,
             replace: bool = False, target: str = TARGET, expires_at: float | None = None) -> NewEvent:
    """An outbox row that makes one Bot API call (at `due_at`; never after `expires_at`, a wall-clock
    time; `replace`: see `NewEvent`)."""
    payload: dict[str, Any] = {"method": method, "params": params}
    if expires_at is not None:
        payload["expires_at"] = expires_at
    return NewEvent(event_id, order_key, method, payload, target=target, due_at=due_at, replace=replace)


def callback_answer(query_id: str, pressed_at: float, answer: dict | None = None, *, due_at: float | None = None,
                    replace: bool = False, suffix: str = "") -> NewEvent:
    """The one `answerCallbackQuery` of a button pressed at `pressed_at`: empty (the spinner stops) or with
    `answer`'s fields; never sent once Telegram's window for it has passed."""
    return bot_call(f"callback-answer-{query_id}{suffix}", f"callback:{query_id}", "answerCallbackQuery",
                    {"callback_query_id": query_id, **(answer or {})}, due_at=due_at, replace=replace,
                    target=ANSWERS_TARGET, expires_at=pressed_at + ANSWER_WINDOW_SECONDS)


def callback_answer_fields(answer: Any) -> tuple[dict[str, Any], list[str]]:
    """The usable fields of Make's `callback_answer` (text, show_alert, url, cache_time) and what was dropped."""
    if not isinstance(answer, dict):
        return {}, ["callback_answer is not an object"]
    kept, dropped = {}, []
    for name, value in answer.items():
        kind = _CALLBACK_ANSWER_FIELDS.get(name)
        ok = kind is not None and isinstance(value, kind) and (kind is not int or not isinstance(value, bool))
        if ok and name == "text":
            value = clean_text(value)
            ok = len(value) <= 200  # Telegram's limit for a notification
        if ok and name == "cache_time":
            ok = 0 <= value <= 86400 * 365
        if ok:
            kept[name] = value
        else:
            dropped.append(name)
    return kept, dropped


class TelegramOutbox(OutboxWorkers):
    """The `telegram-outbox` claim loop sending the durable Bot API calls, a few at once on `telegram-outbox-N` threads."""

    def __init__(self, store: Store, client: TelegramClient, typing: TypingKeepAlive, *,
                 target: str = TARGET, name: str = "telegram-outbox", max_in_flight: int = MAX_IN_FLIGHT,
                 max_age_seconds: float = 72 * 3600, clock: Callable[[], float] = time.time,
                 results: ReplyResults | None = None,
                 on_unreachable: Callable[[str], None] = lambda method: None, max_rate: float = 0.0,
                 chat_interval: float = 0.0) -> None:
        super().__init__(store, target, name, max_in_flight, max_rate, clock=clock,
                         window=CallWindow.per_second(max_rate) if max_rate > 0 else None)
        self._client = client
        self._typing = typing
        self._max_age = max_age_seconds
        self._policy = BackoffPolicy(initial=1.0, maximum=60.0)
        self._results = results or ReplyResults()  # a `POST /reply` waiting to hear what became of its parts
        self._on_unreachable = on_unreachable
        # Only messages are spaced per chat (Telegram's per-chat limit is on messages): not an answer to a
        # button press, which has its own short window, nor a refund.
        self._spacing = ChatSpacing(chat_interval) if chat_interval > 0 else None
        self.sent = 0

    def start(self) -> None:
        """Start the claim loop; a call a crash left in flight after it began to go out, and that must not be
        repeated (`sendMessage`: it may have arrived), is recorded as done instead of being sent again."""
        for row in self._store.interrupted_on_wire(self._target, self._clock()):
            log.warning("%s was being sent when the gateway stopped; not sent again, so it is never sent twice",
                        row.event_id)
            self._store.mark_delivered(row.id, lease=row.lease)
        super().start()

    def _handle(self, row: OutboxRow) -> None:
        method, params = row.payload["method"], row.payload["params"]
        if row.was_on_wire and not may_repeat(method):
            # Claimed again from an instance that died (its lease ran out) after the call began to go out.
            log.warning("%s was being sent by an instance that stopped; not sent again, so it is never sent twice",
                        row.event_id)
            self._settle(lambda: self._store.mark_delivered(row.id, lease=row.lease), row)
            return
        expires_at, now = row.payload.get("expires_at"), self._clock()
        if expires_at is not None and now > expires_at:
            # Flood control, a slow Bot API or a restart held it too long: Telegram would refuse it now.
            log.warning("%s not sent: its time has passed (%.0f s late)", row.event_id, now - expires_at)
            self._settle(lambda: self._store.mark_delivered(row.id, lease=row.lease), row)
            return
        chat_id = params.get("chat_id") if method in REPLY_METHODS else None
        not_before = self._spacing.reserve(chat_id, now) if self._spacing and chat_id is not None else None
        if not_before is not None:
            # Queued after its chat's queue had emptied, or in another queue to the same chat (the admin's
            # notice), less than the interval after the chat's last message: back in its queue until then.
            log.debug("%s waits %.2f s: chat %s had a message just now", row.event_id, not_before - now, chat_id)
            self._settle(lambda: self._store.release_claims([row.id], not_before, lease=row.lease), row)
            return
        try:
            if method in REPLY_METHODS:
                self._typing.stop(params.get("chat_id"))
            # An answer to a button press is worth little after a few seconds: never wait long for one.
            # A call that must not be repeated is marked durably just before its request goes out: after a
            # crash, one marked may have arrived and is not sent again; one not marked never left.
            on_wire = None if may_repeat(method) else (lambda: self._store.mark_on_wire(row.id, lease=row.lease))
            try:
                result = self._client.call(method, params, attempts=1, on_wire=on_wire, read_timeout=(
                    _ANSWER_READ_TIMEOUT if method == "answerCallbackQuery" else None))
            finally:
                self._answered()  # Telegram has counted it by now: the pacing window need not wait for the store
        except RetryAfter as err:
            # Telegram's wait counts from its answer, not from when the call was made.
            outcome = self._retry(row, self._clock(), err.retry_after, err.description)
        except TelegramError as err:
            outcome = self._after_error(row, method, err, self._clock())
        except StoreError as err:  # marking it on the wire failed: nothing was sent
            log.warning("%s for %s not sent: %s; trying again", method, row.event_id, err)
            outcome = self._retry(row, self._clock(), backoff(row.attempts, self._policy), str(err))
        except Exception as err:
            log.exception("%s for %s failed unexpectedly", method, row.event_id)
            outcome = self._retry(row, self._clock(), backoff(row.attempts, self._policy), type(err).__name__)
        else:
            self.sent += 1
            log.info("%s done (%s)", method, row.event_id)
            message_id = result.get("message_id") if isinstance(result, dict) else None
            if row.payload.get("fallback"):
                log.info("%s sent without its formatting or buttons", row.event_id)
            self._results.report(row.event_id, PartOutcome("sent", message_id if is_int(message_id) else None,
                                                           fallback=row.payload.get("fallback", "")))
            outcome = self._sent(row, chat_id)
        self._settle(outcome, row)

    def _sent(self, row: OutboxRow, chat_id: Any) -> Callable[[], None]:
        """What to record after a call that reached Telegram: done, and a message's chat's next one is due
        no earlier than the chat's interval from now (in the store, so a restart keeps it)."""
        if self._spacing is None or chat_id is None:
            return lambda: self._store.mark_delivered(row.id, lease=row.lease)
        next_at = self._spacing.sent(chat_id, self._clock())
        return lambda: self._store.mark_delivered(row.id, next_not_before=next_at, lease=row.lease)

    def _after_error(self, row: OutboxRow, method: str, err: TelegramError, now: float) -> Callable[[], None]:
        """What to record after Telegram did not confirm the call."""
        if err.sent and not may_repeat(method):
            log.warning("%s for %s may or may not have arrived (%s); not repeated, so it is not sent twice",
                        method, row.event_id, err.description)
            self._results.report(row.event_id, PartOutcome("unconfirmed", description=err.description))
            return self._sent(row, row.payload["params"].get("chat_id") if method in REPLY_METHODS else None)
        if method == "answerCallbackQuery":
            return self._after_answer_error(row, err, now)
        if chat_unreachable(err) and row.order_key.startswith(USER_CHAT_PREFIX):
            # The user blocked the bot or the chat is gone: nothing to fix or retry, and no dead letter.
            # (The admin's chat is not a user's: a wrong ADMIN_CHAT_ID stays a visible dead letter.)
            chat_id = row.payload["params"].get("chat_id")
            log.info("%s for %s: chat %s is unreachable (%s); dropped", method, row.event_id, chat_id,
                     err.description)
            self._typing.stop(chat_id)
            self._on_unreachable(method)
            self._results.report(row.event_id, PartOutcome("unreachable", description=err.description))
            return lambda: self._store.mark_delivered(row.id, lease=row.lease)
        if isinstance(err, NetworkError):
            return self._retry(row, now, backoff(row.attempts, self._policy), err.description)
        if method == "refundStarPayment" and "CHARGE_ALREADY_REFUNDED" in err.description.upper():
            log.info("%s: already refunded", row.event_id)
            return lambda: self._store.mark_delivered(row.id, lease=row.lease)
        plain = bare(row.payload["params"]) if method in REPLY_METHODS and isinstance(err, BadRequest) else None
        if plain is not None and not row.payload.get("fallback"):
            # Never lose a reply to its dressing: a bad link or button, or entities Telegram will not take.
            log.warning("%s for %s refused: %s; sending it once more without formatting or buttons", method,
                        row.event_id, err.description)
            payload = {**row.payload, "params": plain, "fallback": err.description}
            return lambda: self._store.retry_with(row.id, payload, now, err.description, lease=row.lease)
        if self._results.report(row.event_id, PartOutcome("refused", description=err.description)):
            # A `POST /reply` waiting for it tells its caller (502): no dead letter is needed to see it.
            log.warning("%s for %s refused: %s (told to the caller of POST /reply)", method, row.event_id, err)
            return lambda: self._store.mark_delivered(row.id, lease=row.lease)
        if isinstance(err, ChatMigrated):
            log.error("%s for %s: the group moved to chat %s; update the chat id (kept as a dead letter)",
                      method, row.event_id, err.new_chat_id)
        else:  # refused for its content (400, 401): repeating will not help
            log.error("%s for %s refused: %s (kept as a dead letter)", method, row.event_id, err)
        return lambda: self._store.mark_failed(row.id, now, err.description, dead=True, lease=row.lease)

    def _after_answer_error(self, row: OutboxRow, err: TelegramError, now: float) -> Callable[[], None]:
        """An answer to a button press failed: retried only inside Telegram's window; one refused for its
        content (Make's text or url) is sent once more empty, so the spinner still stops."""
        params, expires_at = row.payload["params"], row.payload.get("expires_at", 0.0)
        too_old = "too old" in err.description.lower() or "query id is invalid" in err.description.lower()
        if now > expires_at or too_old:
            log.warning("%s not answered: %s; too late to try again", row.event_id, err.description)
            return lambda: self._store.mark_delivered(row.id, lease=row.lease)
        if isinstance(err, BadRequest) and set(params) != {"callback_query_id"}:
            log.warning("%s refused: %s; answering it empty instead", row.event_id, err.description)
            plain = callback_answer(params["callback_query_id"], expires_at - ANSWER_WINDOW_SECONDS, suffix="-empty")
            return lambda: self._store.mark_delivered(row.id, [plain], now, lease=row.lease)
        if isinstance(err, NetworkError):
            return self._retry(row, now, min(1.0, backoff(row.attempts, self._policy)), err.description)
        log.warning("%s refused: %s; not retried", row.event_id, err.description)
        return lambda: self._store.mark_delivered(row.id, lease=row.lease)

    def _retry(self, row: OutboxRow, now: float, delay: float, reason: str) -> Callable[[], None]:
        self._results.report(row.event_id, PartOutcome("postponed", description=reason))
        dead = now - row.created_at >= self._max_age
        # A flood wait (a day, say) must not carry a row past its age unseen: it is tried once more then.
        delay = min(delay, max(1.0, row.created_at + self._max_age - now))
        if dead:
            log.error("%s is a dead letter after %d attempts (%s)", row.event_id, row.attempts, reason)
        else:
            log.warning("%s not sent (%s); next try in %.1f s", row.event_id, reason, delay)
        return lambda: self._store.mark_failed(row.id, now + delay, reason, dead=dead, lease=row.lease)
