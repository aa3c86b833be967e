"""Builders for Telegram updates used across the tests."""

from __future__ import annotations

import itertools
import time
from typing import Any

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
