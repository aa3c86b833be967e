"""When a user's burst is over, and per-user flood control: decisions from plain numbers."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class DebounceSettings:
    """The three limits that close a batch."""

    debounce_seconds: float
    max_wait_seconds: float
    max_messages: int


def deadline(first_at: float, last_at: float, count: int, cfg: DebounceSettings) -> tuple[float, str]:
    """When a batch opened at `first_at`, last added to at `last_at`, holding `count` messages closes, and why."""
    if count >= cfg.max_messages:
        return last_at, "max_messages"
    quiet = last_at + cfg.debounce_seconds
    cap = first_at + cfg.max_wait_seconds
    if cap <= quiet:
        return cap, "max_wait"
    return quiet, "quiet"


class DebounceManager:
    """Per-user flood control: at most `max_messages` per `window_seconds` pass; the rest are held back."""

    def __init__(self, max_messages: int, window_seconds: float) -> None:
        self._max = max_messages
        self._window = window_seconds
        # _lock guards _recent (user id -> arrival times (monotonic) inside the window, oldest first;
        # plain lists, at most `max_messages` long, since a deque costs ~600 bytes per user) and
        # _held (user id -> messages held back since the user was last allowed one).
        self._lock = threading.Lock()
        self._recent: dict[int, list[float]] = {}
        self._held: dict[int, int] = {}
        self._sweep_at = 0.0

    def should_process(self, user_id: int, now: float) -> bool:
        """Count a message from `user_id` at `now`; return False when it is over the user's limit."""
        with self._lock:
            if now >= self._sweep_at:
                self._sweep(now)
            times = self._recent.setdefault(user_id, [])
            expired = 0
            while expired < len(times) and times[expired] <= now - self._window:
                expired += 1
            del times[:expired]
            if len(times) >= self._max:
                self._held[user_id] = self._held.get(user_id, 0) + 1
                return False
            self._held.pop(user_id, None)
            times.append(now)
            return True

    def held_in_a_row(self, user_id: int) -> int:
        """How many of the user's messages were held back since the last one that passed."""
        with self._lock:
            return self._held.get(user_id, 0)

    def clear_user(self, user_id: int) -> None:
        """Forget a user's recent messages (their limit starts afresh)."""
        with self._lock:
            self._recent.pop(user_id, None)
            self._held.pop(user_id, None)

    def get_active_users_count(self) -> int:
        """How many users sent a message within the window."""
        with self._lock:
            return len(self._recent)

    def _sweep(self, now: float) -> None:
        # Users who went quiet are dropped so memory follows the active users, not all users ever seen.
        cutoff = now - self._window
        for user_id in [u for u, t in self._recent.items() if not t or t[-1] <= cutoff]:
            del self._recent[user_id]
            self._held.pop(user_id, None)
        self._sweep_at = now + self._window
