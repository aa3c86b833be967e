"""Nothing lost under faults: crashes, Make and Telegram failing, a locked database, a second instance."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys

import httpx
import pytest

from config import derive_webhook_secret
from doubles import ROOT, TOKEN, MakeDouble, Service, TelegramDouble, free_port, wait_until
from helpers import text_update

WEBHOOK = {"WEBHOOK_URL": "https://gateway.example.test/webhook"}
SECRET_HEADERS = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}


def _post_until_stored(service: Service, update: dict) -> bool:
    """Post like Telegram does: a refused or failed request is not acknowledged, so it is sent again."""
    try:
        return service.post("/webhook", json=update, headers=SECRET_HEADERS).status_code == 200
    except httpx.HTTPError:
        return False


def _by_event_id(make: MakeDouble) -> list[dict]:
    """Accepted events in arrival order, one per event_id (a scenario drops repeats by event_id)."""
    seen: dict[str, dict] = {}
    for event in make.accepted():
        seen.setdefault(event["event_id"], event)
    return list(seen.values())


@pytest.mark.parametrize("mode", ["polling", "webhook"])
def test_kill_9_at_random_moments_loses_nothing_and_keeps_chat_order(
        mode: str, start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """20 users send bursts; the service is killed with SIGKILL twice at random points and restarted:
    every message reaches Make in exactly one event_id, and each chat's messages keep their order."""
    rng = random.Random(20261125)
    env = {"DEBOUNCE_SECONDS": "0.3", "MAX_WAIT_SECONDS": "1", **(WEBHOOK if mode == "webhook" else {})}
    updates = [text_update(f"u{user}-m{n}", user_id=user) for n in range(6) for user in range(1, 21)]
    kills = sorted(rng.sample(range(10, len(updates) - 10), 2))
    service = start_service(**env)
    for index, update in enumerate(updates):
        if index in kills:
            service.kill()
            service = start_service(**env)
        if mode == "polling":
            telegram.push_update(update)
        else:
            wait_until(lambda: _post_until_stored(service, update), what=f"update {index} to be stored")
    expected = {u["update_id"]: u["message"]["chat"]["id"] for u in updates}

    def all_delivered() -> bool:
        delivered = [m["update_id"] for e in _by_event_id(make) if e["event_type"] == "message_batch"
                     for m in e["messages"]]
        return sorted(delivered) == sorted(expected)

    wait_until(all_delivered, timeout=60, what="every message at Make")
    events = [e for e in _by_event_id(make) if e["event_type"] == "message_batch"]
    delivered = [m["update_id"] for e in events for m in e["messages"]]
    assert len(delivered) == len(set(delivered)) == len(updates)  # each message in exactly one event_id
    for chat in set(expected.values()):
        in_chat = [m["update_id"] for e in events if e["chat_id"] == chat for m in e["messages"]]
        assert in_chat == sorted(in_chat), f"chat {chat} out of order"
    assert service.stop() == 0


def test_make_down_then_back_delivers_everything_in_order(start_service, telegram: TelegramDouble) -> None:
    """With Make refusing connections, events wait and health says degraded; once Make is back,
    everything arrives, in order per chat."""
    port = free_port()
    service = start_service(MAKE_WEBHOOK_URL=f"http://127.0.0.1:{port}/hook", DEBOUNCE_SECONDS="0.1",
                            MAX_BATCH_MESSAGES="1", MAKE_RETRY_MAX_SECONDS="0.5", HEALTH_MAX_OUTBOX_AGE_SECONDS="1")
    for n in range(3):
        for user in (1, 2):
            telegram.push_update(text_update(f"{user}:{n}", user_id=user))
    health = wait_until(lambda: (h := service.health())["outbox_pending"] == 6 and h["make"]["failed_attempts"]
                        and h, what="undeliverable events")
    assert health["status"] == "degraded" and "ConnectError" in health["make"]["last_error"]
    wait_until(lambda: any("oldest undelivered event" in p for p in service.health()["problems"]),
               what="the outbox age to be reported")
    make = MakeDouble(port=port)
    try:
        wait_until(lambda: len(_by_event_id(make)) == 6, timeout=15, what="all six events")
        for user in (1, 2):
            assert [e["text"] for e in _by_event_id(make) if e["user_id"] == user] == [f"{user}:{n}" for n in range(3)]
        wait_until(lambda: service.health()["status"] == "ok", what="health back to ok")
    finally:
        make.close()


def test_make_slow_429_queue_full_are_retried_honouring_retry_after(start_service, telegram: TelegramDouble,
                                                                    make: MakeDouble) -> None:
    """A Make that times out, answers 429 with Retry-After and 400 Queue is full still gets the event,
    once accepted, and the wait after the 429 is the one Make asked for."""
    make.script((200, "Accepted", {}, 3.0), (429, "Too many requests", {"Retry-After": "2"}),
                (400, "Queue is full."))
    service = start_service(MAKE_TIMEOUT_SECONDS="1", MAKE_RETRY_MAX_SECONDS="5", DEBOUNCE_SECONDS="0.1")
    telegram.push_update(text_update("patience", user_id=30))
    wait_until(lambda: len(make.requests) == 4, timeout=30, what="four attempts")
    assert [r["status"] for r in make.requests] == [200, 429, 400, 200]
    assert make.requests[2]["at"] - make.requests[1]["at"] >= 2.0  # Retry-After: 2 honoured
    assert len({r["json"]["event_id"] for r in make.requests}) == 1
    wait_until(lambda: service.health()["outbox_pending"] == 0, what="delivered")
    assert service.printed("timed out")


def test_make_webhook_gone_is_loud_and_retried_at_the_longest_interval(start_service, telegram: TelegramDouble,
                                                                       make: MakeDouble) -> None:
    """410 (the Make webhook was deleted) marks health degraded with webhook_gone, and is retried."""
    make.script(*[(410, "There is no scenario listening for this webhook.")] * 2)
    service = start_service(MAKE_RETRY_MAX_SECONDS="1", DEBOUNCE_SECONDS="0.1")
    telegram.push_update(text_update("anyone there?", user_id=31))
    health = wait_until(lambda: (h := service.health())["make"]["webhook_gone"] and h, what="410 reported")
    assert health["status"] == "degraded" and "MAKE_WEBHOOK_URL" in health["make"]["last_error"]
    wait_until(lambda: make.accepted(), timeout=10, what="delivery once the webhook is back")
    assert [r["status"] for r in make.requests] == [410, 410, 200]
    assert "the Make webhook is gone" in service.text


def test_old_undelivered_event_becomes_dead_letter_chat_moves_on_and_replay_delivers(
        tmp_path, start_service, telegram: TelegramDouble, make: MakeDouble) -> None:
    """An event still failing after MAKE_MAX_AGE_HOURS is a dead letter (the chat's next event goes on);
    `dead-letters` lists it and `replay-dead` delivers it."""
    make.reject_if = lambda event: (500, "Scenario failed") if event.get("text") == "doomed" else None
    service = start_service(MAKE_MAX_AGE_HOURS="0.001", MAKE_RETRY_MAX_SECONDS="0.5", MAX_BATCH_MESSAGES="1")
    telegram.push_update(text_update("doomed", user_id=40))
    health = wait_until(lambda: (h := service.health())["outbox_dead"] == 1 and h, timeout=20, what="a dead letter")
    assert health["status"] == "degraded" and any("dead letter" in p for p in health["problems"])
    telegram.push_update(text_update("next one", user_id=40))
    wait_until(lambda: [e["text"] for e in make.accepted()] == ["next one"], what="the chat moving on")
    env = {**service.env}
    base = {"PATH": os.environ["PATH"]}
    listed = subprocess.run([sys.executable, str(ROOT / "app.py"), "dead-letters"], cwd=tmp_path, env={**base, **env},
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and "HTTP 500" in listed.stdout and "message_batch" in listed.stdout
    make.reject_if = None  # the scenario is fixed
    replayed = subprocess.run([sys.executable, str(ROOT / "app.py"), "replay-dead"], cwd=tmp_path,
                              env={**base, **env}, capture_output=True, text=True, timeout=30)
    assert replayed.returncode == 0 and "1 dead letter(s) queued again" in replayed.stdout
    wait_until(lambda: "doomed" in [e["text"] for e in make.accepted()], what="the replayed dead letter")
    assert service.health()["outbox_dead"] == 0


def test_telegram_down_polling_backs_off_and_skips_nothing(start_service, telegram: TelegramDouble,
                                                           make: MakeDouble) -> None:
    """getUpdates failing (5xx, then 429) while updates wait: once Telegram answers, every update arrives."""
    telegram.script("getUpdates", *[(502, {"ok": False, "error_code": 502, "description": "Bad Gateway"})] * 3,
                    (429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                           "parameters": {"retry_after": 1}}))
    service = start_service(DEBOUNCE_SECONDS="0.2")
    for n in range(5):
        telegram.push_update(text_update(f"m{n}", user_id=50))
    event = wait_until(lambda: make.accepted(), timeout=30, what="the batch after the outage")[0]
    assert [m["text"] for m in event["messages"]] == [f"m{n}" for n in range(5)]
    assert "Telegram asks to wait 1 s" in service.text
    assert 'gateway_telegram_calls_total{method="getUpdates",outcome="RetryAfter"} 1.0' in service.get("/metrics").text


def test_locked_database_is_not_acknowledged_then_recovers(start_service, make: MakeDouble) -> None:
    """While another process holds the SQLite file locked, POST /webhook answers 503 (Telegram resends)
    and /ready says why; once released, the same update is stored and delivered."""
    service = start_service(**WEBHOOK, DEBOUNCE_SECONDS="0.1")
    update = text_update("during the lock", user_id=60)
    blocker = sqlite3.connect(service.env["STATE_DB"], timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        refused = service.post("/webhook", json=update, headers=SECRET_HEADERS)
        assert refused.status_code == 503
        ready = service.get("/ready")
        assert ready.status_code == 503 and "locked" in " ".join(ready.json()["reasons"])
    finally:
        blocker.rollback()
        blocker.close()
    assert service.post("/webhook", json=update, headers=SECRET_HEADERS).json()["outcome"] == "stored"
    event = wait_until(lambda: make.accepted(), what="the update after the lock")[0]
    assert event["text"] == "during the lock"
    assert service.get("/ready").json() == {"ready": True}


def test_second_instance_on_the_same_database_is_refused(start_service, service_env, tmp_path) -> None:
    """A second gateway on the same STATE_DB stops at once with a clear message instead of sharing it."""
    start_service()
    second = Service(tmp_path, {**service_env})
    with pytest.raises(AssertionError, match="service exited at start"):
        second.start(timeout=15)
    assert "another gateway is already running on state database" in second.text
    assert second.proc is not None and second.proc.wait(10) == 2  # a setting to fix at start: status 2


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem of its own (tmpfs), so a test can fill it or make it read-only; needs root."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.strip()}")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount_point)], check=True)

    yield mount_point, remount
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_disk_full_refuses_updates_cleanly_and_loses_none(small_disk, start_service, make: MakeDouble) -> None:
    """When the disk fills up, updates get 503 (not acknowledged, so Telegram resends them), every one
    acknowledged before is kept, and once there is room again everything reaches Make exactly once."""
    mount_point, remount = small_disk
    make.reject_if = lambda event: (503, "paused")  # keep the events in the outbox while the disk fills
    service = start_service(**WEBHOOK, STATE_DB=str(mount_point / "state.sqlite3"), DEBOUNCE_SECONDS="0.1",
                            MAKE_RETRY_MAX_SECONDS="0.5")
    acknowledged, refused = [], []
    for n in range(400):
        update = text_update(f"{n}:" + "x" * 3000, user_id=1000 + n)
        status = service.post("/webhook", json=update, headers=SECRET_HEADERS).status_code
        assert status in (200, 503)
        (acknowledged if status == 200 else refused).append(update)
        if len(refused) >= 3:
            break
    assert acknowledged and len(refused) == 3, "the disk never filled up"
    assert "database or disk is full" in service.text
    remount("size=8m")
    for update in refused:  # Telegram resends what was not acknowledged
        assert service.post("/webhook", json=update, headers=SECRET_HEADERS).status_code == 200
    make.reject_if = None
    expected = sorted(u["update_id"] for u in acknowledged + refused)

    def delivered() -> list[int]:
        return sorted(m["update_id"] for e in _by_event_id(make) for m in e["messages"])

    wait_until(lambda: delivered() == expected, timeout=60, what="every update at Make")
    assert service.health()["outbox_pending"] == 0


def test_read_only_state_stops_the_start_with_a_clear_message(small_disk, start_service, service_env,
                                                               make: MakeDouble) -> None:
    """A state database on a read-only filesystem stops the start with one clear line (exit 2), and the
    batch it holds is delivered once the filesystem is writable again."""
    mount_point, remount = small_disk
    env = {"STATE_DB": str(mount_point / "state.sqlite3"), "DEBOUNCE_SECONDS": "30", "MAX_WAIT_SECONDS": "60"}
    first = start_service(**WEBHOOK, **env)
    update = text_update("kept through it all", user_id=70)
    assert first.post("/webhook", json=update, headers=SECRET_HEADERS).json()["outcome"] == "stored"
    assert first.stop() == 0
    remount("ro")
    try:
        refused = Service(mount_point.parent, {**service_env, **WEBHOOK, **env})
        with pytest.raises(AssertionError, match="service exited at start"):
            refused.start(timeout=15)
        assert refused.proc is not None and refused.proc.wait(10) == 2
        assert "cannot open state database" in refused.text and "Read-only file system" in refused.text
        assert "Traceback" not in refused.text
    finally:
        remount("rw")
    start_service(**WEBHOOK, **{**env, "DEBOUNCE_SECONDS": "0.01", "MAX_WAIT_SECONDS": "0.01"})
    assert wait_until(lambda: make.accepted(), what="the kept batch")[0]["text"] == "kept through it all"


def test_sigterm_while_make_hangs_exits_0_and_the_event_is_sent_again(start_service, telegram: TelegramDouble,
                                                                      make: MakeDouble) -> None:
    """SIGTERM during a delivery Make never answers: the service exits 0 within its stop time, and the
    event (in flight, so not known delivered) goes to Make again after the restart, with the same event_id."""
    make.script((200, "Accepted", {}, 30.0))
    first = start_service(DEBOUNCE_SECONDS="0.1", MAKE_TIMEOUT_SECONDS="60")
    telegram.push_update(text_update("in flight", user_id=80))
    wait_until(lambda: make.requests, what="the delivery to hang")
    assert first.stop(timeout=20) == 0
    start_service(DEBOUNCE_SECONDS="0.1")
    wait_until(lambda: len(make.requests) == 2, timeout=15, what="the event sent again")
    assert make.requests[0]["json"]["event_id"] == make.requests[1]["json"]["event_id"]
    assert make.requests[1]["json"]["text"] == "in flight"


def test_polling_does_not_confirm_updates_it_could_not_store(start_service, telegram: TelegramDouble,
                                                            make: MakeDouble) -> None:
    """While the database is locked, polled updates are not confirmed (the offset stays), so they are
    fetched again and delivered once it is free."""
    service = start_service(DEBOUNCE_SECONDS="0.1")
    wait_until(lambda: telegram.calls_of("getUpdates"), what="polling to start")
    blocker = sqlite3.connect(service.env["STATE_DB"], timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        telegram.push_update(text_update("wait for me", user_id=81))
        wait_until(lambda: "updates not stored, so not confirmed" in service.text, timeout=20,
                   what="the store failure to be logged")
    finally:
        blocker.rollback()
        blocker.close()
    event = wait_until(lambda: make.accepted(), timeout=30, what="the update after the lock")[0]
    assert event["text"] == "wait for me"


def test_telegram_unreachable_in_webhook_mode_is_reported(start_service) -> None:
    """With the Bot API unreachable, webhook mode keeps retrying setWebhook and health names the problem."""
    service = start_service(**WEBHOOK, TELEGRAM_API_URL=f"http://127.0.0.1:{free_port()}")
    health = wait_until(lambda: (h := service.health())["problems"] and any("Telegram unreachable" in p
                        for p in h["problems"]) and h, what="the problem in health")
    assert health["status"] == "degraded"
    assert any("webhook not registered" in p for p in health["problems"])
    wait_until(lambda: "setWebhook failed" in service.text, timeout=20, what="the failure to be logged")


def test_hanging_bot_api_does_not_hold_up_ingestion_or_delivery(start_service, telegram: TelegramDouble,
                                                                make: MakeDouble) -> None:
    """While every sendChatAction and sendMessage hangs for seconds, updates are still acknowledged at
    once and batches still reach Make: typing and replies degrade, ingestion does not."""
    slow = (200, {"ok": True, "result": True}, 3.0)
    telegram.script("sendChatAction", *[slow] * 20)
    telegram.script("sendMessage", *[(200, {"ok": True, "result": {"message_id": 1}}, 3.0)] * 20)
    make.script(*[(200, {"reply": "slow to arrive"})] * 10)
    service = start_service(**WEBHOOK, DEBOUNCE_SECONDS="0.1", TYPING_MODE="until_reply",
                            TYPING_INTERVAL_SECONDS="0.5")
    for user in range(1, 6):
        answer = service.post("/webhook", json=text_update("hello", user_id=90 + user), headers=SECRET_HEADERS)
        assert answer.json()["outcome"] == "stored"
        wait_until(lambda: len(make.accepted()) == user, what=f"batch {user} at Make")
    wait_until(lambda: len(telegram.calls_of("sendMessage")) == 5, timeout=30, what="the slow replies, in the end")


def test_store_locked_after_make_accepted_does_not_send_the_event_twice(start_service, telegram: TelegramDouble,
                                                                        make: MakeDouble) -> None:
    """If the outcome cannot be written right after Make accepted the event, it is written once the store
    is free again; Make is not sent the event a second time."""
    make.script((200, "Accepted", {}, 1.0))
    service = start_service(DEBOUNCE_SECONDS="0.1")
    telegram.push_update(text_update("exactly once", user_id=85))
    wait_until(lambda: make.requests, what="Make to be working on the event")
    blocker = sqlite3.connect(service.env["STATE_DB"], timeout=5)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        wait_until(lambda: "not recorded yet" in service.text, timeout=20, what="the outcome to wait for the store")
    finally:
        blocker.rollback()
        blocker.close()
    wait_until(lambda: service.health()["outbox_pending"] == 0, timeout=20, what="the outcome to be recorded")
    assert len(make.requests) == 1
