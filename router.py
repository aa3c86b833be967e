"""Routes one update: validated, de-duplicated and stored in one transaction, then handed on.

The webhook route and the poller both call `UpdateRouter.handle()`. When it returns, the update is
durable (or was refused as malformed), so the caller may acknowledge it to Telegram.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from batching import BatchManager
from config import FORWARDABLE_KINDS
from debounce import DebounceManager
from metrics import GatewayMetrics
from store import AddResult, NewEvent, Store, StoreError
from telegram_outbox import callback_answer
from updates import is_int, is_ordinary_message, is_payment_message, message_item, update_kind, user_summary

log = logging.getLogger("gateway.router")

KNOWN_KINDS = frozenset(FORWARDABLE_KINDS) | {"pre_checkout_query", "unknown"}
DEDUP_SECONDS = 48 * 3600  # Telegram keeps undelivered updates 24 h; twice that for margin
_PRUNE_EVERY = 3600.0


class PaymentHandler(Protocol):
    """What the router needs from payments: take a payment update durably; return whether it was new."""

    def handle(self, update: dict[str, Any]) -> bool: ...


@dataclass(frozen=True)
class Routed:
    """What became of an update: `outcome` is stored, duplicate, held, ignored, quarantined or invalid."""

    outcome: str
    kind: str = "unknown"
    detail: str = ""


class UpdateRouter:
    """Decides where each update goes and stores it durably before the caller acknowledges it."""

    def __init__(self, store: Store, batches: BatchManager, flood: DebounceManager,
                 metrics: GatewayMetrics, forward_kinds: tuple[str, ...],
                 payments: PaymentHandler | None = None, callback_answer_seconds: float = 5.0,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._batches = batches
        self._flood = flood
        self._metrics = metrics
        self._forward = set(forward_kinds)
        self.payments = payments
        self._callback_answer_seconds = callback_answer_seconds
        self._clock = clock
        self._monotonic = monotonic
        # _lock guards last_update_id and _next_prune.
        self._lock = threading.Lock()
        self.last_update_id: int | None = store.last_update_id()
        self._next_prune = 0.0
        self._counters: dict[tuple[str, str], Any] = {}  # (kind, outcome) -> its counter (setdefault: thread-safe)

    def handle(self, update: Any) -> Routed:
        """Store and route one update; a malformed one is `invalid`, a repeat `duplicate`. Raises `StoreError` only."""
        if not isinstance(update, dict) or not is_int(update.get("update_id")) or update["update_id"] < 0:
            self._count("unknown", "invalid")
            log.info("an update without a valid update_id: refused")
            return Routed("invalid", detail="not a JSON object with an integer update_id (0 or more)")
        update_id = update["update_id"]
        kind = update_kind(update)
        self._prune_now_and_then()
        try:
            routed = self._route(update_id, kind, update)
        except StoreError:
            raise
        except Exception:
            # A shape nobody foresaw: keep the update (forwarded verbatim) rather than lose or refuse it.
            log.exception("update %s (%s) could not be routed; forwarding it to Make as it is", update_id, kind)
            try:
                new = self._store.record_update(update_id, self._clock(), [forward_event(update_id, kind, update)])
            except StoreError:
                raise
            except Exception:
                log.exception("update %s cannot even be forwarded; acknowledged and dropped", update_id)
                new = self._store.record_update(update_id, self._clock())
            routed = Routed("quarantined" if new else "duplicate", kind)
        return self._finish(update_id, kind, update, routed)

    def handle_later(self, update: Any, then: Callable[[Routed | Exception], None]) -> None:
        """`handle` without waiting for the commit, for the webhook under a burst: an ordinary message is queued
        for the store's next group commit, and `then(routed)` is called once it is committed (`then(error)` if
        it could not be: a `StoreError`, or another error); any other update is handled at once, `then` called
        before this returns. `then` runs on the store's committing thread: quick, never calling the store."""
        # Each path below ends in `then`, exactly once: its caller's request is waiting for it.
        def answer(routed: Callable[[], Routed]) -> None:
            try:
                result: Routed | Exception = routed()
            except Exception as err:  # noqa: BLE001 - handed to the caller, which answers for it
                result = err
            then(result)

        if not (isinstance(update, dict) and is_int(update.get("update_id")) and update["update_id"] >= 0
                and update_kind(update) == "message" and not is_payment_message(update)
                and is_ordinary_message(update)):
            answer(lambda: self.handle(update))
            return
        try:
            update_id, message = update["update_id"], update["message"]
            chat_id, user_id = message["chat"]["id"], message["from"]["id"]
            user, item = user_summary(message.get("from")), message_item(update_id, message)
            self._prune_now_and_then()
        except Exception:  # noqa: BLE001 - a shape nobody foresaw, or the store failing: `handle` it
            answer(lambda: self.handle(update))
            return
        arrived = self._monotonic()

        def added(result: AddResult | Exception) -> None:
            if isinstance(result, StoreError):
                then(result)
                return
            if isinstance(result, Exception):  # as `handle` does: keep the update rather than lose or refuse it
                log.error("update %s (message) could not be routed (%r); forwarding it to Make as it is",
                          update_id, result)
                try:
                    events = [forward_event(update_id, "message", update)]
                except Exception:  # noqa: BLE001 - as `handle` does: acknowledged and dropped
                    log.exception("update %s cannot even be forwarded; acknowledged and dropped", update_id)
                    events = []
                self._store.record_update_later(update_id, self._clock(), events, quarantined)
                return
            answer(lambda: self._finish(update_id, "message", update, self._added(update_id, chat_id, user_id, result)))

        def quarantined(unit: Any) -> None:
            answer(lambda: self._finish(update_id, "message", update,
                                        Routed("quarantined" if unit.outcome() else "duplicate", "message")))

        self._batches.add_later(update_id, chat_id, user_id, user, item,
                                lambda: self._flood.should_process(user_id, arrived), added)

    def _finish(self, update_id: int, kind: str, update: dict[str, Any], routed: Routed) -> Routed:
        """What follows an update's routing: counted, remembered as the latest, logged."""
        self._count(kind, routed.outcome)
        if routed.outcome != "duplicate":
            with self._lock:
                if self.last_update_id is None or update_id > self.last_update_id:
                    self.last_update_id = update_id
        _log_received(update_id, kind, update, routed)
        return routed

    def _count(self, kind: str, outcome: str) -> None:
        # The label is bounded to kinds we know: a sender must not be able to mint metric series. The
        # children are kept here, as `labels()` costs more than the increment itself.
        key = (kind if kind in KNOWN_KINDS else "other", outcome)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters.setdefault(key, self._metrics.updates.labels(*key))
        counter.inc()

    def _route(self, update_id: int, kind: str, update: dict[str, Any]) -> Routed:
        if kind == "pre_checkout_query" or is_payment_message(update):
            if self.payments is None:
                return self._forward_or_ignore(update_id, kind, update, force=True)
            self._flush_batch(update_id, update.get(kind))
            new = self.payments.handle(update)
            return Routed("stored" if new else "duplicate", kind)
        if is_ordinary_message(update):
            return self._add_message(update_id, update["message"])
        return self._forward_or_ignore(update_id, kind, update)

    def _add_message(self, update_id: int, message: dict[str, Any]) -> Routed:
        chat_id, user_id = message["chat"]["id"], message["from"]["id"]
        arrived = self._monotonic()
        # Flood control is asked inside the storing transaction, once the update is known to be new: a repeat
        # must not use up the user's allowance, and no second transaction is needed to find that out.
        result = self._batches.add(update_id, chat_id, user_id, user_summary(message.get("from")),
                                   message_item(update_id, message),
                                   admit=lambda: self._flood.should_process(user_id, arrived))
        return self._added(update_id, chat_id, user_id, result)

    def _added(self, update_id: int, chat_id: int, user_id: int, result: AddResult) -> Routed:
        """A stored message's outcome (a held one warned of, now and then)."""
        if not result.new:
            return Routed("duplicate", "message")
        if result.held:
            self._metrics.flood_held.inc()
            held = self._flood.held_in_a_row(user_id)
            if held == 1 or held % 1000 == 0:  # a flooding user must not flood the log too
                log.warning("flood control held back update %s from user %s in chat %s (%d in a row; counted, "
                            "reported as flood_held in the next batch)", update_id, user_id, chat_id, held)
            return Routed("held", "message")
        return Routed("stored", "message")

    def _forward_or_ignore(self, update_id: int, kind: str, update: dict[str, Any], force: bool = False) -> Routed:
        forwarded = force or kind in self._forward
        now, body = self._clock(), update.get(kind)
        events: list[NewEvent] = []
        if forwarded:
            self._flush_batch(update_id, body)
            events.append(forward_event(update_id, kind, update))
        if kind == "callback_query" and isinstance(body, dict) and isinstance(body.get("id"), str):
            # Its button spins until answered: Make may answer it (callback_answer) until the due time.
            wait = self._callback_answer_seconds if forwarded else 0.0
            events.append(callback_answer(body["id"], now, due_at=now + wait))
        if not self._store.record_update(update_id, now, events):
            return Routed("duplicate", kind)
        if forwarded:
            return Routed("stored", kind)
        why = "service message or message from a bot/channel" if kind == "message" else "kind not forwarded"
        return Routed("ignored", kind, why + " (see FORWARD_UPDATE_KINDS)")

    def _flush_batch(self, update_id: int, body: Any) -> None:
        """Close the sender's open batch in this chat first, so Make gets their messages before this event."""
        chat_id, user_id = _chat_and_user(body)
        if chat_id is None or user_id is None or not self._batches.has_open(chat_id, user_id):
            return
        if not self._store.seen(update_id):  # a repeat must not cut the user's newer batch short
            self._batches.flush(chat_id, user_id)

    def _prune_now_and_then(self) -> None:
        now = self._monotonic()
        with self._lock:
            if now < self._next_prune:
                return
            self._next_prune = now + _PRUNE_EVERY
        pruned = self._store.prune_seen(self._clock() - DEDUP_SECONDS)
        if pruned:
            log.info("forgot %d update id(s) older than %d h", pruned, DEDUP_SECONDS // 3600)


_OUTCOMES = {"stored": "stored", "duplicate": "a repeat; ignored", "held": "held back by flood control",
             "ignored": "acknowledged and dropped", "quarantined": "could not be routed; forwarded to Make as it is"}


def _log_received(update_id: int, kind: str, update: dict[str, Any], routed: Routed) -> None:
    """One line per update received: its id, kind, chat and fate; never its content (users' words stay out
    of the log)."""
    if routed.outcome == "held":
        # Flood control warns once per run of held messages: a line each would let one user flood the log.
        log.debug("update %s (message): held back by flood control", update_id)
        return
    chat_id, user_id = _chat_and_user(update.get(kind))
    source = (f" from chat {chat_id}" if chat_id is not None else
              f" from user {user_id}" if user_id is not None else "")
    shown = kind if kind in KNOWN_KINDS else f"unknown kind {kind[:40]!r}"  # a key anyone could have written
    detail = f": {routed.detail}" if routed.detail else ""
    log.info("update %s (%s)%s: %s%s", update_id, shown, source, _OUTCOMES.get(routed.outcome, routed.outcome),
             detail)


def forward_event(update_id: int, kind: str, update: dict[str, Any]) -> NewEvent:
    """An `update` event carrying the update verbatim, ordered with its chat's other events."""
    chat_id, user_id = _chat_and_user(update.get(kind))
    payload = {
        "event_type": "update",
        "event_id": f"update-{update_id}",
        "update_type": kind,
        "update_id": update_id,
        "chat_id": chat_id,
        "user_id": user_id,
        "update": update,
    }
    if chat_id is not None:
        order_key = f"chat:{chat_id}"
    else:
        order_key = f"user:{user_id}" if user_id is not None else f"update:{update_id}"
    return NewEvent(payload["event_id"], order_key, "update", payload)


def _chat_and_user(body: Any) -> tuple[int | None, int | None]:
    """Best-effort chat and user ids of an update's body (a callback's chat is its message's)."""
    if not isinstance(body, dict):
        return None, None
    user = body.get("from") if isinstance(body.get("from"), dict) else body.get("user")
    user_id = user.get("id") if isinstance(user, dict) and is_int(user.get("id")) else None
    chat = body.get("chat")
    if not isinstance(chat, dict) and isinstance(body.get("message"), dict):
        chat = body["message"].get("chat")
    chat_id = chat.get("id") if isinstance(chat, dict) and is_int(chat.get("id")) else None
    return chat_id, user_id
