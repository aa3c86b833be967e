"""updates.py: an update's kind, whether it is an ordinary user message, and the contract's message summary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from updates import (
    batch_text,
    is_ordinary_message,
    is_payment_message,
    message_item,
    message_type,
    update_kind,
)

HUMAN = {"id": 42, "is_bot": False, "first_name": "Alice", "username": "alice", "language_code": "ru"}
PRIVATE = {"id": 42, "type": "private", "first_name": "Alice"}


def message(**content: Any) -> dict[str, Any]:
    """A private message from a human carrying `content`."""
    return {"message_id": 7, "date": 1763900000, "from": dict(HUMAN), "chat": dict(PRIVATE), **content}


def update(msg: dict[str, Any], update_id: int = 1001) -> dict[str, Any]:
    """A `message` update around `msg`."""
    return {"update_id": update_id, "message": msg}


PHOTO_SIZES = [
    {"file_id": "small", "file_unique_id": "s", "width": 90, "height": 51, "file_size": 1502},
    {"file_id": "medium", "file_unique_id": "m", "width": 320, "height": 180, "file_size": 20747},
    {"file_id": "large", "file_unique_id": "l", "width": 1280, "height": 720, "file_size": 85340},
]
LOCATION = {"latitude": 55.75, "longitude": 37.61}

# (contract type, message content, expected file_id or None)
CONTENT = [
    ("text", {"text": "hi"}, None),
    ("photo", {"photo": PHOTO_SIZES, "caption": "look"}, "large"),
    ("video", {"video": {"file_id": "vid", "duration": 3, "width": 1, "height": 1}}, "vid"),
    ("voice", {"voice": {"file_id": "vox", "duration": 2}}, "vox"),
    ("audio", {"audio": {"file_id": "aud", "duration": 200, "title": "song"}}, "aud"),
    ("document", {"document": {"file_id": "doc", "file_name": "a.pdf"}}, "doc"),
    ("sticker", {"sticker": {"file_id": "stk", "type": "regular", "width": 512, "height": 512}}, "stk"),
    # Telegram sends an animation with a `document` too; the animation is what it is.
    ("animation", {"animation": {"file_id": "gif", "duration": 1}, "document": {"file_id": "gif-doc"}}, "gif"),
    ("video_note", {"video_note": {"file_id": "circle", "length": 384, "duration": 3}}, "circle"),
    ("contact", {"contact": {"phone_number": "+70000000000", "first_name": "Bob"}}, None),
    # Telegram sends a venue with a `location` too; the venue is what it is.
    ("venue", {"venue": {"location": LOCATION, "title": "Cafe", "address": "Main st 1"}, "location": LOCATION},
     None),
    ("location", {"location": LOCATION}, None),
    ("poll", {"poll": {"id": "p1", "question": "Why?", "options": [], "is_anonymous": True}}, None),
    ("dice", {"dice": {"emoji": "🎲", "value": 4}}, None),
    ("other", {"story": {"chat": PRIVATE, "id": 3}}, None),
]


@pytest.mark.parametrize("expected,content,file_id", CONTENT, ids=[c[0] for c in CONTENT])
def test_message_type_names_every_contract_type(expected: str, content: dict, file_id: str | None) -> None:
    """Each kind of user content gets the contract's `type`, and the message counts as ordinary."""
    msg = message(**content)
    assert message_type(msg) == expected
    assert is_ordinary_message(update(msg))


@pytest.mark.parametrize("expected,content,file_id", CONTENT, ids=[c[0] for c in CONTENT])
def test_message_item_carries_the_content_a_scenario_needs(expected: str, content: dict,
                                                           file_id: str | None) -> None:
    """The batch entry has the ids, date and type, and the text, or the caption, file_id and shared objects."""
    msg = message(**content)
    item = message_item(1001, msg)
    assert item["update_id"] == 1001
    assert item["message_id"] == msg["message_id"]
    assert item["date"] == msg["date"]
    assert item["type"] == expected
    json.dumps(item)  # it goes to Make as JSON
    if expected == "text":
        assert item["text"] == content["text"]
        return
    assert item["caption"] == content.get("caption")
    assert item["file_id"] == file_id
    assert item["media_group_id"] is None
    if expected in ("contact", "venue", "location", "poll", "dice"):
        assert item[expected] == content[expected]


def test_photo_file_id_is_the_largest_size() -> None:
    """Of a photo's sizes (Telegram lists them small to large) the largest one's file_id is used."""
    largest = max(PHOTO_SIZES, key=lambda size: size["width"] * size["height"])
    assert message_item(1, message(photo=PHOTO_SIZES))["file_id"] == largest["file_id"]


def test_album_item_keeps_media_group_id_and_reply() -> None:
    """An album photo keeps its `media_group_id`, and a reply names the message it answers."""
    msg = message(photo=PHOTO_SIZES, media_group_id="1407069695", reply_to_message={"message_id": 5, "date": 1})
    item = message_item(9, msg)
    assert item["media_group_id"] == "1407069695"
    assert item["reply_to_message_id"] == 5


def test_service_message_has_no_type() -> None:
    """A message with no user content (a member joined) has no contract type."""
    assert message_type(message(new_chat_members=[{"id": 1, "is_bot": True, "first_name": "Bot"}])) is None
    assert message_type(message(pinned_message={"message_id": 1, "date": 0})) is None


def test_ordinary_message_from_a_human_in_private_and_groups() -> None:
    """A text from a human counts as ordinary in a private chat, a group and a supergroup."""
    for chat_type in ("private", "group", "supergroup"):
        msg = message(text="hi", chat={"id": -100, "type": chat_type, "title": "t"})
        assert is_ordinary_message(update(msg)), chat_type


def test_sender_without_is_bot_is_a_human() -> None:
    """The old update format has no `is_bot`; such a sender counts as a human."""
    sender = {k: v for k, v in HUMAN.items() if k != "is_bot"}
    assert is_ordinary_message(update(message(text="hi", **{"from": sender})))


@pytest.mark.parametrize("why,msg", [
    ("bot sender", message(text="hi", **{"from": {"id": 7, "is_bot": True, "first_name": "Bot"}})),
    ("missing from", {k: v for k, v in message(text="hi").items() if k != "from"}),
    ("from without id", message(text="hi", **{"from": {"first_name": "x"}})),
    ("channel chat", message(text="hi", chat={"id": -1001, "type": "channel", "title": "News"})),
    ("missing chat", {k: v for k, v in message(text="hi").items() if k != "chat"}),
    ("service message", message(new_chat_title="New name")),
    ("not an object", "hello"),
])
def test_not_an_ordinary_message(why: str, msg: Any) -> None:
    """Bots, channels, service messages and malformed messages are not ordinary user messages."""
    assert not is_ordinary_message(update(msg)), why


def test_other_update_kinds_are_not_ordinary_messages() -> None:
    """An edited message or a channel post is not an ordinary message, whatever it contains."""
    assert not is_ordinary_message({"update_id": 1, "edited_message": message(text="hi")})
    assert not is_ordinary_message({"update_id": 1, "channel_post": message(text="hi")})


def test_update_kind_is_the_field_besides_update_id() -> None:
    """The kind is the update's one field besides `update_id`, whatever its position; none gives `unknown`."""
    assert update_kind({"update_id": 1, "callback_query": {}}) == "callback_query"
    assert update_kind({"poll_answer": {}, "update_id": 1}) == "poll_answer"
    assert update_kind({"update_id": 1}) == "unknown"


def test_batch_text_joins_texts_and_captions_in_order() -> None:
    """The batch text is every text and caption, in arrival order, one per line; captionless media add nothing."""
    items = [
        message_item(1, message(text="hi")),
        message_item(2, message(sticker={"file_id": "stk"})),
        message_item(3, message(photo=PHOTO_SIZES, caption="this one")),
        message_item(4, message(text="")),
        message_item(5, message(text="a refund")),
    ]
    assert batch_text(items) == "hi\nthis one\na refund"
    assert batch_text([]) == ""


@pytest.mark.parametrize("msg", [
    {"photo": "not a list"},
    {"photo": []},
    {"photo": [None, 3]},
    {"text": 5},
    {"document": {"file_id": 12}},
    {"caption": ["x"], "video": {}},
    {"reply_to_message": "x", "text": "hi"},
    {"location": None, "contact": 1},
    {},
])
def test_hostile_messages_never_raise(msg: dict) -> None:
    """Fields of the wrong type give None values, never an exception."""
    item = message_item(1, msg)
    assert item["type"] in ("text", "photo", "video", "voice", "audio", "document", "sticker", "animation",
                            "video_note", "contact", "location", "venue", "poll", "dice", "other")
    batch_text([item])
    is_ordinary_message({"update_id": 1, "message": msg})


# The real updates in tests/data


def test_every_real_update_is_handled_without_raising(samples: list[dict]) -> None:
    """All 80 real updates get a kind and a classification, and any message in them a JSON-ready summary."""
    assert len(samples) == 80
    for sample in samples:
        upd = sample["update"]
        kind = update_kind(upd)
        assert isinstance(kind, str) and kind != "update_id", sample["kind"]
        assert isinstance(is_ordinary_message(upd), bool), sample["kind"]
        assert isinstance(is_payment_message(upd), bool), sample["kind"]
        inner = upd.get(kind)
        if isinstance(inner, dict):
            message_type(inner)
            item = message_item(upd["update_id"], inner)
            json.dumps(item)
            batch_text([item])


def _sample(samples: list[dict], kind: str) -> dict[str, Any]:
    found = [s["update"] for s in samples if s["kind"] == kind]
    assert found, f"no sample of kind {kind!r} in tests/data/telegram_updates.json"
    return found[0]


@pytest.mark.parametrize("kind,expected_type", [
    ("private_text", "text"),
    ("bot_command_legacy_doc_example", "text"),  # old format: no is_bot, no chat.type
    ("group_message", "text"),
    ("supergroup_message", "text"),
    ("photo_caption", "photo"),
    ("media_group", "document"),
    ("voice", "voice"),
    ("video_note", "video_note"),
    ("audio_legacy_doc_example", "audio"),
    ("sticker", "sticker"),
    ("contact", "contact"),
    ("location", "location"),
    ("dice", "dice"),
    ("message_poll_quiz", "poll"),
    ("story", "other"),
])
def test_real_user_messages_are_ordinary_with_their_type(samples: list[dict], kind: str,
                                                         expected_type: str) -> None:
    """Known real user messages are ordinary and get the expected contract type."""
    upd = _sample(samples, kind)
    assert update_kind(upd) == "message"
    assert is_ordinary_message(upd)
    assert message_item(upd["update_id"], upd["message"])["type"] == expected_type


@pytest.mark.parametrize("kind,expected_kind", [
    ("anonymous_admin", "message"),  # sent as GroupAnonymousBot, a bot
    ("service_new_chat_members", "message"),
    ("service_pinned_message", "message"),
    ("successful_payment", "message"),
    ("edited_message", "edited_message"),
    ("channel_post", "channel_post"),
    ("callback_query", "callback_query"),
    ("callback_query_inaccessible_message", "callback_query"),
    ("pre_checkout_query", "pre_checkout_query"),
    ("my_chat_member_zero_ids", "my_chat_member"),
    ("business_message", "business_message"),
    ("unknown_update_type", "new_update_kind"),
])
def test_real_updates_that_are_not_ordinary_messages(samples: list[dict], kind: str, expected_kind: str) -> None:
    """Known real service messages, bot messages, payments and other kinds are not ordinary messages."""
    upd = _sample(samples, kind)
    assert update_kind(upd) == expected_kind
    assert not is_ordinary_message(upd)


def test_real_successful_payment_is_a_payment_message(samples: list[dict]) -> None:
    """The real `successful_payment` message is recognised as a payment, and a plain text is not."""
    assert is_payment_message(_sample(samples, "successful_payment"))
    assert not is_payment_message(_sample(samples, "private_text"))


def test_real_text_keeps_its_text(samples: list[dict]) -> None:
    """A real text message's summary carries its text unchanged."""
    upd = _sample(samples, "private_text")
    assert message_item(upd["update_id"], upd["message"])["text"] == upd["message"]["text"]


def test_real_photo_uses_the_largest_size(samples: list[dict]) -> None:
    """The real photo's summary names its largest size and keeps its caption."""
    msg = _sample(samples, "photo_caption")["message"]
    item = message_item(1, msg)
    assert item["file_id"] == max(msg["photo"], key=lambda s: s["width"] * s["height"])["file_id"]
    assert item["caption"] == msg.get("caption")


def test_real_album_documents_share_their_media_group_id(samples: list[dict]) -> None:
    """The two documents of a real album carry the same `media_group_id` and distinct file ids."""
    album = [s["update"] for s in samples if s["kind"] == "media_group"]
    items = [message_item(u["update_id"], u["message"]) for u in album]
    assert len(items) == 2
    assert items[0]["media_group_id"] == items[1]["media_group_id"] == album[0]["message"]["media_group_id"]
    assert items[0]["file_id"] != items[1]["file_id"]
    assert [i["file_id"] for i in items] == [u["message"]["document"]["file_id"] for u in album]


def test_automatic_forward_from_linked_channel_is_not_a_user_message(samples) -> None:
    """A channel post echoed into its discussion group is not batched for the AI to answer."""
    forwards = [s["update"] for s in samples if (s["update"].get("message") or {}).get("is_automatic_forward")]
    assert forwards, "the sample set has an automatic forward"
    assert not any(is_ordinary_message(u) for u in forwards)
