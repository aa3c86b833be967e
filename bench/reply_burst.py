"""`POST /reply` bursts and hostile sockets against webhooks and checkouts.

Prints, in one run:
1. A quiet gateway: POST /webhook latency (p50, max) and how long a pre-checkout takes to be answered.
2. The same while N chats (default 300, one client connection each) post three `/reply` calls in a row
   and the Bot API takes 0.5 s per sendMessage: webhook latency, the pre-checkout's answer, `/reply`
   answers by status and their longest wait; then every part sent once, each chat in order.
3. 300 sockets opened and left silent, then a webhook: its latency (closed after
   HTTP_REQUEST_TIMEOUT_SECONDS; before, each held a connection slot for 30 s or more).

Run: python bench/reply_burst.py [chats]
"""

from __future__ import annotations

import collections
import itertools
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from config import derive_webhook_secret  # noqa: E402
from doubles import TOKEN, MakeDouble, Service, TelegramDouble, wait_until  # noqa: E402

REPLY_TOKEN = "bench-reply-token"
HEADERS = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}
AUTH = {"Authorization": f"Bearer {REPLY_TOKEN}"}
PER_CHAT = 3
_update_ids = itertools.count(1)


def update(kind: str, user: int) -> dict[str, Any]:
    """A text message or a pre-checkout query from `user`."""
    update_id = next(_update_ids)
    sender = {"id": user, "is_bot": False, "first_name": "B"}
    if kind == "pre_checkout_query":
        return {"update_id": update_id, "pre_checkout_query": {
            "id": f"q{update_id}", "from": sender, "currency": "RUB", "total_amount": 100,
            "invoice_payload": f"order-{update_id}"}}
    return {"update_id": update_id, "message": {"message_id": update_id, "date": int(time.time()),
                                                "chat": {"id": user, "type": "private"}, "from": sender,
                                                "text": "hi"}}


def webhooks_and_checkout(service: Service, telegram: TelegramDouble, stop: threading.Event) -> dict[str, float]:
    """Post a webhook every 0.25 s until `stop`, and one pre-checkout: latencies in seconds."""
    latencies: list[float] = []
    with httpx.Client(timeout=120) as client:
        checkout = update("pre_checkout_query", 7)
        sent_at = time.monotonic()
        client.post(service.url + "/webhook", json=checkout, headers=HEADERS)
        query_id = checkout["pre_checkout_query"]["id"]
        answered = wait_until(lambda: next((t for p, t in zip(telegram.calls_of("answerPreCheckoutQuery"),
                                                             telegram.times_of("answerPreCheckoutQuery"))
                                            if p.get("pre_checkout_query_id") == query_id), None),
                              timeout=120, what="the checkout's answer")
        while not stop.is_set():
            started = time.monotonic()
            client.post(service.url + "/webhook", json=update("message", 10_000_000), headers=HEADERS)
            latencies.append(time.monotonic() - started)
            stop.wait(0.25)
    latencies.sort()
    return {"p50": latencies[len(latencies) // 2], "max": latencies[-1], "n": len(latencies),
            "checkout": answered - sent_at}


def burst(service: Service, chats: int) -> tuple[collections.Counter, float, float]:
    """`chats` clients posting PER_CHAT replies each: answers by status, the longest wait, the wall time."""
    statuses: collections.Counter = collections.Counter()
    longest = [0.0]
    lock = threading.Lock()

    def chat(chat_id: int) -> None:
        with httpx.Client(timeout=120) as client:
            for n in range(PER_CHAT):
                started = time.monotonic()
                answer = client.post(service.url + "/reply", json={"chat_id": chat_id, "text": f"{chat_id}:{n}"},
                                     headers=AUTH)
                with lock:
                    statuses[answer.status_code] += 1
                    longest[0] = max(longest[0], time.monotonic() - started)

    started = time.monotonic()
    threads = [threading.Thread(target=chat, args=(c,)) for c in range(1, chats + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses, longest[0], time.monotonic() - started


def main() -> None:
    chats = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    telegram, make = TelegramDouble(), MakeDouble()
    ids = itertools.count(100_000)
    telegram.reject_if = lambda name, params: (
        (200, {"ok": True, "result": {"message_id": next(ids)}}, 0.5) if name == "sendMessage" else None)
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), {
            "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
            "WEBHOOK_URL": "https://bench.example/webhook", "HOST": "127.0.0.1", "PORT": "0",
            "STATE_DB": str(Path(tmp) / "state.sqlite3"), "REPLY_TOKEN": REPLY_TOKEN, "TYPING_MODE": "off",
            "LOG_LEVEL": "INFO", "FLOOD_MAX_MESSAGES": "100000"}).start(timeout=60)
        try:
            stop = threading.Event()
            quiet: dict[str, float] = {}
            runner = threading.Thread(target=lambda: quiet.update(webhooks_and_checkout(service, telegram, stop)))
            runner.start()
            time.sleep(3)  # a quiet spell to compare with: the benchmark's own pacing, not a test wait
            stop.set()
            runner.join()
            print(f"quiet:  webhook p50 {quiet['p50'] * 1000:.1f} ms, max {quiet['max'] * 1000:.1f} ms "
                  f"(n={quiet['n']:.0f}); pre-checkout answered after {quiet['checkout'] * 1000:.0f} ms")

            stop.clear()
            loaded: dict[str, float] = {}
            runner = threading.Thread(target=lambda: loaded.update(webhooks_and_checkout(service, telegram, stop)))
            result: list[Any] = []
            bursting = threading.Thread(target=lambda: result.extend(burst(service, chats)))
            bursting.start()
            time.sleep(1)  # the burst is under way before the checkout arrives
            runner.start()
            bursting.join()
            stop.set()
            runner.join()
            statuses, longest, wall = result
            print(f"burst:  {chats} chats x {PER_CHAT} /reply (Bot API 0.5 s per message): answers "
                  f"{dict(sorted(statuses.items()))}, longest {longest:.1f} s, all answered in {wall:.1f} s")
            print(f"        webhook p50 {loaded['p50'] * 1000:.1f} ms, max {loaded['max'] * 1000:.1f} ms "
                  f"(n={loaded['n']:.0f}); pre-checkout answered after {loaded['checkout'] * 1000:.0f} ms "
                  f"(Telegram's limit: 10,000 ms)")
            wait_until(lambda: service.health()["outbox_pending"] == 0, timeout=600, what="every reply to go out")
            sent = [p["text"] for p in telegram.calls_of("sendMessage")]
            by_chat: dict[str, list[int]] = collections.defaultdict(list)
            for text in sent:
                chat, n = text.split(":")
                by_chat[chat].append(int(n))
            in_order = all(ns == list(range(PER_CHAT)) for ns in by_chat.values())
            print(f"        sent {len(sent)} of {chats * PER_CHAT}, {len(sent) - len(set(sent))} twice, "
                  f"every chat in order: {in_order and len(by_chat) == chats}")

            port = int(service.url.rsplit(":", 1)[1])
            silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
            started = time.monotonic()
            answer = httpx.post(service.url + "/webhook", json=update("message", 11), headers=HEADERS, timeout=120)
            print(f"silent: 300 sockets open and silent, then a webhook: {answer.status_code} after "
                  f"{(time.monotonic() - started) * 1000:.0f} ms")
            for sock in silent:
                sock.close()
        finally:
            service.stop()
            telegram.close()
            make.close()


if __name__ == "__main__":
    main()
