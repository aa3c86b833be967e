"""Payments end to end, and the amount formatting and admin notice on their own."""

from __future__ import annotations

import html
import re

import pytest

from doubles import MakeDouble, TelegramDouble, wait_until
from helpers import payment_update, pre_checkout_update, text_update
from payments import admin_notice, amount_with_currency, format_amount, refusal_text

ADMIN = "-1001234"


def _answers(telegram: TelegramDouble) -> dict[str, dict]:
    return {a["pre_checkout_query_id"]: a for a in telegram.calls_of("answerPreCheckoutQuery")}


def _admin_messages(telegram: TelegramDouble) -> list[dict]:
    return [m for m in telegram.calls_of("sendMessage") if str(m["chat_id"]) == ADMIN]


@pytest.mark.parametrize("amount, currency, expected, shown", [
    (150000, "RUB", "1500.00", "1500.00 ₽"),
    (500, "JPY", "500", "500 ¥"),
    (50, "XTR", "50", "50 ⭐"),
    (1999, "USD", "19.99", "19.99 $"),
    (12345, "KWD", "12.345", "12.345 KWD"),
    (5, "EUR", "0.05", "0.05 €"),
])
def test_amounts_use_each_currencys_minor_digits(amount: int, currency: str, expected: str, shown: str) -> None:
    """Amounts are divided by 10**exp of their own currency, not always by 100."""
    assert format_amount(amount, currency) == expected
    assert amount_with_currency(amount, currency) == shown


def test_admin_notice_escapes_every_user_supplied_value() -> None:
    """Names, order info and payload with <, > and & are escaped, and read back intact."""
    evil = "<b>Ann</b> & </i>Co"
    payment = {"currency": "RUB", "total_amount": 150000, "invoice_payload": "order<1>&2",
               "telegram_payment_charge_id": "ch<1>",
               "order_info": {"name": evil, "phone_number": "+7<900>", "email": "a&b@x.ru"}}
    text = admin_notice("Новая оплата", payment, {"id": 1, "first_name": evil, "username": "u&<"})
    allowed = re.sub(r"</?(b|code)>", "", text)
    assert "<" not in allowed and ">" not in allowed
    plain = html.unescape(allowed)
    for value in (evil, "order<1>&2", "+7<900>", "a&b@x.ru", "u&<", "1500.00 ₽"):
        assert value in plain


def test_pre_checkout_is_answered_while_make_hangs(start_service, telegram: TelegramDouble,
                                                   make: MakeDouble) -> None:
    """A pre-checkout is approved while the only delivery to Make is still hanging."""
    make.script((200, "Accepted", {}, 15))  # the first batch hangs in Make
    service = start_service(DEBOUNCE_SECONDS="0.1", MAKE_TIMEOUT_SECONDS="30")
    telegram.push_update(text_update("buying", user_id=42))
    wait_until(lambda: make.requests, what="Make to receive the batch and hang")
    telegram.push_update(pre_checkout_update("q1", "order-1"))
    answer = wait_until(lambda: _answers(telegram).get("q1"), timeout=10, what="the pre-checkout answer")
    assert answer["ok"] is True
    assert service.health()["make"]["delivered"] == 0  # Make is still hanging


def test_concurrent_and_already_paid_checkouts_are_refused(start_service, telegram: TelegramDouble) -> None:
    """Another buyer's checkout of a payload being paid is refused; after payment, any checkout of it is refused."""
    start_service(TEXT_PAYMENT_IN_PROGRESS="busy now", TEXT_ALREADY_PAID="paid already")
    telegram.push_update(pre_checkout_update("a", "order-2"))
    telegram.push_update(pre_checkout_update("b", "order-2", user_id=43))
    answers = wait_until(lambda: len(_answers(telegram)) == 2 and _answers(telegram), what="two answers")
    assert answers["a"]["ok"] is True
    assert answers["b"] == {"pre_checkout_query_id": "b", "ok": False, "error_message": "busy now"}
    telegram.push_update(payment_update("charge-2", "order-2"))
    telegram.push_update(pre_checkout_update("c", "order-2"))
    answer = wait_until(lambda: _answers(telegram).get("c"), what="the third answer")
    assert answer["ok"] is False and answer["error_message"] == "paid already"


def test_redelivered_payment_gives_one_admin_message_and_one_make_event(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A successful_payment update delivered three times is recorded, notified and sent once."""
    service = start_service(ADMIN_CHAT_ID=ADMIN)
    update = payment_update("charge-3", "order-3", order_info={"name": "<b>Ann</b> & Co"})
    for _ in range(3):
        telegram.push_update(update)
    # The same payment in an update with another id (a charge id is the payment's key, not the update id).
    telegram.push_update({**update, "update_id": update["update_id"] + 100000})
    wait_until(lambda: _admin_messages(telegram), what="the admin notice")
    event = wait_until(lambda: make.accepted(), what="the payment event")[0]
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    assert len(_admin_messages(telegram)) == 1 and len(make.accepted()) == 1
    assert event["event_type"] == "payment" and event["event_id"] == "payment-charge-3"
    assert event["payment"]["amount"] == "1500.00" and event["duplicate"] is False
    assert event["chat_id"] == 42 and event["user"]["id"] == 42
    notice = _admin_messages(telegram)[0]
    assert notice["parse_mode"] == "HTML"
    assert "&lt;b&gt;Ann&lt;/b&gt; &amp; Co" in notice["text"] and "1500.00 ₽" in notice["text"]
    assert service.health()["payments_recorded"] == 1


def test_restart_between_payment_and_second_checkout_still_refuses(
        start_service, telegram: TelegramDouble) -> None:
    """The paid payload survives a restart: a later checkout of it is refused."""
    first = start_service()
    telegram.push_update(payment_update("charge-4", "order-4", currency="XTR", total_amount=50))
    wait_until(lambda: first.health()["payments_recorded"] == 1, what="the payment to be recorded")
    first.kill()
    start_service()
    telegram.push_update(pre_checkout_update("d", "order-4", currency="XTR", total_amount=50))
    answer = wait_until(lambda: _answers(telegram).get("d"), what="the answer after restart")
    assert answer["ok"] is False and answer["error_message"] == "Этот счёт уже оплачен."


def test_second_payment_of_paid_payload_is_flagged_and_stars_refunded(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """An old invoice paid again is recorded as a duplicate, the admin is told, Make sees duplicate: true,
    and with auto-refund on, the Stars are refunded."""
    start_service(ADMIN_CHAT_ID=ADMIN, PAYMENT_AUTO_REFUND_STARS="true")
    telegram.push_update(payment_update("charge-5a", "order-5", currency="XTR", total_amount=50))
    telegram.push_update(payment_update("charge-5b", "order-5", currency="XTR", total_amount=50))
    refund = wait_until(lambda: telegram.calls_of("refundStarPayment"), what="the Stars refund")[0]
    assert refund == {"user_id": 42, "telegram_payment_charge_id": "charge-5b"}
    wait_until(lambda: len(make.accepted()) == 2, what="two payment events")
    assert [e["duplicate"] for e in make.accepted()] == [False, True]
    notices = wait_until(lambda: len(_admin_messages(telegram)) == 2 and _admin_messages(telegram),
                         what="two admin notices")
    assert "нужен возврат" in notices[1]["text"] and "50 ⭐" in notices[1]["text"]


def test_refunded_payment_is_forwarded_as_payment_refunded(start_service, telegram: TelegramDouble,
                                                           make: MakeDouble) -> None:
    """A refunded_payment message becomes one payment_refunded event, and the payload may be bought again."""
    start_service()
    telegram.push_update(payment_update("charge-6", "order-6", currency="XTR", total_amount=50))
    refund_update = {"update_id": 777006, "message": {
        "message_id": 9, "date": 1, "chat": {"id": 42, "type": "private"},
        "from": {"id": 42, "is_bot": False, "first_name": "Buyer"},
        "refunded_payment": {"currency": "XTR", "total_amount": 50, "invoice_payload": "order-6",
                             "telegram_payment_charge_id": "charge-6"}}}
    telegram.push_update(refund_update)
    telegram.push_update(refund_update)
    events = wait_until(lambda: len(make.accepted()) == 2 and make.accepted(), what="two events")
    assert [e["event_type"] for e in events] == ["payment", "payment_refunded"]
    assert events[1]["refund"]["amount"] == "50"
    telegram.push_update(pre_checkout_update("e", "order-6", currency="XTR", total_amount=50))
    assert wait_until(lambda: _answers(telegram).get("e"), what="the answer")["ok"] is True


def test_make_check_can_refuse_and_a_silent_make_falls_back_to_local_rules(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """With PAYMENT_CHECK_WITH_MAKE, Make's refusal reaches the user; a Make that does not answer in time
    leaves the local decision (approve)."""
    make.script((200, {"ok": False, "error_message": "Нет в наличии"}), (200, "Accepted", {}, 8))
    start_service(PAYMENT_CHECK_WITH_MAKE="true", PAYMENT_CHECK_TIMEOUT_SECONDS="1")
    telegram.push_update(pre_checkout_update("f", "order-7"))
    refused = wait_until(lambda: _answers(telegram).get("f"), what="Make's refusal")
    assert refused == {"pre_checkout_query_id": "f", "ok": False, "error_message": "Нет в наличии"}
    telegram.push_update(pre_checkout_update("g", "order-7"))
    approved = wait_until(lambda: _answers(telegram).get("g"), timeout=10, what="the fallback answer")
    assert approved["ok"] is True
    assert [e["event_type"] for e in make.events] == ["pre_checkout", "pre_checkout"]


def test_payment_messages_never_enter_a_batch_and_keep_the_users_order(start_service, telegram: TelegramDouble,
                                                                         make: MakeDouble) -> None:
    """A payment between two texts of the same user enters no batch: the text before it is flushed to Make
    first (`reason: flushed`), then the payment, then a batch with the text after it."""
    start_service(DEBOUNCE_SECONDS="2")
    telegram.push_update(text_update("one", user_id=42))
    telegram.push_update(payment_update("charge-8", "order-8"))
    telegram.push_update(text_update("two", user_id=42))
    wait_until(lambda: len(make.accepted()) == 3, what="the flushed batch, the payment and the next batch")
    events = make.accepted()
    assert [e["event_type"] for e in events] == ["message_batch", "payment", "message_batch"]
    assert (events[0]["text"], events[0]["reason"]) == ("one", "flushed")
    assert events[1]["payment"]["invoice_payload"] == "order-8"
    assert (events[2]["text"], events[2]["reason"]) == ("two", "quiet")


def test_admin_group_that_migrated_does_not_block_later_notices(start_service, telegram: TelegramDouble) -> None:
    """A notice refused because the admin group became a supergroup is kept as a dead letter with the new
    chat id logged, and the next payment's notice still goes out."""
    telegram.script("sendMessage", (400, {"ok": False, "error_code": 400, "description": "Bad Request: group chat "
                                          "was upgraded to a supergroup chat",
                                          "parameters": {"migrate_to_chat_id": -1009999999999}}))
    service = start_service(ADMIN_CHAT_ID=ADMIN)
    telegram.push_update(payment_update("charge-9a", "order-9a"))
    wait_until(lambda: service.health()["outbox_dead"] == 1, what="the first notice to be a dead letter")
    telegram.push_update(payment_update("charge-9b", "order-9b"))
    wait_until(lambda: len(_admin_messages(telegram)) == 2, what="the second notice")
    assert service.printed("-1009999999999")


def test_admin_notice_is_retried_after_telegram_fails_and_no_refund_without_opt_in(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A notice Telegram answers with 500 is sent again; a duplicate Stars payment is not refunded unless asked."""
    telegram.script("sendMessage", (500, {"ok": False, "error_code": 500, "description": "Internal Server Error"}))
    service = start_service(ADMIN_CHAT_ID=ADMIN)
    telegram.push_update(payment_update("charge-10a", "order-10", currency="XTR", total_amount=50))
    telegram.push_update(payment_update("charge-10b", "order-10", currency="XTR", total_amount=50))
    wait_until(lambda: len(_admin_messages(telegram)) == 3, timeout=15, what="two notices, one sent twice")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    assert [e["duplicate"] for e in make.accepted()] == [False, True]
    assert telegram.calls_of("refundStarPayment") == []


def test_redelivered_pre_checkout_still_holding_is_answered_again(start_service, telegram: TelegramDouble) -> None:
    """A pre-checkout update seen again while its approval holds the payload is answered again (it may
    never have been answered before a crash); the payload stays held against other buyers' checkouts."""
    start_service()
    update = pre_checkout_update("h1", "order-11")
    telegram.push_update(update)
    telegram.push_update(update)
    wait_until(lambda: len(telegram.calls_of("answerPreCheckoutQuery")) == 2, what="two answers")
    assert all(a["ok"] is True for a in telegram.calls_of("answerPreCheckoutQuery"))
    telegram.push_update(pre_checkout_update("h2", "order-11", user_id=43))
    assert wait_until(lambda: _answers(telegram).get("h2"), what="the other checkout")["ok"] is False


def _subscription(update: dict, first: bool) -> dict:
    """`update` (a successful_payment) made a Stars subscription's first payment or renewal, as Telegram sends it."""
    payment = update["message"]["successful_payment"]
    payment.update(is_recurring=True, subscription_expiration_date=1_800_000_000)
    if first:
        payment["is_first_recurring"] = True
    return update


def test_subscription_renewal_is_a_normal_payment_and_a_one_off_paid_twice_is_still_a_duplicate(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """A Stars subscription's renewal (same payload, new charge) and another subscriber's first payment of the
    shared payload are normal payments: `duplicate: false`, `subscription: "renewal"` / `"first"`, a renewal
    notice, no refund, and a later subscriber's checkout is approved; a one-off invoice paid twice is still
    a refunded duplicate, and every payment event has the `subscription` key."""
    # No spacing between messages to a chat: five notices to the admin's group would take 12 s (20 a minute).
    service = start_service(ADMIN_CHAT_ID=ADMIN, PAYMENT_AUTO_REFUND_STARS="true", TEXT_ADMIN_RENEWAL="Renewed ✓",
                            TELEGRAM_CHAT_INTERVAL_SECONDS="0")
    stars = {"currency": "XTR", "total_amount": 100}
    for update in (_subscription(payment_update("sub-a1", "club", **stars), first=True),
                   _subscription(payment_update("sub-a2", "club", **stars), first=False),
                   _subscription(payment_update("sub-b1", "club", user_id=43, **stars), first=True),
                   payment_update("once-1", "order-12", **stars), payment_update("once-2", "order-12", **stars)):
        telegram.push_update(update)
    events = wait_until(lambda: len(make.accepted()) == 5 and make.accepted(), what="five payment events")
    seen = {e["event_id"]: (e["subscription"], e["duplicate"]) for e in events}
    assert seen == {"payment-sub-a1": ("first", False), "payment-sub-a2": ("renewal", False),
                    "payment-sub-b1": ("first", False), "payment-once-1": (None, False),
                    "payment-once-2": (None, True)}
    wait_until(lambda: len(_admin_messages(telegram)) == 5, what="five admin notices")
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="the outbox to drain")
    assert telegram.calls_of("refundStarPayment") == [{"user_id": 42, "telegram_payment_charge_id": "once-2"}]
    notices = {re.search(r"Charge ID: <code>(.*?)</code>", m["text"]).group(1): m["text"]
               for m in _admin_messages(telegram)}
    assert notices["sub-a2"].startswith("<b>Renewed ✓</b>") and "100 ⭐" in notices["sub-a2"]
    assert notices["sub-a1"].startswith("<b>💰 Новая оплата</b>") and notices["sub-b1"].startswith("<b>💰")
    assert "нужен возврат" in notices["once-2"]
    telegram.push_update(pre_checkout_update("s1", "club", user_id=44, **stars))
    telegram.push_update(pre_checkout_update("s2", "club", user_id=45, **stars))
    telegram.push_update(pre_checkout_update("s3", "order-12", user_id=45, **stars))
    answers = wait_until(lambda: len(_answers(telegram)) == 3 and _answers(telegram), what="three answers")
    assert answers["s1"]["ok"] is True and answers["s2"]["ok"] is True  # a shared link: nobody is held off
    assert answers["s3"] == {"pre_checkout_query_id": "s3", "ok": False, "error_message": "Этот счёт уже оплачен."}


def test_a_buyer_whose_card_was_declined_may_try_again_at_once(start_service, telegram: TelegramDouble) -> None:
    """The same buyer's second checkout of a payload they hold is approved (a declined card, tried again);
    another buyer's checkout is refused while that hold lives, and once paid, the payload is refused to all."""
    start_service(TEXT_PAYMENT_IN_PROGRESS="busy now", TEXT_ALREADY_PAID="paid already")
    telegram.push_update(pre_checkout_update("r1", "order-13", user_id=42))
    assert wait_until(lambda: _answers(telegram).get("r1"), what="the first checkout")["ok"] is True
    telegram.push_update(pre_checkout_update("r2", "order-13", user_id=42))  # no successful_payment came
    assert wait_until(lambda: _answers(telegram).get("r2"), what="the second try")["ok"] is True
    telegram.push_update(pre_checkout_update("r3", "order-13", user_id=43))
    assert wait_until(lambda: _answers(telegram).get("r3"), what="another buyer's checkout") == {
        "pre_checkout_query_id": "r3", "ok": False, "error_message": "busy now"}
    telegram.push_update(payment_update("charge-13", "order-13", user_id=42))
    telegram.push_update(pre_checkout_update("r4", "order-13", user_id=42))
    assert wait_until(lambda: _answers(telegram).get("r4"), what="a checkout after payment")["error_message"] == (
        "paid already")


def _make_refuses(texts: dict[str, object]):
    """A Make `reject_if` refusing each pre_checkout with the error_message given for its payload."""
    def answer(event: dict) -> tuple[int, object] | None:
        payload = event.get("pre_checkout_query", {}).get("invoice_payload")
        return (200, {"ok": False, "error_message": texts[payload]}) if payload in texts else None
    return answer


def _telegram_refuses_error_messages_over(limit: int):
    """A Bot API `reject_if` answering 400 to an answerPreCheckoutQuery whose error_message is over `limit`."""
    def answer(method: str, params: dict) -> tuple[int, object] | None:
        if method == "answerPreCheckoutQuery" and len(params.get("error_message", "")) > limit:
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: ERROR_MESSAGE_TOO_LONG"}
        return None
    return answer


def test_a_refusal_text_of_makes_that_telegram_rejects_is_replaced_by_the_default(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """When Telegram answers 400 to Make's error_message, the checkout is refused again at once with
    TEXT_PAYMENT_REFUSED, never left unanswered."""
    make.reject_if = _make_refuses({"order-14": "Этот товар закончился на складе, попробуйте завтра"})
    telegram.reject_if = _telegram_refuses_error_messages_over(30)  # a Telegram stricter than we know of
    service = start_service(PAYMENT_CHECK_WITH_MAKE="true", TEXT_PAYMENT_REFUSED="Нельзя")
    telegram.push_update(pre_checkout_update("t1", "order-14"))
    calls = wait_until(lambda: len(telegram.calls_of("answerPreCheckoutQuery")) == 2
                       and telegram.calls_of("answerPreCheckoutQuery"), what="the second answer")
    assert calls[0]["error_message"] == "Этот товар закончился на складе, попробуйте завтра"
    assert calls[1] == {"pre_checkout_query_id": "t1", "ok": False, "error_message": "Нельзя"}
    assert "Telegram refused Make's error_message" in service.text


def test_a_refusal_text_of_makes_is_stripped_and_an_unfit_one_replaced_before_sending(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """Make's error_message reaches the buyer stripped; one too long, blank, unprintable or not a string is
    replaced by TEXT_PAYMENT_REFUSED before it is sent, so each checkout is answered once."""
    make.reject_if = _make_refuses({"p-spaces": "  Нет в наличии \n", "p-long": "Нет. " * 60, "p-blank": " \n ",
                                    "p-control": "Нет\x00в наличии", "p-number": 42})
    telegram.reject_if = _telegram_refuses_error_messages_over(255)
    start_service(PAYMENT_CHECK_WITH_MAKE="true", TEXT_PAYMENT_REFUSED="Нельзя")
    for payload in ("p-spaces", "p-long", "p-blank", "p-control", "p-number"):
        telegram.push_update(pre_checkout_update(f"u-{payload}", payload))
    answers = wait_until(lambda: len(_answers(telegram)) == 5 and _answers(telegram), what="five answers")
    assert {q: (a["ok"], a["error_message"]) for q, a in answers.items()} == {
        "u-p-spaces": (False, "Нет в наличии"), "u-p-long": (False, "Нельзя"), "u-p-blank": (False, "Нельзя"),
        "u-p-control": (False, "Нельзя"), "u-p-number": (False, "Нельзя")}
    assert len(telegram.calls_of("answerPreCheckoutQuery")) == 5


def test_refusal_text_keeps_exactly_the_fit_texts() -> None:
    """Whatever Make sends as error_message, `refusal_text` gives it back stripped when that is a non-empty
    text of at most 255 UTF-16 units without control characters (but newlines) or lone surrogates, and
    None otherwise."""
    import unicodedata

    from hypothesis import given, settings
    from hypothesis import strategies as st

    odd = st.characters(categories=["Cc", "Cs", "Zs", "Zl", "So", "Lo"])  # controls, surrogates, spaces, emoji
    values = st.one_of(st.text(max_size=300), st.text(odd, max_size=20), st.text(st.characters(), min_size=120,
                       max_size=300), st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2))

    def fit(text: str) -> bool:
        if not text or [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cs")]:
            return False
        return len(text.encode("utf-16-le")) <= 2 * 255

    @settings(max_examples=500, deadline=None)
    @given(values)
    def check(value: object) -> None:
        stripped = value.strip() if isinstance(value, str) else None
        assert refusal_text(value) == (stripped if stripped is not None and fit(stripped) else None)

    check()
    assert refusal_text("😀" * 128) is None and refusal_text("😀" * 127) == "😀" * 127  # an emoji is two units
