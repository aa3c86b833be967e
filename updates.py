"""What an update is: its kind, whether it is an ordinary user message, and the message's summary.

Pure functions over the parsed JSON, written for hostile input: any field may be missing or of the
wrong type, and nothing here raises on that.
"""

from __future__ import annotations

from typing import Any

# Checked in this order: an animation also carries `document`, a venue also carries `location`.
MESSAGE_TYPES = (
    "text", "photo", "video", "voice", "audio", "animation", "document", "sticker", "video_note",
    "contact", "venue", "location", "poll", "dice",
)
# User content that has no type of its own in the contract.
_OTHER_CONTENT = ("story", "game", "paid_media", "web_app_data", "giveaway", "giveaway_winners", "checklist")
_OBJECT_TYPES = ("contact", "venue", "location", "poll", "dice")
PAYMENT_FIELDS = ("successful_payment", "refunded_payment")


def update_kind(update: dict[str, Any]) -> str:
    """The update's kind: the name of its one field besides `update_id` (`unknown` if none)."""
    for key in update:
        if key != "update_id":
            return key
    return "unknown"


def is_int(value: Any) -> bool:
    """True for a JSON integer that fits in 64 bits, as every Telegram id and amount does (booleans are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63


def message_type(message: dict[str, Any]) -> str | None:
    """The contract's `type` of a message with user content, or None for a service message."""
    for name in MESSAGE_TYPES:
        if message.get(name) is not None:
            return name
    if any(message.get(name) is not None for name in _OTHER_CONTENT):
        return "other"
    return None


def is_ordinary_message(update: dict[str, Any]) -> bool:
    """True when the update is a `message` from a human in a private chat or group, with content."""
    message = update.get("message")
    if not isinstance(message, dict):
        return False
    sender, chat = message.get("from"), message.get("chat")
    if not isinstance(sender, dict) or not is_int(sender.get("id")) or sender.get("is_bot") is True:
        return False
    if not isinstance(chat, dict) or not is_int(chat.get("id")):
        return False
    if chat.get("type", "private") not in ("private", "group", "supergroup"):
        return False
    if message.get("is_automatic_forward") is True:  # a channel post echoed into its discussion group
        return False
    return message_type(message) is not None


def is_payment_message(update: dict[str, Any]) -> bool:
    """True when the update is a message carrying `successful_payment` or `refunded_payment`."""
    message = update.get("message")
    return isinstance(message, dict) and any(isinstance(message.get(f), dict) for f in PAYMENT_FIELDS)


def user_summary(sender: Any) -> dict[str, Any] | None:
    """The contract's `user` object from a Telegram `User`."""
    if not isinstance(sender, dict):
        return None
    return {key: sender.get(key) for key in ("id", "username", "first_name", "last_name", "language_code")}


def message_item(update_id: int, message: dict[str, Any]) -> dict[str, Any]:
    """One entry of a batch's `messages`: ids, date, type, and the content a scenario needs."""
    kind = message_type(message) or "other"
    item: dict[str, Any] = {
        "update_id": update_id,
        "message_id": message.get("message_id"),
        "date": message.get("date"),
        "type": kind,
    }
    if kind == "text":
        item["text"] = _str_or_none(message.get("text"))
    else:
        item["caption"] = _str_or_none(message.get("caption"))
        item["file_id"] = _file_id(message.get(kind))
        item["media_group_id"] = _str_or_none(message.get("media_group_id"))
        if kind in _OBJECT_TYPES and isinstance(message.get(kind), dict):
            item[kind] = message[kind]
    reply = message.get("reply_to_message")
    if isinstance(reply, dict) and is_int(reply.get("message_id")):
        item["reply_to_message_id"] = reply["message_id"]
    return item


def batch_text(items: list[dict[str, Any]]) -> str:
    """The texts and captions of a batch, joined with newlines, in arrival order."""
    parts = [item.get("text") or item.get("caption") for item in items]
    return "\n".join(p for p in parts if isinstance(p, str) and p)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _file_id(content: Any) -> str | None:
    if isinstance(content, list):  # photo: sizes from small to large; the largest is last
        content = content[-1] if content else None
    if isinstance(content, dict) and isinstance(content.get("file_id"), str):
        return content["file_id"]
    return None
