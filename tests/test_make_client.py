"""make_client.py: what Make's answer means (pure classification) and delivery against a real Make double."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from doubles import MakeDouble, free_port
from make_client import Delivered, MakeClient, RetryLater, classify, parse_replies, parse_retry_after

EVENT = {"event_type": "message_batch", "event_id": "batch-abc", "chat_id": 42, "user_id": 42,
         "messages": [{"type": "text", "text": "привет 👋"}], "batch_size": 1, "text": "привет 👋",
         "reason": "quiet"}


def headers(**values: str) -> httpx.Headers:
    """Response headers as MakeClient receives them (names case-insensitive)."""
    return httpx.Headers({name.replace("_", "-"): value for name, value in values.items()})


# classify(): (status, headers, text) -> outcome

@pytest.mark.parametrize("status,text,replies", [
    (200, "Accepted", []),
    (200, "", []),
    (200, '{"reply": "x"}', ["x"]),
    (200, '{"replies": ["a", "b"]}', ["a", "b"]),
    (200, '{"reply": "first", "replies": ["second"]}', ["first", "second"]),
    (200, '{"reply": "   "}', []),
    (200, '["a list", "is not an answer"]', []),
    (200, "{not json", []),
    (202, '{"reply": "later"}', ["later"]),
    (204, "", []),
])
def test_any_2xx_is_delivered_with_its_replies(status: int, text: str, replies: list[str]) -> None:
    """Every 2xx is delivered; a JSON `reply` or `replies` becomes texts to send, anything else none."""
    outcome = classify(status, headers(), text)
    assert isinstance(outcome, Delivered)
    assert (outcome.status, outcome.replies) == (status, replies)


@pytest.mark.parametrize("status,text", [
    (500, "Internal Server Error"),
    (502, "<html>Bad Gateway</html>"),
    (503, "Service Unavailable"),
    (429, "Too Many Requests"),
    (400, "Queue is full."),
    (400, "queue IS FULL"),
])
def test_transient_failures_are_retried_and_not_permanent(status: int, text: str) -> None:
    """5xx, 429 and Make's `400 Queue is full` are retried as transient, not reported as permanent."""
    outcome = classify(status, headers(), text)
    assert isinstance(outcome, RetryLater)
    assert not outcome.permanent
    assert str(status) in outcome.reason


@pytest.mark.parametrize("status,text", [
    (410, "There is no scenario listening for this webhook."),
    (404, "Not Found"),
    (400, "Bad Request: malformed JSON"),
    (401, "Unauthorized"),
    (413, "Payload Too Large"),
])
def test_other_client_errors_are_permanent(status: int, text: str) -> None:
    """410 (webhook gone), 404 and other 4xx are retried later but flagged permanent, for health to report."""
    outcome = classify(status, headers(), text)
    assert isinstance(outcome, RetryLater)
    assert outcome.permanent
    assert str(status) in outcome.reason


def test_gone_webhook_names_the_setting_to_check() -> None:
    """A 410 says the Make webhook is gone and points at MAKE_WEBHOOK_URL."""
    outcome = classify(410, headers(), "Gone")
    assert isinstance(outcome, RetryLater) and "MAKE_WEBHOOK_URL" in outcome.reason


def test_retry_after_in_seconds_is_honoured() -> None:
    """A 429 with `Retry-After: 7` asks for a 7-second wait."""
    outcome = classify(429, headers(Retry_After="7"), "slow down")
    assert isinstance(outcome, RetryLater) and outcome.retry_after == 7.0


def test_retry_after_as_http_date_is_honoured() -> None:
    """A 503 with an HTTP-date `Retry-After` asks to wait until then."""
    wait = 120
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=wait), usegmt=True)
    outcome = classify(503, headers(Retry_After=when), "maintenance")
    assert isinstance(outcome, RetryLater)
    assert outcome.retry_after is not None and wait - 5 <= outcome.retry_after <= wait


def test_retry_after_without_a_header_is_none() -> None:
    """Without `Retry-After` the outcome leaves the wait to the backoff."""
    outcome = classify(500, headers(), "oops")
    assert isinstance(outcome, RetryLater) and outcome.retry_after is None


def test_parse_retry_after_forms() -> None:
    """Seconds, past and future dates, and garbage give a wait, zero, a wait and None."""
    now = datetime(2025, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("30", now) == 30.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now) == 0.0
    assert parse_retry_after("-5", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None


def test_long_error_bodies_are_cut_in_the_reason() -> None:
    """A huge error page does not end up whole in the reason (it is logged and shown in health)."""
    outcome = classify(500, headers(), "<html>" + "x" * 10_000 + "</html>")
    assert isinstance(outcome, RetryLater) and len(outcome.reason) < 300


@pytest.mark.parametrize("body,replies", [
    ({"reply": 5}, [5]),
    ({"reply": None, "replies": None}, []),
    ({"reply": {"text": "rich", "format": "markdown"}}, [{"text": "rich", "format": "markdown"}]),
    ({"replies": ["a", 1, None, {"text": "b"}, ["c"], "d", "", "  "]}, ["a", 1, {"text": "b"}, ["c"], "d"]),
    ({"replies": "one string"}, ["one string"]),
    ({"reply": ["x", "y"], "replies": {"text": "z"}}, ["x", "y", {"text": "z"}]),
    ("just a string", []),
    (None, []),
    ([{"reply": "x"}], []),
])
def test_parse_replies_takes_the_items_as_they_are(body: Any, replies: list[Any]) -> None:
    """The items of `reply` and then of `replies`, each one item or a list of them, are taken unread, in
    order, blank strings and nulls left out: reading each (and logging a bad one) is the delivery's work."""
    assert parse_replies(body) == replies


# MakeClient.deliver() against the Make double


def test_deliver_posts_the_event_with_its_id_header(make: MakeDouble) -> None:
    """The event goes as JSON with `X-Event-Id`, and Make's plain "Accepted" is delivered."""
    client = MakeClient(make.url + "/hook", timeout=5)
    try:
        outcome = client.deliver(EVENT["event_id"], EVENT)
    finally:
        client.close()
    assert isinstance(outcome, Delivered) and (outcome.status, outcome.replies) == (200, [])
    assert make.events == [EVENT]
    sent = {k.lower(): v for k, v in make.requests[0]["headers"].items()}
    assert sent["x-event-id"] == EVENT["event_id"]
    assert sent["content-type"].startswith("application/json")


def test_deliver_reads_replies_and_retry_after_from_make(make: MakeDouble) -> None:
    """A JSON reply comes back as replies; a 429 with `Retry-After` comes back as RetryLater with that wait."""
    make.script((200, {"reply": "Здравствуйте!"}), (429, "Too Many Requests", {"Retry-After": "3"}))
    client = MakeClient(make.url + "/hook", timeout=5)
    try:
        first = client.deliver("e1", EVENT)
        second = client.deliver("e2", EVENT)
    finally:
        client.close()
    assert isinstance(first, Delivered) and (first.status, first.replies) == (200, ["Здравствуйте!"])
    assert isinstance(second, RetryLater) and second.retry_after == 3.0 and not second.permanent


def test_deliver_to_a_closed_port_is_retry_later() -> None:
    """With nothing listening, delivery is RetryLater, not an exception."""
    client = MakeClient(f"http://127.0.0.1:{free_port()}/hook", timeout=2)
    try:
        outcome = client.deliver("e1", EVENT)
    finally:
        client.close()
    assert isinstance(outcome, RetryLater) and not outcome.permanent


def test_deliver_to_a_slow_scenario_times_out_as_retry_later(make: MakeDouble) -> None:
    """When Make answers after the client's timeout, delivery gives up in about that time and says RetryLater."""
    make.script((200, "Accepted", {}, 2.0))
    client = MakeClient(make.url + "/hook", timeout=1)
    started = time.monotonic()
    try:
        outcome = client.deliver("e1", EVENT)
    finally:
        client.close()
    elapsed = time.monotonic() - started
    assert isinstance(outcome, RetryLater) and not outcome.permanent
    assert elapsed < 1.9, f"the client waited {elapsed:.2f} s, past its 1 s timeout"
    assert len(make.requests) == 1  # the request did reach Make: delivery is at least once


def test_close_is_safe_twice() -> None:
    """Closing the client twice is harmless."""
    client = MakeClient("http://127.0.0.1:9/hook")
    client.close()
    client.close()


def test_an_answer_nested_too_deep_to_read_is_still_delivered() -> None:
    """A 2xx whose JSON is nested past Python's recursion limit is delivered (without replies), never an error
    that would post the event again."""
    deep = "[" * 200_000 + "]" * 200_000
    outcome = classify(200, {}, '{"callback_answer": ' + deep + "}")
    assert isinstance(outcome, Delivered) and outcome.replies == [] and outcome.body is None


def test_make_over_its_rate_limit_throttles_the_whole_webhook() -> None:
    """429 and "Queue is full" say the webhook as a whole is refusing: `throttled`; a 500 is not."""
    assert classify(429, {"Retry-After": "2"}, "Too many requests").throttled
    assert classify(400, {}, "Queue is full.").throttled
    assert not classify(500, {}, "Scenario failed to complete.").throttled


def test_an_answer_that_looks_like_json_but_is_not_says_so() -> None:
    """A model's text with quotes mapped into a hand-written JSON body: delivered (Make ran the scenario),
    no replies, and a problem for the log; a plain `Accepted` has none."""
    outcome = classify(200, headers(), '{"reply": "He said "yes""}')
    assert isinstance(outcome, Delivered) and outcome.replies == [] and "looks like JSON but is not" in outcome.problem
    assert classify(200, headers(), "Accepted") == Delivered(200, [], None)


@pytest.mark.parametrize("event_id, header", [("batch-0a1b", "batch-0a1b"), ("payment-ch\x00-77", "payment-ch%00-77"),
                                              ("payment-заказ", "payment-%D0%B7%D0%B0%D0%BA%D0%B0%D0%B7")])
def test_an_event_id_any_header_can_carry_goes_out(event_id: str, header: str) -> None:
    """An event id that holds NUL or non-ASCII (from a payment's charge id) is percent-encoded in X-Event-Id, so
    the event is delivered, its body keeping the id as it is, instead of failing for ever in the client."""
    make = MakeDouble()
    client = MakeClient(make.url + "/hook", timeout=5)
    try:
        outcome = client.deliver(event_id, {"event_id": event_id})
        assert isinstance(outcome, Delivered)
        assert make.requests[0]["headers"]["X-Event-Id"] == header and make.events == [{"event_id": event_id}]
    finally:
        client.close()
        make.close()


class _CountingMake(ThreadingHTTPServer):
    """A keep-alive Make webhook that counts the connections it accepts and holds each call until `together`
    calls are open at once (then answers them all)."""

    daemon_threads = True

    def __init__(self, together: int) -> None:
        self.connections = 0
        self.barrier = threading.Barrier(together, timeout=10)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer.connections += 1  # one handler per connection

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                if outer.barrier is not None:
                    outer.barrier.wait()
                self.send_response(200)
                self.send_header("Content-Length", "8")
                self.end_headers()
                self.wfile.write(b"Accepted")

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_calls_in_flight_each_have_a_connection_and_later_calls_reuse_them() -> None:
    """Calls made at once are all open at Make at once (none waits behind another for a connection), and calls
    made afterwards go over the connections kept alive, opening none; after `close()` a call fails as a
    permanent RetryLater, never an exception."""
    server = _CountingMake(together=6)
    client = MakeClient(f"http://127.0.0.1:{server.server_port}/hook", timeout=10)
    try:
        outcomes: list[Any] = []
        callers = [threading.Thread(target=lambda n=n: outcomes.append(client.deliver(f"e{n}", EVENT)))
                   for n in range(6)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(15)
        assert len(outcomes) == 6 and all(isinstance(outcome, Delivered) for outcome in outcomes), outcomes
        assert server.connections == 6
        server.barrier = None
        for n in range(12):
            assert isinstance(client.deliver(f"later-{n}", EVENT), Delivered)
        assert server.connections == 6  # the one connection open now was one of the six
        client.close()
        after = client.deliver("after-close", EVENT)
        assert isinstance(after, RetryLater) and after.permanent
    finally:
        client.close()
        server.shutdown()
        server.server_close()
