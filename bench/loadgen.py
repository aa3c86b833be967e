"""The load generator the benchmarks share: updates posted over keep-alive connections on threads."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx


def post_all(url: str, updates: list[dict[str, Any]], headers: dict[str, str],
             connections: int = 16) -> tuple[float, list[float]]:
    """Post `updates` over `connections` keep-alive connections, each expecting a 200; return
    (seconds in all, each request's latency)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(part: list[dict[str, Any]]) -> None:
        mine = []
        with httpx.Client(headers=headers, timeout=60) as client:
            for update in part:
                started = time.perf_counter()
                response = client.post(url, json=update)
                mine.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(updates[n::connections],)) for n in range(connections)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, latencies
