"""The HTTP routes, the health report and the command line, against the real service in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from config import derive_webhook_secret
from doubles import ROOT, TOKEN, MakeDouble, TelegramDouble, wait_until
from helpers import text_update

WEBHOOK = {"WEBHOOK_URL": "https://gateway.example.test/webhook"}
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def test_webhook_mode_registers_webhook_with_secret_and_kinds(start_service, telegram: TelegramDouble) -> None:
    """At start, webhook mode calls setWebhook with WEBHOOK_URL, the secret and the kinds it handles."""
    service = start_service(**WEBHOOK, FORWARD_UPDATE_KINDS="callback_query,poll_answer")
    registered = wait_until(lambda: telegram.calls_of("setWebhook"), what="setWebhook")[0]
    assert registered["url"] == WEBHOOK["WEBHOOK_URL"]
    assert registered["secret_token"] == derive_webhook_secret(TOKEN)
    assert registered["drop_pending_updates"] is False  # a restart never drops what Telegram holds
    assert set(registered["allowed_updates"]) >= {"message", "callback_query", "pre_checkout_query", "poll_answer"}
    wait_until(lambda: service.health()["status"] == "ok", what="status ok once registered")


def test_polling_mode_deletes_webhook_then_long_polls(start_service, telegram: TelegramDouble) -> None:
    """Polling mode removes any webhook (keeping pending updates) before its first getUpdates."""
    start_service()
    wait_until(lambda: telegram.calls_of("getUpdates"), what="getUpdates")
    names = [name for name, _ in telegram.calls]
    assert names.index("deleteWebhook") < names.index("getUpdates")
    assert telegram.calls_of("deleteWebhook")[0] == {"drop_pending_updates": False}
    poll = telegram.calls_of("getUpdates")[0]
    assert poll["timeout"] == 1 and poll["limit"] == 100


def test_webhook_refuses_wrong_or_missing_secret_and_stores_nothing(start_service, make: MakeDouble) -> None:
    """A wrong or missing secret gets 401, and the update is neither stored nor sent to Make."""
    service = start_service(**WEBHOOK, DEBOUNCE_SECONDS="0.1")
    update = text_update("intruder")
    assert service.post("/webhook", json=update).status_code == 401
    assert service.post("/webhook", json=update, headers={SECRET_HEADER: "wrong"}).status_code == 401
    # The same update with the right secret is new: the refused ones left no trace.
    ok = service.post("/webhook", json=update, headers={SECRET_HEADER: derive_webhook_secret(TOKEN)})
    assert ok.json()["outcome"] == "stored"
    wait_until(lambda: make.accepted(), what="the one event")
    assert len(make.events) == 1


def test_webhook_malformed_bodies_get_4xx_and_odd_updates_200(start_service) -> None:
    """Non-JSON, non-objects and bad update_ids get 400; an oversized body 413; an odd update 200; never 500."""
    service = start_service(**WEBHOOK)
    headers = {SECRET_HEADER: derive_webhook_secret(TOKEN), "Content-Type": "application/json"}
    for body in (b"not json", b"[1, 2]", b"{}", b'{"update_id": "7"}', b'{"update_id": 1.5}', b"\xff\xfe{",
                 b"[" * 10000 + b"]" * 10000):
        assert service.post("/webhook", content=body, headers=headers).status_code == 400, body[:20]
    assert service.post("/webhook", content=b" " * (1024 * 1024 + 1), headers=headers).status_code == 413
    odd = {"update_id": 91, "message": {"chat": {"id": "x"}, "text": ["list"]}}
    assert service.post("/webhook", json=odd, headers=headers).status_code == 200
    nested: dict = {"update_id": 92}
    cursor = nested
    for _ in range(300):
        cursor["x"] = {}
        cursor = cursor["x"]
    assert service.post("/webhook", json=nested, headers=headers).status_code == 200
    assert service.health()["status"] in ("ok", "degraded")
    assert "Traceback" not in service.text


def test_health_reports_the_contract_fields(start_service, telegram: TelegramDouble) -> None:
    """GET / answers 200 with status, mode, last_update_id, active_batches, batch_timers and outbox_pending."""
    service = start_service(DEBOUNCE_SECONDS="30", MAX_WAIT_SECONDS="60")
    telegram.push_update(text_update("open", user_id=1, update_id=4242))
    health = wait_until(lambda: (h := service.health())["active_batches"] == 1 and h, what="an open batch")
    response = service.get("/")
    assert response.status_code == 200
    assert response.headers["Server"] == "telegram-make-gateway"  # the gateway's server, not Flask's development server
    assert health["status"] == "ok" and health["mode"] == "polling"
    assert health["last_update_id"] == 4242
    assert health["batch_timers"] == 1 and health["outbox_pending"] == 0
    metrics = service.get("/metrics").text
    assert 'gateway_updates_total{kind="message",outcome="stored"} 1.0' in metrics
    assert "gateway_active_batches 1.0" in metrics


def test_flood_control_holds_back_and_reports_flood_held(start_service, telegram: TelegramDouble,
                                                         make: MakeDouble) -> None:
    """Over FLOOD_MAX_MESSAGES, messages are held back and counted as flood_held in the user's batch."""
    service = start_service(FLOOD_MAX_MESSAGES="2", FLOOD_WINDOW_SECONDS="60", DEBOUNCE_SECONDS="0.5")
    for n in range(4):
        telegram.push_update(text_update(f"m{n}", user_id=66))
    event = wait_until(lambda: make.accepted(), what="the batch")[0]
    assert [m["text"] for m in event["messages"]] == ["m0", "m1"]
    assert event["flood_held"] == 2
    assert "gateway_flood_held_total 2.0" in service.get("/metrics").text
    assert "flood control held back" in service.text


def test_reply_route(start_service, telegram: TelegramDouble) -> None:
    """POST /reply: 401 without the bearer token, 400 for a bad body, 200 with message ids, 502 when refused
    for its content, 410 when the chat cannot be reached."""
    service = start_service(REPLY_TOKEN="s3cret-reply")
    auth = {"Authorization": "Bearer s3cret-reply"}
    assert service.post("/reply", json={"chat_id": 1, "text": "x"}).status_code == 401
    assert service.post("/reply", json={"chat_id": 1, "text": "x"},
                        headers={"Authorization": "Bearer nope"}).status_code == 401
    for bad in ({"chat_id": "1", "text": "x"}, {"chat_id": 1}, {"chat_id": 1, "text": "x", "parse_mode": "BBCode"}):
        assert service.post("/reply", json=bad, headers=auth).status_code == 400
    ok = service.post("/reply", json={"chat_id": 5, "text": "<b>hello</b>", "parse_mode": "HTML"}, headers=auth)
    assert ok.status_code == 200 and len(ok.json()["message_ids"]) == 1
    # The markup is read by the gateway and sent as entities: Telegram gets nothing it could fail to parse.
    assert telegram.calls_of("sendMessage")[-1] == {"chat_id": 5, "text": "hello",
                                                    "entities": [{"type": "bold", "offset": 0, "length": 5}]}
    refusal = (400, {"ok": False, "error_code": 400, "description": "Bad Request: BUTTON_URL_INVALID"})
    telegram.script("sendMessage", refusal, refusal)  # refused with its buttons, and refused bare too
    buttons = {"inline_keyboard": [[{"text": "go", "url": "bad"}]]}
    refused = service.post("/reply", json={"chat_id": 6, "text": "hi", "reply_markup": buttons}, headers=auth)
    assert refused.status_code == 502 and "BUTTON_URL_INVALID" in refused.json()["error"]
    assert telegram.calls_of("sendMessage")[-2:] == [{"chat_id": 6, "text": "hi", "reply_markup": buttons},
                                                     {"chat_id": 6, "text": "hi"}]
    telegram.script("sendMessage", (400, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}))
    gone = service.post("/reply", json={"chat_id": 7, "text": "hi"}, headers=auth)
    assert gone.status_code == 410 and gone.json()["chat_unreachable"] is True
    # Told to the caller, so neither is kept as a dead letter.
    assert service.get("/").json()["outbox_dead"] == 0
    assert "s3cret-reply" not in service.text


def test_reply_route_is_off_without_token(start_service) -> None:
    """Without REPLY_TOKEN, POST /reply does not exist (404)."""
    service = start_service()
    assert service.post("/reply", json={"chat_id": 1, "text": "x"}).status_code == 404


def _run_cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "SYSTEMROOT") if k in os.environ}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=tmp_path, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_bad_settings_stop_the_start_with_every_problem_named(tmp_path: Path) -> None:
    """Bad settings: exit status 2, one line per problem naming the variable, no traceback, no token."""
    bad_token = "123:short"
    result = _run_cli(tmp_path, {"BOT_TOKEN": bad_token, "MAKE_WEBHOOK_URL": "not a url",
                                 "DEBOUNCE_SECONDS": "-1", "TYPING_MODE": "sometimes",
                                 "WEBHOOK_URL": "http://insecure.example/webhook"})
    assert result.returncode == 2
    for name in ("BOT_TOKEN", "MAKE_WEBHOOK_URL", "DEBOUNCE_SECONDS", "TYPING_MODE", "WEBHOOK_URL"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "short" not in result.stderr


def test_settings_are_read_from_dotenv_file(tmp_path: Path, telegram: TelegramDouble) -> None:
    """`.env` in the working directory supplies settings, and the CLI shows the webhook info from Telegram."""
    (tmp_path / ".env").write_text(f"BOT_TOKEN={TOKEN}\nMAKE_WEBHOOK_URL=https://hook.eu1.make.com/x\n"
                                   f"TELEGRAM_API_URL={telegram.url}\n")
    result = _run_cli(tmp_path, {}, "webhook-info")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pending_update_count"] == 0
    assert telegram.calls_of("getWebhookInfo")


def test_cli_telegram_error_is_one_line_without_token(tmp_path: Path, telegram: TelegramDouble) -> None:
    """A Bot API error in a CLI command prints one line without the token and exits 1."""
    telegram.script("setWebhook", (400, {"ok": False, "error_code": 400,
                                         "description": "Bad Request: bad webhook: HTTPS url must be provided"}))
    env = {"BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": "https://hook.eu1.make.com/x", "TELEGRAM_API_URL": telegram.url,
           "WEBHOOK_URL": "https://gateway.example.test/webhook"}
    result = _run_cli(tmp_path, env, "set-webhook")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "bad webhook" in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    ok = _run_cli(tmp_path, env, "delete-webhook")
    assert ok.returncode == 0 and "deleted" in ok.stdout
    assert telegram.calls_of("deleteWebhook") == [{"drop_pending_updates": False}]


def test_health_is_reachable_with_plain_http_client(start_service) -> None:
    """The service answers on the port it printed, over real HTTP."""
    service = start_service()
    assert httpx.get(service.url + "/", timeout=5).status_code == 200


def _logging_configured(*secrets: str) -> str:
    """The start of a script that configures the gateway's logging as `main()` does, masking `secrets`."""
    return ("import logging, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import app\n"
            "class Settings:\n"
            "    log_level = 'INFO'\n"
            "    def secrets(self):\n"
            f"        return {secrets!r}\n"
            "app.configure_logging(Settings())\n")


def test_a_log_output_nobody_reads_does_not_keep_the_process_from_exiting(tmp_path: Path) -> None:
    """The log-writer writes queued lines out at exit for a few seconds at most: with a stderr pipe nobody reads
    (full, so the writer is stuck in a write), the process still exits, with its own status."""
    script = tmp_path / "stuck.py"
    script.write_text(
        _logging_configured() +
        "for n in range(3000):  # far more than a pipe holds, far fewer than the queue does\n"
        "    logging.getLogger('gateway').info('line %d %s', n, 'x' * 100)\n"
        "sys.exit(3)\n", encoding="utf-8")
    assert _status_with_stderr_unread(script) == 3


def _status_with_stderr_unread(script: Path, env: dict[str, str] | None = None) -> int:
    """Run `script` with a stderr pipe nobody reads; its exit status (killed, and failing, after 60 s)."""
    child = subprocess.Popen([sys.executable, str(script)], cwd=script.parent, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        return child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stderr is not None
        child.stderr.close()


def _without_unbuffered() -> dict[str, str]:
    """This process's environment without PYTHONUNBUFFERED: stderr buffered, as a service usually runs."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}


def test_the_real_main_exits_with_its_status_when_nobody_reads_its_output(tmp_path: Path) -> None:
    """`python app.py` run the way a careless parent runs it (stderr a pipe nobody reads, stderr buffered): the
    log-writer, stuck in a write, holds no lock that `main()`'s last flush or the interpreter's exit waits for."""
    script = tmp_path / "main_stuck.py"
    script.write_text(
        "import logging, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import app\n"
        "def serve(config):\n"
        "    for n in range(3000):  # far more than a pipe holds\n"
        "        logging.getLogger('gateway').info('line %d %s', n, 'x' * 100)\n"
        "    return 3\n"
        "app.serve = serve\n"
        "sys.exit(app.main())\n", encoding="utf-8")
    env = {**_without_unbuffered(), "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": "http://127.0.0.1:9/hook",
           "STATE_DB": str(tmp_path / "state.sqlite3")}
    assert _status_with_stderr_unread(script, env) == 3


def test_logging_goes_on_when_there_is_no_output_at_all() -> None:
    """With no stderr (`sys.stderr` is None, as under pythonw on Windows) every write fails: more lines than the
    queue holds are logged all the same, and nothing waits for a writer that cannot write."""
    script = ("import logging, sys\n"
              "sys.stderr = None\n" + _logging_configured().split("\n", 1)[1] +
              "for n in range(25000):\n"
              "    logging.getLogger('gateway').info('line %d', n)\n"
              "print('logged all', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "logged all" in done.stdout


def test_other_handlers_see_each_record_as_it_was_logged() -> None:
    """The queueing handler formats a record's message for the writer on a copy: another handler on the same
    logger (pytest's caplog, an error tracker) still gets the format, its arguments and the exception."""
    script = (_logging_configured() +
              "seen = []\n"
              "class Keep(logging.Handler):\n"
              "    def emit(self, record):\n"
              "        seen.append((record.msg, record.args, bool(record.exc_info)))\n"
              "logging.getLogger().addHandler(Keep())\n"
              "try:\n"
              "    raise ValueError('boom')\n"
              "except ValueError:\n"
              "    logging.getLogger('gateway').exception('failed for chat %s', 42)\n"
              "print(seen, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('failed for chat %s', (42,), True)]"
    assert "failed for chat 42" in done.stderr and "ValueError: boom" in done.stderr


def test_a_steady_flood_of_lines_reaches_the_output_in_bounded_writes() -> None:
    """Threads that log without pause refill the queue as fast as the writer drains it: each write still takes
    at most a thousand lines, so the output keeps moving and the writer's memory stays bounded."""
    script = ("import sys, threading, time\n"
              "class Counting:  # the output: how many lines each write carries\n"
              "    def __init__(self): self.writes = []\n"
              "    def write(self, text): self.writes.append(text.count('\\n'))\n"
              "    def flush(self): pass\n"
              "out = Counting()\n"
              "sys.stderr = out\n" + _logging_configured() +
              "end = time.monotonic() + 2\n"
              "def flood():\n"
              "    log = logging.getLogger('gateway')\n"
              "    while time.monotonic() < end:\n"
              "        log.info('line %s', 'x' * 50)\n"
              "threads = [threading.Thread(target=flood) for _ in range(8)]\n"
              "for t in threads: t.start()\n"
              "for t in threads: t.join()\n"
              "app._log_writer.stop()\n"
              "print(max(out.writes), len(out.writes), sum(out.writes), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    largest, writes, lines = map(int, done.stdout.split())
    assert largest <= 1000 and lines > 1000 and writes > 1


def test_a_log_line_that_cannot_be_formatted_is_reported_masked() -> None:
    """A log call whose arguments cannot be formatted is reported (a line of its own, with the error), but its
    arguments and the error's text pass the same masking as every line: no secret reaches the output."""
    webhook_secret = "webhook-secret-that-must-not-leak"
    script = (
        _logging_configured(TOKEN, webhook_secret) +
        "class Unprintable:\n"
        "    def __str__(self):\n"
        f"        raise ValueError('token ' + {TOKEN!r})\n"
        "log = logging.getLogger('gateway')\n"
        "log.info('value %s', Unprintable())\n"
        f"log.info('two values %s %s', {webhook_secret!r})\n"
        "log.info('after')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "could not be formatted" in done.stderr and "after" in done.stderr
    # Each report names the call that went wrong (the script's own lines, as logging found them).
    reports = [line for line in done.stderr.splitlines() if "could not be formatted" in line]
    assert len(reports) == 2 and all(re.search(r"\(<string>:\d+\)", line) for line in reports), reports
    for secret in (TOKEN, TOKEN.split(":")[1], webhook_secret):
        assert secret not in done.stderr
