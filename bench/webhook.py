"""Throughput and latency of POST /webhook: the real gateway against a bare Flask no-op on waitress.

Both servers run as subprocesses; the same load generator (16 keep-alive connections on threads)
drives each. The gateway stores every update durably (SQLite, synchronous=FULL) before its 200, so
the difference is the price of "nothing lost". Run: python bench/webhook.py [requests]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from config import derive_webhook_secret  # noqa: E402
from doubles import TOKEN, MakeDouble, Service, TelegramDouble, wait_until  # noqa: E402
from loadgen import post_all  # noqa: E402

CONNECTIONS = 16
NOOP_APP = """
import sys
from flask import Flask, jsonify
from waitress import serve
app = Flask("noop")
@app.post("/webhook")
def webhook():
    return jsonify(ok=True)
print("listening on http://127.0.0.1:%s" % sys.argv[1], flush=True)
serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=8, _quiet=True)
"""


def load(url: str, requests: int, headers: dict[str, str], first_id: int) -> tuple[float, list[float]]:
    """Post `requests` distinct text updates over CONNECTIONS connections; return (seconds, latencies)."""
    updates = []
    for update_id in range(first_id, first_id + requests // CONNECTIONS * CONNECTIONS):
        user = 1 + update_id % 500
        updates.append({"update_id": update_id, "message": {
            "message_id": update_id, "date": 0, "chat": {"id": user, "type": "private"},
            "from": {"id": user, "is_bot": False, "first_name": "B"}, "text": f"m{update_id}"}})
    return post_all(url, updates, headers, CONNECTIONS)


def report(name: str, seconds: float, latencies: list[float]) -> None:
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"{name:<34} {len(latencies) / seconds:8.0f} req/s   p50 {statistics.median(latencies) * 1000:6.1f} ms"
          f"   p99 {p99 * 1000:6.1f} ms   ({len(latencies)} requests, {CONNECTIONS} connections)")


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    telegram, make = TelegramDouble(), MakeDouble()
    with tempfile.TemporaryDirectory() as tmp:
        gateway = Service(Path(tmp), {
            "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
            "WEBHOOK_URL": "https://bench.example/webhook", "HOST": "127.0.0.1", "PORT": "0",
            "STATE_DB": str(Path(tmp) / "state.sqlite3"), "DEBOUNCE_SECONDS": "0.5", "LOG_LEVEL": "INFO",
            "TYPING_MODE": "off", "FLOOD_MAX_MESSAGES": "100000"}).start()
        headers = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}
        load(gateway.url + "/webhook", 320, headers, 1)  # warm-up
        seconds, latencies = load(gateway.url + "/webhook", requests, headers, 100000)
        report("gateway POST /webhook (durable)", seconds, latencies)
        wait_until(lambda: gateway.health()["outbox_pending"] == 0 and gateway.health()["active_batches"] == 0,
                   timeout=120, what="every batch delivered")
        delivered = sum(e.get("batch_size", 0) for e in make.accepted())
        print(f"{'':<34} all {delivered} messages reached Make in {len(make.accepted())} batches")
        gateway.stop()

    port = 18000 + int(time.time()) % 1000
    peer = subprocess.Popen([sys.executable, "-c", NOOP_APP, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None and "listening" in peer.stdout.readline()
        url = f"http://127.0.0.1:{port}/webhook"
        wait_until(lambda: httpx.post(url, json={}).status_code == 200, what="the no-op app")
        load(url, 320, {}, 1)
        seconds, latencies = load(url, requests, {}, 100000)
        report("peer: bare Flask no-op on waitress", seconds, latencies)
    finally:
        peer.terminate()
        peer.wait()
    telegram.close()
    make.close()


if __name__ == "__main__":
    main()
