"""`python app.py send-sample [--all]`: sample events, built by the gateway's own code, posted to Make.

Make's Custom webhook learns its data structure from the first request it gets ("Redetermine data
structure"): the first sample, a `message_batch`, carries exactly the fields the gateway sends in one, so
they are mappable at once; `--all` then shows what the scenario answers to every type.
Each is marked `"sample": true` and has a new event id, so a scenario that drops repeats still takes it.
"""

from __future__ import annotations

import secrets
import sys
import time

from batching import build_batch_event
from config import Config
from delivery import answer_calls
from make_client import Delivered, MakeClient, RetryLater
from payments import checkout_answer, payment_event, pre_checkout_event, refund_event
from replies import REPLY_METHODS
from router import forward_event
from store import BatchRow, NewEvent, OutboxRow
from updates import message_item, user_summary


def sample_events(now: float) -> list[NewEvent]:
    """One event of each type the gateway posts to Make, built by the gateway's own code from realistic
    updates, each marked `"sample": true`; the message_batch first. Ids are new on every call, so a scenario
    that drops repeated event ids still takes them."""
    run = secrets.token_hex(4)
    update_id = 700000000 + secrets.randbelow(100000000)
    date = int(now)
    user = {"id": 512345678, "is_bot": False, "first_name": "Anna", "last_name": "Petrova", "username": "anna_p",
            "language_code": "ru"}
    chat = {"id": user["id"], "first_name": "Anna", "last_name": "Petrova", "username": "anna_p", "type": "private"}
    text = {"message_id": 2041, "from": user, "chat": chat, "date": date - 3,
            "text": "Hi! The lamp I ordered last week arrived broken"}
    photo = {"message_id": 2042, "from": user, "chat": chat, "date": date, "caption": "this is how it looks",
             "photo": [{"file_id": "AgACAgIAAxkBAAIH-sample-small", "file_unique_id": "AQADsmall", "file_size": 1480,
                        "width": 90, "height": 67},
                       {"file_id": "AgACAgIAAxkBAAIH-sample-large", "file_unique_id": "AQADlarge",
                        "file_size": 98321, "width": 1280, "height": 960}],
             "reply_to_message": {"message_id": 2041, "from": user, "chat": chat, "date": date - 3}}
    items = [message_item(update_id, text), message_item(update_id + 1, photo)]
    batch = BatchRow(f"sample-{run}", chat["id"], user["id"], user_summary(user), now - 3, now, len(items), items)
    bot = {"id": 7000000001, "is_bot": True, "first_name": "Shop bot", "username": "shop_bot"}
    press = {"update_id": update_id + 2, "callback_query": {
        "id": f"sample-{run}", "from": user, "chat_instance": "-4583929210093", "data": "refund:order-1042",
        "message": {"message_id": 2043, "from": bot, "chat": chat, "date": date, "text": "Would you like a refund?",
                    "reply_markup": {"inline_keyboard": [[{"text": "Yes, refund", "callback_data": "refund:order-1042"},
                                                          {"text": "No", "callback_data": "keep:order-1042"}]]}}}}
    paid = {"message_id": 2044, "from": user, "chat": chat, "date": date, "successful_payment": {
        "currency": "RUB", "total_amount": 149000, "invoice_payload": "order-1042",
        "telegram_payment_charge_id": f"sample-{run}", "provider_payment_charge_id": f"sample-provider-{run}",
        "order_info": {"name": "Anna Petrova", "phone_number": "+79991234567", "email": "anna@example.com"}}}
    refunded = {"message_id": 2045, "from": user, "chat": chat, "date": date, "refunded_payment": {
        "currency": "XTR", "total_amount": 50, "invoice_payload": "stars-pack-50",
        "telegram_payment_charge_id": f"sample-stars-{run}"}}
    checkout = {"id": f"sample-{run}", "from": user, "currency": "RUB", "total_amount": 149000,
                "invoice_payload": "order-1043", "order_info": {"name": "Anna Petrova"}}
    events = [build_batch_event(batch, "quiet"), forward_event(press["update_id"], "callback_query", press)]
    for kind, payload in (("payment", payment_event(paid, duplicate=False)),
                          ("payment_refunded", refund_event(refunded)), ("pre_checkout", pre_checkout_event(checkout))):
        events.append(NewEvent(payload["event_id"], f"chat:{chat['id']}", kind, payload))
    return [NewEvent(e.event_id, e.order_key, e.event_type, {**e.payload, "sample": True}) for e in events]


def describe_answer(event: NewEvent, outcome: Delivered, reply_format: str) -> str:
    """What the gateway would do with Make's answer to `event`, read by the same code the gateway uses."""
    if event.event_type == "pre_checkout":
        ok, text = checkout_answer(outcome)
        if ok:
            return "the checkout would be approved"
        return f"the checkout would be refused with {text!r}" if text else \
            "the checkout would be refused with TEXT_PAYMENT_REFUSED"
    if outcome.problem:
        return f"no reply would be sent: its answer {outcome.problem}"
    row = OutboxRow(0, event.event_id, event.order_key, event.event_type, event.payload, time.time(), 1, None)
    calls = answer_calls(row, outcome, reply_format)
    messages = sum(1 for call in calls if call.event_type in REPLY_METHODS)
    said = []
    if messages:
        said.append(f"its answer holds a reply: the gateway would send {messages} message(s)")
    elif outcome.replies:
        said.append("its answer holds a reply that cannot be sent (see the warnings above)")
    if any(call.event_type == "answerCallbackQuery" for call in calls):
        said.append("its callback_answer would answer the button")
    return "; ".join(said) if said else "no reply in its answer (the gateway would send nothing)"


def send_samples(config: Config, every_type: bool) -> int:
    """`send-sample`: post sample events to MAKE_WEBHOOK_URL as the gateway would, one line each saying what
    Make answered; 1 (one line) if Make did not take one."""
    events = sample_events(time.time())
    make = MakeClient(config.make_webhook_url, timeout=config.make_timeout_seconds, max_connections=1)
    try:
        for event in events if every_type else events[:1]:
            outcome = make.deliver(event.event_id, event.payload)
            if isinstance(outcome, RetryLater) and _sent_unanswered(outcome):
                print(f"error: Make did not answer the sample {event.event_type} event within "
                      f"MAKE_TIMEOUT_SECONDS={config.make_timeout_seconds:g}: it may have received it anyway (see "
                      "the scenario's History in Make)", file=sys.stderr)
                return 1
            if isinstance(outcome, RetryLater):
                print(f"error: Make did not take the sample {event.event_type} event: {outcome.reason}",
                      file=sys.stderr)
                return 1
            print(f"{event.event_type}: Make answered HTTP {outcome.status}; "
                  f"{describe_answer(event, outcome, config.reply_format)}")
    finally:
        make.close()
    return 0


def _sent_unanswered(outcome: RetryLater) -> bool:
    """Whether Make may have the event although it did not answer: the request went out, then time ran out (a
    connect or pool timeout means it never left)."""
    return outcome.reason.startswith("timed out") and not any(
        kind in outcome.reason for kind in ("ConnectTimeout", "PoolTimeout"))
