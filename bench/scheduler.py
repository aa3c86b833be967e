"""Debounce resets at scale: one scheduler thread and a heap (ours) against a `threading.Timer` per user.

1. 10,000 users open a batch, then each sends one more message: a debounce reset each. For ours, the
   time per reset of the whole `BatchManager.add` (the message stored durably in a real SQLite file,
   synchronous=FULL, as the service does) and, timed inside it, of the scheduler's part alone
   (`_schedule`: the heap push under the lock and the scheduler's wake-up); how often the
   `batch-scheduler` thread woke for them; thread count and RSS added; heap entries after the resets.
   For the peer, cancel + new `Timer` + start per reset, with threads and RSS; it stores nothing, so
   its figures are for the timers alone, to set beside our scheduler part.
2. How big the deadline heap gets. A reset pushes a new entry and leaves the old one, skipped when
   popped at its due time; every entry is due at most DEBOUNCE_SECONDS after it was pushed (the cap,
   MAX_WAIT_SECONDS, only ever makes it sooner), so the stale ones count the resets of the last
   DEBOUNCE_SECONDS, whatever MAX_WAIT_SECONDS; and they are all dropped once there are more than two
   per live one (plus 64). Simulated time, no thread: the scheduler's pass runs every 0.1 s of simulated
   time, the deadlines come from `debounce.deadline()` as `add` computes them. Patterns: one user's
   burst of 30 messages 0.1 s apart (DEBOUNCE_SECONDS=4); 10,000 users sending a message every 2 s
   each for 120 s (the pace FLOOD_MAX_MESSAGES=30 per 60 s lets through) with MAX_WAIT_SECONDS=3600
   (and MAX_BATCH_MESSAGES out of the way), at DEBOUNCE_SECONDS=4 (the default) and 60. The
   reference: the live entries (open batches), the fewest the heap can hold.

Run: python bench/scheduler.py [users]
"""

from __future__ import annotations

import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batching import BatchManager  # noqa: E402
from debounce import DebounceSettings, deadline  # noqa: E402
from store import MemoryStore, SQLiteStore  # noqa: E402


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
    before, threads_before = rss_mb(), threading.active_count()
    manager.start()
    passes = [0]
    close_due = manager._close_due

    def counted_pass() -> float:
        passes[0] += 1
        return close_due()

    manager._close_due = counted_pass  # type: ignore[method-assign]
    scheduled = manager._schedule
    in_scheduler = [0]

    def timed_schedule(key: tuple[int, int], at: float) -> None:
        started = time.perf_counter_ns()
        scheduled(key, at)
        in_scheduler[0] += time.perf_counter_ns() - started

    manager._schedule = timed_schedule  # type: ignore[method-assign]
    started = time.perf_counter()
    for user in range(users):
        manager.add(user + 1, user, user, {"id": user}, {"type": "text", "text": "hi"})
    opened = time.perf_counter() - started
    rss, threads = rss_mb() - before, threading.active_count() - threads_before
    in_scheduler[0], passes[0] = 0, 0
    started = time.perf_counter()
    for user in range(users):
        manager.add(users + user + 1, user, user, {"id": user}, {"type": "text", "text": "again"})
    reset = (time.perf_counter() - started) / users * 1e6
    scheduler = in_scheduler[0] / users / 1000
    heap = manager.heap_entries
    print(f"  ours: one scheduler thread        open {users} batches {opened:5.2f} s, +{threads} thread(s), "
          f"+{rss:5.1f} MB RSS")
    print(f"        per reset: whole add {reset:6.1f} us (SQLite write included), scheduler part {scheduler:5.2f} us;"
          f" scheduler woke {passes[0]} times for {users} resets; heap {heap} entries, "
          f"{manager.scheduled_deadlines} live")
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
    reset = (time.perf_counter() - started) / users * 1e6
    print(f"  peer: threading.Timer per user    open {users} timers  {opened:5.2f} s, +{threads} threads, "
          f"+{rss:5.1f} MB RSS")
    print(f"        per reset: cancel + Timer + start {reset:6.1f} us")
    for timer in timers.values():
        timer.cancel()


def heap_under(label: str, settings: DebounceSettings, users: int, messages: int, every: float) -> None:
    """`users` users each send `messages` messages `every` seconds apart (random offsets), in simulated time;
    the heap's largest size and the open batches then."""
    now = [0.0]
    store = MemoryStore()  # holds no batch: a due key is found closed and forgotten, as after a real close
    manager = BatchManager(store, settings, clock=lambda: now[0], monotonic=lambda: now[0])
    rand = random.Random(1)
    sends = sorted((rand.uniform(0, every) + n * every, user) for user in range(users) for n in range(messages))
    first: dict[int, float] = {}
    counts: dict[int, int] = {}
    biggest = live_then = 0
    tick, i = 0.1, 0
    started = time.perf_counter()
    while i < len(sends):
        now[0] += tick
        while i < len(sends) and sends[i][0] <= now[0]:
            at, user = sends[i]
            i += 1
            if user not in first or not manager.has_open(user, user):  # the last batch closed: a new one
                first[user], counts[user] = at, 0
            counts[user] += 1
            due, _ = deadline(first[user], at, counts[user], settings)
            manager._schedule((user, user), due)
        if manager.heap_entries > biggest:  # before the pass drops what is due: the most it held
            biggest, live_then = manager.heap_entries, manager.scheduled_deadlines
        manager._close_due()
    seconds = time.perf_counter() - started
    print(f"  {label:<58} heap at most {biggest:>7,} entries, {live_then:>6,} of them live "
          f"({biggest / max(1, live_then):4.1f}x; reference: live <= {users:,})  [{seconds:.1f} s]")
    store.close()


def main() -> None:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    print(f"1. {users:,} users with an open batch each send one more message (a debounce reset each)")
    with tempfile.TemporaryDirectory() as tmp:
        ours(users, tmp)
    peer(users)
    print("2. the deadline heap under resets (simulated time; a reset leaves a stale entry until its due time)")
    heap_under("one user, 30 messages 0.1 s apart, DEBOUNCE_SECONDS=4", DebounceSettings(4, 15, 50), 1, 30, 0.1)
    heap_under(f"{users:,} users, a message every 2 s for 120 s, DEBOUNCE 4, MAX_WAIT 3600",
               DebounceSettings(4, 3600, 10**6), users, 60, 2.0)
    heap_under(f"{users:,} users, a message every 2 s for 120 s, DEBOUNCE 60, MAX_WAIT 3600",
               DebounceSettings(60, 3600, 10**6), users, 60, 2.0)


if __name__ == "__main__":
    main()
