"""replies.py: reply items (strings or objects) read into Bot API calls that Telegram accepts."""

from __future__ import annotations

from typing import Any

import pytest

from formatting import CAPTION_LIMIT, TEXT_LIMIT, utf16_len
from replies import ReplyError, bare, message_calls, read_reply

BUTTONS = {"inline_keyboard": [[{"text": "Yes", "callback_data": "yes"}, {"text": "No", "callback_data": "no"}]]}


def units(text: str) -> int:
    """UTF-16 code units of `text`, counted independently of the code under test."""
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def calls(item: Any, default_format: str = "plain") -> list[tuple[str, dict[str, Any]]]:
    """The Bot API calls for one reply item in chat 7."""
    return message_calls(read_reply(item, default_format), 7)


@pytest.mark.parametrize("text,expected", [
    ("", 0), ("abc", 3), ("привет", 6), ("é", 1), ("😀", 2), ("a😀b", 4), ("👨\u200d👩\u200d👧", 8), ("𝕏", 2),
])
def test_utf16_len_counts_code_units(text: str, expected: int) -> None:
    """Characters outside the BMP (most emoji) count as two units, everything else as one."""
    assert utf16_len(text) == expected == units(text)


def test_a_string_is_sent_as_it_is() -> None:
    """The contract: a plain string is one sendMessage with exactly that text, nothing else."""
    assert calls("Здравствуйте! **as is**") == [("sendMessage", {"chat_id": 7, "text": "Здравствуйте! **as is**"})]


def test_a_string_follows_reply_format() -> None:
    """With REPLY_FORMAT=markdown a plain string is read as Markdown and sent as text plus entities."""
    [(method, params)] = calls("Hello **world**", "markdown")
    assert (method, params["text"]) == ("sendMessage", "Hello world")
    assert params["entities"] == [{"type": "bold", "offset": 6, "length": 5}]
    assert "parse_mode" not in params  # nothing for Telegram to fail to parse


def test_an_object_with_markdown_buttons_and_no_preview() -> None:
    """format, reply_markup and link_preview become entities, buttons and link_preview_options."""
    [(method, params)] = calls({"text": "*Pick* one: https://x.org", "format": "markdown", "reply_markup": BUTTONS,
                                "link_preview": False})
    assert method == "sendMessage" and params["text"] == "Pick one: https://x.org"
    assert params["entities"] == [{"type": "italic", "offset": 0, "length": 4}]
    assert params["reply_markup"] == BUTTONS
    assert params["link_preview_options"] == {"is_disabled": True}


def test_an_object_format_wins_over_reply_format() -> None:
    """An item's own format (or parse_mode) is used whatever REPLY_FORMAT says."""
    assert calls({"text": "**x**", "format": "plain"}, "markdown")[0][1]["text"] == "**x**"
    assert calls({"text": "<b>x</b>", "parse_mode": "HTML"})[0][1]["entities"][0]["type"] == "bold"


def test_a_long_reply_puts_buttons_on_its_last_part_only() -> None:
    """10,000 characters: three parts within the limit, buttons (and only they) on the last."""
    sent = calls({"text": "слово " * 1700, "reply_markup": BUTTONS})
    assert len(sent) == 3
    assert all(units(params["text"]) <= TEXT_LIMIT for _, params in sent)
    assert ["reply_markup" in params for _, params in sent] == [False, False, True]
    assert " ".join(p["text"] for _, p in sent).split() == ["слово"] * 1700


def test_a_photo_with_a_caption_and_buttons() -> None:
    """A photo (URL or file_id) goes with its caption, the caption's entities and the buttons in one call."""
    [(method, params)] = calls({"photo": "https://example.com/a.jpg", "caption": "**Nice**", "format": "markdown",
                                "reply_markup": BUTTONS})
    assert method == "sendPhoto"
    assert params == {"chat_id": 7, "photo": "https://example.com/a.jpg", "caption": "Nice",
                      "caption_entities": [{"type": "bold", "offset": 0, "length": 4}], "reply_markup": BUTTONS}


def test_a_document_without_a_caption() -> None:
    """A document alone is one sendDocument."""
    assert calls({"document": "BQACAgIAAxkBAAIB"}) == [("sendDocument", {"chat_id": 7, "document": "BQACAgIAAxkBAAIB"})]


def test_a_caption_too_long_for_one_follows_the_photo_as_text() -> None:
    """Captions hold 1024 units: a longer one goes after the photo as messages, buttons on the last."""
    caption = "word " * 400
    sent = calls({"photo": "AgAC", "caption": caption, "reply_markup": BUTTONS})
    assert [m for m, _ in sent] == ["sendPhoto", "sendMessage"]
    assert sent[0][1] == {"chat_id": 7, "photo": "AgAC"}
    assert sent[1][1]["text"] == caption.strip() and sent[1][1]["reply_markup"] == BUTTONS
    assert units(caption) > CAPTION_LIMIT


@pytest.mark.parametrize("item,problem", [
    (5, "a reply must be a string or an object"),
    ([], "a reply must be a string or an object"),
    ({}, "text must be a non-empty string"),
    ({"text": "  "}, "text must be a non-empty string"),
    ({"text": "x", "format": "rtf"}, "format must be one of plain, markdown, html"),
    ({"text": "x", "parse_mode": "BBCode"}, "parse_mode must be HTML or MarkdownV2"),
    ({"text": "x", "format": "html", "parse_mode": "HTML"}, "give format or parse_mode, not both"),
    ({"text": "x", "reply_markup": "buttons"}, "reply_markup must be an object"),
    ({"text": "x", "reply_markup": {"inline_keyboard": [{"text": "flat"}]}}, "reply_markup must be an object"),
    ({"text": "x", "link_preview": "no"}, "link_preview must be true or false"),
    ({"photo": "a", "document": "b"}, "a photo or a document, not both"),
    ({"photo": ""}, "photo must be a URL or a file_id"),
    ({"photo": "a", "caption": 5}, "caption must be a string"),
    ({"text": "<b></b>", "format": "html"}, "text is empty once read as html"),
])
def test_bad_items_say_what_is_wrong(item: Any, problem: str) -> None:
    """An item that cannot be sent raises ReplyError naming the problem."""
    with pytest.raises(ReplyError, match=problem):
        read_reply(item)


def test_unknown_fields_are_named() -> None:
    """A field that means nothing (a typo, most likely) is reported, the reply still read."""
    assert read_reply({"text": "x", "formatt": "markdown"}).ignored == ("formatt",)


def test_broken_unicode_is_cleaned_everywhere() -> None:
    """Lone surrogates in the text, the buttons and the file become U+FFFD (they cannot be sent as UTF-8)."""
    [(_, params)] = calls({"photo": "id\ud800", "caption": "a\udc00", "reply_markup": {
        "inline_keyboard": [[{"text": "b\ud83d", "callback_data": "c"}]]}})
    assert (params["photo"], params["caption"]) == ("id\ufffd", "a\ufffd")
    assert params["reply_markup"]["inline_keyboard"][0][0]["text"] == "b\ufffd"


def test_bare_strips_formatting_and_buttons_only() -> None:
    """The fallback of a refused reply keeps the chat, text and media, and drops what Telegram may refuse."""
    params = {"chat_id": 7, "text": "t", "entities": [{}], "reply_markup": BUTTONS,
              "link_preview_options": {"is_disabled": True}}
    assert bare(params) == {"chat_id": 7, "text": "t"}
    assert bare({"chat_id": 7, "photo": "p", "caption": "c", "caption_entities": [{}]}) == {
        "chat_id": 7, "photo": "p", "caption": "c"}
    assert bare({"chat_id": 7, "text": "t"}) is None  # nothing to drop: no second try


@pytest.mark.parametrize("tail", ["\n", "\n\n", " ", "\n \n"])
def test_no_part_is_blank(tail: str) -> None:
    """A text just over the limit only because of trailing whitespace never yields a blank part."""
    sent = calls("A" * TEXT_LIMIT + tail)
    assert [p["text"] for _, p in sent] == ["A" * TEXT_LIMIT]


def test_emoji_straddling_the_limit_moves_to_the_next_part() -> None:
    """When an emoji's two units would cross the limit, the whole emoji goes to the next part."""
    sent = calls("a" + "😀" * 2048)
    assert [p["text"] for _, p in sent] == ["a" + "😀" * 2047, "😀"]


def deep(levels: int) -> dict[str, Any]:
    """An object nested `levels` deep."""
    node: dict[str, Any] = {}
    for _ in range(levels):
        node = {"n": node}
    return node


@pytest.mark.parametrize("button,problem", [
    ({"text": "x", "callback_data": "y", "n": float("nan")}, "a number JSON cannot carry"),
    ({"text": "x", "callback_data": "y", "n": deep(5000)}, "nested too deep"),
])
def test_markup_that_cannot_be_stored_is_refused(button: dict[str, Any], problem: str) -> None:
    """A reply_markup with NaN (Make's JSON may carry it) or nested past the recursion limit is a bad item,
    not a failure that costs the answer's other replies."""
    with pytest.raises(ReplyError, match=problem):
        read_reply({"text": "x", "reply_markup": {"inline_keyboard": [[button]]}})


def test_a_reply_from_make_names_no_chat() -> None:
    """A reply goes to the event's chat: one naming a chat_id is refused, not sent to the wrong person."""
    with pytest.raises(ReplyError, match="has no chat_id"):
        read_reply({"chat_id": 999, "text": "Admin: new order"})


def test_a_photo_with_caption_and_text_sends_the_text_after_it() -> None:
    """`caption` goes with the photo, `text` beside it follows as a message, and the buttons go last."""
    sent = calls({"photo": "AgAC", "caption": "Кот", "text": "**Подробнее** ниже", "format": "markdown",
                  "reply_markup": BUTTONS})
    assert [m for m, _ in sent] == ["sendPhoto", "sendMessage"]
    assert sent[0][1] == {"chat_id": 7, "photo": "AgAC", "caption": "Кот"}
    assert sent[1][1]["text"] == "Подробнее ниже" and sent[1][1]["reply_markup"] == BUTTONS
    assert sent[1][1]["entities"] == [{"type": "bold", "offset": 0, "length": 9}]


def test_only_the_first_32768_characters_of_a_reply_are_read_into_messages() -> None:
    """A reply is cut at MAX_REPLY_CHARS before it is split, so a huge one costs no more than that."""
    sent = calls("word " * 20_000)
    assert sum(len(p["text"]) for _, p in sent) <= 32768 and len(sent) == 9


@pytest.mark.parametrize("mode,fmt", [("HTML", "html"), ("Html", "html"), (" html ", "html"), ("MARKDOWNV2", "mdv2")])
def test_parse_mode_is_read_in_any_case(mode: str, fmt: str) -> None:
    """Telegram reads parse_mode in any case and trimmed; so does the gateway. Legacy Markdown is refused with
    a pointer to format: markdown."""
    source = "<b>x</b>" if fmt == "html" else "*x*"
    [(_, params)] = calls({"text": source, "parse_mode": mode})
    assert params["text"] == "x" and params["entities"][0]["type"] == "bold"
    with pytest.raises(ReplyError, match="use format: markdown"):
        read_reply({"text": "*x*", "parse_mode": "Markdown"})
