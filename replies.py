"""Replies: what Make's answer or `POST /reply` asks to send, read into Bot API calls (text split at
Telegram's limit, formatting as entities, buttons, a photo or document), and the outcomes of `/reply` parts."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from formatting import (CAPTION_LIMIT, FORMATS, PARSE_MODES, TEXT_LIMIT, Entity, clean_text, head, split_entities,
                        to_entities, trim)

MAX_REPLY_CHARS = 32768  # eight full Telegram messages; more is almost certainly a scenario's mistake
MAX_REPLY_MESSAGES = 20  # messages one answer from Make may send: a list of 100,000 "a" is a mistake too
MAX_SOURCE_CHARS = 4 * MAX_REPLY_CHARS  # a reply's source with its markup; the rest is cut before it is read
REPLY_METHODS = ("sendMessage", "sendPhoto", "sendDocument")  # the calls that answer a user


def clean_json(value: Any) -> Any:
    """`value` (parsed JSON, e.g. a `reply_markup`) with `clean_text` applied to every string in it."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [clean_json(item) for item in value]
    if isinstance(value, dict):
        return {clean_text(key): clean_json(item) for key, item in value.items()}
    return value


class ReplyError(ValueError):
    """A reply that cannot be sent as given; the message says why."""


@dataclass(frozen=True)
class Reply:
    """One reply as Telegram will show it: visible text and its entities, and what goes with it."""

    text: str
    entities: list[Entity]
    reply_markup: dict[str, Any] | None = None
    link_preview: bool | None = None
    media: str | None = None  # "photo" or "document"
    file: str = ""  # the photo's or document's URL or file_id
    ignored: tuple[str, ...] = ()  # fields of the item that mean nothing here (a typo, most likely)
    more_text: str = ""  # a photo's or document's `text` beside its `caption`: sent after it as a message
    more_entities: list[Entity] = field(default_factory=list)


def read_reply(item: Any, default_format: str = "plain") -> Reply:
    """A reply from Make's answer or `POST /reply`: a string (read in `default_format`), or an object with
    `text`, `format` or `parse_mode`, `reply_markup`, `link_preview`, or a `photo`/`document` with a
    `caption` (and a `text` sent after it). Raises `ReplyError` for one that cannot be sent."""
    if isinstance(item, str):
        item = {"text": item}
    elif not isinstance(item, dict):
        raise ReplyError(f"a reply must be a string or an object, not {type(item).__name__}")
    if "chat_id" in item:
        raise ReplyError("a reply goes to the event's chat and has no chat_id (POST /reply writes to any chat)")
    fmt = _format_of(item, default_format)
    for name in ("text", "caption"):
        if item.get(name) is not None and not isinstance(item[name], str):
            raise ReplyError(f"{name} must be a string")
    media = [name for name in ("photo", "document") if item.get(name) is not None]
    if len(media) > 1:
        raise ReplyError("a reply has a photo or a document, not both")
    if media:
        file = item[media[0]]
        if not isinstance(file, str) or not file.strip():
            raise ReplyError(f"{media[0]} must be a URL or a file_id")
        source, more = item.get("caption") or "", item.get("text") or ""
        if not source:  # without a caption, the text is the caption; beside one, it follows the file
            source, more = more, ""
    else:
        file, source, more = "", item.get("text"), ""
        if not isinstance(source, str) or not source.strip():
            raise ReplyError("text must be a non-empty string")
    markup = item.get("reply_markup")
    if markup is not None and not _is_markup(markup):
        raise ReplyError("reply_markup must be an object with inline_keyboard or keyboard (lists of rows of "
                         "buttons), remove_keyboard or force_reply")
    try:
        markup = clean_json(markup)
        json.dumps(markup, allow_nan=False)
    except RecursionError:
        raise ReplyError("reply_markup is nested too deep") from None
    except ValueError:
        raise ReplyError("reply_markup holds a number JSON cannot carry (NaN, Infinity)") from None
    preview = item.get("link_preview")
    if preview is not None and not isinstance(preview, bool):
        raise ReplyError("link_preview must be true or false")
    text, entities = to_entities(source[:MAX_SOURCE_CHARS], fmt)  # lone surrogates cleaned there
    if not media and not text.strip():
        raise ReplyError(f"text is empty once read as {fmt}")
    more_text, more_entities = to_entities(more[:MAX_SOURCE_CHARS], fmt) if more.strip() else ("", [])
    ignored = tuple(sorted(str(key) for key in item if key not in _REPLY_FIELDS))
    return Reply(text, entities, markup, preview, media[0] if media else None, clean_text(file.strip()), ignored,
                 more_text, more_entities)


def source_size(item: Any) -> int:
    """Characters of text and caption a reply item holds: what reading it costs."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, dict):
        return sum(len(item[name]) for name in ("text", "caption") if isinstance(item.get(name), str))
    return 0


_REPLY_FIELDS = {"text", "format", "parse_mode", "reply_markup", "link_preview", "photo", "document", "caption"}


def _format_of(item: dict[str, Any], default_format: str) -> str:
    fmt, parse_mode = item.get("format"), item.get("parse_mode")
    if fmt is not None and parse_mode is not None:
        raise ReplyError("give format or parse_mode, not both")
    if parse_mode is not None:
        if not isinstance(parse_mode, str) or parse_mode.strip().lower() not in PARSE_MODES:
            raise ReplyError("parse_mode must be HTML or MarkdownV2 (for Markdown as models write it, use "
                             "format: markdown)")
        return PARSE_MODES[parse_mode.strip().lower()]
    if fmt is not None and (not isinstance(fmt, str) or fmt not in FORMATS):
        raise ReplyError(f"format must be one of {', '.join(FORMATS)}")
    return fmt or default_format


def _is_markup(markup: Any) -> bool:
    """Whether `markup` has the shape of one of Telegram's reply markups: each of `inline_keyboard` and
    `keyboard` it has a list of rows of button objects, `remove_keyboard` and `force_reply` true, and at
    least one of them (the buttons' own fields are Telegram's to check)."""
    if not isinstance(markup, dict) or not any(name in markup for name in _MARKUPS):
        return False
    for name in (name for name in _MARKUPS if name in markup):
        value = markup[name]
        if name in ("inline_keyboard", "keyboard"):
            if not (isinstance(value, list) and value
                    and all(isinstance(row, list) and all(isinstance(b, dict) for b in row) for row in value)):
                return False
        elif value is not True:
            return False
    return True


_MARKUPS = ("inline_keyboard", "keyboard", "remove_keyboard", "force_reply")


def message_calls(reply: Reply, chat_id: int) -> list[tuple[str, dict[str, Any]]]:
    """The Bot API calls that show `reply` in `chat_id`: its text split at Telegram's limit, or its photo or
    document with its caption (one too long for a caption follows it as text, as does a `text` beside the
    caption); the buttons go on the last call. At most `MAX_REPLY_CHARS` of each text are sent."""
    calls: list[tuple[str, dict[str, Any]]] = []
    texts: list[tuple[str, list[Entity]]] = []  # what goes as messages, in order
    if reply.media:
        method = "sendPhoto" if reply.media == "photo" else "sendDocument"
        params: dict[str, Any] = {"chat_id": chat_id, reply.media: reply.file}
        caption = _parts(*head(reply.text, reply.entities, MAX_REPLY_CHARS), CAPTION_LIMIT)
        if len(caption) == 1:
            params["caption"] = caption[0][0]
            if caption[0][1]:
                params["caption_entities"] = caption[0][1]
        elif caption:
            texts.append((reply.text, reply.entities))
        calls.append((method, params))
        texts.append((reply.more_text, reply.more_entities))
    else:
        texts.append((reply.text, reply.entities))
    for text, entities in texts:
        for part, part_entities in _parts(*head(text, entities, MAX_REPLY_CHARS), TEXT_LIMIT):
            params = {"chat_id": chat_id, "text": part}
            if part_entities:
                params["entities"] = part_entities
            if reply.link_preview is not None:
                params["link_preview_options"] = {"is_disabled": not reply.link_preview}
            calls.append(("sendMessage", params))
    if reply.reply_markup is not None and calls:
        calls[-1][1]["reply_markup"] = reply.reply_markup
    return calls


def _parts(text: str, entities: list[Entity], limit: int) -> list[tuple[str, list[Entity]]]:
    """`text` split at `limit`, each part without trailing whitespace; blank parts (Telegram refuses them) left out."""
    parts = (trim(*part) for part in split_entities(text, entities, limit))
    return [part for part in parts if part[0].strip()]


def bare(params: dict[str, Any]) -> dict[str, Any] | None:
    """`params` of a reply without its formatting, link preview options and buttons (what Telegram may refuse
    in it), or None when it has none of them."""
    kept = {key: value for key, value in params.items() if key not in _DRESSING}
    return kept if len(kept) < len(params) else None


_DRESSING = ("entities", "caption_entities", "parse_mode", "reply_markup", "link_preview_options")


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part of a `POST /reply`: `sent` (with its `message_id`), `refused` (for its content),
    `unreachable` (the user blocked the bot, the chat is gone), `postponed` (flood control or a network error:
    it waits in the outbox) or `unconfirmed` (its answer was lost; not sent again, so never twice)."""

    kind: str
    message_id: int | None = None
    description: str = ""
    fallback: str = ""  # why it was sent without its formatting and buttons (Telegram refused them), if it was


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
