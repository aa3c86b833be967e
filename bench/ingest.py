"""Durable ingest against aiogram 3's no-op webhook: `wrk`, 16 and 64 connections, distinct updates.

The gateway (`python app.py`, webhook mode, SQLite with synchronous=FULL, default settings otherwise, and
MAKE_MAX_RATE=0 so the batches drain quickly afterwards) answers 200 only once an update is committed,
de-duplicated and in its user's batch. It runs twice: with a Make double that answers each batch in 1 s, as
a real scenario does, and with one that answers at once. The peer is aiogram's own `SimpleRequestHandler` on
aiohttp with a handler that does nothing and stores nothing. Both get the same load from `wrk` (2 threads,
`bench/wrk_updates.lua`: every request a new update id, 500 users). Between runs the gateway's batches are
delivered, and at the end every message it acknowledged must have reached the Make double exactly once.

Then the WSGI servers on the same load: a bare Flask no-op and a bare WSGI no-op on waitress (the server
before granian) and on granian (the ceiling each server puts on any app).

Needs `wrk` (Debian/Ubuntu: `apt install wrk`; macOS: `brew install wrk`) and the peers' packages:
`pip install -r bench/requirements.txt`. Run: python bench/ingest.py [seconds per run]
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from config import derive_webhook_secret  # noqa: E402
from doubles import TOKEN, MakeDouble, Service, TelegramDouble, free_port, wait_until  # noqa: E402

CONNECTIONS = (16, 64)
# The gateway is run twice. Its full batches go to Make during the load: a real scenario takes a second or
# more to answer, so its calls mostly wait; a Make that answers at once is the worst case, its calls running
# in Python beside the load (about 1.4 ms of CPU each, most of it httpx).
GATEWAYS = {"gateway, Make in 1 s": 1.0, "gateway, Make at once": 0.0}
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
    """One figure line: name, connections, rate and latencies (and errors, if any)."""
    errors = f"   {f['non2xx']:.0f} non-2xx, {f['socket_errors']:.0f} socket errors" if f["non2xx"] or f[
        "socket_errors"] else ""
    return (f"{name:<30} {connections:3d} conn  {f['rate']:7.0f} updates/s   p50 {f['p50_ms']:6.1f} ms   "
            f"p99 {f['p99_ms']:6.1f} ms   max {f['max_ms']:6.1f} ms{errors}")


def gateway_env(tmp: str, telegram: TelegramDouble, make: MakeDouble) -> dict[str, str]:
    """The gateway's settings: defaults, webhook mode, its state in `tmp`."""
    return {"BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
            "WEBHOOK_URL": "https://bench.example/webhook", "HOST": "127.0.0.1", "PORT": "0",
            "STATE_DB": str(Path(tmp) / "state.sqlite3"), "TYPING_MODE": "off", "MAKE_MAX_RATE": "0",
            "FLOOD_MAX_MESSAGES": "100000"}


def gateway_runs(seconds: int, settings: dict[str, str] | None = None,
                 make_latency: float = 0.0) -> list[tuple[int, dict[str, float]]]:
    """The gateway (`python app.py`, with `settings` over the defaults) under each load, its batches delivered
    (to a Make double answering each in `make_latency` seconds) between runs, then the check that every
    acknowledged message reached Make once."""
    telegram, make = TelegramDouble(), MakeDouble()
    make.latency = make_latency
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**gateway_env(tmp, telegram, make), **(settings or {})}
            gateway = Service(Path(tmp), env).start()
            url, stop = gateway.url, gateway.stop
            secret = derive_webhook_secret(TOKEN)
            warm = wrk(url + "/webhook", 16, 1, 1, secret)  # warm-up (its updates reach Make too)
            for n, connections in enumerate(CONNECTIONS, start=1):
                _drained(url)
                runs.append((connections, wrk(url + "/webhook", connections, seconds, n * 1_000_000_000, secret)))
            _drained(url)
            acknowledged = sum(int(f["requests"] - f["non2xx"]) for f in [warm, *(f for _, f in runs)])
            ids = [m["update_id"] for e in make.accepted() for m in e.get("messages", [])]
            stop()
    finally:
        telegram.close()
        make.close()
    # wrk does not count the requests still under way when it stops, which the gateway may have stored.
    print(f"gateway {settings or ''}(Make answering in {make_latency:g} s): {len(ids)} messages reached Make in "
          f"{len(make.accepted())} batches, "
          f"{len(ids) - len(set(ids))} twice; wrk counted {acknowledged} acknowledged (+ up to "
          f"{sum(CONNECTIONS) + 16} cut off by its stops, which Telegram would resend)")
    cut_off = sum(CONNECTIONS) + 16
    verdict = "ok" if acknowledged <= len(set(ids)) <= acknowledged + cut_off and len(ids) == len(set(ids)) else "WRONG"
    print(f"  every acknowledged message at Make, none twice: {verdict}")
    return runs


def _drained(url: str) -> None:
    """Wait until the gateway at `url` has no open batch and nothing waiting for Make."""
    def health() -> dict[str, Any]:
        return httpx.get(url + "/", timeout=10).json()
    wait_until(lambda: health()["outbox_pending"] == 0 and health()["active_batches"] == 0, timeout=600,
               what="every batch delivered")


def _granian(workdir: Path, target: str) -> tuple[str, Callable[[], Any]]:
    """Serve the WSGI app `target` with granian's own command (one worker, 8 threads like HTTP_THREADS);
    (url, stop)."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "granian"), "--interface", "wsgi", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--blocking-threads", "8", "--log-level", "warning", target]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _listening(url), timeout=30, what=f"granian serving {target}")

    def stop() -> None:
        process.terminate()
        process.wait(30)
    return url, stop


def server_runs(seconds: int) -> list[tuple[str, int, dict[str, float]]]:
    """The no-op apps on waitress and granian under each load: the ceiling each server puts on any app."""
    runs = []
    for app_name in ("flask_noop", "wsgi_noop"):
        for server in ("waitress", "granian"):
            if server == "waitress":
                port = free_port()
                process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "noop_apps.py"), app_name, str(port)])
                url = f"http://127.0.0.1:{port}"
                wait_until(lambda: _answers(url + "/webhook", ""), what="waitress serving the no-op")

                def stop(process: subprocess.Popen[bytes] = process) -> None:
                    process.terminate()
                    process.wait(30)
            else:
                url, stop = _granian(ROOT, f"bench.noop_apps:{app_name}")
            try:
                wrk(url + "/webhook", 16, 1, 1, "")
                for n, connections in enumerate(CONNECTIONS, start=1):
                    runs.append((f"{app_name} on {server}", connections,
                                 wrk(url + "/webhook", connections, seconds, n * 1_000_000_000, "")))
            finally:
                stop()
    return runs


def peer_runs(seconds: int) -> list[tuple[int, dict[str, float]]]:
    """aiogram's webhook handler, no-op, under each load."""
    port, secret = free_port(), "bench-secret"
    peer = subprocess.Popen([sys.executable, "-c", AIOGRAM_NOOP, str(port), TOKEN, secret], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert peer.stdout is not None and "listening" in peer.stdout.readline()
        url = f"http://127.0.0.1:{port}/webhook"
        wait_until(lambda: _answers(url, secret), what="the aiogram peer")
        wrk(url, 16, 1, 1, secret)
        return [(c, wrk(url, c, seconds, n * 1_000_000_000, secret)) for n, c in enumerate(CONNECTIONS, start=1)]
    finally:
        peer.terminate()
        peer.wait()


def _listening(url: str) -> bool:
    """Whether something answers HTTP at `url` yet (any status)."""
    try:
        httpx.get(url, timeout=5)
        return True
    except httpx.HTTPError:
        return False


def _answers(url: str, secret: str | None) -> bool:
    """Whether `url` answers (a POST with `secret`, or a GET when it is None) with a 2xx yet."""
    try:
        if secret is None:
            return httpx.get(url, timeout=5).is_success
        return httpx.post(url, json={"update_id": 1}, headers={"X-Telegram-Bot-Api-Secret-Token": secret},
                          timeout=5).is_success
    except httpx.HTTPError:
        return False


def main() -> None:
    """Run everything under the same loads and print each figure beside the peer's."""
    if shutil.which("wrk") is None:
        sys.exit("bench/ingest.py needs wrk: apt install wrk (or brew install wrk)")
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    ours = {name: gateway_runs(seconds, make_latency=latency) for name, latency in GATEWAYS.items()}
    for name, runs in ours.items():
        for connections, f in runs:
            print(line(name, connections, f), flush=True)
    if not importlib.util.find_spec("aiogram") or not importlib.util.find_spec("waitress"):
        print("aiogram or waitress is not installed (pip install -r bench/requirements.txt): peers left out")
        return
    theirs = peer_runs(seconds)
    for connections, f in theirs:
        print(line("aiogram 3 no-op webhook", connections, f), flush=True)
    for name, runs in ours.items():
        for (connections, mine), (_, peer) in zip(runs, theirs):
            print(f"  {name}, {connections} connections: {mine['rate'] / peer['rate']:.2f}x aiogram's rate")
    for name, connections, f in server_runs(seconds):
        print(line(name, connections, f), flush=True)


if __name__ == "__main__":
    main()
