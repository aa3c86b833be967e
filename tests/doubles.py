"""Test doubles serving real HTTP on 127.0.0.1: a Bot API server, a Make webhook, and the service itself.

Each double records the requests it got, plays scripted answers, and keeps any error raised in its
own threads so `check()` re-raises it at teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import httpx

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


class _Server:
    """A threaded HTTP server on 127.0.0.1 (port 0: any free one) whose handler calls `self.handle`."""

    def __init__(self, port: int = 0) -> None:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without this, Nagle's algorithm holds the body
            # until the client's delayed ACK (40 ms), and every call looks 40 ms slow.
            disable_nagle_algorithm = True

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    status, headers, payload = double.handle(self.command, self.path, dict(self.headers), body)
                except Exception as err:  # kept for check(); the client sees a 500
                    double.errors.append(err)
                    status, headers, payload = 500, {}, b"double failed"
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout); nothing to report

            do_POST = do_GET = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.errors: list[Exception] = []
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        raise NotImplementedError

    def check(self) -> None:
        """Re-raise the first error the double's threads hit."""
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _json(status: int, obj: Any) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def telegram_refusal(name: str, params: dict[str, Any]) -> str | None:
    """The description of Telegram's 400 for a message it would refuse for its form (empty or too long text,
    a caption too long, entities outside the text), or None."""
    if name == "sendMessage":
        text, entities, limit = params.get("text"), params.get("entities") or [], 4096
        if not isinstance(text, str) or not text.strip():
            return "Bad Request: message text is empty"
    elif name in ("sendPhoto", "sendDocument"):
        text, entities, limit = params.get("caption") or "", params.get("caption_entities") or [], 1024
        if not params.get(name.removeprefix("send").lower()):
            return "Bad Request: there is no photo in the request"
    else:
        return None
    if _units(text) > limit:
        return "Bad Request: message is too long" if name == "sendMessage" else "Bad Request: message caption is too long"
    if params.get("parse_mode") not in (None, "HTML", "MarkdownV2", "Markdown"):
        return "Bad Request: unsupported parse_mode"
    for entity in entities:
        if not (isinstance(entity, dict) and isinstance(entity.get("offset"), int) and entity.get("length", 0) > 0
                and entity["offset"] + entity["length"] <= _units(text)):
            return f"Bad Request: can't parse entities: entity {entity!r} is outside the text"
    return None


class TelegramDouble(_Server):
    """A Bot API server: records calls, long-polls `getUpdates` from a queue, plays scripted replies."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.call_times: list[float] = []  # time.monotonic() of each call, parallel to `calls`
        self._scripts: dict[str, list[tuple]] = {}
        self._pending: list[dict[str, Any]] = []  # updates not yet confirmed by an offset
        self._cond = threading.Condition()
        self._message_id = 1000
        self.webhook: dict[str, Any] | None = None
        # When set, a call no scripted reply answers gets the (status, JSON body) pair it returns for the
        # method name and parameters, if any: e.g. to refuse some content as Telegram would.
        self.reject_if: Callable[[str, dict[str, Any]], tuple[int, Any] | None] | None = None
        super().__init__()

    def push_update(self, update: dict[str, Any]) -> None:
        """Make `update` available to `getUpdates`, as Telegram would."""
        with self._cond:
            self._pending.append(update)
            self._cond.notify_all()

    def script(self, method: str, *replies: tuple) -> None:
        """Answer the next calls of `method` with these (status, JSON body[, delay]), in order; the delay is
        seconds, or a `threading.Event` the answer waits for (a Bot API held until the test lets it go)."""
        with self.lock:
            self._scripts.setdefault(method, []).extend(replies)

    def times_of(self, method: str) -> list[float]:
        """When (time.monotonic()) each call of `method` arrived."""
        with self.lock:
            return [t for (name, _), t in zip(self.calls, self.call_times) if name == method]

    def calls_of(self, method: str) -> list[dict[str, Any]]:
        """The parameters of every call of `method` so far."""
        with self.lock:
            return [params for name, params in self.calls if name == method]

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        found = re.fullmatch(r"/bot([^/]+)/(\w+)", path)
        if not found:
            return _json(404, {"ok": False, "error_code": 404, "description": "Not Found"})
        token, name = found.groups()
        if token != self.token:
            return _json(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
        params = json.loads(body) if body else {}
        with self.lock:
            self.calls.append((name, params))
            self.call_times.append(time.monotonic())
            scripted = self._scripts.get(name)
            reply = scripted.pop(0) if scripted else None
        if reply is None and self.reject_if is not None:
            reply = self.reject_if(name, params)
        if reply is None:
            problem = telegram_refusal(name, params)
            reply = (400, {"ok": False, "error_code": 400, "description": problem}) if problem else None
        if reply is not None:
            if len(reply) > 2 and isinstance(reply[2], threading.Event):
                reply[2].wait(60)
            elif len(reply) > 2:
                time.sleep(reply[2])  # a slow Bot API, on the double's own thread
            return _json(reply[0], reply[1])
        return _json(200, {"ok": True, "result": self._default(name, params)})

    def _default(self, name: str, params: dict[str, Any]) -> Any:
        if name == "getUpdates":
            return self._get_updates(params)
        if name in ("sendMessage", "sendPhoto", "sendDocument"):
            with self.lock:
                self._message_id += 1
                message_id = self._message_id
            return {"message_id": message_id, "date": int(time.time()), "chat": {"id": params.get("chat_id")},
                    "text": params.get("text")}
        if name == "setWebhook":
            self.webhook = params
        if name == "deleteWebhook":
            self.webhook = None
        if name == "getWebhookInfo":
            return {"url": (self.webhook or {}).get("url", ""), "pending_update_count": 0}
        return True

    def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = params.get("offset")
        limit = params.get("limit", 100)
        deadline = time.monotonic() + min(float(params.get("timeout", 0)), 2.0)
        with self._cond:
            if offset is not None:
                self._pending = [u for u in self._pending if u["update_id"] >= offset]
            while not self._pending and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return list(self._pending[:limit])


class MakeDouble(_Server):
    """A Make custom webhook: records events, plays scripted answers (status, body, headers, delay)."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self._scripts: list[tuple[int, Any, dict[str, str], float]] = []
        # When set, an event for which it returns a (status, body) pair gets that answer instead.
        self.reject_if: Callable[[dict[str, Any]], tuple[int, Any] | None] | None = None
        # Calls open right now, the most ever open at once, and chats that had two calls open at once.
        self.open = 0
        self.max_open = 0
        self.overlapping_chats: list[Any] = []
        self._open_chats: dict[Any, int] = {}
        self._gather: tuple[int, float] | None = None
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
                scripted = (*rejected, {}, 0.0)
            else:
                scripted = self._scripts.pop(0) if self._scripts else (200, "Accepted", {}, 0.0)
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


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """The real gateway (`python app.py`) in a subprocess, in its own working directory."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.output: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> "Service":
        """Start the service and wait until it listens."""
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "SYSTEMROOT", "TMPDIR") if k in os.environ}
        env = {**base, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=self.workdir, env=env,
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
