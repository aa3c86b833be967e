"""`POST /webhook` as bare WSGI in front of the Flask app: the one route Telegram drives at full speed.

A backlog after downtime arrives as up to `max_connections` requests at once, each of which must be stored
before its 200. Flask's request and response objects cost about as much as storing the update, so this
route skips them: secret checked in constant time, body parsed once as strict JSON, then
`UpdateRouter.handle_later()`: a message is queued for the next group commit and the request's thread goes
back to the server at once; the ready-made answer is sent once the update is committed, by the thread that
committed it (`http_server.RESPOND_LATER`). Served by something else than `http_server`, the route waits for
`UpdateRouter.handle()` instead. Every other path and method goes on to Flask. The answers are the same JSON
the Flask routes write (`{"ok": ...}`).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from http import HTTPStatus
from typing import Any, Callable, Iterable

from werkzeug.exceptions import RequestEntityTooLarge

from http_server import ANSWERED_LATER, BODY_SLOTS, RESPOND_LATER, SLOT_WAIT_SECONDS, BodySlotsTaken
from router import Routed, UpdateRouter
from store import StoreError

log = logging.getLogger("gateway")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
PATH = "/webhook"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 reads as infinity, which no JSON encoder writes back
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# One decoder for every body: json.loads with these options would build a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite_float)


def parse_json(raw: bytes) -> Any:
    """Parse a request body as strict JSON: no NaN, Infinity or number overflowing to infinity, which
    nothing downstream could send on."""
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request's body, all of it; `RequestEntityTooLarge` if it is over `limit` bytes (a declared length
    over it is refused before a byte is read, a chunked body once `limit` + 1 bytes have come);
    `BodySlotsTaken` when every thread allowed to read a body has been reading one for `SLOT_WAIT_SECONDS`
    (stalled clients: answer 503; a burst's bodies arrive in milliseconds and free their slots)."""
    try:
        declared = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        declared = -1
    if declared > limit:
        raise RequestEntityTooLarge()
    slots = environ.get(BODY_SLOTS)
    if slots is not None and not slots.acquire(timeout=SLOT_WAIT_SECONDS):
        raise BodySlotsTaken()
    try:
        wanted = declared if declared >= 0 else limit + 1
        stream, parts, got = environ["wsgi.input"], [], 0
        while got < wanted:  # a WSGI read may return less than asked before the end
            part = stream.read(wanted - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    finally:
        if slots is not None:
            slots.release()
    if got > limit:
        raise RequestEntityTooLarge()
    return parts[0] if len(parts) == 1 else b"".join(parts)


def json_body(answer: dict[str, Any]) -> bytes:
    """An answer as Flask's `jsonify` writes it (compact, one line)."""
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


class WebhookRoute:
    """WSGI middleware: `POST /webhook` handled here, everything else passed to `app` (Flask)."""

    def __init__(self, app: WSGIApp, router: UpdateRouter, secret: str, max_body_bytes: int) -> None:
        self._app = app
        self._router = router
        self._secret = secret.encode()
        self._max_body = max_body_bytes
        self._answers: dict[str, bytes] = {}  # outcome -> its 200 body (a handful of outcomes)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return self._app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            return _answer(start_response, HTTPStatus.METHOD_NOT_ALLOWED,
                           json_body({"ok": False, "error": "use POST"}), [("Allow", "POST")])
        given = environ.get("HTTP_X_TELEGRAM_BOT_API_SECRET_TOKEN", "").encode("latin-1")
        if not hmac.compare_digest(given, self._secret):
            return _error(start_response, HTTPStatus.UNAUTHORIZED, "wrong secret token")
        try:
            raw = read_body(environ, self._max_body)
        except RequestEntityTooLarge:
            return _error(start_response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body over the size limit")
        except BodySlotsTaken:
            log.warning("POST /webhook: every body-reading thread is busy (stalled clients?); answered 503")
            return _error(start_response, HTTPStatus.SERVICE_UNAVAILABLE, "busy; try again")
        try:
            update = parse_json(raw)
        except (ValueError, RecursionError):
            return _error(start_response, HTTPStatus.BAD_REQUEST, "body is not JSON")
        respond = environ.get(RESPOND_LATER)
        if respond is not None:  # the server lets this thread go now; the answer follows the group's commit
            self._router.handle_later(update, lambda result: respond(*self._answer_for(result)))
            return ANSWERED_LATER
        try:
            result: Routed | Exception = self._router.handle(update)
        except Exception as err:  # noqa: BLE001 - answered (and logged) as the deferred path does
            result = err
        status, body = self._answer_for(result)
        return _answer(start_response, status, body)

    def _answer_for(self, result: Routed | Exception) -> tuple[HTTPStatus, bytes]:
        """The status and body that tell Telegram what became of its update (`UpdateRouter.handle`'s result or
        error)."""
        if isinstance(result, StoreError):
            log.error("update not stored (Telegram will resend it): %s", result)
            return HTTPStatus.SERVICE_UNAVAILABLE, json_body({"ok": False, "error": "cannot store the update now"})
        if isinstance(result, Exception):
            log.error("POST /webhook failed", exc_info=result)
            return HTTPStatus.INTERNAL_SERVER_ERROR, json_body({"ok": False, "error": "internal error"})
        if result.outcome == "invalid":
            return HTTPStatus.BAD_REQUEST, json_body({"ok": False, "error": result.detail})
        body = self._answers.get(result.outcome)
        if body is None:
            body = self._answers.setdefault(result.outcome, json_body({"ok": True, "outcome": result.outcome}))
        return HTTPStatus.OK, body


def _error(start_response: Callable[..., Any], status: HTTPStatus, error: str) -> list[bytes]:
    return _answer(start_response, status, json_body({"ok": False, "error": error}))


def _answer(start_response: Callable[..., Any], status: HTTPStatus, body: bytes,
            headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(f"{status.value} {status.phrase}", [("Content-Type", "application/json"),
                                                       ("Content-Length", str(len(body))), *(headers or [])])
    return [body]
