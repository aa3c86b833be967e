"""Reply texts: cleaned of broken Unicode, split at Telegram's limit; and the outcomes of `POST /reply` parts."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

TEXT_LIMIT = 4096  # Telegram's limit, counted here in UTF-16 code units (an emoji can be two)
# json.loads joins an escaped surrogate pair into one character, so any surrogate left in a str is lone.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_REPLY_CHARS = 32768  # eight full Telegram messages; more is almost certainly a scenario's mistake
MAX_REPLY_MESSAGES = 20  # messages one answer from Make may send: a list of 100,000 "a" is a mistake too


def clean_text(text: str) -> str:
    """`text` with each lone surrogate (half an emoji, not encodable as UTF-8) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def clean_json(value: Any) -> Any:
    """`value` (parsed JSON, e.g. a `reply_markup`) with `clean_text` applied to every string in it."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_json(item) for item in value]
    if isinstance(value, dict):
        return {clean_text(key): clean_json(item) for key, item in value.items()}
    return value


def utf16_len(text: str) -> int:
    """Length of `text` in UTF-16 code units, as Telegram counts it (a lone surrogate counts as one)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


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


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part of a `POST /reply`: `sent` (with its `message_id`), `refused` (for its content),
    `unreachable` (the user blocked the bot, the chat is gone), `postponed` (flood control or a network error:
    it waits in the outbox) or `unconfirmed` (its answer was lost; not sent again, so never twice)."""

    kind: str
    message_id: int | None = None
    description: str = ""


class ReplyResults:
    """Passes what the Telegram outbox did with each `/reply` part to the request waiting for it."""

    def __init__(self) -> None:
        # _cond guards _waiting: event id -> the outcomes of the request that waits for it.
        self._cond = threading.Condition()
        self._waiting: dict[str, dict[str, PartOutcome]] = {}

    def expect(self, event_ids: list[str]) -> dict[str, PartOutcome]:
        """Register a request's parts before they are queued; pass the returned dict to `wait`."""
        outcomes: dict[str, PartOutcome] = {}
        with self._cond:
            for event_id in event_ids:
                self._waiting[event_id] = outcomes
        return outcomes

    def report(self, event_id: str, outcome: PartOutcome) -> bool:
        """Hand `outcome` to the request waiting for `event_id`; False when none waits (it answered already)."""
        with self._cond:
            outcomes = self._waiting.get(event_id)
            if outcomes is None:
                return False
            outcomes[event_id] = outcome
            self._cond.notify_all()
            return True

    def wait(self, event_ids: list[str], outcomes: dict[str, PartOutcome], timeout: float) -> dict[str, PartOutcome]:
        """Wait until every part is settled, or one is postponed (the rest wait behind it), or `timeout`;
        then stop waiting for them and return what is known. A report after this goes to nobody."""
        def settled() -> bool:
            return len(outcomes) == len(event_ids) or any(o.kind == "postponed" for o in outcomes.values())

        with self._cond:
            self._cond.wait_for(settled, timeout)
            for event_id in event_ids:
                self._waiting.pop(event_id, None)
            return dict(outcomes)
