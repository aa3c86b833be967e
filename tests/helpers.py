"""Builders for Telegram updates used across the tests."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable

from doubles import Service, TelegramDouble

_ids = itertools.count(5000)


def next_update_id() -> int:
    """A fresh update id."""
    return next(_ids)


def text_update(text: str, user_id: int = 42, chat_id: int | None = None, update_id: int | None = None,
                **user: Any) -> dict[str, Any]:
    """A private-chat text message update from a human user."""
    update_id = next_update_id() if update_id is None else update_id
    sender = {"id": user_id, "is_bot": False, "first_name": user.get("first_name", f"User{user_id}"),
              "username": user.get("username", f"user{user_id}"), "language_code": "ru"}
    chat = {"id": chat_id if chat_id is not None else user_id, "type": "private" if chat_id is None else "group"}
    return {"update_id": update_id, "message": {"message_id": update_id, "date": int(time.time()),
                                                "from": sender, "chat": chat, "text": text}}


def pre_checkout_update(query_id: str, payload: str, user_id: int = 42, currency: str = "RUB",
                        total_amount: int = 150000) -> dict[str, Any]:
    """A pre_checkout_query update."""
    return {"update_id": next_update_id(), "pre_checkout_query": {
        "id": query_id, "from": {"id": user_id, "is_bot": False, "first_name": "Buyer"}, "currency": currency,
        "total_amount": total_amount, "invoice_payload": payload}}


def payment_update(charge_id: str, payload: str, user_id: int = 42, currency: str = "RUB",
                   total_amount: int = 150000, order_info: dict[str, Any] | None = None,
                   first_name: str = "Buyer") -> dict[str, Any]:
    """A message carrying successful_payment."""
    payment: dict[str, Any] = {"currency": currency, "total_amount": total_amount, "invoice_payload": payload,
                               "telegram_payment_charge_id": charge_id,
                               "provider_payment_charge_id": f"prov-{charge_id}"}
    if order_info is not None:
        payment["order_info"] = order_info
    update_id = next_update_id()
    return {"update_id": update_id, "message": {
        "message_id": update_id, "date": int(time.time()), "chat": {"id": user_id, "type": "private"},
        "from": {"id": user_id, "is_bot": False, "first_name": first_name, "username": "buyer"},
        "successful_payment": payment}}


def callback_update(query_id: str, data: str = "buy", user_id: int = 42, chat_id: int | None = None) -> dict[str, Any]:
    """A press on an inline button under a bot message in the user's chat."""
    update_id = next_update_id()
    chat = {"id": chat_id if chat_id is not None else user_id, "type": "private" if chat_id is None else "group"}
    return {"update_id": update_id, "callback_query": {
        "id": query_id, "from": {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"},
        "chat_instance": f"ci-{user_id}", "data": data,
        "message": {"message_id": 1, "date": int(time.time()), "chat": chat, "text": "menu"}}}


def deliver(service: Service, telegram: TelegramDouble, mode: str, update: dict[str, Any]) -> None:
    """Hand one update to the service the way `mode` does: queued for getUpdates, or posted to the webhook."""
    if mode == "polling":
        telegram.push_update(update)
    else:
        from config import derive_webhook_secret
        from doubles import TOKEN
        response = service.post("/webhook", json=update,
                                headers={"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)})
        assert response.status_code == 200, response.text


def start_in_mode(start_service: Callable[..., Service], mode: str, **env: str) -> Service:
    """Start the service in `mode` (polling, or webhook with a WEBHOOK_URL)."""
    if mode == "webhook":
        env.setdefault("WEBHOOK_URL", "https://gateway.example.test/webhook")
    return start_service(**env)
