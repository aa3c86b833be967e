"""Telegram's sending limits, decided from plain numbers: how many calls may start now, and when a chat may
get its next message.

The Bot FAQ allows about 30 messages a second overall, about 1 a second per chat (short bursts
tolerated) and 20 a minute per group. Telegram counts a message when its request arrives, which the
gateway never sees: it knows only when it started a call and when the answer came. So `CallWindow`
counts a call from before it starts until a window after its answer, and `chat_interval` is measured
from the answer too: however long a request takes to arrive, Telegram never sees more than the limit.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

GROUP_INTERVAL_SECONDS = 60 / 20  # 20 messages a minute in a group: evenly spaced, a minute never holds more


def is_group(chat_id: Any) -> bool:
    """Whether `chat_id` is a group, supergroup or channel (a negative id or an `@username`), not a user's chat."""
    if isinstance(chat_id, str):
        return chat_id.startswith("@") or chat_id.startswith("-")
    return isinstance(chat_id, int) and not isinstance(chat_id, bool) and chat_id < 0


def chat_interval(chat_id: Any, interval: float) -> float:
    """Seconds to leave between two messages to `chat_id` when a user's chat gets `interval` (0: no spacing)."""
    if interval <= 0:
        return 0.0
    return max(interval, GROUP_INTERVAL_SECONDS) if is_group(chat_id) else interval


class CallWindow:
    """At most `limit` calls in any `seconds` as the far end counts them, whatever the network's delay:
    a call counts from before it starts until `seconds` after it ended."""

    def __init__(self, limit: int, seconds: float = 1.0) -> None:
        if limit < 1:
            raise ValueError("a window holds at least one call")
        self.limit = limit
        self.seconds = seconds
        # _lock guards _open (calls started and not ended) and _ended (when recent calls ended, oldest
        # first): the claim loop starts calls, worker threads end them.
        self._lock = threading.Lock()
        self._open = 0
        self._ended: deque[float] = deque()

    @classmethod
    def per_second(cls, rate: float) -> "CallWindow":
        """A window of one second holding `rate` calls (a fraction rounds up: spacing keeps the average)."""
        return cls(max(1, math.ceil(rate)), 1.0)

    def room(self, now: float) -> int:
        """How many calls may start at `now`."""
        with self._lock:
            self._forget(now)
            return max(0, self.limit - self._open - len(self._ended))

    def wait(self, now: float) -> float | None:
        """Seconds from `now` until a call may start: 0 now, None once a call in flight ends."""
        with self._lock:
            self._forget(now)
            if self._open + len(self._ended) < self.limit:
                return 0.0
            return self._ended[0] + self.seconds - now if self._ended else None

    def started(self) -> None:
        """A call is about to start."""
        with self._lock:
            self._open += 1

    def ended(self, now: float) -> None:
        """A call started earlier has its answer (or failed) at `now`."""
        with self._lock:
            self._open = max(0, self._open - 1)
            self._ended.append(now)

    def _forget(self, now: float) -> None:
        while self._ended and self._ended[0] <= now - self.seconds:
            self._ended.popleft()


class ChatSpacing:
    """When each chat may get its next message: `chat_interval` after the answer to its last one.

    In memory, so it holds only what the store cannot: a message queued after its chat's queue emptied, or
    in another queue to the same chat (the store spaces the messages that were already waiting behind
    one). Chats whose time has passed are forgotten."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        # _lock guards _due (chat id -> earliest next message, the caller's clock), written by every
        # worker thread, and _sweep_at (when to drop the chats whose time has passed).
        self._lock = threading.Lock()
        self._due: dict[Any, float] = {}
        self._sweep_at = 0.0

    def reserve(self, chat_id: Any, now: float) -> float | None:
        """The time before which `chat_id` must get no message; or None, and the chat is held for a message
        starting at `now` (until `sent` says when its answer came), so no other may start meanwhile."""
        with self._lock:
            due = self._due.get(chat_id)
            # A due time further off than the chat's interval was set before the wall clock stepped back:
            # it would hold the chat for the step (an hour, say), not for its interval.
            if due is not None and now < due <= now + chat_interval(chat_id, self.interval):
                return due
            self._set(chat_id, now)
            return None

    def sent(self, chat_id: Any, now: float) -> float:
        """A message to `chat_id` was answered at `now`; return when the chat may get the next one."""
        with self._lock:
            return self._set(chat_id, now)

    def _set(self, chat_id: Any, now: float) -> float:
        if now >= self._sweep_at or self._sweep_at - now > GROUP_INTERVAL_SECONDS + self.interval:  # or stepped back
            self._due = {chat: at for chat, at in self._due.items()
                         if now < at <= now + GROUP_INTERVAL_SECONDS + self.interval}
            self._sweep_at = now + GROUP_INTERVAL_SECONDS + self.interval
        due = self._due[chat_id] = now + chat_interval(chat_id, self.interval)
        return due

    def __len__(self) -> int:
        with self._lock:
            return len(self._due)
