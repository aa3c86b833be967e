"""Test doubles serving real HTTP on 127.0.0.1: the Bot API (the project's own emulator), a Make webhook,
raw TCP misbehaviour, and the service itself.

Each double records the requests it got, plays scripted answers, and keeps any error raised in its
own threads so `check()` re-raises it at teardown.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from emulator import BotApiEmulator, LocalServer

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "123456789:AAHk3x-TESTtokenTESTtokenTESTtoken_x9"


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class TelegramDouble(BotApiEmulator):
    """The project's Bot API emulator with the tests' token."""

    def __init__(self, token: str = TOKEN, deliver_webhooks_to: str | None = None, port: int = 0) -> None:
        super().__init__(token, deliver_webhooks_to=deliver_webhooks_to, port=port)


class FloodControl:
    """A `reject_if` for the Bot API double that holds the sending methods to Telegram's Bot FAQ limits as
    hard rules: at most `overall` messages in any `window` seconds across chats, at least `chat_gap` seconds
    between two messages to one chat, and at most `group_per_minute` in any minute to a group (negative
    id). A message over a limit gets Telegram's 429 with `parameters.retry_after` and is not counted."""

    METHODS = ("sendMessage", "sendPhoto", "sendDocument")

    def __init__(self, overall: int = 30, chat_gap: float = 1.0, window: float = 1.0, group_per_minute: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.overall, self.chat_gap, self.window, self.group_per_minute = overall, chat_gap, window, group_per_minute
        self._clock = clock
        # _lock guards everything below: the server answers on a thread per connection.
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque()  # accepted messages inside the window
        self._by_chat: dict[Any, list[float]] = {}  # arrival of each accepted message, per chat
        self.accepted: list[tuple[float, Any, dict[str, Any]]] = []  # (arrival, chat id, params) of each
        self.refused: list[tuple[float, Any, str]] = []  # (arrival, chat id, which limit) of each 429

    def __call__(self, method: str, params: dict[str, Any]) -> tuple[int, Any] | None:
        if method not in self.METHODS:
            return None
        chat = params.get("chat_id")
        with self._lock:
            now = self._clock()
            while self._recent and self._recent[0] <= now - self.window:
                self._recent.popleft()
            mine = self._by_chat.setdefault(chat, [])
            waits = []
            if len(self._recent) >= self.overall:
                waits.append(("overall", self._recent[0] + self.window - now))
            if mine and now - mine[-1] < self.chat_gap:
                waits.append(("chat", mine[-1] + self.chat_gap - now))
            minute = [at for at in mine[-self.group_per_minute:] if at > now - 60.0]
            if isinstance(chat, int) and chat < 0 and len(minute) >= self.group_per_minute:
                waits.append(("group", minute[0] + 60.0 - now))
            if not waits:
                self._recent.append(now)
                mine.append(now)
                self.accepted.append((now, chat, params))
                return None
            limit, wait = max(waits, key=lambda w: w[1])
            self.refused.append((now, chat, limit))
        retry_after = max(1, math.ceil(wait))  # Telegram's retry_after is whole seconds
        return 429, {"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {retry_after}",
                     "parameters": {"retry_after": retry_after}}

    def gaps(self, since: int = 0) -> list[float]:
        """Seconds between consecutive accepted messages to the same chat, across every chat (from the
        `since`-th accepted message on)."""
        with self._lock:
            last: dict[Any, float] = {}
            gaps = []
            for at, chat, _ in self.accepted[since:]:
                if chat in last:
                    gaps.append(at - last[chat])
                last[chat] = at
            return gaps

    def most_in_window(self, since: int = 0) -> int:
        """The most messages accepted within any `window` seconds (from the `since`-th accepted message on)."""
        with self._lock:
            times = [at for at, _, _ in self.accepted[since:]]
        most, first = 0, 0
        for last, at in enumerate(times):
            while times[first] <= at - self.window:
                first += 1
            most = max(most, last - first + 1)
        return most


class MakeDouble(LocalServer):
    """A Make custom webhook: records events, plays scripted answers (status, body, headers, delay)."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self._scripts: list[tuple[int, Any, dict[str, str], float]] = []
        # When set, an event for which it returns (status, body[, headers]) gets that answer instead.
        self.reject_if: Callable[[dict[str, Any]], tuple[Any, ...] | None] | None = None
        # Calls open right now, the most ever open at once, and chats that had two calls open at once.
        self.open = 0
        self.max_open = 0
        self.overlapping_chats: list[Any] = []
        self._open_chats: dict[Any, int] = {}
        self._gather: tuple[int, float] | None = None
        self.latency = 0.0  # seconds every unscripted answer takes (a real scenario takes seconds)
        self._gathered = threading.Condition(threading.Lock())
        super().__init__(port)

    def gather(self, calls: int, timeout: float = 15.0) -> None:
        """Hold every request until `calls` are open at once, then answer them all (once); if that many
        never come within `timeout`, the waiting requests fail the test."""
        self._gather = (calls, timeout)

    def script(self, *replies: tuple) -> None:
        """Answer the next requests with these (status, body[, headers[, delay seconds]]) tuples, in order."""
        with self.lock:
            for status, body, *rest in replies:
                headers = rest[0] if rest else {}
                delay = rest[1] if len(rest) > 1 else 0.0
                self._scripts.append((status, body, headers, delay))

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON of every request received (delivered or not)."""
        with self.lock:
            return [r["json"] for r in self.requests]

    def accepted(self) -> list[dict[str, Any]]:
        """The events this double answered with a 2xx."""
        with self.lock:
            return [r["json"] for r in self.requests if 200 <= r["status"] < 300]

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        event = json.loads(body)
        rejected = self.reject_if(event) if self.reject_if is not None else None
        with self.lock:
            if rejected is not None:
                status, reply, *headers = rejected
                scripted = (status, reply, headers[0] if headers else {}, 0.0)
            else:
                scripted = self._scripts.pop(0) if self._scripts else (200, "Accepted", {}, self.latency)
        status, reply, reply_headers, delay = scripted
        record = {"json": event, "headers": headers, "status": status, "at": time.monotonic()}
        with self.lock:
            self.requests.append(record)
        chat = event.get("chat_id")
        with self._gathered:
            self.open += 1
            self.max_open = max(self.max_open, self.open)
            self._open_chats[chat] = self._open_chats.get(chat, 0) + 1
            if chat is not None and self._open_chats[chat] > 1:
                self.overlapping_chats.append(chat)
            self._gathered.notify_all()
        try:
            with self._gathered:
                if self._gather is not None:
                    calls, timeout = self._gather
                    if not self._gathered.wait_for(lambda: self._gather is None or self.open >= calls, timeout):
                        raise AssertionError(f"only {self.open} Make call(s) open at once, never {calls}")
                    self._gather = None  # gathered once: the others waiting, and later calls, go straight through
                    self._gathered.notify_all()
            if delay:
                time.sleep(delay)  # a slow scenario, on the double's own thread
        finally:
            with self._gathered:
                self.open -= 1
                self._open_chats[chat] -= 1
        if isinstance(reply, (dict, list)):
            return status, {"Content-Type": "application/json", **reply_headers}, json.dumps(reply).encode()
        if isinstance(reply, bytes):  # exactly these bytes, with only the headers given
            return status, reply_headers, reply
        return status, {"Content-Type": "text/plain", **reply_headers}, str(reply).encode()


class RawServer:
    """A raw TCP server on 127.0.0.1 for answers no HTTP library would write: it reads each request, sends
    the bytes `answer(n, request)` gives for the n-th one (None: nothing), then does `then`: "close" (hangs
    up), "stall" (says nothing more, keeps the connection open) or "trickle" (one more byte every 0.3 s)."""

    def __init__(self, answer: Callable[[int, bytes], bytes | None] = lambda n, request: None,
                 then: str = "close") -> None:
        self.received: list[bytes] = []
        self._answer, self._then = answer, then
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                self.received.append(request)
                response = self._answer(len(self.received), request)
                if response is not None:
                    conn.sendall(response)
                while self._then != "close" and not self._stop.wait(0.3):
                    if self._then == "trickle":
                        try:
                            conn.sendall(b" ")
                        except OSError:
                            break

    def close(self) -> None:
        self._stop.set()
        self._server.close()


def child_env(**env: str) -> dict[str, str]:
    """`env` for a child process, with only what it needs of ours to start (PATH and the like), nothing else."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "SYSTEMROOT", "TMPDIR") if k in os.environ}
    return {**base, **env}


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """The real gateway (`python app.py`) in a subprocess, in its own working directory."""

    def __init__(self, workdir: Path, env: dict[str, str], args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.env = env
        self.args = args
        self.output: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> "Service":
        """Start the service and wait until it listens."""
        env = child_env(PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *self.args], cwd=self.workdir, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = len(self.output)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

        def listening() -> str | None:
            for line in self.output[started:]:
                found = re.search(r"listening on http://[^:]+:(\d+)", line)
                if found:
                    return found.group(1)
            if self.proc.poll() is not None:
                raise AssertionError("service exited at start:\n" + self.text)
            return None

        port = wait_until(listening, timeout, "the service to listen")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.output.append(line)

    @property
    def text(self) -> str:
        """Everything the service printed so far."""
        return "".join(self.output)

    def printed(self, text: str, timeout: float = 10.0) -> bool:
        """Whether the service prints `text`, waiting for it up to `timeout` s (log lines reach the output
        through the log-writer thread, a moment after what they tell of has happened); raises if it never does."""
        wait_until(lambda: text in self.text, timeout, f"the service to print {text!r}")
        return True

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=10, **kwargs)

    def health(self) -> dict[str, Any]:
        return self.get("/").json()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """`kill -9`: no chance to clean up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
