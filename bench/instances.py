"""Ingest and delivery with one instance on SQLite, one on PostgreSQL, and three on PostgreSQL sharing it,
under the same load, in one run.

Load: `wrk` posting distinct updates (`bench/wrk_updates.lua`, 500 users) at 16 and 64 connections. Three
instances get the connections spread evenly, one `wrk` each, as a round-robin balancer spreads them; their
rates add up, and the p99 shown is the worst of the three. Make (a double on 127.0.0.1) answers each batch
at once, so delivery runs as fast as the gateway lets it (MAKE_MAX_RATE=0). Each setup reports the ingest
rate and latency, and how many batches per second reached Make from the first request until the last batch
was delivered; then it checks that every acknowledged message reached Make exactly once.

PostgreSQL is Debian's (`apt install postgresql`), started in a temp dir on a free port with its default
durability (fsync and synchronous_commit on), as the tests start it. Needs `wrk`.
Run: python bench/instances.py [seconds per run]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from config import derive_webhook_secret  # noqa: E402
from doubles import TOKEN, MakeDouble, Service, TelegramDouble, wait_until  # noqa: E402
from ingest import gateway_env, line, wrk  # noqa: E402
from postgres import PostgresServer, server_binaries  # noqa: E402

CONNECTIONS = (16, 64)


def spread(connections: int, parts: int) -> list[int]:
    """`connections` split as evenly as a round-robin balancer would."""
    return [connections // parts + (1 if i < connections % parts else 0) for i in range(parts)]


def load(urls: list[str], connections: int, seconds: int, first_id: int) -> dict[str, float]:
    """One `wrk` per instance at once, the connections spread over them; the figures added up."""
    secret = derive_webhook_secret(TOKEN)
    results: list[dict[str, float]] = []

    def one(url: str, conns: int, offset: int) -> None:
        results.append(wrk(url + "/webhook", conns, seconds, first_id + offset, secret))

    threads = [threading.Thread(target=one, args=(url, conns, n * 10_000_000))
               for n, (url, conns) in enumerate(zip(urls, spread(connections, len(urls))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = {key: sum(r[key] for r in results) for key in ("requests", "non2xx", "socket_errors")}
    return {**total, "seconds": max(r["seconds"] for r in results), "rate": sum(r["rate"] for r in results),
            "p50_ms": max(r["p50_ms"] for r in results), "p99_ms": max(r["p99_ms"] for r in results),
            "max_ms": max(r["max_ms"] for r in results)}


def drained(urls: list[str]) -> bool:
    """Nothing open or waiting for Make, as the (shared) state says."""
    health = httpx.get(urls[0] + "/", timeout=10).json()
    return health["outbox_pending"] == 0 and health["stored_open_batches"] == 0


def setup_run(name: str, instances: int, database_url: str | None, seconds: int) -> list[str]:
    """Start the setup, load it at each connection count, let it deliver; its figure lines."""
    telegram, make = TelegramDouble(), MakeDouble()
    lines: list[str] = []
    services: list[Service] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = gateway_env(tmp, telegram, make)
            if database_url:
                env["DATABASE_URL"] = database_url
            for n in range(instances):
                folder = Path(tmp) / f"instance-{n}"
                folder.mkdir()
                services.append(Service(folder, env).start(timeout=60))
            urls = [s.url for s in services]
            load(urls, 16, 1, 1)  # warm-up (its updates reach Make too)
            wait_until(lambda: drained(urls), timeout=600, what="the warm-up delivered")
            acknowledged = 0
            for n, connections in enumerate(CONNECTIONS, start=1):
                batches_before = len(make.accepted())
                started = time.monotonic()
                figures = load(urls, connections, seconds, n * 1_000_000_000)
                acknowledged += int(figures["requests"] - figures["non2xx"])
                wait_until(lambda: drained(urls), timeout=600, what="every batch delivered")
                took = time.monotonic() - started
                batches = len(make.accepted()) - batches_before
                lines.append(f"{line(name, connections, figures)}   {batches / took:6.0f} batches/s to Make")
            ids = [m["update_id"] for e in make.accepted() for m in e.get("messages", [])]
            twice = len(ids) - len(set(ids))
            verdict = "ok" if twice == 0 and len(set(ids)) >= acknowledged else "WRONG"
            lines.append(f"  {name}: {len(set(ids))} messages reached Make ({acknowledged} acknowledged in the "
                         f"measured runs, plus the warm-up's), {twice} twice: {verdict}")
            for service in services:
                service.stop()
    finally:
        for service in services:
            if service.proc is not None and service.proc.poll() is None:
                service.kill()
        telegram.close()
        make.close()
    return lines


def main() -> None:
    """Each setup under the same loads; every figure printed together at the end."""
    if shutil.which("wrk") is None:
        sys.exit("bench/instances.py needs wrk: apt install wrk (or brew install wrk)")
    binaries = server_binaries()
    if binaries is None:
        sys.exit("bench/instances.py needs PostgreSQL's server: apt install postgresql")
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    server = PostgresServer(binaries)
    server.start()
    lines: list[str] = []
    try:
        lines += setup_run("1 instance, SQLite", 1, None, seconds)
        lines += setup_run("1 instance, PostgreSQL", 1, server.new_database(), seconds)
        lines += setup_run("3 instances, PostgreSQL", 3, server.new_database(), seconds)
    finally:
        server.remove()
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or "?"
    print(f"\n{cores} cores; Make answers at once; {seconds} s per run")
    for text in lines:
        print(text)


if __name__ == "__main__":
    main()
