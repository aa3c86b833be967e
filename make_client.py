"""Posts events to the Make webhook and says what the answer means: delivered, or retry later.

Outcomes are values, not exceptions: `deliver()` returns `Delivered` (with any replies Make put in
its response) or `RetryLater` (with Make's `Retry-After` when given, and whether the failure looks
permanent, like 410 for a deleted webhook, so health can say so). Whether an undelivered event has
become a dead letter is decided by its age, in `delivery.py`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Any, Mapping
from urllib.parse import quote

import httpx

from telegram_api import redact

log = logging.getLogger("gateway.make")

MAX_ANSWER_BYTES = 5 * 1024 * 1024  # Make's own payload limit; an answer bigger than this is not read


@dataclass(frozen=True)
class Delivered:
    """Make accepted the event (any 2xx); `replies` are the reply items its response asks us to send."""

    status: int
    replies: list[Any] = field(default_factory=list)
    body: Any = None
    problem: str = ""  # what was wrong with an answer that looked meant to be read, for the log


@dataclass(frozen=True)
class RetryLater:
    """Not delivered; try again. `permanent` marks answers that will not fix themselves (410, other 4xx)."""

    reason: str
    retry_after: float | None = None
    permanent: bool = False
    throttled: bool = False  # Make refuses the whole webhook for now (429, queue full), not just this event


Outcome = Delivered | RetryLater


def parse_replies(body: Any) -> list[Any]:
    """The reply items in Make's JSON answer, unread: those of `reply`, then those of `replies`, each a single
    item or a list of them (a scenario mixes the two up easily), blank strings and nulls left out;
    `replies.read_reply` reads each and says what is wrong with one."""
    if not isinstance(body, dict):
        return []
    found: list[Any] = []
    for name in ("reply", "replies"):
        value = body.get(name)
        found.extend(value if isinstance(value, list) else [value])
    return [item for item in found if item is not None and (not isinstance(item, str) or item.strip())]


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header `name` (any case), or None."""
    return next((value for key, value in headers.items() if key.lower() == name), None)


def classify(status: int, headers: Mapping[str, str], text: str) -> Outcome:
    """Turn Make's HTTP answer into an outcome (pure: no I/O)."""
    if 200 <= status < 300:
        try:
            body = json.loads(text) if text else None
        except (ValueError, RecursionError) as err:  # Make's plain "Accepted", or JSON that cannot be read
            if text.lstrip().startswith(("{", "[")):
                # Most often a model's text, quotes or newlines and all, mapped into a hand-written JSON body.
                problem = f"it looks like JSON but is not ({err.__class__.__name__}: {str(err)[:120]})"
                return Delivered(status, [], None, problem)
            body = None
        return Delivered(status, parse_replies(body), body)
    snippet = " ".join(text.split())[:200]
    retry_after = parse_retry_after(_header(headers, "retry-after"))
    if status == 429:
        return RetryLater(f"HTTP 429: {snippet}", retry_after, throttled=True)
    if status >= 500:
        return RetryLater(f"HTTP {status}: {snippet}", retry_after)
    if status == 400 and "queue is full" in text.lower():
        return RetryLater(f"HTTP 400: {snippet}", retry_after, throttled=True)
    if 300 <= status < 400:
        location = _header(headers, "location") or ""
        return RetryLater(f"HTTP {status}: Make answered with a redirect{f' to {location}' if location else ''}; "
                          "check MAKE_WEBHOOK_URL", retry_after, permanent=True)
    if status == 410:
        return RetryLater("HTTP 410: the Make webhook is gone (deleted or deactivated); check MAKE_WEBHOOK_URL",
                          retry_after, permanent=True)
    return RetryLater(f"HTTP {status}: {snippet}", retry_after, permanent=True)


class MakeClient:
    """Sends one event per request to the Make webhook, TLS verified, with explicit timeouts."""

    def __init__(self, url: str, timeout: float = 45.0, verify: bool | str = True, max_connections: int = 100) -> None:
        self._url = url
        self._timeout = timeout
        # One TLS context for every client: building one (the CA bundle read and parsed) takes tens of ms.
        self._tls = httpx.create_ssl_context(verify=verify)
        self._max_connections = max_connections
        # One connection per call in flight (a call must never wait behind a slow scenario), each in an httpx
        # client of its own, taken for the call: one pool of dozens of connections, shared by every delivery
        # thread, cost each call a lock held across the pool and a readability check of every idle
        # connection, about two thirds of a call's CPU with 50 calls in flight.
        self._idle: list[httpx.Client] = []  # most recently used last: its connection is the likeliest alive
        self._clients: set[httpx.Client] = set()
        self._lock = threading.Lock()
        self._closed = False

    def _new_client(self) -> httpx.Client:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        return httpx.Client(timeout=httpx.Timeout(self._timeout, connect=min(10.0, self._timeout)),
                            verify=self._tls,
                            # Only what `_Inflater` decodes, within its size limit.
                            headers={"User-Agent": "telegram-make-gateway", "Accept-Encoding": "gzip, deflate"},
                            limits=limits)

    def _take(self) -> httpx.Client:
        """A client for one call: an idle one, or a new one (a closed one once `close()` has run)."""
        with self._lock:  # (building one costs a tenth of a millisecond, the TLS context being shared)
            if self._idle:
                return self._idle.pop()
            client = self._new_client()
            if self._closed:
                client.close()  # the call then fails as one on a closed client always did
            else:
                self._clients.add(client)
            return client

    def _give_back(self, client: httpx.Client) -> None:
        with self._lock:
            if not (self._closed or client.is_closed) and len(self._idle) < self._max_connections:
                self._idle.append(client)
                return
            self._clients.discard(client)
        client.close()

    def deliver(self, event_id: str, payload: dict[str, Any]) -> Outcome:
        """POST one event (header `X-Event-Id`) and classify the answer; never raises.

        Once Make has answered a 2xx status it has run the scenario, so whatever then goes wrong with the
        answer's body (cut, stalled, too big, unreadable) still counts as delivered, without replies:
        posting the event again would run the scenario twice."""
        try:
            # ASCII JSON: a lone surrogate from a user's update is sent escaped, never crashes the send.
            content = json.dumps(payload, ensure_ascii=True, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            return RetryLater(f"event is not valid JSON: {err}", permanent=True)
        client = self._take()
        try:
            return self._post(client, event_id, content)
        finally:
            self._give_back(client)

    def _post(self, client: httpx.Client, event_id: str, content: bytes) -> Outcome:
        status: int | None = None
        try:
            with client.stream("POST", self._url, content=content,
                               headers={"X-Event-Id": header_value(event_id),
                                        "Content-Type": "application/json"}) as response:
                status = response.status_code
                text = _read_text(response, self._timeout)
            return classify(status, response.headers, text)
        except Exception as err:  # network trouble, a closed client, or anything else: an outcome, never an escape
            reason = "timed out" if isinstance(err, httpx.TimeoutException) else type(err).__name__
            detail = f"{reason} ({type(err).__name__})" if reason == "timed out" else f"{reason}: {redact(str(err))}"
            if status is not None and 200 <= status < 300:
                log.error("Make accepted %s (HTTP %s) but its answer could not be read (%s); delivered without "
                          "replies", event_id, status, detail)
                return Delivered(status)
            if status is not None:  # Make's status still says what kind of failure it is (429, 5xx, 410...)
                return classify(status, response.headers, f"(answer unreadable: {detail})")
            return RetryLater(detail, permanent=not isinstance(err, httpx.HTTPError))

    @property
    def timeout(self) -> float:
        """Seconds each step of a call (connecting, sending, the answer's headers, its body) may take."""
        return self._timeout

    def close(self) -> None:
        """Close every connection; safe to call twice. A call already under way has its client closed under it
        (it may still end either way); a call that starts after this returns fails, as on a closed client."""
        with self._lock:
            self._closed = True
            clients, self._clients, self._idle = list(self._clients), set(), []
        for client in clients:
            client.close()


def header_value(text: str) -> str:
    """`text` fit for an HTTP header: as it is if printable ASCII, else percent-encoded (an event id built from
    what Telegram sent, a payment's charge id, may hold anything; a header that cannot be sent would stop its
    chat's queue for good)."""
    return text if text.isascii() and text.isprintable() else quote(text, safe="")


class UnreadableAnswer(Exception):
    """Make's answer body did not arrive whole in time, is over `MAX_ANSWER_BYTES`, or cannot be decoded."""


def _read_text(response: httpx.Response, budget: float) -> str:
    """The answer's body as text, read within `budget` seconds of its headers (httpx times each read, not
    the whole body: one dribbling a byte at a time would hold the chat for ever) and never inflated past
    `MAX_ANSWER_BYTES` (a few compressed kilobytes can hold gigabytes)."""
    deadline = time.monotonic() + budget
    inflate = _Inflater(response.headers.get("Content-Encoding", ""))
    chunks: list[bytes] = []
    size = 0
    for raw in response.iter_raw():
        chunk = inflate(raw, MAX_ANSWER_BYTES - size)
        chunks.append(chunk)
        size += len(chunk)
        if time.monotonic() > deadline:
            raise UnreadableAnswer(f"answer did not arrive whole in {budget:g} s")
    return b"".join(chunks).decode(response.encoding or "utf-8", errors="replace")


class _Inflater:
    """Decodes a body sent with `Content-Encoding` identity, gzip or deflate, never yielding more than asked."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        self._raw_deflate = encoding == "deflate"  # servers send deflate with or without its zlib header
        self._started = False
        if encoding in ("", "identity"):
            self._inflater = None
        elif encoding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._inflater = zlib.decompressobj()
        else:  # stacked encodings, or ones we did not ask for
            raise UnreadableAnswer(f"answer encoded as {encoding!r}")

    def __call__(self, data: bytes, room: int) -> bytes:
        """`data` decoded; raises `UnreadableAnswer` once the body would pass `room` more bytes."""
        if self._inflater is None:
            out = data
        else:
            try:
                out = self._inflater.decompress(data, room + 1)
            except zlib.error as err:
                if self._started or not self._raw_deflate:
                    raise UnreadableAnswer(f"answer cannot be decoded: {err}") from None
                self._inflater, self._raw_deflate = zlib.decompressobj(-zlib.MAX_WBITS), False
                return self(data, room)
            if self._inflater.unconsumed_tail:
                raise UnreadableAnswer(f"answer over {MAX_ANSWER_BYTES} bytes")
        self._started = True
        if len(out) > room:
            raise UnreadableAnswer(f"answer over {MAX_ANSWER_BYTES} bytes")
        return out
