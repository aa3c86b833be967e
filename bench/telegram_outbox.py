"""The Telegram outbox against a Bot API that enforces Telegram's limits: how close to them it runs.

The Bot API double (`FloodControl`) holds the Bot FAQ's limits as hard rules: at most 30 messages in
any second across chats and at least 1 s between two messages to one chat, answering anything over them
with 429 and `parameters.retry_after`, as Telegram does. N chats (default 300) write once each; Make
answers each at once with PARTS replies (default 3), so N x PARTS messages are queued within a few
seconds (the overall limit binds); then 10 chats get 10 parts each (the per-chat limit binds). Prints,
in one run, with pacing off (the gateway before) and with the default pacing, for each burst:
messages/s achieved against 30 and the most in any one second, per-chat gaps (min, p50) against 1 s,
429s provoked, the time from the first message to the last against the theoretical minimum, and whether
every part arrived once and in order. Before the bursts, it times a quiet chat's one-part `POST /reply`
(answered once the part is sent; the median of three): pacing must add nothing to it.

Run: python bench/telegram_outbox.py [chats] [parts]
"""

from __future__ import annotations

import collections
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from config import derive_webhook_secret  # noqa: E402
from doubles import TOKEN, FloodControl, MakeDouble, Service, TelegramDouble, wait_until  # noqa: E402
from loadgen import post_all  # noqa: E402

RATE, CHAT_GAP = 30, 1.0  # Telegram's Bot FAQ limits, as the double enforces them
REPLY_TOKEN = "bench-reply-token"
QUIET_CHAT = 10_000_000  # chat ids from here on are not the burst's
HEADERS = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}
_update_ids = itertools.count(1)


def text(user: int) -> dict[str, Any]:
    """A text message from `user` in their private chat."""
    update_id = next(_update_ids)
    return {"update_id": update_id, "message": {
        "message_id": update_id, "date": int(time.time()), "chat": {"id": user, "type": "private"},
        "from": {"id": user, "is_bot": False, "first_name": "B"}, "text": "hi"}}


def quantile(values: list[Any], q: float) -> Any:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run(label: str, bursts: list[tuple[int, int]], **env: str) -> None:
    """One gateway with `env`: a quiet chat's `/reply`, then each burst of (chats, parts) through the
    flood-controlled double, one after the other; print the figures of each."""
    telegram, make, flood = TelegramDouble(), MakeDouble(), FloodControl(overall=RATE, chat_gap=CHAT_GAP)
    telegram.reject_if = flood
    parts_of: dict[int, int] = {}  # chat id -> how many replies Make answers it with
    make.reject_if = lambda event: (200, {"replies": [f"{event['chat_id']}:{n}"
                                                      for n in range(parts_of[event["chat_id"]])]})
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp), {
            "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
            "WEBHOOK_URL": "https://bench.example/webhook", "HOST": "127.0.0.1", "PORT": "0",
            "STATE_DB": str(Path(tmp) / "state.sqlite3"), "DEBOUNCE_SECONDS": "0.05", "MAX_WAIT_SECONDS": "1",
            "MAKE_MAX_RATE": "0", "TYPING_MODE": "off", "REPLY_TOKEN": REPLY_TOKEN, "LOG_LEVEL": "INFO",
            "FLOOD_MAX_MESSAGES": "100000", **env}).start(timeout=120)
        try:
            with httpx.Client(headers={"Authorization": f"Bearer {REPLY_TOKEN}"}, timeout=30) as client:
                client.post(service.url + "/reply", json={"chat_id": QUIET_CHAT, "text": "warm-up"})
                quiet = []
                for n in range(1, 4):
                    time.sleep(1.1)  # a quiet spell (the benchmark's own pacing): nothing sent for over a second
                    started = time.perf_counter()
                    answer = client.post(service.url + "/reply", json={"chat_id": QUIET_CHAT + n, "text": "quiet"})
                    quiet.append((time.perf_counter() - started, answer.status_code))
            print(f"{label}: a quiet chat's one-part POST /reply answered {quantile(quiet, 0.5)[1]} after "
                  f"{quantile(quiet, 0.5)[0] * 1000:.0f} ms (median of {len(quiet)})")
            first_chat = 1
            for chats, parts in bursts:
                ids = range(first_chat, first_chat + chats)
                first_chat += chats
                parts_of.update(dict.fromkeys(ids, parts))
                accepted, refused = len(flood.accepted), len(flood.refused)
                post_all(service.url + "/webhook", [text(chat) for chat in ids], HEADERS)
                wait_until(lambda: len(flood.accepted) >= accepted + chats * parts, timeout=chats * parts,
                           what="every part to be sent")
                wait_until(lambda: service.health()["outbox_pending"] == 0, timeout=60, what="the outbox to empty")
                report(flood, accepted, refused, chats, parts)
        finally:
            service.stop()
            telegram.close()
            make.close()


def report(flood: FloodControl, accepted: int, refused: int, chats: int, parts: int) -> None:
    """Print how the burst whose messages are accepted from the `accepted`-th on went."""
    burst = flood.accepted[accepted:]
    times = [at for at, _, _ in burst]
    span = times[-1] - times[0]
    by_chat: dict[int, list[int]] = collections.defaultdict(list)
    for _, chat, params in burst:
        owner, n = params["text"].split(":")
        by_chat[chat].append(int(n) if int(owner) == chat else -1)
    in_order = len(by_chat) == chats and all(ns == list(range(parts)) for ns in by_chat.values())
    gaps = flood.gaps(accepted)
    kinds = collections.Counter(limit for _, _, limit in flood.refused[refused:])
    total = chats * parts
    print(f"  {chats} chats x {parts} parts = {total} messages:")
    print(f"    rate     {(len(times) - 1) / span:.1f} messages/s (limit {RATE}); most in any 1 s: "
          f"{flood.most_in_window(accepted)}")
    print(f"    per chat gap min {min(gaps):.3f} s, p50 {quantile(gaps, 0.5):.3f} s (limit {CHAT_GAP:g} s)")
    print(f"    429s     {sum(kinds.values())} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or 'none'})")
    least = max(math.ceil(total / RATE) - 1, (parts - 1) * CHAT_GAP)
    even = max((total - 1) / RATE, (parts - 1) * CHAT_GAP)
    print(f"    time     first to last message {span:.1f} s; theoretical minimum {least:.1f} s "
          f"({even:.1f} s evenly spaced)")
    print(f"    {len(times)} sent, {len(times) - len({p['text'] for _, _, p in burst})} twice, "
          f"every chat's parts once and in order: {in_order}")


def main() -> None:
    chats = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    parts = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    bursts = [(chats, parts), (10, 10)]  # the overall limit binds, then the per-chat one
    run("before (unpaced)", bursts, TELEGRAM_MAX_RATE="0", TELEGRAM_CHAT_INTERVAL_SECONDS="0")
    run("paced (defaults: 30/s, 1 s per chat)", bursts)


if __name__ == "__main__":
    main()
