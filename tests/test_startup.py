"""A start that fails fast and says who it is: getMe at start, one-line exits (status 2) for a refused token,
a port in use, a state folder that cannot be made and no settings at all; one log line per update; the
`send-sample`, `dead-letters` and `webhook-info` commands needing only what they use. Against the real
service or CLI in a subprocess, the Bot API and Make doubles on 127.0.0.1."""

from __future__ import annotations

import _thread
import errno
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

import store as store_module
from app import serve
from config import Config
from doubles import ROOT, TOKEN, MakeDouble, RawServer, TelegramDouble, child_env, free_port, wait_until
from helpers import deliver, start_in_mode, text_update
from http_server import listen_problem
from store import NewEvent, SQLiteStore

OTHER_TOKEN = "987654321:AAG-otherTOKENotherTOKENotherTOKEN_42"  # a token the Bot API double does not know
SECRETS = (TOKEN, TOKEN.split(":")[1], OTHER_TOKEN, OTHER_TOKEN.split(":")[1])


def run_app(cwd: Path, env: dict[str, str], *args: str, timeout: float = 60,
            **popen: Any) -> subprocess.CompletedProcess[str]:
    """Run `python app.py ARGS` in `cwd` with exactly `env` (plus PATH and the like); stdout and stderr kept apart;
    `popen` goes to `subprocess.run` (e.g. the user to run as)."""
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout, **popen)


def one_line_exit(result: subprocess.CompletedProcess[str], status: int = 2) -> str:
    """Assert the run ended with `status` after printing exactly one line and no traceback; return the line."""
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.returncode == status, output
    assert len(lines) == 1, output
    assert "Traceback" not in output
    for secret in SECRETS:
        assert secret not in output
    return lines[0]


@pytest.fixture
def service_settings(service_env: dict[str, str]) -> dict[str, str]:
    """The test service's settings, at INFO, with a connection limit that fits any open-file limit (so that no
    warning about it joins the one line a failed start prints)."""
    return {**service_env, "LOG_LEVEL": "INFO", "HTTP_MAX_CONNECTIONS": "100"}


def test_start_asks_telegram_who_the_bot_is_and_logs_it(start_service, telegram: TelegramDouble) -> None:
    """getMe is called at start, before the service listens, and the log names the bot."""
    service = start_service()
    assert "running as @sandbox_gateway_bot (id 123456789)" in service.text
    assert service.text.index("running as") < service.text.index("listening on")
    assert telegram.calls[0][0] == "getMe"
    assert service.get("/ready").json() == {"ready": True}


@pytest.mark.parametrize("refusal", ["401", "404"])
def test_token_telegram_refuses_stops_the_start_with_one_line(refusal: str, tmp_path: Path, telegram: TelegramDouble,
                                                               service_settings: dict[str, str]) -> None:
    """A token Telegram refuses (401, or 404 as for a malformed one) stops the start before it listens: exit
    status 2, one line naming BOT_TOKEN, no traceback, no token."""
    env = dict(service_settings)
    if refusal == "401":
        env["BOT_TOKEN"] = OTHER_TOKEN
    else:
        telegram.script("getMe", (404, {"ok": False, "error_code": 404, "description": "Not Found"}))
    line = one_line_exit(run_app(tmp_path, env))
    assert "BOT_TOKEN" in line and f"Telegram refused BOT_TOKEN ({refusal}" in line and "@BotFather" in line
    assert all(name == "getMe" for name, _ in telegram.calls)  # nothing else was tried


def test_telegram_unreachable_at_start_then_back(start_service) -> None:
    """With Telegram unreachable the service still listens, `/ready` is 503 naming Telegram; once a Bot API
    answers on that address, getMe goes through, the bot is named and `/ready` is 200."""
    port = free_port()
    service = start_service(TELEGRAM_API_URL=f"http://127.0.0.1:{port}", LOG_LEVEL="INFO")
    ready = service.get("/ready")
    assert ready.status_code == 503
    assert any("Telegram" in reason and "getMe" in reason for reason in ready.json()["reasons"]), ready.json()
    assert "running as" not in service.text
    telegram = TelegramDouble(port=port)
    try:
        wait_until(lambda: service.get("/ready").status_code == 200, timeout=60, what="/ready once Telegram answers")
        assert service.printed("running as @sandbox_gateway_bot (id 123456789)")
        assert service.stop() == 0
    finally:
        telegram.close()


def test_token_refused_once_telegram_answers_stops_the_service_with_status_2(start_service) -> None:
    """Started while Telegram was unreachable, the service stops cleanly with exit status 2 and the one line
    naming BOT_TOKEN once Telegram answers that it refuses the token."""
    port = free_port()
    service = start_service(TELEGRAM_API_URL=f"http://127.0.0.1:{port}", LOG_LEVEL="INFO")
    telegram = TelegramDouble(token=OTHER_TOKEN, port=port)
    try:
        assert service.proc is not None
        assert service.proc.wait(60) == 2
    finally:
        telegram.close()
    refused = [line for line in service.output if "Telegram refused BOT_TOKEN (401" in line]
    assert len(refused) == 1 and "@BotFather" in refused[0]
    assert "stopped" in service.text and "Traceback" not in service.text


def test_sigterm_while_telegram_is_unreachable_stops_at_once(start_service) -> None:
    """A stop during the getMe retries is a normal stop: exit status 0, the threads wound down."""
    service = start_service(TELEGRAM_API_URL=f"http://127.0.0.1:{free_port()}", LOG_LEVEL="INFO")
    wait_until(lambda: "Telegram has not answered getMe yet" in service.text, what="a getMe retry to be planned")
    assert service.stop() == 0
    assert "stopped" in service.text and "Traceback" not in service.text


def test_port_in_use_is_one_line_naming_host_and_port(tmp_path: Path, service_settings: dict[str, str]) -> None:
    """A port another program listens on: exit status 2, one line naming HOST and PORT, no traceback."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = one_line_exit(run_app(tmp_path, {**service_settings, "PORT": str(port)}))
    assert f"HOST=127.0.0.1 PORT={port}" in line and "in use" in line
    assert "AirPlay" not in line  # only port 5000 is macOS's


def test_listen_problems_name_the_setting_and_macos_airplay_on_5000() -> None:
    """Each reason the server cannot listen is one line naming HOST/PORT; port 5000 in use mentions AirPlay."""
    airplay = listen_problem(OSError(errno.EADDRINUSE, "Address already in use"), "0.0.0.0", 5000)
    assert "PORT=5000" in airplay and "AirPlay" in airplay and "macOS" in airplay and "set PORT" in airplay
    denied = listen_problem(PermissionError(errno.EACCES, "Permission denied"), "0.0.0.0", 80)
    assert "PORT=80" in denied and "permission denied" in denied and "1024" in denied
    elsewhere = listen_problem(OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), "10.9.9.9", 8000)
    assert "10.9.9.9 is not an address of this machine" in elsewhere and "HOST" in elsewhere
    unknown = listen_problem(socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "no.such.host", 8000)
    assert "HOST=no.such.host" in unknown
    for line in (airplay, denied, elsewhere, unknown):
        assert "\n" not in line


def test_state_db_under_a_regular_file_is_one_line_naming_state_db(tmp_path: Path,
                                                                   service_settings: dict[str, str]) -> None:
    """A STATE_DB whose folder cannot be created (a file is in the way): exit status 2, one line naming STATE_DB."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    line = one_line_exit(run_app(tmp_path, {**service_settings, "STATE_DB": str(blocker / "state.sqlite3")}))
    assert "STATE_DB=" in line and f"{blocker} is a file, not a folder" in line


def test_no_dotenv_and_no_settings_say_where_it_looked(tmp_path: Path) -> None:
    """Nothing set and no `.env`: one line with the absolute path looked at and what to copy; once a `.env`
    exists, its problems are listed as before."""
    line = one_line_exit(run_app(tmp_path, {}))
    assert str(tmp_path / ".env") in line and ".env.example" in line
    assert "BOT_TOKEN" in line and "MAKE_WEBHOOK_URL" in line
    (tmp_path / ".env").write_text(f"BOT_TOKEN={TOKEN}\n")
    listed = run_app(tmp_path, {})
    assert listed.returncode == 2 and "configuration error" in listed.stderr
    assert "MAKE_WEBHOOK_URL is required" in listed.stderr and ".env.example" not in listed.stderr


def test_each_update_is_logged_once_at_info_without_its_text(start_service, telegram: TelegramDouble,
                                                             make: MakeDouble) -> None:
    """At INFO every update received gets one line (id, kind, chat, outcome), a repeat its own; the text never."""
    service = start_in_mode(start_service, "webhook", LOG_LEVEL="INFO")
    marker = "private-words-7f3a9c"
    update = text_update(f"my secret is {marker}", user_id=4242, update_id=880001)
    deliver(service, telegram, "webhook", update)
    wait_until(lambda: make.accepted(), what="the batch at Make")
    deliver(service, telegram, "webhook", update)  # Telegram sends it again
    deliver(service, telegram, "webhook", {"update_id": 880002, "edited_message": {**update["message"], "text": marker}})
    # Log lines reach stdout through the log-writer thread: they may follow the 200 by a moment.
    wait_until(lambda: any("update 880002" in line for line in service.output), what="the edit's log line")
    lines = [line for line in service.output if "update 880001" in line]
    assert len(lines) == 2, lines
    assert "update 880001 (message) from chat 4242: stored" in lines[0]
    assert "update 880001 (message) from chat 4242: a repeat; ignored" in lines[1]
    edit = [line for line in service.output if "update 880002" in line]
    assert len(edit) == 1 and "(edited_message) from chat 4242: acknowledged and dropped" in edit[0]
    assert " INFO " in lines[0]
    assert marker not in service.text


def _sample_env(make: MakeDouble) -> dict[str, str]:
    return {"MAKE_WEBHOOK_URL": make.url + "/hook"}  # nothing else: no BOT_TOKEN, no .env


def test_send_sample_posts_one_message_batch_marked_sample(tmp_path: Path, make: MakeDouble) -> None:
    """`send-sample` needs only MAKE_WEBHOOK_URL and posts one message_batch marked `"sample": true`, with
    the X-Event-Id header, saying in one line what Make answered and whether it holds a reply."""
    make.script((200, {"reply": "Sorry to hear that! A new lamp is on its way."}))
    result = run_app(tmp_path, _sample_env(make), "send-sample")
    assert result.returncode == 0, result.stderr
    assert len(make.requests) == 1
    event = make.events[0]
    assert event["event_type"] == "message_batch" and event["sample"] is True
    assert make.requests[0]["headers"]["X-Event-Id"] == event["event_id"]
    assert [m["type"] for m in event["messages"]] == ["text", "photo"]
    assert event["text"] == "\n".join(m.get("text") or m.get("caption") for m in event["messages"])
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and "message_batch" in lines[0] and "HTTP 200" in lines[0]
    assert "reply" in lines[0] and "1 message(s)" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no state database, no folder


def test_send_sample_all_posts_one_event_of_each_type(tmp_path: Path, make: MakeDouble) -> None:
    """`send-sample --all` posts one event of each type, each marked sample, one line each; twice gives new ids."""
    result = run_app(tmp_path, _sample_env(make), "send-sample", "--all")
    assert result.returncode == 0, result.stderr
    types = [e["event_type"] for e in make.events]
    assert types == ["message_batch", "update", "payment", "payment_refunded", "pre_checkout"]
    assert all(e["sample"] is True for e in make.events)
    by_type = {e["event_type"]: e for e in make.events}
    assert by_type["update"]["update_type"] == "callback_query"
    assert by_type["payment"]["payment"]["amount"] == "1490.00"
    assert by_type["payment_refunded"]["refund"]["amount"] == "50"
    assert by_type["pre_checkout"]["pre_checkout_query"]["invoice_payload"]
    assert len(result.stdout.splitlines()) == 5
    assert "checkout would be approved" in result.stdout
    first_ids = {e["event_id"] for e in make.events}
    assert run_app(tmp_path, _sample_env(make), "send-sample", "--all").returncode == 0
    assert not first_ids & {e["event_id"] for e in make.events[5:]}


def test_send_sample_with_make_unreachable_is_one_line_and_status_1(tmp_path: Path) -> None:
    """Make unreachable: exit status 1, one line saying so."""
    result = run_app(tmp_path, {"MAKE_WEBHOOK_URL": f"http://127.0.0.1:{free_port()}/hook"}, "send-sample", "--all")
    line = one_line_exit(result, status=1)
    assert "Make did not take the sample message_batch" in line


def test_send_sample_without_make_url_names_it(tmp_path: Path) -> None:
    """`send-sample` with no MAKE_WEBHOOK_URL (and no .env) names what it needs, and nothing about the bot."""
    line = one_line_exit(run_app(tmp_path, {}, "send-sample"))
    assert "MAKE_WEBHOOK_URL" in line and "BOT_TOKEN" not in line


def test_sample_batch_has_exactly_the_fields_of_a_real_batch(start_service, telegram: TelegramDouble,
                                                             make: MakeDouble, tmp_path: Path) -> None:
    """The sample message_batch has the same fields as one the running gateway sends for a real message
    (plus `sample`), down to the user and a text message's fields."""
    start_service()
    telegram.push_update(text_update("a real message", user_id=77))
    real = wait_until(lambda: make.accepted(), what="a real batch")[0]
    assert run_app(tmp_path, _sample_env(make), "send-sample").returncode == 0
    sample = make.events[-1]
    assert sample["sample"] is True and "sample" not in real
    assert set(sample) - {"sample"} == set(real)
    assert set(sample["user"]) == set(real["user"])
    assert set(sample["messages"][0]) == set(real["messages"][0])  # both text messages


def test_dead_letters_with_no_state_database_creates_none(tmp_path: Path) -> None:
    """`dead-letters` where no state database exists says so (status 1) and leaves no file or folder behind;
    it needs no BOT_TOKEN or MAKE_WEBHOOK_URL, and a bad setting it does not read does not stop it."""
    line = one_line_exit(run_app(tmp_path, {"DEBOUNCE_SECONDS": "-1"}, "dead-letters"), status=1)
    assert f"no state database at {tmp_path / 'data' / 'state.sqlite3'}" in line
    assert list(tmp_path.iterdir()) == []
    replay = one_line_exit(run_app(tmp_path, {}, "replay-dead"), status=1)
    assert "no state database" in replay and list(tmp_path.iterdir()) == []


def test_dead_letters_empty_then_one(tmp_path: Path) -> None:
    """`dead-letters` on a state database says "no dead letters", then lists the one there is."""
    path = tmp_path / "state.sqlite3"
    env = {"STATE_DB": str(path)}
    SQLiteStore(str(path)).close()
    empty = run_app(tmp_path, env, "dead-letters")
    assert empty.returncode == 0 and empty.stdout.strip() == "no dead letters", empty.stderr
    store = SQLiteStore(str(path))
    try:
        now = time.time()
        store.enqueue_event(NewEvent("batch-dead-1", "chat:5", "message_batch", {"chat_id": 5}), now)
        row = store.claim_due_event(now)
        assert row is not None
        store.mark_failed(row.id, now + 60, "HTTP 410: the Make webhook is gone", dead=True)
    finally:
        store.close()
    listed = run_app(tmp_path, env, "dead-letters")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["batch-dead-1\tmessage_batch\tattempts=1\tHTTP 410: the Make webhook is gone"]


def test_webhook_info_needs_only_the_bot_token(tmp_path: Path, telegram: TelegramDouble) -> None:
    """`webhook-info` runs with only BOT_TOKEN and TELEGRAM_API_URL set; without BOT_TOKEN it names it."""
    result = run_app(tmp_path, {"BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": telegram.url}, "webhook-info")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["url"] == ""
    line = one_line_exit(run_app(tmp_path, {"TELEGRAM_API_URL": telegram.url}, "webhook-info"))
    assert "BOT_TOKEN" in line and "MAKE_WEBHOOK_URL" not in line
    assert list(tmp_path.iterdir()) == []


def test_set_webhook_needs_webhook_url(tmp_path: Path, telegram: TelegramDouble) -> None:
    """`set-webhook` without WEBHOOK_URL stops with a problem naming it, and calls nothing."""
    result = run_app(tmp_path, {"BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": telegram.url}, "set-webhook")
    assert result.returncode == 2 and "WEBHOOK_URL is required" in result.stderr
    assert telegram.calls == []


def test_sandbox_on_a_taken_port_is_one_line_too(tmp_path: Path) -> None:
    """`sandbox --port` on a port in use stops like the service does: exit status 2, one line, no traceback."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = one_line_exit(run_app(tmp_path, {}, "sandbox", "--port", str(port)))
    assert f"--port {port}" in line and "in use" in line.lower() and "leave --port out" in line


# Listening on every address of HOST


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _addresses_of(host: str) -> set[str]:
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return set()
    return {info[4][0] for info in found}


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")


@needs_ipv6
@pytest.mark.skipif(not {"127.0.0.1", "::1"} <= _addresses_of("localhost"),
                    reason="localhost names one address here (the in-process test below covers two)")
def test_host_localhost_is_served_on_both_of_its_addresses(start_service) -> None:
    """HOST=localhost, where it names 127.0.0.1 and ::1 (macOS, many Linux systems), listens on both, logs the
    IPv4 one in the usual line and the other as "also listening on", and answers on each."""
    service = start_service(HOST="localhost", LOG_LEVEL="INFO")
    also = re.search(r"also listening on (http://\[::1\]:\d+)", service.text)
    assert also is not None, service.text
    assert service.get("/ready").status_code == 200
    assert httpx.get(also.group(1) + "/ready", timeout=10).status_code == 200
    assert service.stop() == 0


@needs_ipv6
def test_a_host_with_two_addresses_is_served_on_both(tmp_path: Path, telegram: TelegramDouble, make: MakeDouble,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The gateway itself (in this process), with a resolver that names ::1 and 127.0.0.1 for localhost as
    macOS's does: it listens on both real addresses, logs each (IPv4 first, in the line tools parse; IPv6 in
    brackets), answers on each, and stops cleanly."""
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> list:
        if host != "localhost":
            return real(host, port, family, type, proto, flags)
        found = []
        for address in ("::1", "127.0.0.1"):
            try:
                found += real(address, port, family, type, proto, flags)
            except socket.gaierror:  # a family not asked for
                pass
        return found

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    config = Config.from_env(environ={
        "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url + "/hook", "TELEGRAM_API_URL": telegram.url,
        "HOST": "localhost", "PORT": "0", "STATE_DB": str(tmp_path / "state.sqlite3"), "POLL_TIMEOUT_SECONDS": "1",
        "HTTP_MAX_CONNECTIONS": "100"}, dotenv_path=None)
    caplog.set_level(logging.INFO)
    answers: dict[str, int] = {}
    listening: list[str] = []

    def on_listening(url: str) -> None:
        listening.extend(r.getMessage() for r in caplog.records if "listening on" in r.getMessage())
        urls = [re.search(r"listening on (\S+)", line).group(1) for line in listening]  # type: ignore[union-attr]

        def visit() -> None:
            try:
                for each in urls:
                    answers[each] = httpx.get(each + "/ready", timeout=10).status_code
            finally:  # as SIGTERM would
                _thread.interrupt_main(signal.SIGTERM)

        threading.Thread(target=visit, name="test-visitor", daemon=True).start()

    assert serve(config, on_listening=on_listening) == 0
    assert len(listening) == 2, listening
    assert re.match(r"listening on http://127\.0\.0\.1:\d+ \(mode polling", listening[0])
    assert re.fullmatch(r"also listening on http://\[::1\]:\d+", listening[1])
    assert list(answers.values()) == [200, 200], answers


@needs_ipv6
def test_an_ipv6_host_is_written_in_brackets(tmp_path: Path, service_settings: dict[str, str]) -> None:
    """HOST=:: logs `http://[::]:PORT`, a URL one can use, and the service answers there."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, text=True,
                            env=child_env(**{**service_settings, "HOST": "::", "PYTHONUNBUFFERED": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True).start()
    try:
        found = wait_until(lambda: re.search(r"listening on http://\[::\]:(\d+) ", "".join(output)), timeout=20,
                           what="the listening line")
        assert httpx.get(f"http://[::1]:{found.group(1)}/ready", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "http://:::" not in "".join(output)


# Nothing printed holds the token or the secrets


def _printed(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def test_telegram_api_url_holding_the_token_is_refused_without_showing_it(tmp_path: Path, telegram: TelegramDouble,
                                                                         service_settings: dict[str, str]) -> None:
    """A TELEGRAM_API_URL with `/bot<token>` pasted in (a tutorial's request URL) stops the start and the CLI
    naming TELEGRAM_API_URL, and neither the token nor its secret part is printed."""
    api_url = f"{telegram.url}/bot{TOKEN}"
    for args, env in (((), {**service_settings, "TELEGRAM_API_URL": api_url}),
                      (("webhook-info",), {"BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": api_url})):
        result = run_app(tmp_path, env, *args)
        assert result.returncode == 2, _printed(result)
        assert "TELEGRAM_API_URL holds the bot token" in result.stderr
        for secret in SECRETS:
            assert secret not in _printed(result)
    assert telegram.calls == []


def test_a_token_refused_with_a_custom_api_url_names_only_its_server(tmp_path: Path, telegram: TelegramDouble,
                                                                     service_settings: dict[str, str]) -> None:
    """The 404 hint about TELEGRAM_API_URL shows its server only: never a password or path in it."""
    telegram.script("getMe", (404, {"ok": False, "error_code": 404, "description": "Not Found"}))
    port = telegram.url.rsplit(":", 1)[1]
    env = {**service_settings, "TELEGRAM_API_URL": f"http://gateway:pa55word-in-url@127.0.0.1:{port}"}
    line = one_line_exit(run_app(tmp_path, env))
    assert f"TELEGRAM_API_URL, http://127.0.0.1:{port}, is a Bot API server" in line
    assert "pa55word" not in line


def test_webhook_url_holding_the_token_or_secret_is_never_printed(tmp_path: Path, telegram: TelegramDouble) -> None:
    """`set-webhook` says which URL it set with the token and the webhook secret masked, a refused WEBHOOK_URL is
    named without its value, and `webhook-info` masks them in Telegram's answer."""
    secret = "my-webhook-secret-42"
    env = {"BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": telegram.url, "WEBHOOK_SECRET": secret,
           "WEBHOOK_URL": f"https://example.com/{TOKEN}/hook?s={secret}"}
    result = run_app(tmp_path, env, "set-webhook")
    assert result.returncode == 0, _printed(result)
    assert result.stdout.startswith("webhook set to https://example.com/")
    info = run_app(tmp_path, env, "webhook-info")
    assert info.returncode == 0 and "example.com" in info.stdout
    refused = run_app(tmp_path, {**env, "WEBHOOK_URL": f"http://example.com/{TOKEN}"}, "set-webhook")
    assert refused.returncode == 2 and "WEBHOOK_URL (its value holds BOT_TOKEN" in refused.stderr
    for run in (result, info, refused):
        for hidden in (*SECRETS, secret):
            assert hidden not in _printed(run)
    assert telegram.calls_of("setWebhook")[0]["url"] == env["WEBHOOK_URL"]  # masked in print only


def test_a_token_with_non_ascii_digits_is_refused_and_never_printed(tmp_path: Path,
                                                                   service_settings: dict[str, str]) -> None:
    """A token whose id has Arabic-Indic digits is not a token (Telegram's ids are ASCII digits), and its secret
    part is printed nowhere, not even inside TELEGRAM_API_URL or a value that echoes it."""
    arabic = "١٢٣٤٥٦٧٨٩:" + TOKEN.split(":")[1]
    env = {**service_settings, "BOT_TOKEN": arabic, "TYPING_MODE": f"x{TOKEN.split(':')[1]}"}
    result = run_app(tmp_path, env)
    assert result.returncode == 2
    assert "BOT_TOKEN does not look like a bot token" in result.stderr and "TYPING_MODE" in result.stderr
    assert TOKEN.split(":")[1] not in _printed(result)


# .env files that cannot be read


def test_dotenv_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    """A `.env` saved in cp1251 (a Russian Windows default) or holding binary: one line naming the file and what
    is wrong with it, exit status 2, no traceback."""
    text = f"BOT_TOKEN={TOKEN}\nTEXT_PAYMENT_REFUSED=Оплата невозможна\n"
    (tmp_path / ".env").write_bytes(text.encode("cp1251"))
    line = one_line_exit(run_app(tmp_path, {}))
    assert str(tmp_path / ".env") in line and "not UTF-8" in line
    (tmp_path / ".env").write_bytes(b"\x00\x01binary\x00" + bytes(range(256)))
    line = one_line_exit(run_app(tmp_path, {}, "webhook-info"))
    assert str(tmp_path / ".env") in line


def test_dotenv_with_a_byte_order_mark_is_read(tmp_path: Path, telegram: TelegramDouble) -> None:
    """A `.env` that starts with a UTF-8 byte order mark (Notepad's "UTF-8 with BOM") is read as if it had none."""
    (tmp_path / ".env").write_text(f"BOT_TOKEN={TOKEN}\nTELEGRAM_API_URL={telegram.url}\n", encoding="utf-8-sig")
    result = run_app(tmp_path, {}, "webhook-info")
    assert result.returncode == 0, _printed(result)


# What only permissions can show


ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads and writes whatever the modes say


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """A folder to fill, and `seal()`, after which this user (the app's, in its subprocess) may read but not write
    in it: its modes (0555, files 0444) for an ordinary user; for root, whom modes do not stop, a filesystem of
    its own remounted read-only (skipped where none can be mounted)."""
    folder = tmp_path / "sealed"
    folder.mkdir()
    if ROOT_USER:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a filesystem here: {mounted.stderr.strip()}")

    def seal() -> None:
        if ROOT_USER:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        else:
            for path in folder.iterdir():
                path.chmod(0o444)
            folder.chmod(0o555)

    yield folder, seal
    if ROOT_USER:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
    else:
        folder.chmod(0o755)


needs_posix = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX's")
not_as_root = pytest.mark.skipif(ROOT_USER, reason="root may read and enter anything: no mode can show this")


@needs_posix
@not_as_root
def test_dotenv_this_user_cannot_read_is_one_line_naming_it(tmp_path: Path) -> None:
    """A `.env` this user may not read: one line naming it and "permission denied", exit status 2."""
    (tmp_path / ".env").write_text(f"BOT_TOKEN={TOKEN}\n")
    (tmp_path / ".env").chmod(0o000)
    line = one_line_exit(run_app(tmp_path, {}, "webhook-info"))
    assert f"cannot read {(tmp_path / '.env').resolve()}: permission denied" in line


# The getMe at start


def test_flood_wait_on_get_me_is_capped(start_service, telegram: TelegramDouble) -> None:
    """A 429 on getMe asking for 100000 s is obeyed for at most the retry policy's 30 s."""
    flood = (429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 100000",
                   "parameters": {"retry_after": 100000}})
    telegram.script("getMe", flood, flood)
    service = start_service(LOG_LEVEL="INFO")
    planned = wait_until(lambda: re.search(r"Telegram has not answered getMe yet \(getMe failed 429.*asking again "
                                           r"in ([0-9.]+) s", service.text), timeout=20, what="the wait after a 429")
    assert float(planned.group(1)) == 30.0
    assert service.get("/ready").status_code == 503
    assert service.stop() == 0


@pytest.mark.parametrize("answer", [None, [1, 2], {"username": "no_id_bot"}, {"id": "123"}, {"id": True}],
                         ids=["null", "list", "no-id", "string-id", "bool-id"])
def test_a_get_me_answer_naming_no_bot_is_no_answer(answer: Any, start_service, telegram: TelegramDouble) -> None:
    """A getMe `result` that is not a user with an integer id identifies nobody: `/ready` is 503 saying why, the
    gateway keeps asking, and once Telegram names the bot it is ready."""
    telegram.script("getMe", *[(200, {"ok": True, "result": answer})] * 2)  # the first retry gets it too
    service = start_service(LOG_LEVEL="INFO")
    ready = service.get("/ready")
    assert ready.status_code == 503 and "names no bot" in " ".join(ready.json()["reasons"]), ready.json()
    wait_until(lambda: service.get("/ready").status_code == 200, timeout=30, what="/ready once getMe names the bot")
    assert service.printed("running as @sandbox_gateway_bot (id 123456789)")
    assert "running as a bot without" not in service.text


def test_what_telegram_says_is_logged_on_one_line(start_service, telegram: TelegramDouble, tmp_path: Path,
                                                  service_settings: dict[str, str]) -> None:
    """A username with a newline (or control characters) cannot forge a log line, a long one is cut; a refusal
    whose description runs over many lines is still one line."""
    telegram.script("getMe", (200, {"ok": True, "result": {
        "id": 5, "is_bot": True, "first_name": "B", "username": "evil\n2026-01-01 00:00:00,000 ERROR forged\x1b[2J" +
        "x" * 500}}))
    service = start_service(LOG_LEVEL="INFO")
    named = [line for line in service.output if "running as @evil" in line]
    assert len(named) == 1 and "(id 5)" in named[0] and "\x1b" not in named[0] and len(named[0]) < 300
    assert not any(line.startswith("2026-01-01") for line in service.output)
    assert service.stop() == 0
    telegram.script("getMe", (401, {"ok": False, "error_code": 401, "description": "Unauthorized\n" * 50}))
    line = one_line_exit(run_app(tmp_path, service_settings))
    assert "Telegram refused BOT_TOKEN (401 Unauthorized Unauthorized" in line


def test_a_401_not_from_the_bot_api_is_not_blamed_on_the_token(start_service) -> None:
    """A proxy's JSON 401 (no `ok`, no `error_code`) says nothing about BOT_TOKEN: the service runs, `/ready` is
    503 saying the answer is not the Bot API's, and it keeps asking."""
    body = b'{"error": "proxy authentication required"}'
    proxy = RawServer(lambda n, request: b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    try:
        service = start_service(TELEGRAM_API_URL=proxy.url, LOG_LEVEL="INFO")
        ready = service.get("/ready")
        assert ready.status_code == 503
        assert "not from the Bot API" in " ".join(ready.json()["reasons"]), ready.json()
        wait_until(lambda: "asking again in" in service.text, what="getMe to be asked again")
        assert "refused BOT_TOKEN" not in service.text
        assert service.stop() == 0
    finally:
        proxy.close()


def test_sigterm_during_the_start_get_me_is_a_logged_stop(tmp_path: Path, telegram: TelegramDouble,
                                                         service_settings: dict[str, str]) -> None:
    """SIGTERM while the first getMe waits for Telegram: the log says "stopping" then "stopped", exit status 0."""
    held = threading.Event()
    telegram.script("getMe", (200, {"ok": True, "result": {"id": 1, "is_bot": True, "first_name": "B"}}, held))
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, text=True,
                            env=child_env(**{**service_settings, "PYTHONUNBUFFERED": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: telegram.calls_of("getMe"), timeout=20, what="the first getMe")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        held.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert [line.split("] ", 1)[1] for line in lines] == ["stopping", "stopped"], out


# Commands: a refused token, Make's silence


def test_webhook_commands_with_a_refused_token_name_bot_token(tmp_path: Path, telegram: TelegramDouble) -> None:
    """`webhook-info` and `delete-webhook` with a token Telegram refuses say so as the start does: one line
    naming BOT_TOKEN, exit status 2."""
    for command in ("webhook-info", "delete-webhook"):
        line = one_line_exit(run_app(tmp_path, {"BOT_TOKEN": OTHER_TOKEN, "TELEGRAM_API_URL": telegram.url}, command))
        assert "Telegram refused BOT_TOKEN (401" in line and "@BotFather" in line


def test_send_sample_unanswered_in_time_says_make_may_have_it(tmp_path: Path, make: MakeDouble) -> None:
    """Make silent past MAKE_TIMEOUT_SECONDS after the event went out: one line saying Make may have received it."""
    make.script((200, "Accepted", {}, 3.0))
    line = one_line_exit(run_app(tmp_path, {**_sample_env(make), "MAKE_TIMEOUT_SECONDS": "1"}, "send-sample"),
                         status=1)
    assert "MAKE_TIMEOUT_SECONDS=1" in line and "may have received it" in line


# dead-letters and replay-dead touch nothing that is not the gateway's


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (x)")
        db.execute("INSERT INTO notes VALUES (1)")
    db.close()


def _version_1(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(f"BEGIN; {store_module._MIGRATIONS[0]}; PRAGMA user_version=1; COMMIT;")
    db.close()


FILES = {"foreign": (_foreign, "SQLite database of something else"),
         "version-1": (_version_1, "start the gateway (python app.py) once to upgrade it"),
         "empty": (lambda path: path.write_bytes(b""), "the file is empty"),
         "text": (lambda path: path.write_text(f"BOT_TOKEN={TOKEN}\n"), "not a SQLite database")}


@pytest.mark.parametrize("command", ["dead-letters", "replay-dead"])
@pytest.mark.parametrize("kind", list(FILES))
def test_dead_letter_commands_leave_a_file_not_the_gateways_as_it_was(kind: str, command: str,
                                                                       tmp_path: Path) -> None:
    """On a file that is not a state database of this version (another program's, an older one, an empty or a
    text file) both commands stop with one line saying what it is, exit status 1, and change nothing: the
    same bytes, no journal, WAL or lock file beside it."""
    make, why = FILES[kind]
    path = tmp_path / "state.sqlite3"
    make(path)
    before, files = _digest(path), sorted(os.listdir(tmp_path))
    line = one_line_exit(run_app(tmp_path, {"STATE_DB": str(path)}, command), status=1)
    assert line.startswith(f"error: STATE_DB={path}: ") and why in line
    assert _digest(path) == before and sorted(os.listdir(tmp_path)) == files


def _one_dead_letter(path: Path) -> None:
    store = SQLiteStore(str(path))
    now = time.time()
    store.enqueue_event(NewEvent("batch-dead-7", "chat:7", "message_batch", {"chat_id": 7}), now)
    row = store.claim_due_event(now)
    assert row is not None
    store.mark_failed(row.id, now, "HTTP 410: gone", dead=True)
    store.close()


@needs_posix
def test_dead_letters_needs_only_read_access(tmp_path: Path, unwritable: tuple[Path, Any]) -> None:
    """A user who may only read the state database (and not write its folder) lists its dead letters and leaves
    no file behind; `replay-dead`, which must write, says so in one line, the file unchanged."""
    folder, seal = unwritable
    path = folder / "state.sqlite3"
    _one_dead_letter(path)
    seal()
    before, files = _digest(path), sorted(os.listdir(folder))
    env = {"STATE_DB": str(path)}
    listed = run_app(tmp_path, env, "dead-letters")
    assert listed.returncode == 0, _printed(listed)
    assert listed.stdout.splitlines() == ["batch-dead-7\tmessage_batch\tattempts=1\tHTTP 410: gone"]
    line = one_line_exit(run_app(tmp_path, env, "replay-dead"), status=1)
    assert line.startswith(f"error: STATE_DB={path}: cannot write the state database") and "write access" in line
    assert _digest(path) == before and sorted(os.listdir(folder)) == files


def test_dead_letters_takes_no_write_lock(tmp_path: Path) -> None:
    """`dead-letters` lists while another connection holds the write lock (a gateway writing): a listing must
    never wait for, or hold up, the gateway's writes."""
    path = tmp_path / "state.sqlite3"
    _one_dead_letter(path)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        listed = run_app(tmp_path, {"STATE_DB": str(path)}, "dead-letters")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert listed.returncode == 0, _printed(listed)
    assert listed.stdout.startswith("batch-dead-7\t")


@needs_posix
@not_as_root
def test_state_db_in_a_folder_this_user_cannot_enter_is_permission_denied(tmp_path: Path) -> None:
    """A STATE_DB in a folder closed to this user: "permission denied", not "no state database"."""
    folder = tmp_path / "closed"
    folder.mkdir()
    _one_dead_letter(folder / "state.sqlite3")
    folder.chmod(0o000)
    try:
        for command in ("dead-letters", "replay-dead"):
            line = one_line_exit(run_app(tmp_path, {"STATE_DB": str(folder / "state.sqlite3")}, command), status=1)
            assert "permission denied" in line and "no state database" not in line
    finally:
        folder.chmod(0o755)


# STATE_DB problems at start: one line, exit status 2


@needs_posix
@pytest.mark.parametrize("case,why", [("a folder", "it is a folder, not a file"),
                                      ("a device", "not a regular file"),
                                      ("a name too long", "too long")])
def test_state_db_that_cannot_be_used_is_one_line_and_status_2(case: str, why: str, tmp_path: Path,
                                                                service_settings: dict[str, str]) -> None:
    """STATE_DB naming a folder, a device or a name too long for the filesystem: exit status 2, one line
    `error: STATE_DB=...: ...` saying what to set, no log line, nothing created beside it."""
    if case == "a folder":
        (tmp_path / "state.sqlite3").mkdir()
        state_db = str(tmp_path / "state.sqlite3")
    else:
        state_db = os.devnull if case == "a device" else str(tmp_path / ("n" * 300))
    files = sorted(os.listdir(tmp_path))
    line = one_line_exit(run_app(tmp_path, {**service_settings, "STATE_DB": state_db}))
    assert line.startswith(f"error: STATE_DB={state_db}: ") and why in line and "set STATE_DB" in line
    assert sorted(os.listdir(tmp_path)) == files


@needs_posix
def test_state_db_where_its_lock_file_cannot_be_made_is_one_line_and_status_2(
        tmp_path: Path, unwritable: tuple[Path, Any], service_settings: dict[str, str]) -> None:
    """A state database in a folder this user cannot write, so its lock file cannot be made: exit status 2, one
    line naming STATE_DB, the lock file and what to do."""
    folder, seal = unwritable
    SQLiteStore(str(folder / "state.sqlite3")).close()
    seal()
    state_db = str(folder / "state.sqlite3")
    line = one_line_exit(run_app(tmp_path, {**service_settings, "STATE_DB": state_db}))
    assert line.startswith(f"error: STATE_DB={state_db}: cannot open state database: cannot open its lock file "
                           f"{state_db}.lock")
    assert "give this user write access" in line or "writable filesystem" in line


def test_second_gateway_on_one_state_db_is_one_line_and_status_2(tmp_path: Path,
                                                                  service_settings: dict[str, str]) -> None:
    """A STATE_DB another gateway holds (its lock taken): exit status 2, one line saying to stop it or use
    another STATE_DB."""
    holder = SQLiteStore(service_settings["STATE_DB"], exclusive=True)
    try:
        line = one_line_exit(run_app(tmp_path, service_settings))
    finally:
        holder.close()
    assert line.startswith(f"error: STATE_DB={service_settings['STATE_DB']}: another gateway is already running")
    assert "STATE_DB of its own" in line
