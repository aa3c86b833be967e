"""`python app.py sandbox` end to end: the real gateway in a subprocess, the emulated Telegram, the stand-in
(or a "real") Make, driven through the chat page's API, and in headless Chromium when the machine has it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from doubles import ROOT, MakeDouble, Service, free_port, wait_until

ANNA, BORIS = 111111111, 222222222
JSON = {"Content-Type": "application/json"}


class Sandbox:
    """A running sandbox and the page's API."""

    def __init__(self, service: Service) -> None:
        self.service = service
        found = re.search(r"Sandbox ready: open (http://\S+)", service.text)
        assert found, service.text
        self.page = found.group(1)
        self.api = self.page + "/api/"

    def post(self, path: str, **body: Any) -> dict[str, Any]:
        # json.dumps escapes a lone surrogate, which httpx's own encoding refuses.
        response = httpx.post(self.api + path, content=json.dumps(body), timeout=10,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        return response.json()

    def state(self, user: int = ANNA) -> dict[str, Any]:
        return httpx.get(self.api + "state", params={"user": user}, timeout=10).json()

    def bot_messages(self, user: int = ANNA) -> list[dict[str, Any]]:
        return [m for m in self.state(user)["chat"] if m["from_bot"]]


@pytest.fixture
def start_sandbox(tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    """Start `python app.py sandbox` with short timings (through its settings), in an empty folder (no .env)."""
    started: list[Service] = []

    def start(*args: str, **env: str) -> Sandbox:
        settings = {"DEBOUNCE_SECONDS": "0.6", "MAX_WAIT_SECONDS": "5", "POLL_TIMEOUT_SECONDS": "1",
                    "LOG_LEVEL": "INFO", **env}
        service = Service(tmp_path, settings, ("sandbox", "--port", str(free_port()), *args))
        started.append(service)
        service.start()
        wait_until(lambda: "Sandbox ready" in service.text, what="the sandbox's ready line")
        return Sandbox(service)

    yield start
    for service in started:
        assert service.stop() == 0, service.text
        assert "Traceback" not in service.text, service.text


def test_a_burst_becomes_one_batch_answered_after_typing(start_sandbox) -> None:
    """Three messages in a burst reach the stand-in Make as one `message_batch` of the contract's shape, the
    chat shows "typing…" while Make thinks, then one answer with buttons."""
    sandbox = start_sandbox("--make-delay", "1.5")
    for text in ("hello", "I need *help*", "with an order"):
        sandbox.post("say", user=ANNA, text=text)
    wait_until(lambda: sandbox.state()["typing"], what="typing… in Anna's chat")
    assert sandbox.bot_messages() == []  # typing comes before the answer
    answers = wait_until(sandbox.bot_messages, what="the bot's answer")
    assert len(answers) == 1
    assert answers[0]["text"].startswith("Got 3 messages in one batch")
    assert {"type": "bold", "offset": 0, "length": len("Got 3 messages")} in answers[0]["entities"]
    assert [b["callback_data"] for b in answers[0]["buttons"][0]] == ["helpful", "buy"]
    wait_until(lambda: not sandbox.state()["typing"], what="typing to stop")
    events = [r for r in sandbox.state()["events"] if r["event"]["event_type"] == "message_batch"]
    assert len(events) == 1 and events[0]["status"] == 200
    event = events[0]["event"]
    assert [m["text"] for m in event["messages"]] == ["hello", "I need *help*", "with an order"]
    assert event["text"] == "hello\nI need *help*\nwith an order"
    assert {"event_type", "event_id", "chat_id", "user_id", "user", "messages", "batch_size", "text",
            "reason", "flood_held"} <= set(event)
    assert event["chat_id"] == ANNA and event["batch_size"] == 3 and event["reason"] == "quiet"
    assert events[0]["answer"]["reply"]["format"] == "html"  # the page shows Make's answer beside the event


def test_buttons_are_answered_and_a_test_payment_notifies_the_admin(start_sandbox) -> None:
    """A button press gets Make's callback answer; "Buy" brings an invoice; paying it is approved, recorded,
    thanked for in the chat and noticed in the admin's chat."""
    sandbox = start_sandbox("--make-delay", "0")
    sandbox.post("say", user=ANNA, text="hi")
    answer = wait_until(sandbox.bot_messages, what="the bot's answer")[0]
    pressed = sandbox.post("press", user=ANNA, message_id=answer["id"], data="helpful")
    got = wait_until(lambda: sandbox.state()["callback_answers"].get(pressed["query_id"]), what="the button's answer")
    assert got["text"] == "You pressed “helpful”"
    wait_until(lambda: any(m["text"] == "Noted: you pressed “helpful”." for m in sandbox.bot_messages()),
               what="Make's reply to the press")

    sandbox.post("press", user=ANNA, message_id=answer["id"], data="buy")
    invoice = wait_until(lambda: [m for m in sandbox.bot_messages() if "invoice" in m], what="the invoice")[0]
    assert invoice["invoice"]["total_amount"] == 10000 and invoice["invoice"]["currency"] == "RUB"
    checkout = sandbox.post("pay", user=ANNA, message_id=invoice["id"])
    approved = wait_until(lambda: sandbox.state()["checkout_answers"].get(checkout["query_id"]), what="pre-checkout")
    assert approved["ok"] is True
    notice = wait_until(lambda: sandbox.state()["admin"], what="the admin's notice")
    assert len(notice) == 1 and "100.00 ₽" in notice[0]["text"] and "Anna" in notice[0]["text"]
    wait_until(lambda: any("Payment of 100.00 RUB received" in m["text"] for m in sandbox.bot_messages()),
               what="the thank-you reply")
    payments = [r["event"] for r in sandbox.state()["events"] if r["event"]["event_type"] == "payment"]
    assert len(payments) == 1 and payments[0]["payment"]["amount"] == "100.00"
    assert payments[0]["payment"]["invoice_payload"] == invoice["invoice"]["payload"]


def test_several_users_have_batches_of_their_own(start_sandbox) -> None:
    """Two users writing at once get one batch each, in their own chats; a third user can be added."""
    sandbox = start_sandbox("--make-delay", "0")
    carol = sandbox.post("users", first_name="Carol")
    for user, text in ((ANNA, "a1"), (BORIS, "b1"), (ANNA, "a2"), (carol["id"], "c1")):
        sandbox.post("say", user=user, text=text)
    for user, count in ((ANNA, 2), (BORIS, 1), (carol["id"], 1)):
        replies = wait_until(lambda: sandbox.bot_messages(user), what=f"the answer to {user}")
        assert len(replies) == 1 and replies[0]["text"].startswith(f"Got {count} message")
    batches = [r["event"] for r in sandbox.state()["events"] if r["event"]["event_type"] == "message_batch"]
    assert sorted(e["chat_id"] for e in batches) == sorted([ANNA, BORIS, carol["id"]])


def test_sandbox_against_a_real_make_webhook_shows_its_events_and_answers(start_sandbox, make: MakeDouble) -> None:
    """`--make-url`: events go to the given webhook (here a double playing Make) through the page's recorder,
    and that webhook's answer reaches the emulated chat."""
    make.script((200, {"reply": {"text": "answered by *your* scenario", "format": "markdown"}}))
    sandbox = start_sandbox("--make-url", make.url + "/real-hook")
    sandbox.post("say", user=BORIS, text="is anyone there?")
    reply = wait_until(lambda: sandbox.bot_messages(BORIS), what="the real webhook's reply")[0]
    assert reply["text"] == "answered by your scenario"
    assert reply["entities"] == [{"type": "italic", "offset": 12, "length": 4}]
    assert make.events[0]["event_type"] == "message_batch" and make.events[0]["chat_id"] == BORIS
    assert make.requests[0]["headers"]["X-Event-Id"] == make.events[0]["event_id"]
    shown = sandbox.state()["events"]
    assert shown[0]["event"] == make.events[0] and shown[0]["answer"]["reply"]["text"] == "answered by *your* scenario"
    assert "stand-in" not in sandbox.state()["make"] and sandbox.state()["make"]["real"] is True
    assert "/real-hook" not in sandbox.service.text  # the webhook's secret path is not printed


def test_bad_make_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A `--make-url` that is not a URL stops the sandbox at once, saying so."""
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "sandbox", "--make-url", "hook.eu1.make.com/abc"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--make-url" in done.stderr and "Traceback" not in done.stderr


def _browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.mark.skipif(_browser() is None, reason="needs Chromium and its driver from the system's packages "
                                              "(Debian: apt-get install chromium chromium-driver); .ci/run installs them")
def test_the_chat_page_in_headless_chromium(start_sandbox, tmp_path: Path) -> None:
    """The page as a person uses it: a burst of three, "typing…", one answer, a button, a payment and the
    admin's notice; a screenshot is kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    chromium, driver_path = _browser()  # type: ignore[misc]
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or a driver
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    sandbox = start_sandbox("--make-delay", "1.5")
    browser = webdriver.Chrome(service=DriverService(executable_path=driver_path), options=options)
    try:
        browser.get(sandbox.page)

        def found(selector: str) -> list[Any]:
            return browser.find_elements(By.CSS_SELECTOR, selector)

        wait_until(lambda: found("#users button.current"), what="the page to load")
        box = browser.find_element(By.ID, "input")
        for text in ("first", "second", "third"):
            box.send_keys(text, Keys.ENTER)
        wait_until(lambda: len(found("#chat .msg.user")) == 3, what="three messages in the chat")
        wait_until(lambda: "on" in browser.find_element(By.ID, "typing").get_attribute("class"), what="typing…")
        assert found("#chat .msg.bot") == []
        answer = wait_until(lambda: found("#chat .msg.bot"), what="the answer")
        assert len(answer) == 1 and answer[0].text.startswith("Got 3 messages in one batch")
        assert answer[0].find_element(By.TAG_NAME, "b").text == "Got 3 messages"  # entities drawn as Telegram does
        wait_until(lambda: found("#events .event[data-type=message_batch]"), what="the event in the side panel")

        answer[0].find_element(By.CSS_SELECTOR, "button[data-data=helpful]").click()
        wait_until(lambda: "You pressed" in browser.find_element(By.ID, "toast").text, what="the button's answer")

        wait_until(lambda: found("#chat .msg.bot button[data-data=buy]"), what="the buy button")[0].click()
        wait_until(lambda: found("#chat .invoice button.pay"), what="the invoice")[0].click()
        wait_until(lambda: "Payment approved" in browser.find_element(By.ID, "chat").text, what="approval")
        wait_until(lambda: "Новая оплата" in browser.find_element(By.ID, "admin").text, what="the admin's notice")
        wait_until(lambda: "Payment of 100.00 RUB received" in browser.find_element(By.ID, "chat").text,
                   what="the thank-you")
        shot = tmp_path / "sandbox.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        logs = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert logs == [], json.dumps(logs)
    finally:
        browser.quit()


def test_injected_flood_control_delays_the_reply_but_loses_nothing(start_sandbox) -> None:
    """The page's "flood-control the next reply": Telegram answers the reply with 429, the gateway waits as told
    and sends it; a method the page does not offer is refused."""
    sandbox = start_sandbox("--make-delay", "0")
    sandbox.post("fail", method="sendMessage", status=429)
    sandbox.post("say", user=ANNA, text="are you there?")
    replies = wait_until(lambda: sandbox.bot_messages(), timeout=20, what="the reply after the 429")
    assert len(replies) == 1 and replies[0]["text"].startswith("Got 1 message")
    assert "Too Many Requests: retry after 3" in sandbox.service.text
    refused = httpx.post(sandbox.api + "fail", json={"method": "deleteWebhook", "status": 429}, timeout=10)
    assert refused.status_code == 400 and "method must be one of" in refused.json()["error"]


def test_half_an_emoji_from_a_user_or_from_make_breaks_nothing(start_sandbox, make: MakeDouble) -> None:
    """A lone surrogate (half an emoji) typed by a user, in a user's name, or in Make's answer: every chat goes on
    and the page's state still reads (it once made every getUpdates fail, and the page unreadable)."""
    make.script((200, b'{"reply": "half \\ud83d of a smile"}', {"Content-Type": "application/json"}),
                (200, {"reply": "whole"}))
    sandbox = start_sandbox("--make-url", make.url + "/hook")
    odd = sandbox.post("users", first_name="Eve\udfff")
    assert odd["first_name"] == "Eve\ufffd"
    sandbox.post("say", user=BORIS, text="lone \ud800 here")
    reply = wait_until(lambda: sandbox.bot_messages(BORIS), what="the answer with half an emoji")[0]
    assert reply["text"] == "half \ufffd of a smile"
    assert make.events[0]["messages"][0]["text"] == "lone \ufffd here"
    sandbox.post("say", user=ANNA, text="after")
    wait_until(lambda: sandbox.bot_messages(ANNA), what="the next chat's answer")
    assert all(r["status"] == 200 for r in sandbox.state()["events"])


def test_a_button_telegram_would_refuse_costs_the_buttons_not_the_answer(start_sandbox, make: MakeDouble) -> None:
    """Make answers with a button whose text is a number: the emulated Telegram refuses it as Telegram does, the
    gateway sends the text without buttons, and the page still draws."""
    make.script((200, {"reply": {"text": "pick one", "reply_markup": {"inline_keyboard": [[
        {"text": 5, "callback_data": 7}]]}}}))
    sandbox = start_sandbox("--make-url", make.url + "/hook")
    sandbox.post("say", user=ANNA, text="menu?")
    reply = wait_until(lambda: sandbox.bot_messages(ANNA), what="the answer without its buttons")[0]
    assert reply["text"] == "pick one" and reply["buttons"] == []
    assert "must be of type String" in sandbox.service.text  # Telegram's reason, logged by the gateway


def test_the_page_api_refuses_odd_requests_with_json(start_sandbox) -> None:
    """Every odd request gets a JSON 4xx saying why, never a 500: another Host (DNS rebinding), a form post from
    another site, numbers out of range, a button that is not there."""
    sandbox = start_sandbox("--make-delay", "0")
    sandbox.post("say", user=ANNA, text="hi")
    answer = wait_until(sandbox.bot_messages, what="the answer")[0]
    cases = [
        ({"json": {"user": ANNA, "text": "x"}, "headers": {"Host": "attacker.example"}}, "say", 403),
        ({"data": {"method": "sendMessage"}}, "fail", 415),
        ({"content": b'{"user": 1e400, "text": "x"}', "headers": JSON}, "say", 400),
        ({"content": b'{"user": %d, "message_id": 1e400, "data": "buy"}' % ANNA, "headers": JSON}, "press", 400),
        ({"json": {"user": ANNA, "message_id": answer["id"], "data": None}}, "press", 400),
        ({"json": {"user": ANNA, "message_id": answer["id"], "data": "not-a-button"}}, "press", 400),
        ({"json": {"user": ANNA, "message_id": answer["id"]}}, "pay", 400),
        ({"json": {"user": 5, "text": "x"}}, "say", 400),
        ({"json": {"user": ANNA, "text": ""}}, "say", 400),
    ]
    for kwargs, route, status in cases:
        response = httpx.post(sandbox.api + route, timeout=10, **kwargs)
        assert response.status_code == status, (route, kwargs, response.text)
        assert response.json()["ok"] is False and response.json()["error"]
    assert httpx.get(sandbox.api + "state", headers={"Host": "evil.example:80"}, timeout=10).status_code == 403


def test_a_users_page_shows_only_their_own_button_answers(start_sandbox) -> None:
    """Button and checkout answers are shown to the user who pressed, not sent to every page."""
    sandbox = start_sandbox("--make-delay", "0")
    sandbox.post("say", user=ANNA, text="hi")
    answer = wait_until(sandbox.bot_messages, what="the answer")[0]
    pressed = sandbox.post("press", user=ANNA, message_id=answer["id"], data="helpful")
    wait_until(lambda: pressed["query_id"] in sandbox.state(ANNA)["callback_answers"], what="Anna's answer")
    assert sandbox.state(BORIS)["callback_answers"] == {}


def test_a_huge_answer_from_make_is_shown_cut(start_sandbox, make: MakeDouble) -> None:
    """A 3 MB answer from Make is delivered whole to the gateway but shown cut on the page, which polls often."""
    make.script((200, b"x" * 3_000_000, {"Content-Type": "text/plain"}))
    sandbox = start_sandbox("--make-url", make.url + "/hook")
    sandbox.post("say", user=ANNA, text="hi")
    record = wait_until(lambda: [r for r in sandbox.state()["events"] if r["status"] is not None],
                        what="Make's answer on the page")[0]
    assert len(record["answer"]) < 21_000 and "3,000,000 bytes in all" in record["answer"]


@pytest.mark.parametrize("args, says", [
    (("--make-url", "http://[::1/x"), "--make-url"),
    (("--make-url", "http://"), "--make-url"),
    (("--make-delay", "50"), "MAKE_TIMEOUT_SECONDS"),
    (("--make-delay", "-1"), "--make-delay"),
    (("--port", "99999"), "--port 99999"),
], ids=["bad-ipv6", "no-host", "delay-over-timeout", "negative-delay", "port-out-of-range"])
def test_bad_sandbox_options_are_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    """An option the sandbox cannot work with stops it at once, naming the option."""
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "sandbox", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and says in done.stderr and "Traceback" not in done.stderr


def test_an_invoice_paid_once_is_refused_the_second_time(start_sandbox) -> None:
    """Paying an invoice the gateway has seen paid is refused with TEXT_ALREADY_PAID: one payment, one notice."""
    sandbox = start_sandbox("--make-delay", "0")
    message_id = sandbox.post("invoice", user=ANNA)["message_id"]
    first = sandbox.post("pay", user=ANNA, message_id=message_id)
    wait_until(lambda: sandbox.state()["checkout_answers"].get(first["query_id"]), what="the first checkout's answer")
    wait_until(lambda: sandbox.state()["admin"], what="the admin's notice")
    again = sandbox.post("pay", user=ANNA, message_id=message_id)
    refused = wait_until(lambda: sandbox.state()["checkout_answers"].get(again["query_id"]), what="the refusal")
    assert refused["ok"] is False and refused["error_message"] == "Этот счёт уже оплачен."
    assert len(sandbox.state()["admin"]) == 1
    assert len([m for m in sandbox.state()["chat"] if "successful_payment" in m]) == 1


def test_a_real_make_slower_than_the_gateway_waits_shows_as_timed_out(start_sandbox, make: MakeDouble) -> None:
    """With --make-url, a scenario slower than MAKE_TIMEOUT_SECONDS shows as given up on the page, as the gateway
    saw it, not as an answer the gateway never got."""
    make.script((200, {"reply": "too late"}, {}, 4.0), (200, {"reply": "in time"}))
    sandbox = start_sandbox("--make-url", make.url + "/hook", MAKE_TIMEOUT_SECONDS="2")
    sandbox.post("say", user=ANNA, text="hi")
    reply = wait_until(lambda: sandbox.bot_messages(), timeout=30, what="the answer of the retry")[0]
    assert reply["text"] == "in time"
    first = sandbox.state()["events"][0]
    assert first["status"] == 504 and "did not answer within 1.5 s" in first["answer"]


def test_a_second_ctrl_c_while_stopping_is_no_traceback(start_sandbox, make: MakeDouble) -> None:
    """Ctrl-C while Make holds a call (the stop waits for it), then Ctrl-C again: still a clean stop, status 0."""
    make.script((200, {"reply": "late"}, {}, 6.0))
    sandbox = start_sandbox("--make-url", make.url + "/hook")
    sandbox.post("say", user=ANNA, text="hi")
    wait_until(lambda: make.open == 1, what="Make to hold the call")
    proc = sandbox.service.proc
    assert proc is not None
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "INFO gateway [MainThread] stopping" in sandbox.service.text, what="the stop to begin")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, sandbox.service.text
    assert "Traceback" not in sandbox.service.text and "stopped" in sandbox.service.text
