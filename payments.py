"""Telegram Payments: pre-checkout decisions in time, each payment recorded once, the admin told.

- `pre_checkout_query`: decided durably in the request (or poller) thread (`paid` / `busy` / `ok`,
  with a short hold on the payload for its buyer, so the same buyer may try again at once after a
  declined card), answered by the `payment-answers` thread, which nothing else uses, so no batch, Make
  call or typing can delay it. An optional check with Make falls back to the local decision if Make
  does not answer in time; a refusal text of Make's that Telegram rejects is replaced by our own.
- `successful_payment`: recorded once per `telegram_payment_charge_id`, its payload marked paid, and,
  in the same transaction, a `payment` event for Make and the admin's notice (and, opted in, a Stars
  refund of a duplicate) put in the durable outbox. The `telegram-outbox` thread sends the Bot API
  calls with retries; the payment path never waits for them. A Stars subscription pays the same
  payload every period (and its link's payload is shared by every subscriber): its payments are
  `subscription: "first"` or `"renewal"`, never duplicates, and never mark the payload paid.
- `refunded_payment`: recorded once and forwarded as a `payment_refunded` event.
"""

from __future__ import annotations

import html
import logging
import queue
import threading
import time
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable

from make_client import Delivered, MakeClient, Outcome
from store import NewEvent, Store
from telegram_api import BadRequest, TelegramClient, TelegramError
from telegram_outbox import bot_call
from updates import is_int, user_summary

log = logging.getLogger("gateway.payments")

# Minor digits per ISO 4217 where they are not 2; Telegram Stars (XTR) are whole.
_EXPONENTS = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI",
                     "VND", "VUV", "XAF", "XOF", "XPF", "XTR"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
}
_SYMBOLS = {"RUB": "₽", "USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥", "CNY": "¥", "UAH": "₴", "KZT": "₸",
            "INR": "₹", "TRY": "₺", "XTR": "⭐"}
_ANSWER_BUDGET_SECONDS = 10.0  # Telegram's limit for answerPreCheckoutQuery
# The longest refusal we send: the limit config.py holds the TEXT_* refusals to, counted here in UTF-16
# units (the safe way to measure text for Telegram: an emoji counts two), since Make's text is unchecked.
_ERROR_MESSAGE_MAX_UNITS = 255


def currency_exponent(currency: str) -> int:
    """How many minor digits `currency` has (2 unless listed)."""
    return _EXPONENTS.get(currency.upper(), 2)


def format_amount(total_amount: int, currency: str) -> str:
    """`total_amount` (minor units) as a decimal string in major units: 150000 RUB -> "1500.00"."""
    exponent = currency_exponent(currency)
    value = Decimal(total_amount).scaleb(-exponent)
    return f"{value:.{exponent}f}"


def amount_with_currency(total_amount: int, currency: str) -> str:
    """The amount as a person reads it: "1500.00 ₽", "500 ¥", "50 ⭐", "12.50 CHF"."""
    return f"{format_amount(total_amount, currency)} {_SYMBOLS.get(currency.upper(), currency.upper())}"


def refusal_text(value: Any) -> str | None:
    """Make's `error_message` fit to show the buyer (stripped; 1-255 UTF-16 units; no control characters
    but newlines, no lone surrogates), or None when it cannot be made so."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or any(c != "\n" and unicodedata.category(c) in ("Cc", "Cs") for c in text):
        return None
    if len(text.encode("utf-16-le")) // 2 > _ERROR_MESSAGE_MAX_UNITS:
        return None
    return text


def subscription_kind(payment: dict[str, Any]) -> str | None:
    """`first` or `renewal` for a Stars subscription's payment (`is_first_recurring` / `is_recurring`), else None."""
    if payment.get("is_first_recurring") is True:
        return "first"
    if payment.get("is_recurring") is True:
        return "renewal"
    return None


def payment_event(message: dict[str, Any], duplicate: bool) -> dict[str, Any]:
    """The `payment` event for Make of a message whose `successful_payment` has a charge id, payload, currency
    and integer amount (checked by the caller)."""
    payment = message["successful_payment"]
    sender = message.get("from") if isinstance(message.get("from"), dict) else None
    chat = message.get("chat") if isinstance(message.get("chat"), dict) else {}
    return {"event_type": "payment", "event_id": f"payment-{payment['telegram_payment_charge_id']}",
            "chat_id": chat.get("id") if is_int(chat.get("id")) else None,
            "user_id": sender.get("id") if sender and is_int(sender.get("id")) else None,
            "user": user_summary(sender),
            "payment": {**payment, "amount": format_amount(payment["total_amount"], payment["currency"])},
            "duplicate": duplicate, "subscription": subscription_kind(payment)}


def refund_event(message: dict[str, Any]) -> dict[str, Any]:
    """The `payment_refunded` event for Make of a message whose `refunded_payment` has a charge id (checked by
    the caller)."""
    refund = message["refunded_payment"]
    sender = message.get("from") if isinstance(message.get("from"), dict) else None
    chat = message.get("chat") if isinstance(message.get("chat"), dict) else {}
    amount, currency = refund.get("total_amount"), str(refund.get("currency", ""))
    body = {**refund, "amount": format_amount(amount, currency)} if is_int(amount) else dict(refund)
    return {"event_type": "payment_refunded", "event_id": f"refund-{refund['telegram_payment_charge_id']}",
            "chat_id": chat.get("id") if is_int(chat.get("id")) else None,
            "user_id": sender.get("id") if sender else None, "user": user_summary(sender), "refund": body}


def pre_checkout_event(query: dict[str, Any]) -> dict[str, Any]:
    """The `pre_checkout` event that asks Make whether to approve a checkout (`PAYMENT_CHECK_WITH_MAKE`)."""
    sender = query.get("from") if isinstance(query.get("from"), dict) else None
    return {"event_type": "pre_checkout", "event_id": f"pre-checkout-{query['id']}",
            "user_id": sender.get("id") if sender else None, "user": user_summary(sender),
            "pre_checkout_query": query}


def checkout_answer(outcome: Outcome) -> tuple[bool, str | None]:
    """What Make's answer to a `pre_checkout` event says: approve or not, and its refusal text when fit to show
    (see `refusal_text`). Only an answer that says `"ok": false` refuses."""
    body = outcome.body if isinstance(outcome, Delivered) else None
    if isinstance(body, dict) and body.get("ok") is False:
        return False, refusal_text(body.get("error_message"))
    return True, None


@dataclass(frozen=True)
class PaymentTexts:
    """Texts shown in Telegram (each a setting, see `config.py`; Russian by default, like the original bot)."""

    already_paid: str
    in_progress: str
    refused: str
    admin_payment: str
    admin_duplicate: str
    admin_refunded: str
    admin_renewal: str


def admin_notice(title: str, payment: dict[str, Any], sender: dict[str, Any] | None, extra: str = "") -> str:
    """The admin's HTML notice of a payment; every user-supplied value is escaped."""
    e = lambda value: html.escape(str(value), quote=False)  # noqa: E731
    currency = str(payment.get("currency", ""))
    amount = payment.get("total_amount") if is_int(payment.get("total_amount")) else 0
    lines = [f"<b>{e(title)}</b>", f"Сумма: <b>{e(amount_with_currency(amount, currency))}</b>"]
    if sender:
        name = " ".join(str(sender[k]) for k in ("first_name", "last_name") if sender.get(k))
        handle = f"@{sender['username']}, " if sender.get("username") else ""
        lines.append(f"Покупатель: {e(name)} ({e(handle)}id {e(sender.get('id'))})")
    info = payment.get("order_info") if isinstance(payment.get("order_info"), dict) else {}
    for label, key in (("Имя", "name"), ("Телефон", "phone_number"), ("Email", "email")):
        if info.get(key):
            lines.append(f"{label}: {e(info[key])}")
    address = info.get("shipping_address")
    if isinstance(address, dict):
        parts = [address.get(k) for k in ("country_code", "state", "city", "street_line1", "street_line2", "post_code")]
        lines.append("Адрес: " + e(", ".join(str(p) for p in parts if p)))
    lines.append(f"Счёт (payload): <code>{e(payment.get('invoice_payload', ''))}</code>")
    if payment.get("telegram_payment_charge_id"):
        lines.append(f"Charge ID: <code>{e(payment['telegram_payment_charge_id'])}</code>")
    if extra:
        lines.append(e(extra))
    return "\n".join(lines)


class PaymentProcessor:
    """Takes payment updates from the router and owns the two payment threads."""

    def __init__(self, store: Store, telegram: TelegramClient, *, admin_chat_id: int | None,
                 texts: PaymentTexts, hold_seconds: float = 30.0,
                 auto_refund_stars: bool = False, make_check: MakeClient | None = None,
                 make_check_timeout: float = 3.0, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._telegram = telegram
        self._admin = admin_chat_id
        self._hold = hold_seconds
        self._texts = texts
        self._auto_refund = auto_refund_stars
        self._make_check = make_check
        self._clock = clock
        self._answers: queue.Queue[tuple[dict[str, Any], str, float] | None] = queue.Queue()
        self._make_check_timeout = make_check_timeout
        self._thread: threading.Thread | None = None
        self.answered = 0

    # Called by the router, in a request or poller thread: store only, never call out.

    def handle(self, update: dict[str, Any]) -> bool:
        """Take a payment update durably (answers and notices go out on their threads); return whether it was new."""
        if isinstance(update.get("pre_checkout_query"), dict):
            return self._pre_checkout(update["update_id"], update["pre_checkout_query"])
        message = update.get("message") if isinstance(update.get("message"), dict) else {}
        if isinstance(message.get("successful_payment"), dict):
            return self._successful(update["update_id"], message)
        if isinstance(message.get("refunded_payment"), dict):
            return self._refunded(update["update_id"], message)
        return self._store.record_update(update["update_id"], self._clock())

    def _pre_checkout(self, update_id: int, query: dict[str, Any]) -> bool:
        query_id, payload = query.get("id"), query.get("invoice_payload")
        if not isinstance(query_id, str) or not isinstance(payload, str):
            log.warning("pre_checkout_query %s without id or payload; cannot answer it", update_id)
            return self._store.record_update(update_id, self._clock())
        sender = query.get("from") if isinstance(query.get("from"), dict) else {}
        user_id = sender.get("id")
        if not is_int(user_id):
            # Telegram always names the buyer; without one no hold could keep another buyer off the
            # payload, so the checkout is refused rather than risked.
            log.warning("pre_checkout_query %s has no buyer (from.id); refused", update_id)
            new = self._store.record_update(update_id, self._clock())
            if new:
                self._answers.put((query, "refused", time.monotonic()))
            return new
        decision = self._store.decide_checkout(update_id, query_id, payload, user_id, self._clock(), self._hold)
        if decision == "duplicate":
            if self._store.holds(payload, query_id, self._clock()):
                # Approved before a crash, perhaps never answered: answering again is harmless.
                self._answers.put((query, "ok", time.monotonic()))
            return False
        self._answers.put((query, decision, time.monotonic()))
        return True

    def _successful(self, update_id: int, message: dict[str, Any]) -> bool:
        payment = message["successful_payment"]
        charge_id, payload = payment.get("telegram_payment_charge_id"), payment.get("invoice_payload")
        currency, amount = payment.get("currency"), payment.get("total_amount")
        if not (isinstance(charge_id, str) and charge_id and isinstance(payload, str)
                and isinstance(currency, str) and is_int(amount)):
            log.error("successful_payment in update %s lacks charge id, payload, currency or amount: "
                      "forwarded to Make as an update for a person to check", update_id)
            return self._store.record_update(update_id, self._clock(), [NewEvent(
                f"update-{update_id}", f"update:{update_id}", "update",
                {"event_type": "update", "event_id": f"update-{update_id}", "update_type": "message",
                 "update": {"update_id": update_id, "message": message}})])
        sender = message.get("from") if isinstance(message.get("from"), dict) else None
        chat = message.get("chat") if isinstance(message.get("chat"), dict) else {}
        chat_id = chat.get("id") if is_int(chat.get("id")) else None
        user_id = sender.get("id") if sender and is_int(sender.get("id")) else None
        subscription = subscription_kind(payment)

        def build(duplicate: bool) -> list[NewEvent]:
            event = payment_event(message, duplicate)
            events = [NewEvent(event["event_id"], f"chat:{chat_id}", "payment", event)]
            refund = duplicate and self._auto_refund and currency == "XTR" and user_id is not None
            if refund:
                events.append(bot_call(f"refund-request-{charge_id}", f"refund:{charge_id}", "refundStarPayment",
                                       {"user_id": user_id, "telegram_payment_charge_id": charge_id}))
            if self._admin is not None:
                title = (self._texts.admin_duplicate if duplicate else
                         self._texts.admin_renewal if subscription == "renewal" else self._texts.admin_payment)
                extra = "Возврат Stars запрошен автоматически." if refund else ""
                events.append(bot_call(f"admin-payment-{charge_id}", "admin", "sendMessage", {
                    "chat_id": self._admin, "parse_mode": "HTML",
                    "text": admin_notice(title, payment, sender, extra)}))
            return events

        new, duplicate = self._store.record_payment(update_id, charge_id, payload, user_id, currency, amount,
                                                    payment, self._clock(), build, recurring=subscription is not None)
        if new:
            log.info("payment recorded: charge %s, %s, payload %r%s%s", charge_id,
                     amount_with_currency(amount, currency), payload,
                     f" (subscription: {subscription})" if subscription else "",
                     " (DUPLICATE: the payload was already paid; refund needed)" if duplicate else "")
            if self._admin is None:
                log.warning("payment %s: no ADMIN_CHAT_ID, so the admin is not notified", charge_id)
        return new

    def _refunded(self, update_id: int, message: dict[str, Any]) -> bool:
        refund = message["refunded_payment"]
        charge_id, payload = refund.get("telegram_payment_charge_id"), refund.get("invoice_payload")
        if not isinstance(charge_id, str) or not charge_id or not isinstance(payload, str):
            log.error("refunded_payment in update %s lacks a charge id or payload; dropped", update_id)
            return self._store.record_update(update_id, self._clock())
        sender = message.get("from") if isinstance(message.get("from"), dict) else None
        event = refund_event(message)
        events = [NewEvent(event["event_id"], f"chat:{event['chat_id']}", "payment_refunded", event)]
        if self._admin is not None:
            events.append(bot_call(f"admin-refund-{charge_id}", "admin", "sendMessage", {
                "chat_id": self._admin, "parse_mode": "HTML",
                "text": admin_notice(self._texts.admin_refunded, refund, sender)}))
        new = self._store.record_refund(update_id, charge_id, payload, refund, self._clock(), events)
        if new:
            log.info("refund recorded: charge %s, payload %r", charge_id, payload)
        return new

    # Threads

    def start(self) -> None:
        """Start the `payment-answers` thread (notices and refunds go out through the Telegram outbox)."""
        self._thread = threading.Thread(target=self._answer_loop, name="payment-answers", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; notices not yet sent stay in the outbox for the next start. Safe to call twice."""
        self._answers.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """True while the `payment-answers` thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _answer_loop(self) -> None:
        while True:  # drains the queue up to stop()'s sentinel: every decided checkout gets its answer
            item = self._answers.get()
            if item is None:
                return
            try:
                self._answer(*item)
            except Exception:
                log.exception("answering a pre-checkout query failed")

    def _answer(self, query: dict[str, Any], decision: str, arrived: float) -> None:
        query_id, payload = query["id"], query["invoice_payload"]
        deadline = arrived + _ANSWER_BUDGET_SECONDS - 0.5
        ok, message, from_make = decision == "ok", None, False
        if decision == "paid":
            message = self._texts.already_paid
        elif decision == "busy":
            message = self._texts.in_progress
        elif decision == "refused":
            message = self._texts.refused
        elif self._make_check is not None:
            if deadline - time.monotonic() > self._make_check_timeout + 2.0:
                ok, message = self._ask_make(query, deadline)
                from_make = message is not None
            else:
                log.warning("pre-checkout %s: no time left to ask Make; the local rules decide", query_id)
            if not ok:
                self._store.release_checkout(payload, query_id)
                message = message or self._texts.refused
        late = time.monotonic() - arrived
        if late > _ANSWER_BUDGET_SECONDS:
            log.error("pre-checkout %s is %.1f s old: Telegram has already cancelled it", query_id, late)
        try:
            try:
                self._telegram.answer_pre_checkout_query(query_id, ok, message, deadline=deadline)
            except BadRequest as err:
                if not from_make:
                    raise
                # Telegram found fault with Make's text, so the checkout is still open: refuse it again
                # with our own text at once rather than leave the buyer waiting for it to time out.
                log.warning("pre-checkout %s: Telegram refused Make's error_message (%s); refused with "
                            "TEXT_PAYMENT_REFUSED instead", query_id, err.description)
                self._telegram.answer_pre_checkout_query(query_id, False, self._texts.refused, deadline=deadline)
            self.answered += 1
            log.info("pre-checkout %s for payload %r %s in %.3f s", query_id, payload,
                     "approved" if ok else f"refused ({'Make' if decision == 'ok' else decision})",
                     time.monotonic() - arrived)
        except TelegramError as err:
            log.error("pre-checkout %s not answered: %s", query_id, err)
            # A hold is released only when Telegram surely did not take the approval; otherwise the
            # checkout may go on, and a second one must stay refused until the hold expires.
            if ok and not err.sent:
                self._store.release_checkout(payload, query_id)

    def _ask_make(self, query: dict[str, Any], deadline: float) -> tuple[bool, str | None]:
        """Ask Make to approve; any answer but an explicit refusal in time approves (the local rules passed).
        A refusal comes with Make's `error_message` when it is fit to show (see `refusal_text`), else None."""
        assert self._make_check is not None
        event = pre_checkout_event(query)
        outcome = self._make_check.deliver(event["event_id"], event)
        if time.monotonic() > deadline - 1.0:
            log.warning("Make's pre-checkout answer came too late; using the local decision")
            return True, None
        ok, message = checkout_answer(outcome)
        if not ok and message is None and isinstance(outcome, Delivered) and isinstance(outcome.body, dict) \
                and outcome.body.get("error_message") is not None:
            log.warning("pre-checkout %s: Make's error_message is not fit to show (empty, too long or "
                        "unprintable); refused with TEXT_PAYMENT_REFUSED", query["id"])
        return ok, message
