"""Memory and disk under abuse: what one flooding user, 100,000 users and 100,000 bogus updates cost.

Runs the real ingestion path in-process (UpdateRouter -> flood control -> BatchManager -> SQLite file,
synchronous=FULL) with the default limits, and prints resident memory and database size after each
scenario. Run: python bench/abuse.py [count]   (default 100000; each scenario takes about a minute)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from batching import BatchManager  # noqa: E402
from debounce import DebounceManager, DebounceSettings  # noqa: E402
from metrics import GatewayMetrics  # noqa: E402
from router import UpdateRouter  # noqa: E402
from scheduler import rss_mb  # noqa: E402
from store import SQLiteStore  # noqa: E402


def message(update_id: int, user: int) -> dict:
    return {"update_id": update_id, "message": {"message_id": update_id, "date": 0, "text": f"spam {update_id}",
                                                "chat": {"id": user, "type": "private"},
                                                "from": {"id": user, "is_bot": False, "first_name": "X"}}}


def run(name: str, count: int, updates, tmp: str) -> None:
    path = Path(tmp) / f"{name}.sqlite3"
    store = SQLiteStore(str(path))
    batches = BatchManager(store, DebounceSettings(4, 15, 50))  # the defaults
    batches.start()
    router = UpdateRouter(store, batches, DebounceManager(30, 60), GatewayMetrics(), ("callback_query",))
    before = rss_mb()
    started = time.perf_counter()
    outcomes: dict[str, int] = {}
    for update in updates(count):
        outcome = router.handle(update).outcome
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    seconds = time.perf_counter() - started
    stats = store.outbox_stats(time.time())
    size = sum(os.path.getsize(p) for p in Path(tmp).glob(f"{name}.sqlite3*")) / 2**20
    print(f"{name:<28} {count} updates in {seconds:5.1f} s; +{rss_mb() - before:6.1f} MB RSS; "
          f"database {size:6.1f} MB; open batches {batches.active_batches}, outbox {stats['outbox_pending']}; "
          f"{outcomes}")
    batches.stop()
    store.close()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        run("one user, many messages", count, lambda n: (message(i, 42) for i in range(1, n + 1)), tmp)
        run("many users, one each", count, lambda n: (message(i, i) for i in range(1, n + 1)), tmp)
        run("bogus update ids", count,
            lambda n: ({"update_id": i, "junk_kind": {"x": "y" * 50}} for i in range(1, n + 1)), tmp)


if __name__ == "__main__":
    main()
