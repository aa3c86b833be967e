"""Sends answers to a chat: split at Telegram's limit, typing stopped once the answer is out."""

from __future__ import annotations

import logging
from typing import Any

from telegram_api import TelegramClient
from typing_keepalive import TypingKeepAlive

log = logging.getLogger("gateway.replies")

TEXT_LIMIT = 4096  # Telegram's limit, counted here in UTF-16 code units (an emoji can be two)


def utf16_len(text: str) -> int:
    """Length of `text` in UTF-16 code units, as Telegram counts it."""
    return len(text.encode("utf-16-le")) // 2


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Split `text` into parts of at most `limit` UTF-16 units, preferring a newline, then a space."""
    parts: list[str] = []
    while utf16_len(text) > limit:
        cut = _prefix_fitting(text, limit)
        for sep in ("\n", " "):
            at = text.rfind(sep, 0, cut)
            if at > cut // 2:  # a separator in the first half would leave tiny parts
                cut = at + 1
                break
        parts.append(text[:cut].rstrip("\n") or text[:cut])
        text = text[cut:]
    if text or not parts:
        parts.append(text)
    # A cut just before trailing blanks would leave a part Telegram refuses ("message text is empty").
    return [p for p in parts if p.strip()] or parts[:1]


def _prefix_fitting(text: str, limit: int) -> int:
    """The longest prefix length (in characters) whose UTF-16 length is at most `limit`."""
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)


class ReplySender:
    """Sends texts to chats and stops the typing status there."""

    def __init__(self, client: TelegramClient, typing: TypingKeepAlive) -> None:
        self._client = client
        self._typing = typing

    def send(self, chat_id: int, text: str, parse_mode: str | None = None,
             reply_markup: dict[str, Any] | None = None) -> list[int]:
        """Send `text` (split if long; `reply_markup` on the last part); return the sent message ids.

        Typing stops first, since the first part clears it in the client anyway; a `TelegramError`
        from any part propagates after the parts before it were sent."""
        self._typing.stop(chat_id)
        message_ids: list[int] = []
        parts = split_text(text)
        for index, part in enumerate(parts):
            extra: dict[str, Any] = {}
            if parse_mode:
                extra["parse_mode"] = parse_mode
            if reply_markup is not None and index == len(parts) - 1:
                extra["reply_markup"] = reply_markup
            sent = self._client.send_message(chat_id, part, **extra)
            if isinstance(sent, dict) and isinstance(sent.get("message_id"), int):
                message_ids.append(sent["message_id"])
        return message_ids
