"""Durable ingest against aiogram 3's no-op webhook: `wrk`, 16 and 64 connections, distinct updates.

The gateway (`python app.py`, webhook mode, SQLite with synchronous=FULL, default settings otherwise)
answers 200 only once an update is committed, de-duplicated and in its user's batch. The peer is aiogram's
own `SimpleRequestHandler` on aiohttp with a handler that does nothing and stores nothing. Both get the
same load from `wrk` (2 threads, `bench/wrk_updates.lua`: every request a new update id, 500 users).
After the runs, every message the gateway acknowledged must reach the Make double exactly once.

Needs `wrk` (Debian/Ubuntu: `apt install wrk`; macOS: `brew install wrk`) and the peer's packages:
`pip install -r bench/requirements.txt`. Run: python bench/ingest.py [seconds per run]
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from config import derive_webhook_secret  # noqa: E402
from doubles import TOKEN, MakeDouble, Service, TelegramDouble, free_port, wait_until  # noqa: E402

CONNECTIONS = (16, 64)
SCRIPT = ROOT / "bench" / "wrk_updates.lua"
AIOGRAM_NOOP = """
import sys
from aiohttp import web
from aiogram import Bot, Dispatcher
from aiogram.webhook.aiohttp_server import SimpleRequestHandler

dispatcher = Dispatcher()

@dispatcher.message()
async def noop(message):
    pass

app = web.Application()
SimpleRequestHandler(dispatcher=dispatcher, bot=Bot(sys.argv[2]), secret_token=sys.argv[3]).register(app, path="/webhook")
print("listening", flush=True)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def wrk(url: str, connections: int, seconds: int, first_id: int, secret: str) -> dict[str, float]:
    """One `wrk` run of distinct updates against `url`; its figures (requests, seconds, p50/p99/max ms, errors)."""
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(SCRIPT),
                          url, "--", str(first_id), secret], capture_output=True, text=True, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    figures["rate"] = figures["requests"] / figures["seconds"]
    return figures


def line(name: str, connections: int, f: dict[str, float]) -> str:
    errors = f"   {f['non2xx']:.0f} non-2xx, {f['socket_errors']:.0f} socket errors" if f["non2xx"] or f[
        "socket_errors"] else ""
    return (f"{name:<30} {connections:3d} conn  {f['rate']:7.0f} updates/s   p50 {f['p50_ms']:6.1f} ms   "
            f"p99 {f['p99_ms']:6.1f} ms   max {f['max_ms']:6.1f} ms{errors}")


def gateway_runs(seconds: int) -> list[tuple[int, dict[str, float]]]:
    """The gateway under each load, then the check that every acknowledged message reached Make once."""
    telegram, make = TelegramDouble(), MakeDouble()
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gateway = Service(Path(tmp), {
                "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
                "WEBHOOK_URL": "https://bench.example/webhook", "HOST": "127.0.0.1", "PORT": "0",
                "STATE_DB": str(Path(tmp) / "state.sqlite3"), "TYPING_MODE": "off",
                "DEBOUNCE_SECONDS": "0.5", "FLOOD_MAX_MESSAGES": "100000"}).start()
            secret = derive_webhook_secret(TOKEN)
            url = gateway.url + "/webhook"
            wrk(url, 16, 1, 1, secret)  # warm-up
            for n, connections in enumerate(CONNECTIONS, start=1):
                runs.append((connections, wrk(url, connections, seconds, n * 1_000_000_000, secret)))
            acknowledged = sum(int(f["requests"] - f["non2xx"]) for _, f in runs)
            wait_until(lambda: gateway.health()["outbox_pending"] == 0 and gateway.health()["active_batches"] == 0,
                       timeout=300, what="every batch delivered")
            ids = [m["update_id"] for e in make.accepted() for m in e.get("messages", [])]
            gateway.stop()
    finally:
        telegram.close()
        make.close()
    # wrk does not count the requests still under way when it stops, which the gateway may have stored.
    print(f"gateway: {len(ids)} messages reached Make in {len(make.accepted())} batches, {len(ids) - len(set(ids))} "
          f"twice; wrk counted {acknowledged} acknowledged (+ up to {sum(CONNECTIONS) * 2 + 16 * 2} cut off by "
          "its stop)")
    return runs


def peer_runs(seconds: int) -> list[tuple[int, dict[str, float]]]:
    """aiogram's webhook handler, no-op, under each load."""
    port, secret = free_port(), "bench-secret"
    peer = subprocess.Popen([sys.executable, "-c", AIOGRAM_NOOP, str(port), TOKEN, secret], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert peer.stdout is not None and "listening" in peer.stdout.readline()
        url = f"http://127.0.0.1:{port}/webhook"
        wait_until(lambda: _answers(url, secret), what="the aiogram peer")
        wrk(url, 16, 1, 1, secret)
        return [(c, wrk(url, c, seconds, n * 1_000_000_000, secret)) for n, c in enumerate(CONNECTIONS, start=1)]
    finally:
        peer.terminate()
        peer.wait()


def _answers(url: str, secret: str) -> bool:
    import httpx
    try:
        return httpx.post(url, json={"update_id": 1}, headers={"X-Telegram-Bot-Api-Secret-Token": secret}).is_success
    except httpx.HTTPError:
        return False


def main() -> None:
    """Run both under the same loads and print each figure beside the peer's."""
    if shutil.which("wrk") is None:
        sys.exit("bench/ingest.py needs wrk: apt install wrk (or brew install wrk)")
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    ours = gateway_runs(seconds)
    theirs = peer_runs(seconds) if importlib.util.find_spec("aiogram") else []
    if not theirs:
        print("aiogram is not installed (pip install -r bench/requirements.txt): the peer is left out")
    for (connections, f), peer in zip(ours, theirs or [None] * len(ours)):
        print(line("gateway (durable, FULL)", connections, f))
        if peer is not None:
            print(line("aiogram 3 no-op webhook", connections, peer[1]))


if __name__ == "__main__":
    main()
