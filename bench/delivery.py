"""Delivery to Make under realistic load: many chats answered at once, and a backlog after an outage.

Prints, in one run:
1. 200 chats write at once and Make takes 3 s per call (a Webhook response after an AI step): the time
   until the last chat has its reply, unpaced and with the default pacing (30 calls/s), and the peak
   thread count of the gateway process; each beside its goal.
2. 100,000 events queued over 10,000 chats while Make answers 503 (a long outage): POST /webhook p50/p99,
   GET /, GET /ready and GET /metrics with that backlog beside an empty gateway's; then Make comes back
   and the backlog drains unpaced to an instant Make double: events/s, every event once, each chat in order.

Run: python bench/delivery.py [chats] [backlog_events] [backlog_chats]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from config import derive_webhook_secret  # noqa: E402
from doubles import TOKEN, MakeDouble, Service, TelegramDouble, wait_until  # noqa: E402
from loadgen import post_all  # noqa: E402
from store import NewEvent, SQLiteStore  # noqa: E402

MAKE_SECONDS = 3.0
DEBOUNCE = 1.0
DRAIN_LIMIT = 600.0  # seconds; a slower gateway is measured on what it drained by then
HEADERS = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}


def gateway(tmp: Path, telegram: TelegramDouble, make: MakeDouble, **env: str) -> Service:
    """The real gateway in webhook mode, state in `tmp`."""
    return Service(tmp, {
        "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
        "WEBHOOK_URL": "https://bench.example/webhook", "HOST": "127.0.0.1", "PORT": "0",
        "STATE_DB": str(tmp / "state.sqlite3"), "DEBOUNCE_SECONDS": str(DEBOUNCE), "LOG_LEVEL": "INFO",
        "FLOOD_MAX_MESSAGES": "100000", **env}).start(timeout=120)


def text(update_id: int, user: int) -> dict[str, Any]:
    return {"update_id": update_id, "message": {
        "message_id": update_id, "date": int(time.time()), "chat": {"id": user, "type": "private"},
        "from": {"id": user, "is_bot": False, "first_name": "B"}, "text": f"question {update_id}"}}


def threads_of(service: Service) -> int:
    """The gateway process's thread count now (Linux)."""
    assert service.proc is not None
    for line in Path(f"/proc/{service.proc.pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def answered_at_once(chats: int, label: str, goal: str, **env: str) -> None:
    """`chats` users write once each; Make takes MAKE_SECONDS and replies; time until the last reply."""
    telegram, make = TelegramDouble(), MakeDouble()
    make.script(*[(200, {"reply": "Here is your answer."}, {}, MAKE_SECONDS)] * chats)
    with tempfile.TemporaryDirectory() as tmp:
        service = gateway(Path(tmp), telegram, make, **env)
        idle_threads = threads_of(service)
        peak = [idle_threads]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], threads_of(service))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        updates = [text(1000 + n, 1 + n) for n in range(chats)]
        first = time.monotonic()
        post_all(service.url + "/webhook", updates, HEADERS)
        last_written = time.monotonic()
        wait_until(lambda: len(telegram.calls_of("sendMessage")) >= chats, timeout=600, what="every reply")
        done = max(telegram.times_of("sendMessage"))
        stop.set()
        sampler.join()
        assert sorted(c["chat_id"] for c in telegram.calls_of("sendMessage")) == list(range(1, chats + 1))
        print(f"  {label:<44} last reply {done - last_written:5.1f} s after the last message "
              f"({done - first:5.1f} s after the first)   goal {goal}   threads {idle_threads} idle, peak {peak[0]}")
        service.stop()
    telegram.close()
    make.close()


def fill_backlog(path: Path, events: int, chats: int) -> None:
    """Queue `events` message_batch events over `chats` chats, as a long Make outage leaves them."""
    store = SQLiteStore(str(path))
    now = time.time() - 600
    batch = []
    for n in range(events):
        chat = 10_000_000 + n % chats
        payload = {"event_type": "message_batch", "event_id": f"backlog-{n}", "chat_id": chat, "user_id": chat,
                   "user": {"id": chat, "first_name": "B"}, "seq": n // chats,
                   "messages": [{"update_id": n, "message_id": n, "date": int(now), "type": "text",
                                 "text": "a question asked while Make was down"}],
                   "batch_size": 1, "text": "a question asked while Make was down", "reason": "quiet"}
        batch.append(NewEvent(f"backlog-{n}", f"chat:{chat}", "message_batch", payload))
    if hasattr(store, "enqueue_events"):
        store.enqueue_events(batch, now)
    else:  # the gateway before bench/delivery.py existed: the same rows, one transaction
        with store._tx() as cur:
            for event in batch:
                store._enqueue(cur, event, now)
    store.close()


def timed_gets(service: Service, path: str, count: int = 20) -> list[float]:
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(count):
            started = time.perf_counter()
            client.get(service.url + path)
            times.append(time.perf_counter() - started)
    return times


def under_backlog(label: str, backlog: tuple[int, int] | None, requests: int = 2000) -> Path | None:
    """Webhook and health latency while Make answers 503, with or without a backlog; returns the state dir."""
    telegram, make = TelegramDouble(), MakeDouble()
    make.reject_if = lambda event: (503, "Service Unavailable")
    tmp = Path(tempfile.mkdtemp())
    if backlog:
        started = time.monotonic()
        fill_backlog(tmp / "state.sqlite3", *backlog)
        print(f"  (queued {backlog[0]:,} events over {backlog[1]:,} chats in {time.monotonic() - started:.1f} s)")
    started = time.monotonic()
    service = gateway(tmp, telegram, make, TYPING_MODE="off")
    start_seconds = time.monotonic() - started
    time.sleep(3)  # let the retries of the backlog settle into their rhythm before measuring
    post_all(service.url + "/webhook", [text(50_000_000 + n, 1 + n % 500) for n in range(200)], HEADERS)
    _, latencies = post_all(service.url + "/webhook", [text(60_000_000 + n, 1 + n % 500) for n in range(requests)],
                            HEADERS)
    health, ready, metrics = (timed_gets(service, p) for p in ("/", "/ready", "/metrics"))
    pending = service.health()["outbox_pending"]
    print(f"  {label:<30} webhook p50 {ms(latencies, 0.5):6.1f} ms  p99 {ms(latencies, 0.99):6.1f} ms   "
          f"GET / {ms(health, 0.5):6.1f} ms   /ready {ms(ready, 0.5):5.1f} ms   /metrics {ms(metrics, 0.5):5.1f} ms"
          f"   (start {start_seconds:.1f} s, {pending:,} pending, {len(make.requests):,} failed calls to Make)")
    service.stop()
    telegram.close()
    make.close()
    return tmp if backlog else None


def drain(tmp: Path, events: int, chats: int) -> None:
    """Make is back and instant: how fast the backlog goes, unpaced; every event once, each chat in order."""
    telegram, make = TelegramDouble(), MakeDouble()
    started = time.monotonic()
    service = gateway(tmp, telegram, make, TYPING_MODE="off", MAKE_MAX_RATE="0")
    with httpx.Client(timeout=60) as client:  # one connection, looked at 5 times a second: not a load of its own
        while client.get(service.url + "/").json()["outbox_pending"] and time.monotonic() - started < DRAIN_LIMIT:
            time.sleep(0.2)
    seconds = time.monotonic() - started
    backlog = [r["json"] for r in make.requests if r["json"]["event_id"].startswith("backlog-")]
    ids = [e["event_id"] for e in backlog]
    in_order = True
    last_seq: dict[int, int] = {}
    for e in backlog:
        if last_seq.get(e["chat_id"], -1) > e["seq"]:
            in_order = False
        last_seq[e["chat_id"]] = e["seq"]
    print(f"  drain once Make is back (unpaced)  {len(ids) / seconds:7.0f} events/s   "
          f"{len(ids):,} delivered in {seconds:.1f} s (start included), {len(set(ids)):,} distinct, "
          f"each chat in order: {in_order}{'' if len(ids) == events else ' (stopped at the time limit)'}"
          f"   goal >= 500 events/s")
    service.stop()
    telegram.close()
    make.close()


def main() -> None:
    chats = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    events = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    backlog_chats = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    print(f"1. {chats} chats write at once; Make answers each after {MAKE_SECONDS:g} s (DEBOUNCE_SECONDS={DEBOUNCE:g})")
    answered_at_once(chats, "unpaced, MAKE_MAX_CONCURRENCY=200", f"< {DEBOUNCE + 2 * MAKE_SECONDS:g} s",
                     MAKE_MAX_RATE="0", MAKE_MAX_CONCURRENCY="200", MAKE_DELIVERY_WORKERS="32")
    answered_at_once(chats, "MAKE_MAX_RATE=30 (default), concurrency 200",
                     f"~{DEBOUNCE + chats / 30 + MAKE_SECONDS:.1f} s +-1", MAKE_MAX_CONCURRENCY="200",
                     MAKE_DELIVERY_WORKERS="32")
    answered_at_once(chats, "all defaults (concurrency 50, rate 30)",
                     f"~{DEBOUNCE + chats / (50 / MAKE_SECONDS) + MAKE_SECONDS:.1f} s (50 per {MAKE_SECONDS:g} s)")
    print(f"2. a backlog of {events:,} events over {backlog_chats:,} chats while Make answers 503 (defaults)")
    under_backlog("empty gateway", None)
    tmp = under_backlog("with the backlog", (events, backlog_chats))
    assert tmp is not None
    drain(tmp, events, backlog_chats)


if __name__ == "__main__":
    main()
