"""Hostile bodies and broken Unicode: oversized and slow requests, numbers that overflow, lone surrogates
from Make and from `POST /reply`, and the rule that an event Make accepted is never posted again."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app import MAX_BODY_BYTES
from config import derive_webhook_secret
from delivery import DeliveryWorkers, reply_calls
from doubles import ROOT, TOKEN, MakeDouble, RawServer, TelegramDouble, wait_until
from helpers import text_update
from make_client import Delivered, MakeClient, RetryLater, classify
from replies import MAX_REPLY_CHARS, MAX_REPLY_MESSAGES
from store import NewEvent, SQLiteStore
from telegram_api import TelegramClient
from typing_keepalive import TypingKeepAlive

SECRET_HEADER = f"X-Telegram-Bot-Api-Secret-Token: {derive_webhook_secret(TOKEN)}\r\n"
REPLY_AUTH = {"Authorization": "Bearer reply-token"}


def _connect(service) -> socket.socket:
    port = int(service.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_status(sock: socket.socket) -> str:
    """The status line of the first answer on `sock` (waits up to the socket's timeout)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def _closed_by_server(sock: socket.socket, timeout: float = 15.0) -> bool:
    """Read whatever is left on `sock`; True once the server closes it, False if it is still open at `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return True


# Bodies and connections


@pytest.mark.parametrize("path, header", [("/webhook", ""), ("/webhook", SECRET_HEADER),
                                          ("/reply", "Authorization: Bearer reply-token\r\n")])
def test_body_over_the_limit_is_refused_from_its_headers_before_it_is_sent(start_service, path: str,
                                                                           header: str) -> None:
    """A request announcing a 1 GB body gets 413 while not one byte of the body has been sent, with or
    without the secret; the service goes on answering."""
    service = start_service(REPLY_TOKEN="reply-token")
    with _connect(service) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{header}"
                     f"Content-Length: 1000000000\r\n\r\n".encode())
        assert _read_status(sock).split()[1] == "413"
    assert service.get("/").status_code == 200


def test_body_at_the_limit_reaches_the_app_and_one_byte_more_does_not(start_service) -> None:
    """The limit is one constant: a body of exactly MAX_BODY_BYTES is read (and refused as not JSON),
    one byte more is 413 from the headers."""
    service = start_service()
    secret = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}
    at_limit = service.post("/webhook", content=b" " * MAX_BODY_BYTES, headers=secret)
    assert at_limit.status_code == 400 and at_limit.json()["error"] == "body is not JSON"
    with _connect(service) as sock:
        sock.sendall(f"POST /webhook HTTP/1.1\r\nHost: gw\r\n{SECRET_HEADER}"
                     f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        assert _read_status(sock).split()[1] == "413"


def test_chunked_body_over_the_limit_is_cut_off(start_service) -> None:
    """A chunked body (no length announced) is refused with 413 once it passes the limit, not read to its end."""
    service = start_service()
    with _connect(service) as sock:
        sock.sendall(f"POST /webhook HTTP/1.1\r\nHost: gw\r\n{SECRET_HEADER}"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 65536
        status = ""
        try:
            for _ in range(4 * MAX_BODY_BYTES // len(chunk)):  # four times the limit, if nobody stops us
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        status = _read_status(sock)
    assert status.split()[1] == "413"


@pytest.fixture()
def serve_app() -> Any:
    """Serve a bare WSGI app with the gateway's server on a free port; its base URL. Closed after the test."""
    from config import Config
    from http_server import HTTPServer, listening_urls
    servers: list[Any] = []

    def serve(app: Any) -> str:
        config = Config.from_env(environ={"BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": "http://127.0.0.1:9/hook",
                                          "HOST": "127.0.0.1", "PORT": "0"}, dotenv_path=None)
        server = HTTPServer(app, config)
        servers.append(server)
        server.start()
        return listening_urls(server)[0]

    yield serve
    for server in servers:
        server.close()


@pytest.mark.parametrize("form", [3, 2, 1])
def test_granian_is_handed_a_socket_in_the_form_its_system_takes(monkeypatch: pytest.MonkeyPatch, form: int) -> None:
    """granian's SocketHolder takes (fd, uds, backlog) on Linux, (fd, uds) on macOS, (socket,) on Windows: each
    form is found, whichever system this runs on."""
    import granian._granian
    from http_server import _socket_holder
    made: list[tuple[Any, ...]] = []

    class Holder:
        def __init__(self, *args: Any) -> None:
            if len(args) != form:
                raise TypeError(f"takes {form} positional arguments but {len(args)} were given")
            made.append(args)

    monkeypatch.setattr(granian._granian, "SocketHolder", Holder)
    with socket.create_server(("127.0.0.1", 0)) as sock:
        assert isinstance(_socket_holder(sock), Holder)
    assert len(made) == 1 and len(made[0]) == form and isinstance(made[0][0], int)
    socket.socket(fileno=made[0][0]).close()


def _odd_app(environ: dict, start_response: Any) -> Any:
    """WSGI apps that break the rules in the ways a server must survive, by path."""
    path = environ["PATH_INFO"]
    if path == "/status99":
        start_response("99 Odd", [])
        return [b"x"]
    if path == "/raises-first":
        start_response("200 OK", [])

        def broken() -> Any:
            raise RuntimeError("no body after all")
            yield b""  # noqa: unreachable - makes it a generator
        return broken()
    if path == "/late-start":
        def late() -> Any:
            start_response("201 Created", [("Content-Type", "text/plain")])
            yield b"made"
        return late()
    if path == "/no-start":
        return [b"nothing said"]
    start_response("200 OK", [])
    return [b"ok"]


@pytest.mark.parametrize("path, status, body", [("/status99", 500, b"internal error\n"),
                                                ("/raises-first", 500, b"internal error\n"),
                                                ("/late-start", 201, b"made"),
                                                ("/no-start", 500, b"internal error\n")])
def test_an_app_breaking_the_wsgi_rules_gets_a_500_and_the_server_goes_on(
        serve_app: Any, path: str, status: int, body: bytes) -> None:
    """A status no HTTP has, a body that fails before its first chunk, no start_response at all: a 500 (granian
    would abort the whole process on the first); start_response on the first step of the body is allowed."""
    url = serve_app(_odd_app)
    answer = httpx.get(url + path, timeout=10)
    assert (answer.status_code, answer.content) == (status, body)
    assert httpx.get(url + "/", timeout=10).content == b"ok"


def test_a_large_response_reaches_a_slow_client_whole(serve_app: Any) -> None:
    """A 24 MB response, read slowly, arrives whole: the request thread waiting for the client to take its
    output is not left waiting."""
    chunk = b"x" * (1 << 20)
    chunks = 24  # 24 MB, past the 16 MB high watermark

    def big(environ: dict, start_response: Any) -> Any:
        start_response("200 OK", [("Content-Length", str(len(chunk) * chunks))])
        return (chunk for _ in range(chunks))

    received = 0
    with httpx.stream("GET", serve_app(big), timeout=30) as response:
        for part in response.iter_raw(65536):
            received += len(part)
            time.sleep(0.001)  # a slow reader: the socket's buffers fill and the server must wait for room
    assert response.status_code == 200 and received == len(chunk) * chunks


def test_a_pipelined_response_reaches_a_slow_reader_while_the_next_request_runs(serve_app: Any) -> None:
    """Two requests sent at once on one connection: the first one's response, more than the socket takes at
    once, reaches a client reading it while the second request's task is still at work (it used to wait,
    unsent, until that task wrote or ended)."""
    size = 3_000_000

    def app(environ: dict, start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/big":
            start_response("200 OK", [("Content-Length", str(size))])
            return [b"x" * size]
        time.sleep(4)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    port = int(serve_app(app).rsplit(":", 1)[1])
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)  # the client reads a moment later: the socket is full by then
        client.settimeout(10)
        started, received = time.monotonic(), 0
        while received < size:
            data = client.recv(65536)
            assert data
            received += len(data)
        assert time.monotonic() - started < 2
    finally:
        client.close()


def test_a_request_trickling_in_is_dropped_and_others_are_served(start_service) -> None:
    """A client sending its headers a byte at a time (slowloris) has its connection closed once
    HTTP_REQUEST_TIMEOUT_SECONDS pass after its first byte; the service answers others meanwhile."""
    service = start_service(HTTP_REQUEST_TIMEOUT_SECONDS="1")
    with _connect(service) as sock:
        sock.settimeout(0.2)
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: gw\r\n")
        closed = False
        sent = 0
        deadline = time.monotonic() + 15
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"X"[:1])
                sent += 1
                closed = sock.recv(1) == b""
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, f"still open after {sent} trickled bytes"
        assert service.get("/").status_code == 200


@pytest.mark.parametrize("path, headers", [("/webhook", "X-Telegram-Bot-Api-Secret-Token: wrong\r\n"),
                                           ("/reply", "Authorization: Bearer wrong\r\n"),
                                           ("/", ""), ("/nowhere", "")])
def test_a_body_never_sent_without_the_secret_holds_no_connection(start_service, path: str, headers: str) -> None:
    """A request whose body is promised and never sent (or trickled) is answered from its headers when its
    client has no secret, and its connection closed at once: only a client with the secret is read from."""
    service = start_service(REPLY_TOKEN="reply-token-0123456789")
    with _connect(service) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: gw\r\n{headers}Content-Length: 100000\r\n\r\n".encode())
        assert _read_status(sock).split()[1] in ("401", "404", "405")
        assert _closed_by_server(sock, timeout=5)


def test_a_client_that_stops_reading_its_answers_is_dropped(start_service) -> None:
    """A client that pipelines requests and never reads the answers would hold its connection for ever (hyper
    has no write timeout): once our data has waited unread for twice HTTP_REQUEST_TIMEOUT_SECONDS, the
    connection is dropped, and others are served meanwhile."""
    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("TCP_USER_TIMEOUT is Linux's; elsewhere a proxy in front bounds this")
    service = start_service(HTTP_REQUEST_TIMEOUT_SECONDS="1")
    port = int(service.url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(1)
    try:
        request = b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n"
        dropped = False
        deadline = time.monotonic() + 30
        while not dropped and time.monotonic() < deadline:
            try:
                sock.sendall(request * 50)
            except socket.timeout:
                pass  # our side is full too: the server has stopped reading us, and waits on its write
            except OSError:  # reset or broken pipe: dropped
                dropped = True
        assert dropped, "still connected after 30 s of unread answers"
        assert service.get("/ready").status_code == 200
    finally:
        sock.close()


def test_a_stalled_body_from_a_client_with_the_secret_leaves_threads_for_the_others(start_service) -> None:
    """A body that stops midway (a client with the secret, or a half-open connection) holds its request thread:
    only so many threads may read bodies at once, so `/ready` keeps one, and a webhook past that is told 503
    (Telegram sends it again) instead of waiting behind the stalled one."""
    service = start_service(HTTP_THREADS="2")
    with _connect(service) as stalled:
        stalled.sendall(f"POST /webhook HTTP/1.1\r\nHost: gw\r\n{SECRET_HEADER}Content-Length: 100\r\n\r\n"
                        '{"update_id": 1'.encode())
        wait_until(lambda: service.get("/ready").status_code == 200, what="/ready answered beside the stall")
        answer = wait_until(lambda: (r := service.post("/webhook", json=text_update("hello"),
                                                          headers=_secret())).status_code == 503 and r,
                            what="a second body refused while the first stalls")
        assert answer.json() == {"ok": False, "error": "busy; try again"}
    # The stalled client gone, bodies are read again.
    assert wait_until(lambda: service.post("/webhook", json=text_update("again"), headers=_secret()).status_code
                      == 200, what="the webhook back")


def test_a_burst_of_bodies_sent_a_moment_after_their_headers_is_all_taken(start_service) -> None:
    """Forty webhooks at once, each body following its headers by 50 ms (a client or proxy that streams it):
    more than the threads that may read bodies, yet none is refused, since each wait for a reading slot is
    short; only a body stalled for longer than that is answered 503."""
    service = start_service(HTTP_THREADS="8")
    statuses: list[str] = []

    def post(n: int) -> None:
        body = json.dumps(text_update(f"burst {n}", user_id=500 + n)).encode()
        with _connect(service) as sock:
            sock.sendall(f"POST /webhook HTTP/1.1\r\nHost: gw\r\n{SECRET_HEADER}Content-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode())
            time.sleep(0.05)
            sock.sendall(body)
            statuses.append(_read_status(sock))

    posters = [threading.Thread(target=post, args=(n,)) for n in range(40)]
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join(30)
    assert len(statuses) == 40 and all(status.split()[1] == "200" for status in statuses), statuses


def test_a_request_whose_client_hung_up_is_waited_for_at_stop(serve_app: Any) -> None:
    """A client that hangs up leaves its request running in the app (granian drops only the connection): a stop
    waits for it, so no request thread is left to call into Python while the interpreter exits."""
    import http_server
    from config import Config
    running, finished = threading.Event(), threading.Event()

    def slow(environ: dict, start_response: Any) -> Any:
        running.set()
        time.sleep(1.5)
        finished.set()
        start_response("200 OK", [])
        return [b"late"]

    config = Config.from_env(environ={"BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": "http://127.0.0.1:9/hook",
                                      "HOST": "127.0.0.1", "PORT": "0"}, dotenv_path=None)
    server = http_server.HTTPServer(slow, config)
    server.start()
    port = server.addresses[0][1]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert running.wait(10)
    assert server.close() and finished.is_set()


def test_a_second_sigterm_after_the_stop_does_not_change_the_exit_status(start_service) -> None:
    """Once stopped, the process ignores another SIGTERM while it exits (a supervisor's repeat, a second
    Ctrl-C): it ends with status 0, not killed by the signal."""
    service = start_service()
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopped" in service.text or service.proc.poll() is not None, what="the stop")
    if service.proc.poll() is None:
        service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(30) == 0


def test_log_bursts_go_to_a_pipe_in_whole_lines_of_at_most_pipe_buf() -> None:
    """A burst of log lines written to a pipe others also write to goes in pieces the system keeps whole (at
    most PIPE_BUF bytes, whole lines; a longer line alone), so no one else's output lands inside a line."""
    import select as select_module

    from app import _atomic_pieces
    size = getattr(select_module, "PIPE_BUF", 512)
    burst = b"".join(b"2026-11-27 line %d of a burst\n" % n for n in range(2000)) + b"T" * (size * 2) + b"\nend\n"
    pieces = _atomic_pieces(burst, size)
    assert b"".join(pieces) == burst and all(piece.endswith(b"\n") for piece in pieces)
    assert all(len(piece) <= size for piece in pieces if piece.count(b"\n") > 1)
    assert _atomic_pieces(burst, 0) == [burst]  # a file or terminal: one write


def test_sigterm_with_a_request_stalled_midway_stops_with_status_0(start_service) -> None:
    """SIGTERM while a request's body has stalled: the service waits a few seconds for it, then stops anyway,
    with status 0 (not an abort: granian's threads are left to the process's end, not to a half-torn-down
    interpreter)."""
    service = start_service()
    with _connect(service) as stalled:
        stalled.sendall(f"POST /webhook HTTP/1.1\r\nHost: gw\r\n{SECRET_HEADER}Content-Length: 100\r\n\r\n"
                        '{"update_id": 1'.encode())
        wait_until(lambda: service.get("/ready").status_code == 200, what="the service serving beside the stall")
        assert service.stop(timeout=30) == 0
    assert "requests still under way" in service.text and "stopped" in service.text


def test_a_silent_connection_is_closed_after_the_request_timeout(start_service) -> None:
    """A connection that never sends a byte is closed HTTP_REQUEST_TIMEOUT_SECONDS after it opened (it
    held a connection slot for 30 s before), and one kept alive after a request is closed as idle."""
    service = start_service(HTTP_REQUEST_TIMEOUT_SECONDS="1")
    with _connect(service) as silent, _connect(service) as kept_alive:
        kept_alive.sendall(b"GET /ready HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert _read_status(kept_alive).split()[1] == "200"
        assert _closed_by_server(silent) and _closed_by_server(kept_alive)


def test_expect_continue_with_a_body_over_the_limit_gets_413_not_continue(start_service) -> None:
    """A client asking `Expect: 100-continue` for a 1 GB body is told 413, never "100 Continue"."""
    service = start_service()
    with _connect(service) as sock:
        sock.sendall(f"POST /webhook HTTP/1.1\r\nHost: gw\r\n{SECRET_HEADER}Expect: 100-continue\r\n"
                     "Content-Length: 1000000000\r\n\r\n".encode())
        assert _read_status(sock).split()[1] == "413"


def test_an_unreadable_content_length_closes_the_connection_without_an_error(start_service) -> None:
    """A Content-Length of 5,000 digits (more than any server reads as a number) is refused by the HTTP layer
    (400) or closes the connection; no error is logged, and the service goes on."""
    service = start_service()
    with _connect(service) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: gw\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n")
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer.split()[1] in (b"400", b"413")
    assert service.get("/").status_code == 200
    assert "Traceback" not in service.text and " ERROR " not in service.text


# Numbers that are not numbers


def _secret() -> dict[str, str]:
    return {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN), "Content-Type": "application/json"}


def test_number_overflowing_to_infinity_is_refused_and_the_chat_goes_on(start_service, make: MakeDouble) -> None:
    """`"date": 1e400` is a 400 (like NaN), nothing is stored, and the user's next message reaches Make."""
    service = start_service(WEBHOOK_URL="https://gw.example.test/webhook", DEBOUNCE_SECONDS="0.1")
    bad = json.dumps(text_update("bad", user_id=9)).replace('"date": ', '"date": 1e400, "x": ')
    refused = service.post("/webhook", content=bad.encode(), headers=_secret())
    assert refused.status_code == 400
    good = service.post("/webhook", json=text_update("good", user_id=9), headers=_secret())
    assert good.status_code == 200
    event = wait_until(lambda: make.accepted(), what="the good batch")[0]
    assert event["text"] == "good"
    assert service.health()["outbox_pending"] == 0


def test_polled_update_with_an_infinite_number_is_dropped_and_the_chat_goes_on(start_service,
                                                                          telegram: TelegramDouble,
                                                                          make: MakeDouble) -> None:
    """Polling: Telegram's JSON cannot be refused, so an update whose `date` reads as infinity is
    acknowledged and dropped (logged), never stored to block its chat; the next message reaches Make."""
    service = start_service(DEBOUNCE_SECONDS="0.1")
    bad = text_update("bad", user_id=9)
    bad["message"]["date"] = float("inf")  # the double writes it as `Infinity`, which httpx reads back as inf
    telegram.push_update(bad)
    telegram.push_update(text_update("good", user_id=9))
    event = wait_until(lambda: make.accepted(), what="the good batch")[0]
    assert event["text"] == "good"
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="nothing left to send")
    health = service.health()
    assert (health["outbox_dead"], health["make"]["failed_attempts"], len(make.requests)) == (0, 0, 1)
    assert "quarantined" in service.get("/metrics").text


_NUMBERS = st.one_of(
    st.sampled_from(["1e400", "-1e400", "1e308", "2.5e-400", "-0", "0.0", "9" * 30, "-" + "9" * 25,
                     "1" + "0" * 5000, "1.5", "123456789012345678901234567890.5"]),
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-9, 9), st.integers(-500, 500)),
)
_STRINGS = st.one_of(
    st.text().map(lambda t: json.dumps(t, ensure_ascii=True)),
    st.lists(st.sampled_from(["\\ud83d", "\\ude00", "\\ud83d\\ude00", "\\u0000", "a", "\\\\", "\\n", "é"]),
             max_size=8).map(lambda parts: '"' + "".join(parts) + '"'),
)


def test_numbers_and_strings_in_updates_are_refused_or_stored_and_always_sendable(start_service,
                                                                                make: MakeDouble) -> None:
    """Property: an update whose date, ids and texts are any JSON numbers or strings (overflowing exponents,
    huge integers, lone surrogates, NUL) gets 200 or 400, never 500; whatever was stored reaches Make
    as JSON, and no event is refused by the gateway itself."""
    service = start_service(WEBHOOK_URL="https://gw.example.test/webhook", DEBOUNCE_SECONDS="0.05",
                            MAX_WAIT_SECONDS="0.2", FLOOD_MAX_MESSAGES="100000")
    answers: list[int] = []
    counter = iter(range(10_000_000, 20_000_000))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(date=_NUMBERS, chat=st.integers(1, 10**6).map(str) | _NUMBERS, text=_STRINGS, name=_STRINGS)
    @example(date="1e400", chat="5", text='"x"', name='"n"')
    @example(date="1", chat="5", text='"\\ud83d"', name='"\\udc00"')
    def check(date: str, chat: str, text: str, name: str) -> None:
        body = (f'{{"update_id": {next(counter)}, "message": {{"message_id": 1, "date": {date}, '
                f'"from": {{"id": 77, "is_bot": false, "first_name": {name}}}, '
                f'"chat": {{"id": {chat}, "type": "private"}}, "text": {text}}}}}')
        status = service.post("/webhook", content=body.encode(), headers=_secret()).status_code
        assert status in (200, 400), body
        answers.append(status)

    check()
    assert 200 in answers and 400 in answers
    wait_until(lambda: service.health()["outbox_pending"] == 0 and service.health()["active_batches"] == 0,
               timeout=30, what="every stored event to reach Make")
    health = service.health()
    assert health["outbox_dead"] == 0 and health["make"]["failed_attempts"] == 0
    assert "not valid JSON" not in service.text and "Traceback" not in service.text
    assert make.accepted()


# Broken Unicode from Make and from /reply


def test_make_reply_with_half_an_emoji_is_sent_repaired_and_the_batch_is_not_posted_again(
        start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """Make's `{"reply": "… \\ud83d"}` reaches the chat with U+FFFD in place of the half emoji; the batch
    is posted to Make once, and the chat's next message goes through."""
    make.script((200, {"reply": "Готово \ud83d", "replies": ["второй \udc00 ответ"]}))
    service = start_service(DEBOUNCE_SECONDS="0.1", MAKE_RETRY_MAX_SECONDS="0.2")
    telegram.push_update(text_update("first", user_id=11))
    sent = wait_until(lambda: len(telegram.calls_of("sendMessage")) == 2 and telegram.calls_of("sendMessage"),
                      what="both replies")
    assert [m["text"] for m in sent] == ["Готово \ufffd", "второй \ufffd ответ"]
    telegram.push_update(text_update("second", user_id=11))
    wait_until(lambda: len(make.requests) == 2, what="the second batch")
    assert [e["text"] for e in make.events] == ["first", "second"]
    assert service.health()["outbox_dead"] == 0


def test_reply_route_repairs_half_an_emoji(start_service, telegram: TelegramDouble) -> None:
    """`POST /reply` with a lone surrogate in `text` is a 200, sent with U+FFFD (it was a 500)."""
    service = start_service(REPLY_TOKEN="reply-token")
    body = b'{"chat_id": 5, "text": "cut \\ud83d emoji \\udc00"}'
    answer = service.post("/reply", content=body, headers={**REPLY_AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert telegram.calls_of("sendMessage")[-1]["text"] == "cut \ufffd emoji \ufffd"


# Make's answers, fuzzed: an event Make accepted is never posted again

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
_REPLY_TEXT = st.text() | st.sampled_from(["\ud83d", "a\udc00b", "", "  ", "x" * 9000, "\U0001F600" * 2100])
_SHAPES = st.fixed_dictionaries({}, optional={
    "reply": _REPLY_TEXT | _JSON,
    "replies": st.lists(_REPLY_TEXT | _JSON, max_size=4) | _JSON,
    "callback_answer": st.fixed_dictionaries({}, optional={"text": _REPLY_TEXT, "show_alert": _JSON,
                                                            "url": _REPLY_TEXT, "cache_time": _JSON}) | _JSON,
})
_BODIES = st.one_of(
    _SHAPES.map(lambda shape: json.dumps(shape).encode()),
    _JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=300),
    st.sampled_from([b"Accepted", b"", b"\xff\xfe{", b'{"reply": "\\ud83d"', b'{"reply": 1e400}', b"[" * 5000,
                     b'{"reply": "ok", "reply": NaN}']),
)


def test_any_answer_from_make_ends_delivered_or_retried_never_posted_twice(
        tmp_path: Path, make: MakeDouble, telegram: TelegramDouble, caplog: pytest.LogCaptureFixture) -> None:
    """Property: whatever Make answers (status, content type, body bytes, JSON shapes), the event ends
    delivered after one post when the status is 2xx, or waits for a retry otherwise; never stays in flight,
    never fails in the gateway, and every Bot API call it leads to can be sent as JSON."""
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))
    client = TelegramClient(TOKEN, telegram.url)
    make_client = MakeClient(make.url + "/hook", timeout=5)
    workers = DeliveryWorkers(store, make_client, TypingKeepAlive(client, "off"), max_age_seconds=3600)
    db = sqlite3.connect(str(tmp_path / "state.sqlite3"))
    counter = iter(range(1_000_000))

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(status=st.sampled_from([200, 201, 202, 204, 299, 400, 404, 410, 429, 500, 503]),
           content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1",
                                         "text/html", None]),
           body=_BODIES, pressed=st.booleans())
    @example(status=200, content_type="application/json", body=b'{"reply": "cut \\ud83d", "replies": ["x"]}',
             pressed=False)
    @example(status=200, content_type="application/json",
             body=b'{"callback_answer": {"text": "\\udc00", "show_alert": true}}', pressed=True)
    def check(status: int, content_type: str | None, body: bytes, pressed: bool) -> None:
        n = next(counter)
        event_id = f"ev-{n}"
        update = {"update_id": n, "callback_query": {"id": f"q{n}", "from": {"id": 1}, "data": "x"}}
        payload = ({"event_type": "update", "event_id": event_id, "update_type": "callback_query", "chat_id": n,
                    "update": update} if pressed
                   else {"event_type": "message_batch", "event_id": event_id, "chat_id": n, "text": "hi"})
        store.enqueue_events([NewEvent(event_id, f"chat:{n}", payload["event_type"], payload)], time.time())
        body = b"" if status == 204 else body  # HTTP: a 204 has no body (one would corrupt the next answer)
        make.script((status, body, {"Content-Type": content_type} if content_type else {}))
        posts_before = len(make.requests)
        caplog.clear()
        [row] = store.claim_due_events(time.time(), "make", 1)
        workers._handle(row)
        assert len(make.requests) == posts_before + 1
        state = db.execute("SELECT status, attempts FROM outbox WHERE event_id=?", (event_id,)).fetchone()
        if 200 <= status < 300:
            assert state is None, state  # delivered: gone from the outbox
        else:
            assert state == ("pending", 1)
            store.mark_failed(row.id, time.time(), "checked", dead=True)  # out of the next examples' way
        failures = [r for r in caplog.records if "in the gateway" in r.getMessage()
                    or "could not be handled" in r.getMessage() or "could not be read" in r.getMessage()]
        assert not failures, [r.getMessage() for r in failures]

    try:
        check()
        calls = [json.loads(text)["params"] for (text,) in db.execute(
            "SELECT payload FROM outbox WHERE target LIKE 'telegram%'")]
        assert calls, "no example led to a Bot API call"
        for params in calls:
            json.dumps(params, ensure_ascii=False, allow_nan=False).encode("utf-8")  # sendable: raises if not
    finally:
        db.close()
        make_client.close()
        client.close()
        store.close()


_REPLY_BODIES = st.one_of(
    st.fixed_dictionaries({"chat_id": st.integers(-2**64, 2**64) | _JSON, "text": _REPLY_TEXT | _JSON},
                          optional={"parse_mode": st.sampled_from(["HTML", "MarkdownV2", "x"]) | _JSON,
                                    "reply_markup": _JSON}).map(lambda b: json.dumps(b).encode()),
    _JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.sampled_from([b'{"chat_id": 1e400, "text": "x"}', b'{"chat_id": 5, "text": "\\udc00"}',
                     b'{"chat_id": 5, "text": NaN}', b"[" * 5000]),
)


def test_reply_route_answers_every_body_without_a_server_error(start_service, telegram: TelegramDouble) -> None:
    """Property: any `POST /reply` body gets 200, 202 or 400 (the Bot API double takes everything), never
    a 5xx, and every text that went out is valid UTF-8."""
    service = start_service(REPLY_TOKEN="reply-token")
    statuses: list[int] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=_REPLY_BODIES)
    @example(body=b'{"chat_id": 5, "text": "cut \\ud83d"}')
    @example(body=b'{"chat_id": 5, "text": NaN}')
    def check(body: bytes) -> None:
        answer = service.post("/reply", content=body, headers={**REPLY_AUTH, "Content-Type": "application/json"})
        assert answer.status_code in (200, 202, 400), (body, answer.status_code, answer.text)
        statuses.append(answer.status_code)

    check()
    assert 200 in statuses and 400 in statuses
    for message in telegram.calls_of("sendMessage"):
        message["text"].encode("utf-8")
    assert "Traceback" not in service.text


class _BrokenMake(MakeClient):
    """A Make client whose call fails inside the gateway (a bug), before anything is posted."""

    def deliver(self, event_id: str, payload: dict) -> object:
        raise RuntimeError("a bug in the gateway")


def test_the_gateways_own_failure_is_retried_then_a_dead_letter_once_too_old(tmp_path: Path,
                                                                            telegram: TelegramDouble) -> None:
    """An error in the gateway before Make took the event is retried like a failed call, and becomes a
    dead letter (its chat moves on) once the event is older than MAKE_MAX_AGE_HOURS; it never stays in flight."""
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))
    client = TelegramClient(TOKEN, telegram.url)
    now = [1000.0]
    workers = DeliveryWorkers(store, _BrokenMake("http://127.0.0.1:9/hook"), TypingKeepAlive(client, "off"),
                              max_age_seconds=3600, clock=lambda: now[0])
    payload = {"event_type": "message_batch", "event_id": "ev", "chat_id": 1, "text": "hi"}
    store.enqueue_events([NewEvent("ev", "chat:1", "message_batch", payload)], now[0])
    [row] = store.claim_due_events(now[0], "make", 1)
    workers._handle(row)
    assert store.outbox_stats(now[0])["outbox_pending"] == 1 and store.dead_events() == []
    now[0] += 3600
    [row] = store.claim_due_events(now[0], "make", 1)
    workers._handle(row)
    assert [r.event_id for r in store.dead_events()] == ["ev"]
    assert workers.health.dead_letters == 1 and "RuntimeError in the gateway" in workers.health.last_error
    client.close()
    store.close()


def _head(status: int, length: int, *extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


_GZIPPED = gzip.compress('{"reply": "héllo"}'.encode(), mtime=0)
_ZLIB = zlib.compress(b'{"reply": "z"}')
_RAW_DEFLATE = (lambda c: c.compress(b'{"reply": "r"}') + c.flush())(zlib.compressobj(wbits=-zlib.MAX_WBITS))
_BOMB = gzip.compress(b"0" * (64 * 1024 * 1024), mtime=0)  # 64 MiB of zeros in about 64 KB


@pytest.mark.parametrize("head, body, then, expected", [
    # The whole call: a body dribbling in past MAKE_TIMEOUT_SECONDS, a cut, a stall, after a 2xx or a 5xx.
    (_head(200, 1000), b"", "trickle", Delivered(200)),
    (_head(500, 1000), b"", "trickle", "retry"),
    (_head(200, 100), b'{"reply": "cu', "close", Delivered(200)),
    (_head(200, 100), b'{"reply": "st', "stall", Delivered(200)),
    (_head(503, 100), b"Service Un", "close", "retry"),
    # A compressed answer is decoded once.
    (_head(200, len(_GZIPPED), "Content-Encoding: gzip"), _GZIPPED, "close",
     Delivered(200, ["héllo"], {"reply": "héllo"})),
    (_head(200, len(_ZLIB), "Content-Encoding: deflate"), _ZLIB, "close", Delivered(200, ["z"], {"reply": "z"})),
    (_head(200, len(_RAW_DEFLATE), "Content-Encoding: deflate"), _RAW_DEFLATE, "close",
     Delivered(200, ["r"], {"reply": "r"})),
    # A compressed answer is never inflated past 5 MiB, nor decoded in layers.
    (_head(200, len(_BOMB), "Content-Encoding: gzip"), _BOMB, "close", Delivered(200)),
    (_head(200, len(_GZIPPED), "Content-Encoding: gzip, gzip"), _GZIPPED, "close", Delivered(200)),
    (_head(503, len(_BOMB), "Content-Encoding: gzip"), _BOMB, "close", "retry"),
], ids=["2xx-trickled", "5xx-trickled", "2xx-cut", "2xx-stalled", "5xx-cut", "gzip", "deflate", "raw-deflate",
        "2xx-gzip-bomb", "2xx-stacked", "5xx-gzip-bomb"])
def test_make_answer_read_whole_within_the_timeout_and_never_posted_twice_after_a_2xx(
        head: bytes, body: bytes, then: str, expected: object) -> None:
    """MAKE_TIMEOUT_SECONDS bounds the reading of Make's answer, not only each read; once Make has said
    2xx it ran the scenario, so an answer cut, stalled or dribbling is delivered without replies (never
    posted again), and after any other status retried; a gzip answer is read once, not decoded twice."""
    make = RawServer(lambda n, request: head + body, then)
    client = MakeClient(make.url + "/hook", timeout=1.5)
    try:
        outcome = client.deliver("ev-1", {"event_type": "message_batch", "event_id": "ev-1"})
    finally:
        client.close()
        make.close()
    if expected == "retry":
        assert isinstance(outcome, RetryLater) and not outcome.permanent, outcome
    else:
        assert outcome == expected
    assert len(make.received) == 1


def test_make_replies_are_capped_in_characters_and_in_messages(caplog: pytest.LogCaptureFixture) -> None:
    """A scenario answering 100,000 characters, or 100,000 one-letter replies, queues at most MAX_REPLY_CHARS
    characters in at most MAX_REPLY_MESSAGES messages, the first ones, in order, and says so in the log."""
    texts = [c.payload["params"]["text"] for c in reply_calls("ev", 5, ["a" * 30000, "b" * 70000, "c"])]
    assert sum(len(t) for t in texts) <= MAX_REPLY_CHARS and texts[0][0] == "a"
    assert "".join(texts) == "a" * 30000  # the next part would pass the limit: it and the rest are dropped
    many = reply_calls("ev2", 5, ["a"] * 100_000)
    assert [c.payload["params"]["text"] for c in many] == ["a"] * MAX_REPLY_MESSAGES
    assert [c.event_id for c in many] == [f"reply-ev2-{i}-0" for i in range(MAX_REPLY_MESSAGES)]
    assert caplog.text.count("the rest is dropped") == 2
    assert reply_calls("ev4", 5, [" " * 40000 + "x"]) == []  # what the limit leaves is blank: nothing to send
    assert len(reply_calls("ev3", 5, ["x" * MAX_REPLY_CHARS])) == MAX_REPLY_CHARS // 4096  # exactly at the limit
    assert caplog.text.count("the rest is dropped") == 2


def test_make_reply_sources_are_capped_in_what_is_read(caplog: pytest.LogCaptureFixture) -> None:
    """Reading markup costs time: an answer of many items that are all markup and no text stops being read
    after MAX_SOURCE_CHARS characters of sources, so it cannot hold a delivery thread for seconds."""
    empty_html = "<i></i>" * 10_000  # 70,000 characters that show nothing
    calls = reply_calls("ev", 5, [empty_html] * 50 + ["never read"], "html")
    assert calls == []
    assert caplog.text.count("skipped: text is empty once read as html") == 2  # 140,000 characters read, then stop
    assert "characters of reply sources; the rest is dropped" in caplog.text
    sent = reply_calls("ev2", 5, ["<b>first</b>", "second"], "html")
    assert [c.payload["params"]["text"] for c in sent] == ["first", "second"]


@pytest.mark.skipif(sys.platform == "win32", reason="open-file limits are a POSIX matter")
@pytest.mark.parametrize("soft, hard, expected", [(600, 600, 600 - 50 - 128), (600, None, 1000), (150, 150, 16)])
def test_connection_limit_fits_the_open_file_limit(soft: int, hard: int | None, expected: int) -> None:
    """1000 connections need more than a 600-file `ulimit -n`: the soft limit is raised where the hard
    one allows, else the connections held are lowered to fit beside Make's and Telegram's."""
    import resource
    if hard is None and resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1000 + 50 + 128:
        pytest.skip("this machine's hard open-file limit is below what 1000 connections need")
    code = ("import resource, sys; sys.path.insert(0, '.');"
            f"hard = {hard} or resource.getrlimit(resource.RLIMIT_NOFILE)[1];"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, hard));"
            "from config import Config; from http_server import connection_limit;"
            "print(connection_limit(Config(bot_token='t', make_webhook_url='https://m', make_max_concurrency=50)),"
            " resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    held, soft_after = map(int, out.stdout.split())
    assert held == expected
    assert soft_after == (soft if hard == soft else 1000 + 50 + 128)


def test_a_redirect_from_make_names_where_it_points() -> None:
    """Make never redirects a webhook: a 3xx is reported with its Location, as a setting to check."""
    outcome = classify(301, {"Location": "https://hook.eu2.make.com/abc"}, "")
    assert isinstance(outcome, RetryLater) and outcome.permanent
    assert "https://hook.eu2.make.com/abc" in outcome.reason and "MAKE_WEBHOOK_URL" in outcome.reason
