"""End to end: rich replies from Make and POST /reply (Markdown, HTML, buttons, a photo), long ones split
safely, and a reply Telegram refuses for its formatting sent again as plain text. The Bot API double refuses
what Telegram would for its form: empty or over-long texts and captions, entities outside the text."""

from __future__ import annotations

import random
import re
from typing import Any

from doubles import MakeDouble, TelegramDouble, wait_until
from helpers import text_update

AUTH = {"Authorization": "Bearer reply-secret"}
BUTTONS = {"inline_keyboard": [[{"text": "Да", "callback_data": "yes"}, {"text": "Нет", "callback_data": "no"}]]}


def units(text: str) -> int:
    """UTF-16 code units of `text`."""
    return len(text.encode("utf-16-le")) // 2


def covered(text: str, entity: dict[str, Any]) -> str:
    """The characters of `text` an entity covers (offsets in UTF-16 units)."""
    raw = text.encode("utf-16-le")
    return raw[entity["offset"] * 2:(entity["offset"] + entity["length"]) * 2].decode("utf-16-le")


def styled(params: dict[str, Any], key: str = "entities", text_key: str = "text") -> list[tuple[str, str]]:
    """The (type, covered text) of each entity of a sent message."""
    return [(e["type"], covered(params[text_key], e)) for e in params.get(key, [])]


def sent_replies(telegram: TelegramDouble) -> list[tuple[str, dict[str, Any]]]:
    """Every message the gateway sent to a user, in order, with its method."""
    return [(name, params) for name, params in list(telegram.calls)
            if name in ("sendMessage", "sendPhoto", "sendDocument")]


def test_markdown_from_make_arrives_as_entities(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A model's Markdown (format: markdown) shows as bold, italic, code and a link, without its markers."""
    answer = "## Итог\nВаш заказ **принят**, *спасибо*! Код: `A-17`. [Статус](https://example.com/orders/17)"
    make.script((200, {"replies": [{"text": answer, "format": "markdown"}]}))
    service = start_service()
    telegram.push_update(text_update("где заказ?", user_id=31))
    [(method, params)] = wait_until(lambda: sent_replies(telegram), what="the reply")
    assert method == "sendMessage" and "parse_mode" not in params
    assert params["text"] == "Итог\nВаш заказ принят, спасибо! Код: A-17. Статус"
    # A heading is bold (H1 and H2 underlined as well, the converter's choice).
    assert [s for s in styled(params) if s[0] != "underline"] == [
        ("bold", "Итог"), ("bold", "принят"), ("italic", "спасибо"), ("code", "A-17"), ("text_link", "Статус")]
    assert params["entities"][-1]["url"] == "https://example.com/orders/17"
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")


def test_reply_format_setting_reads_plain_strings_as_markdown(start_service, telegram: TelegramDouble,
                                                              make: MakeDouble) -> None:
    """REPLY_FORMAT=markdown: Make's plain `reply` string is read as Markdown, as most AI scenarios want."""
    make.script((200, {"reply": "**Готово** ✅"}))
    start_service(REPLY_FORMAT="markdown")
    telegram.push_update(text_update("сделай", user_id=32))
    [(_, params)] = wait_until(lambda: sent_replies(telegram), what="the reply")
    assert params["text"] == "Готово ✅" and styled(params) == [("bold", "Готово")]


def test_buttons_go_on_the_last_part_of_a_long_answer(start_service, telegram: TelegramDouble,
                                                      make: MakeDouble) -> None:
    """A 9,000-character answer with buttons: parts within Telegram's limit (the double refuses longer ones),
    cut between words, buttons under the last part only, and bad items skipped without blocking the chat."""
    words = [random.Random(5).choice(["заказ", "доставка", "оплата", "😀"]) for _ in range(1300)]
    make.script((200, {"replies": [5, {"text": " ".join(words), "reply_markup": BUTTONS}, {"photo": ""}]}),
                (200, {"reply": "next batch answered"}))
    service = start_service()
    telegram.push_update(text_update("расскажи всё", user_id=33))
    wait_until(lambda: len(sent_replies(telegram)) >= 3, what="the parts")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    parts = [params for _, params in sent_replies(telegram)]
    assert len(parts) == 3
    assert all(units(p["text"]) <= 4096 for p in parts)
    assert [w for p in parts for w in p["text"].split()] == words  # no word cut in half, none lost
    assert ["reply_markup" in p for p in parts] == [False, False, True] and parts[-1]["reply_markup"] == BUTTONS
    assert "reply 0 skipped: a reply must be a string or an object" in service.text
    assert "reply 2 skipped: photo must be a URL or a file_id" in service.text
    telegram.push_update(text_update("и ещё", user_id=33))  # the chat goes on
    wait_until(lambda: any(p.get("text") == "next batch answered" for _, p in sent_replies(telegram)),
               what="the next answer")
    assert len(make.accepted()) == 2 and service.health()["outbox_dead"] == 0


def test_a_photo_with_caption_stops_typing(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A photo answer is one sendPhoto with its caption and buttons, and it ends the typing indicator."""
    make.script((200, {"reply": {"photo": "https://example.com/cat.jpg", "caption": "<b>Кот</b> дня",
                                 "format": "html", "reply_markup": BUTTONS}}, {}, 1.0))
    service = start_service(TYPING_MODE="until_reply", TYPING_INTERVAL_SECONDS="0.5", TYPING_MAX_SECONDS="120")
    telegram.push_update(text_update("покажи кота", user_id=34))
    wait_until(lambda: telegram.calls_of("sendChatAction"), what="typing while Make works")
    [(method, params)] = wait_until(lambda: sent_replies(telegram), what="the photo")
    assert method == "sendPhoto"
    assert (params["photo"], params["caption"], params["reply_markup"]) == ("https://example.com/cat.jpg", "Кот дня",
                                                                            BUTTONS)
    assert styled(params, "caption_entities", "caption") == [("bold", "Кот")]
    wait_until(lambda: service.health()["typing_chats"] == 0, what="typing to stop after the photo")


def test_ten_thousand_characters_of_html_through_post_reply(start_service, telegram: TelegramDouble) -> None:
    """A 10,000-character HTML /reply: parts within the limit, each with its own entities, together the whole
    visible text; a bold run across a cut is bold on both sides."""
    rng = random.Random(6)
    chunks = [rng.choice(["обычный текст", "<i>курсив</i>", "<code>x&lt;1</code>", "emoji 👍🏽"]) for _ in range(700)]
    long_bold = "<b>" + " ".join(["жирный"] * 700) + "</b>"  # 4,900 characters of bold: it must cross a cut
    source = " ".join(chunks[:350]) + " " + long_bold + " " + " ".join(chunks[350:])
    assert len(source) >= 10_000
    service = start_service(REPLY_TOKEN="reply-secret")
    answer = service.post("/reply", json={"chat_id": 35, "text": source, "format": "html"}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    parts = [params for _, params in sent_replies(telegram)]
    assert len(answer.json()["message_ids"]) == len(parts) >= 3
    assert all(units(p["text"]) <= 4096 and len(p["entities"]) <= 100 for p in parts)
    expected = re.sub(r"</?\w+>", "", source).replace("&lt;", "<")  # the visible text, read independently
    assert [w for p in parts for w in p["text"].split()] == expected.split()
    bold_parts = [i for i, p in enumerate(parts) if any(kind == "bold" for kind, _ in styled(p))]
    assert len(bold_parts) >= 2, "the long bold run crosses a cut and is bold in both parts"
    for p in parts:
        for kind, text in styled(p):
            if kind == "bold":
                assert set(text.split()) == {"жирный"}


def test_a_reply_refused_for_its_formatting_is_sent_as_plain_text(start_service, telegram: TelegramDouble,
                                                                  make: MakeDouble) -> None:
    """Telegram refuses the formatted message ("can't parse entities"): it is sent once more as plain text with
    the same words, never lost and no dead letter; a /reply caller hears it went without its formatting."""
    def refuse_entities(name: str, params: dict[str, Any]) -> tuple[int, Any] | None:
        if params.get("entities") or params.get("reply_markup"):
            return 400, {"ok": False, "error_code": 400,
                         "description": "Bad Request: can't parse entities: unsupported entity"}
        return None

    telegram.reject_if = refuse_entities
    make.script((200, {"reply": {"text": "**важно**: оплатите до пятницы", "format": "markdown",
                                 "reply_markup": BUTTONS}}))
    service = start_service(REPLY_TOKEN="reply-secret")
    telegram.push_update(text_update("что дальше?", user_id=36))
    wait_until(lambda: len(sent_replies(telegram)) >= 2, what="the refused reply and its plain resend")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    first, second = [params for _, params in sent_replies(telegram)]
    assert first["entities"] and first["reply_markup"] == BUTTONS
    assert second == {"chat_id": 36, "text": "важно: оплатите до пятницы"}
    assert service.health()["outbox_dead"] == 0
    assert "sending it once more without formatting or buttons" in service.text
    answer = service.post("/reply", json={"chat_id": 36, "text": "<b>счёт</b> готов", "parse_mode": "HTML"},
                          headers=AUTH)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["sent_without_formatting"] == 1 and "can't parse entities" in body["formatting_error"]
    assert len(body["message_ids"]) == 1
    assert sent_replies(telegram)[-1][1] == {"chat_id": 36, "text": "счёт готов"}


def test_post_reply_says_what_is_wrong_with_a_bad_body(start_service, telegram: TelegramDouble) -> None:
    """Bad formats, both format and parse_mode, and an empty formatted text are 400s that say why; nothing is
    sent. An unknown field is ignored and named in the answer (callers that send extra fields keep working)."""
    service = start_service(REPLY_TOKEN="reply-secret")
    for body, problem in [
        ({"chat_id": 1, "text": "x", "format": "rtf"}, "format must be one of plain, markdown, html"),
        ({"chat_id": 1, "text": "x", "format": "html", "parse_mode": "HTML"}, "not both"),
        ({"chat_id": 1, "text": "<i></i>", "format": "html"}, "text is empty"),
        ({"chat_id": 1, "photo": "AgAC", "document": "BQAC"}, "not both"),
    ]:
        answer = service.post("/reply", json=body, headers=AUTH)
        assert answer.status_code == 400 and problem in answer.json()["error"], (body, answer.text)
    assert sent_replies(telegram) == []
    answer = service.post("/reply", json={"chat_id": 1, "text": "x", "colour": "red", "disable_notification": True},
                          headers=AUTH)
    assert answer.status_code == 200 and answer.json()["ignored_fields"] == ["colour", "disable_notification"]
    assert [p["text"] for _, p in sent_replies(telegram)] == ["x"]


def test_an_answer_of_only_bad_items_still_stops_typing(start_service, telegram: TelegramDouble,
                                                        make: MakeDouble) -> None:
    """The scenario answered, but nothing in its answer can be sent (bad items, or a body that looks like JSON
    but is not): typing stops all the same, each event is delivered once, and the log says what was wrong."""
    make.script((200, {"replies": [{"photo": ""}, {"text": "<i></i>", "format": "html"}]}, {}, 1.0),
                (200, '{"reply": "Он сказал "да"\n"}', {}, 1.0))
    service = start_service(TYPING_MODE="until_reply", TYPING_INTERVAL_SECONDS="0.5", TYPING_MAX_SECONDS="120")
    telegram.push_update(text_update("привет", user_id=37))
    wait_until(lambda: telegram.calls_of("sendChatAction"), what="typing while Make works")
    wait_until(lambda: make.accepted(), what="Make's answer")
    wait_until(lambda: service.health()["typing_chats"] == 0, what="typing to stop")
    assert sent_replies(telegram) == [] and len(make.accepted()) == 1
    assert "reply 0 skipped: photo must be a URL or a file_id" in service.text
    assert "reply 1 skipped: text is empty once read as html" in service.text
    # A model's text mapped into a hand-written JSON body breaks it: said in the log, and typing stops too.
    telegram.push_update(text_update("ещё раз", user_id=37))
    wait_until(lambda: len(make.accepted()) == 2, what="the second answer")
    wait_until(lambda: "looks like JSON but is not" in service.text, what="the warning")
    wait_until(lambda: service.health()["typing_chats"] == 0, what="typing to stop")
    assert sent_replies(telegram) == [] and service.printed("Build the Webhook response body with a JSON module")


def test_one_odd_item_costs_no_other_reply(start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """NaN in a button, a chat_id (a reply goes to the event's chat only), `<![` in HTML: the odd items are
    skipped or read leniently, and every other reply of the answer is sent, in order; `replies` given as one
    string instead of a list is sent too."""
    raw = ('{"replies": ["first", {"text": "x", "reply_markup": {"inline_keyboard": [[{"text": "b", "n": NaN}]]}},'
           ' {"chat_id": 9, "text": "to someone else"}, {"text": "if a <![ b", "format": "html"}, "third"]}')
    make.script((200, raw), (200, {"replies": "одна строка"}))
    service = start_service()
    telegram.push_update(text_update("вопрос", user_id=38))
    wait_until(lambda: len(sent_replies(telegram)) >= 3, what="the usable replies")
    telegram.push_update(text_update("ещё", user_id=38))
    wait_until(lambda: len(sent_replies(telegram)) >= 4, what="the next answer")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    assert [(p["chat_id"], p["text"]) for _, p in sent_replies(telegram)] == [
        (38, "first"), (38, "if a <![ b"), (38, "third"), (38, "одна строка")]
    assert "reply 1 skipped: reply_markup holds a number JSON cannot carry" in service.text
    assert "reply 2 skipped: a reply goes to the event's chat and has no chat_id" in service.text
    assert len(make.accepted()) == 2
