"""A start that fails fast and says who it is: getMe at start, one-line exits (status 2) for a refused token,
a port in use, a state folder that cannot be made and no settings at all; one log line per update; the
`send-sample`, `dead-letters` and `webhook-info` commands needing only what they use. Against the real
service or CLI in a subprocess, the Bot API and Make doubles on 127.0.0.1."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
import pytest

from doubles import ROOT, TOKEN, MakeDouble, TelegramDouble, free_port, wait_until
from helpers import deliver, start_in_mode, text_update
from http_server import listen_problem
from store import NewEvent, SQLiteStore

OTHER_TOKEN = "987654321:AAG-otherTOKENotherTOKENotherTOKEN_42"  # a token the Bot API double does not know
SECRETS = (TOKEN, TOKEN.split(":")[1], OTHER_TOKEN, OTHER_TOKEN.split(":")[1])


def run_app(cwd: Path, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python app.py ARGS` in `cwd` with exactly `env` (plus PATH and the like); stdout and stderr kept apart."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "SYSTEMROOT", "TMPDIR") if k in os.environ}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=timeout)


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
        assert "running as @sandbox_gateway_bot (id 123456789)" in service.text
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
