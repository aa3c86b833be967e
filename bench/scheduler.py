"""10,000 users with an open batch: one scheduler thread (ours) against a `threading.Timer` per user.

For each: how long opening 10,000 batches takes, how many threads and how much memory it uses, and
how long restarting every user's quiet period (a second message each) takes. Ours stores every
message in a real SQLite file (synchronous=FULL) as the service does; the Timer peer stores nothing,
so its figures are for the timers alone. Run: python bench/scheduler.py [users]
"""

from __future__ import annotations

import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batching import BatchManager  # noqa: E402
from debounce import DebounceSettings  # noqa: E402
from store import SQLiteStore  # noqa: E402


def rss_mb() -> float:
    """Current resident memory in MB (Linux: read from /proc; elsewhere the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(users: int, tmp: str) -> None:
    store = SQLiteStore(str(Path(tmp) / "bench.sqlite3"))
    closed: list[int] = []
    manager = BatchManager(store, DebounceSettings(600, 1200, 50), on_closed=lambda b, r: closed.append(b.count))
    manager.start()
    before, threads_before = rss_mb(), threading.active_count()
    started = time.perf_counter()
    for user in range(users):
        manager.add(user + 1, user, user, {"id": user}, {"type": "text", "text": "hi"})
    opened = time.perf_counter() - started
    rss, threads = rss_mb() - before, threading.active_count() - threads_before
    started = time.perf_counter()
    for user in range(users):
        manager.add(users + user + 1, user, user, {"id": user}, {"type": "text", "text": "again"})
    restarted = time.perf_counter() - started
    print(f"ours: one scheduler thread      open {users} batches {opened:6.2f} s, +{threads} threads, "
          f"+{rss:5.1f} MB RSS; restart all {restarted:6.2f} s; timers {manager.scheduled_deadlines}")
    manager.stop()
    store.close()


def peer(users: int) -> None:
    before, threads_before = rss_mb(), threading.active_count()
    started = time.perf_counter()
    timers = {}
    for user in range(users):
        timers[user] = threading.Timer(600, lambda: None)
        timers[user].start()
    opened = time.perf_counter() - started
    rss, threads = rss_mb() - before, threading.active_count() - threads_before
    started = time.perf_counter()
    for user in range(users):
        timers[user].cancel()
        timers[user] = threading.Timer(600, lambda: None)
        timers[user].start()
    restarted = time.perf_counter() - started
    print(f"peer: threading.Timer per user  open {users} timers  {opened:6.2f} s, +{threads} threads, "
          f"+{rss:5.1f} MB RSS; restart all {restarted:6.2f} s")
    for timer in timers.values():
        timer.cancel()


def main() -> None:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    with tempfile.TemporaryDirectory() as tmp:
        ours(users, tmp)
    peer(users)


if __name__ == "__main__":
    main()
