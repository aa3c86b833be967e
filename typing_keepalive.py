"""Shows "typing…" in chats whose batch is with Make, all on one `typing-keepalive` thread.

Telegram shows a chat action for about 5 seconds, or until the bot's next message arrives, so the
action is re-sent on a schedule: `simulate` reproduces the original bot (typing 3 s, pause 2 s,
typing 2 s: actions at 0 s and 5 s), `until_reply` renews it every `interval` seconds until a reply
is sent or `max_seconds` pass, `off` sends nothing.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

from telegram_api import TelegramClient, TelegramError, chat_unreachable

log = logging.getLogger("gateway.typing")

SIMULATE_OFFSETS = (0.0, 5.0)


def action_offsets(mode: str, interval: float, max_seconds: float) -> list[float]:
    """Seconds after the start at which `sendChatAction` is sent in `mode`."""
    if mode == "off":
        return []
    if mode == "simulate":
        return list(SIMULATE_OFFSETS)
    count = int(max_seconds // interval) + 1
    return [i * interval for i in range(count) if i * interval < max_seconds]


class TypingKeepAlive:
    """Starts and stops the typing status per chat; one thread sends every action."""

    def __init__(self, client: TelegramClient, mode: str, interval: float = 4.0, max_seconds: float = 120.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._offsets = action_offsets(mode, interval, max_seconds)
        self._monotonic = monotonic
        # _lock guards _active (chat id -> generation of its current typing run) and _heap
        # (entries (due monotonic, seq, chat id, generation, index into _offsets)).
        self._lock = threading.Lock()
        self._active: dict[int, int] = {}
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = itertools.count()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.actions_sent = 0

    def start(self, chat_id: int) -> None:
        """Show typing in `chat_id` from now, on the mode's schedule (restarting it if running)."""
        if not self._offsets:
            return
        with self._lock:
            generation = next(self._seq)
            self._active[chat_id] = generation
            heapq.heappush(self._heap, (self._monotonic(), generation, chat_id, generation, 0))
        self._wakeup.set()

    def stop(self, chat_id: int) -> None:
        """Stop renewing typing in `chat_id` (a message from the bot clears what is shown)."""
        with self._lock:
            self._active.pop(chat_id, None)

    @property
    def active_chats(self) -> int:
        """Chats currently shown typing."""
        with self._lock:
            return len(self._active)

    def start_thread(self) -> None:
        """Start the `typing-keepalive` thread."""
        self._thread = threading.Thread(target=self._run, name="typing-keepalive", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop_thread(self, timeout: float = 5.0) -> None:
        """Stop the thread; safe to call twice."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                wait = self._send_due()
            except Exception:
                log.exception("typing pass failed")
                wait = 1.0
            self._wakeup.wait(wait)
            self._wakeup.clear()

    def _send_due(self) -> float:
        due: list[tuple[int, int, bool]] = []
        with self._lock:
            now = self._monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, _, chat_id, generation, index = heapq.heappop(self._heap)
                if self._active.get(chat_id) != generation:
                    continue
                last = index + 1 >= len(self._offsets)
                due.append((chat_id, generation, last))
                if not last:
                    at = now + self._offsets[index + 1] - self._offsets[index]
                    heapq.heappush(self._heap, (at, next(self._seq), chat_id, generation, index + 1))
            wait = self._heap[0][0] - now if self._heap else 60.0
        for chat_id, generation, last in due:  # network calls happen outside the lock
            self._send(chat_id, generation, last)
        return max(0.0, wait) if not due else 0.0

    def _send(self, chat_id: int, generation: int, last: bool) -> None:
        with self._lock:
            # A reply may have stopped this run since it was taken off the heap: typing after the
            # answer would show for another 5 s.
            if self._active.get(chat_id) != generation:
                return
        try:
            self._client.send_chat_action(chat_id, "typing")
            self.actions_sent += 1
        except TelegramError as err:
            if chat_unreachable(err):
                self.stop(chat_id)  # blocked by the user, or the chat is gone: renewing would only fail again
            else:
                log.debug("typing in chat %s not shown: %s", chat_id, err)
        finally:
            if last:
                with self._lock:
                    if self._active.get(chat_id) == generation:
                        del self._active[chat_id]
