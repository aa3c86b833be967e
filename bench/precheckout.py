"""How fast a pre-checkout is answered while Make hangs on every batch (Telegram allows 10 s).

The real gateway (webhook mode) runs as a subprocess; the Make double holds every request for 20 s
while 50 users' batches wait on it. Each pre-checkout is timed from the moment its POST /webhook is
sent to the moment the Bot API double receives answerPreCheckoutQuery. Run: python bench/precheckout.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from config import derive_webhook_secret  # noqa: E402
from doubles import TOKEN, MakeDouble, Service, TelegramDouble, wait_until  # noqa: E402
from helpers import pre_checkout_update, text_update  # noqa: E402

QUERIES = 50


def main() -> None:
    telegram, make = TelegramDouble(), MakeDouble()
    make.script(*[(200, "Accepted", {}, 20.0)] * 200)
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), {
            "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
            "WEBHOOK_URL": "https://bench.example/webhook", "HOST": "127.0.0.1", "PORT": "0",
            "STATE_DB": str(Path(tmp) / "state.sqlite3"), "DEBOUNCE_SECONDS": "0.2", "MAKE_TIMEOUT_SECONDS": "60",
            "TYPING_MODE": "until_reply"}).start()
        headers = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}
        for user in range(1, 51):
            assert service.post("/webhook", json=text_update("hi", user_id=user), headers=headers).status_code == 200
        wait_until(lambda: len(make.requests) >= 2, what="Make to be busy hanging")
        sent: dict[str, float] = {}
        for n in range(QUERIES):
            update = pre_checkout_update(f"q{n}", f"order-{n}", user_id=1000 + n)
            sent[f"q{n}"] = time.monotonic()
            assert service.post("/webhook", json=update, headers=headers).status_code == 200
        wait_until(lambda: len(telegram.calls_of("answerPreCheckoutQuery")) == QUERIES, timeout=30,
                   what="every answer")
        answered = dict(zip((a["pre_checkout_query_id"] for a in telegram.calls_of("answerPreCheckoutQuery")),
                            telegram.times_of("answerPreCheckoutQuery")))
        latencies = sorted((answered[q] - sent[q]) * 1000 for q in sent)
        pending = service.health()["make"]["delivered"]
        print(f"pre-checkout answer while Make hangs: p50 {statistics.median(latencies):.1f} ms, "
              f"max {latencies[-1]:.1f} ms over {QUERIES} queries (Telegram's limit: 10000 ms); "
              f"Make had delivered {pending} of 50 batches meanwhile")
        service.kill()
    telegram.close()
    make.close()


if __name__ == "__main__":
    main()
