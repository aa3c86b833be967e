"""From a batch's deadline to Make: how long after a batch is due does its `message_batch` event reach Make?

The real gateway (`python app.py`, webhook mode, SQLite with synchronous=FULL) runs in a subprocess
against the Bot API emulator and a Make double that notes the wall-clock time (`time.time()`) each event
arrives. The deadline is computed from the event itself with the gateway's own `debounce.deadline()`:
for reason `quiet` it is `last_at` + DEBOUNCE_SECONDS (`last_at` is the gateway's clock when it stored
the last message). The figure is arrival minus deadline, the path after ingest: the scheduler waking,
the transaction that turns the batch into an outbox event, the claim loop waking and claiming it, the
hand-off to a `make-delivery-N` thread, "typing…" being started, and the POST itself. The Make double
answers at once with a short reply, so the replies' `sendMessage` calls run meanwhile, as they would.
The doubles and the load run in the bench's own process, so its delays in taking a request count too.

Two patterns, DEBOUNCE_SECONDS=1, each run twice:
- quiet: one chat; its user sends one message, waits until Make has the batch, and sends the next;
- load: 500 users each send one message at a random moment over 10 s (a fixed seed), so 500 batches
  close at staggered moments, about 50 a second.
Each with the defaults, and with MAKE_MAX_RATE=0. The default MAKE_MAX_RATE=30 starts at most 30 Make
calls a second, one every 33 ms, on purpose (Make's limit is 300 per 10 s per webhook): under 50 batches
a second the events queue behind the pacing and wait seconds, which is the pacing doing its job, not
the gateway being slow. MAKE_MAX_RATE=0 takes the pacing out and leaves the gateway's own latency;
the goal (p99 under 50 ms) is for that, and for the quiet chat, which pacing never delays.

Where the time goes under load (traced with timers around the stages and the store's lock, and py-spy):
the scheduler and the claim loop spend their busy time waiting for the store's one lock and in COMMIT's
fsync; the Python work on the path is well under a millisecond. Each user costs about 12 store
transactions, one at a time on one connection, 7 of them with an fsync (synchronous=FULL: stored,
closed, claimed, delivered with its reply queued, the reply claimed, on the wire, sent), so the tail
follows the disk and whoever else uses it: each section prints a SQLite commit's p50/p99 on this
machine just before it, and each run the load average after it.
The typing keep-alive is not on the path: `start()` only pushes a heap entry; `sendChatAction` goes out
on its own thread while the event is posted.

Run: python bench/deadline.py [users] [spread_seconds] [quiet_batches]
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import statistics
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
from debounce import DebounceSettings, deadline  # noqa: E402
from doubles import TOKEN, MakeDouble, Service, TelegramDouble, wait_until  # noqa: E402

DEBOUNCE = 1.0
MAX_WAIT = 15.0  # the default
GOAL_MS = 50.0
CONNECTIONS = 16
HEADERS = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}


class TimedMake(MakeDouble):
    """The Make double, noting when (wall clock) each event arrived, and answering with a short reply."""

    def __init__(self) -> None:
        self.arrived: dict[str, tuple[float, dict[str, Any]]] = {}
        super().__init__()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        now = time.time()
        event = json.loads(body)
        with self.lock:
            self.arrived.setdefault(event["event_id"], (now, event))
        return super().handle(method, path, headers, body)


def gateway(tmp: Path, telegram: TelegramDouble, make: MakeDouble, **env: str) -> Service:
    """The real gateway in webhook mode, state in `tmp`."""
    return Service(tmp, {
        "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
        "WEBHOOK_URL": "https://bench.example/webhook", "HOST": "127.0.0.1", "PORT": "0",
        "STATE_DB": str(tmp / "state.sqlite3"), "DEBOUNCE_SECONDS": str(DEBOUNCE),
        "MAX_WAIT_SECONDS": str(MAX_WAIT), "LOG_LEVEL": "INFO", "FLOOD_MAX_MESSAGES": "100000",
        **env}).start(timeout=120)


def text(update_id: int, user: int) -> dict[str, Any]:
    return {"update_id": update_id, "message": {
        "message_id": update_id, "date": int(time.time()), "chat": {"id": user, "type": "private"},
        "from": {"id": user, "is_bot": False, "first_name": "B"}, "text": f"question {update_id}"}}


def cpu_seconds(service: Service) -> float:
    """User + system CPU seconds the gateway process has used (Linux)."""
    assert service.proc is not None
    fields = Path(f"/proc/{service.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (100 Hz)


def lateness(make: TimedMake) -> tuple[list[float], dict[str, int]]:
    """Each event's arrival minus its deadline, in seconds; and how many closed for each reason."""
    settings = DebounceSettings(DEBOUNCE, MAX_WAIT, 50)
    late, reasons = [], {}
    with make.lock:
        arrived = list(make.arrived.values())
    for at, event in arrived:
        due, _ = deadline(event["first_at"], event["last_at"], event["batch_size"], settings)
        late.append(at - due)
        reasons[event["reason"]] = reasons.get(event["reason"], 0) + 1
    return late, reasons


def disk_now(commits: int = 300) -> str:
    """This machine's disk right now: a small SQLite commit (WAL, synchronous=FULL, as the store's), p50/p99,
    and the load average; the store waits for such a commit on every write, so a busy disk shows in the tail."""
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(str(Path(tmp) / "probe.sqlite3"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (x TEXT)")
        times = []
        for _ in range(commits):
            started = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?)", ("x" * 300,))
            db.execute("COMMIT")
            times.append(time.perf_counter() - started)
        db.close()
    return (f"(this machine now: SQLite commit p50 {pct(times, 0.5):.2f} ms, p99 {pct(times, 0.99):.2f} ms; "
            f"load average {os.getloadavg()[0]:.1f})")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def report(label: str, late: list[float], reasons: dict[str, int], goal: str, extra: str = "") -> None:
    print(f"  {label:<40} p50 {pct(late, 0.5):7.1f} ms  p99 {pct(late, 0.99):7.1f} ms  max {max(late) * 1000:7.1f} ms"
          f"  mean {statistics.mean(late) * 1000:6.1f} ms   goal {goal}   ({len(late)} batches, "
          f"{', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))}{extra})")


def quiet(batches: int, label: str, goal: str, **env: str) -> None:
    """One chat: one message, wait for Make to have its batch, the next."""
    telegram, make = TelegramDouble(), TimedMake()
    make.reject_if = lambda event: (200, {"reply": "ok"})
    with tempfile.TemporaryDirectory() as tmp:
        service = gateway(Path(tmp), telegram, make, **env)
        with httpx.Client(headers=HEADERS, timeout=60) as client:
            for n in range(batches):
                assert client.post(service.url + "/webhook", json=text(1000 + n, 7)).status_code == 200
                wait_until(lambda: len(make.arrived) > n, timeout=30, what=f"batch {n}")
                time.sleep(0.2)  # the reply and the typing of this batch settle before the next message
        late, reasons = lateness(make)
        report(label, late, reasons, goal, f"; load average {os.getloadavg()[0]:.1f}")
        service.stop()
    telegram.close()
    make.close()


def load(users: int, spread: float, label: str, goal: str, **env: str) -> None:
    """`users` users each send one message at a random moment over `spread` seconds."""
    telegram, make = TelegramDouble(), TimedMake()
    make.reject_if = lambda event: (200, {"reply": "ok"})
    rand = random.Random(7)
    moments = sorted((rand.uniform(0, spread), 1 + user) for user in range(users))
    with tempfile.TemporaryDirectory() as tmp:
        service = gateway(Path(tmp), telegram, make, **env)
        lock = threading.Lock()
        queue = list(reversed(moments))
        webhook: list[float] = []
        cpu_before = cpu_seconds(service)
        origin = time.monotonic() + 0.5

        def post() -> None:
            with httpx.Client(headers=HEADERS, timeout=60) as client:
                while True:
                    with lock:
                        if not queue:
                            return
                        at, user = queue.pop()
                    time.sleep(max(0.0, origin + at - time.monotonic()))
                    started = time.perf_counter()
                    assert client.post(service.url + "/webhook", json=text(100_000 + user, user)).status_code == 200
                    with lock:
                        webhook.append(time.perf_counter() - started)

        threads = [threading.Thread(target=post) for _ in range(CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: len(make.arrived) >= users, timeout=600, what="every batch at Make")
        cpu = cpu_seconds(service) - cpu_before
        late, reasons = lateness(make)
        report(label, late, reasons, goal, f"; webhook p99 {pct(webhook, 0.99):.1f} ms, gateway CPU {cpu:.1f} s, "
               f"load average {os.getloadavg()[0]:.1f}")
        service.stop()
    telegram.close()
    make.close()


def main() -> None:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    spread = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    batches = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    rate = users / spread
    print(f"deadline -> Make double, DEBOUNCE_SECONDS={DEBOUNCE:g} (arrival at Make minus the batch's deadline)")
    print(f"1. quiet: one chat, {batches} batches one after another   {disk_now()}")
    quiet(batches, "defaults (MAKE_MAX_RATE=30)", f"p99 < {GOAL_MS:g} ms")
    quiet(batches, "MAKE_MAX_RATE=0", f"p99 < {GOAL_MS:g} ms", MAKE_MAX_RATE="0")
    print(f"2. load: {users} users, one message each at random moments over {spread:g} s (~{rate:.0f} batches/s)"
          f"   {disk_now()}")
    backlog = max(0.0, users / 30 - spread)
    load(users, spread, "defaults (MAKE_MAX_RATE=30)",
         f"paced: ~{backlog:.1f} s queued at the end" if backlog else f"p99 < {GOAL_MS:g} ms")
    load(users, spread, "MAKE_MAX_RATE=0", f"p99 < {GOAL_MS:g} ms", MAKE_MAX_RATE="0")


if __name__ == "__main__":
    main()
