"""The HTTP server in front of the routes: granian (Rust, hyper), embedded, bounded against hostile clients.

granian parses HTTP in Rust without the GIL and calls the WSGI app on a pool of `HTTP_THREADS` Python
threads. It runs here as one in-process worker per listening address (the gateway keeps its state in this
process), on sockets this module binds, with no signal handlers of its own: `python app.py` handles SIGTERM.

- A body over `MAX_BODY_BYTES` is refused with 413 from its headers, before a byte of it is read (also
  when the client asks `Expect: 100-continue`: it gets the 413, never a "go ahead"); a chunked body is
  cut off at the same limit by the routes that read one (Flask's `MAX_CONTENT_LENGTH`, `webhook.py`).
- A request's headers must arrive whole within `HTTP_REQUEST_TIMEOUT_SECONDS` (slowloris), and a
  connection with no request under way (just opened, or between kept-alive requests) closes after as
  long; a request the app is working on is never cut. A body is read only by a route whose client has
  shown its secret in the headers (`/webhook`, `/reply`); a request answered without reading its body
  has its connection closed at once, so a client without the secret cannot hold one by trickling a body.
  One with the secret can (granian reads a body with no deadline): at most seven in eight threads read
  bodies at once (`BODY_SLOTS`; a body that waits `SLOT_WAIT_SECONDS` for a slot is answered 503), so
  `GET /` and `/ready` keep theirs.
- A client that stops reading our answers is dropped once they have waited unread for twice the request
  timeout (10 s at least), and a peer gone silent by TCP keepalive (`_drop_dead_peers`; hyper has no write
  timeout).
- A stop waits for the calls into the app under way (a client that hung up leaves its request running),
  a few seconds at most; `close()` says whether they all ended.
- At most `HTTP_MAX_CONNECTIONS` connections are held per listening address; more wait in the system's
  accept queue.
- A route may answer after it returns (`RESPOND_LATER`): `POST /webhook` gives its thread back at once and
  is answered by the thread that commits its update; such a request counts as under way until answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable

from config import Config

log = logging.getLogger("gateway.http")

MAX_BODY_BYTES = 1024 * 1024  # far above any real update; anything bigger is refused with 413
_OTHER_FILES = 128  # besides Make's connections: Telegram's pool (32), the state files, logs, listening sockets
_MIN_CONNECTIONS = 16  # fewer would leave the service all but deaf; past the file limit, accepts fail instead
_BACKLOG = 1024  # connections the system queues for the server beyond those it holds
_STOP_SECONDS = 5.0  # how long a stop waits for requests under way before it goes on without them
_MIN_DEAD_PEER_SECONDS = 10.0  # a lossy link's retransmissions must not cut a client that is still reading
SLOT_WAIT_SECONDS = 0.5  # a body waits this long for a reading slot: a burst's bodies free theirs in ms


def connection_limit(config: Config, listeners: int = 1) -> int:
    """`HTTP_MAX_CONNECTIONS` (held by each of `listeners` listening addresses), raising the process's open-file
    limit to fit them (and the outgoing connections to Make and Telegram) where the system allows, else lowered
    to what fits, with a warning."""
    wanted = config.http_max_connections
    try:
        import resource
    except ImportError:
        return wanted
    reserve = config.make_max_concurrency + _OTHER_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted * listeners + reserve:
        target = wanted * listeners + reserve
        target = target if hard == resource.RLIM_INFINITY else min(hard, target)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as err:
            log.warning("cannot raise the open-file limit to %d: %s", target, err)
    if soft != resource.RLIM_INFINITY and soft < wanted * listeners + reserve:
        fits = max(_MIN_CONNECTIONS, (soft - reserve) // listeners)
        log.warning("HTTP_MAX_CONNECTIONS=%d does not fit in %d open files (ulimit -n) beside %d for Make, Telegram "
                    "and the state; holding %d connections", wanted, soft, reserve, fits)
        return fits
    return wanted


# Windows reports socket errors with its own numbers.
_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}
_DENIED = {errno.EACCES, errno.EPERM, getattr(errno, "WSAEACCES", errno.EACCES)}
_NOT_HERE = {errno.EADDRNOTAVAIL, getattr(errno, "WSAEADDRNOTAVAIL", errno.EADDRNOTAVAIL)}


def listen_problem(err: OSError, host: str, port: int) -> str:
    """One line saying why the server cannot listen on `host`:`port`, naming the settings to change."""
    where = f"HOST={host} PORT={port}"
    if isinstance(err, socket.gaierror):
        return f"cannot listen on {where}: HOST is not a name or address of this machine ({err.strerror or err})"
    if err.errno in _IN_USE:
        line = f"cannot listen on {where}: the port is in use by another program; set PORT to a free port"
        if port == 5000:
            line += (" (on macOS, the AirPlay Receiver listens on port 5000: set PORT=8000, say, or turn AirPlay "
                     "Receiver off in System Settings > General > AirDrop & Handoff)")
        return line
    if err.errno in _DENIED:
        hint = " (ports below 1024 need administrator rights: use 1024 or above)" if 0 < port < 1024 else ""
        return f"cannot listen on {where}: permission denied{hint}; set PORT to another port"
    if err.errno in _NOT_HERE:
        return f"cannot listen on {where}: {host} is not an address of this machine; set HOST (0.0.0.0: all)"
    return f"cannot listen on {where}: {err.strerror or err}"


def url_of(host: str, port: int) -> str:
    """The base URL of `host`:`port`, an IPv6 address in brackets (`http://[::1]:8000`)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listening_urls(server: "HTTPServer") -> list[str]:
    """The base URL of each address `server` listens on, IPv4 first (the one tools and people try first).

    A HOST that resolves to several addresses (localhost: 127.0.0.1 and ::1) has a socket each, each with its
    own port when PORT is 0."""
    addresses = [(str(host), int(port)) for host, port in server.addresses]
    return [url_of(host, port) for host, port in sorted(addresses, key=lambda address: ":" in address[0])]


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class HTTPServer:
    """granian serving `app` on sockets bound at construction (an `OSError` if it cannot listen, see
    `listen_problem`): `run()` serves until KeyboardInterrupt (SIGTERM and Ctrl-C arrive as one), `close()`
    stops taking requests and waits a few seconds for those under way."""

    def __init__(self, app: WSGIApp, config: Config) -> None:
        self._sockets = _bind(config.host, config.port, max(_MIN_DEAD_PEER_SECONDS,
                                                            2 * config.http_request_timeout_seconds))
        self.addresses: list[tuple[str, int]] = [sock.getsockname()[:2] for sock in self._sockets]
        self._app = app
        self._config = config
        self._connections = connection_limit(config, len(self._sockets))
        self._stopped: list[threading.Event] = []
        self._signals: list[Any] = []
        self._closed = False
        self._clean = True
        self._running = _Running()
        # The event loop granian's worker API asks for: a WSGI worker never runs it. One, closed with the server
        # (each holds a selector and a wake-up socket pair).
        self._loop = asyncio.new_event_loop()

    def run(self) -> None:
        """Serve (if `start()` has not yet) until KeyboardInterrupt, which it lets through (the caller then calls
        `close()`)."""
        if not self._signals:
            self.start()
        idle = threading.Event()
        while True:  # in short waits: a signal reaches the main thread between them, on every system
            idle.wait(0.5)

    def start(self) -> None:
        """Serve on the worker threads granian starts, and return."""
        from granian._granian import WorkerSignal, WSGIWorker
        from granian.http import HTTP1Settings

        settings = HTTP1Settings(header_read_timeout=max(1, round(self._config.http_request_timeout_seconds * 1000)),
                                 keep_alive=True)
        callback = _wsgi_callback(self._app, threading.BoundedSemaphore(_body_readers(self._config.http_threads)),
                                  self._running)
        scheduler = _scheduler(callback, self._loop)
        for sock in self._sockets:
            stopped, signal = threading.Event(), WorkerSignal()
            signal.add_cb(stopped.set)
            worker = WSGIWorker(
                1, (None, _socket_holder(sock)), None,
                1, 512,  # Rust threads: one does all the HTTP; its blocking pool (unused by WSGI) as granian has it
                self._config.http_threads, 30,  # the Python threads that run requests; an idle one ends after 30 s
                self._connections, "1", settings, None, None,  # connections held; HTTP/1.1 only; no static files
                False, None, None, None, "tls1.3", None, [], False,  # no TLS: a proxy in front terminates it
                (None, None))  # no metrics of granian's own
            worker.serve_mtr(scheduler, self._loop, signal)
            self._signals.append(signal)
            self._stopped.append(stopped)

    def close(self) -> bool:
        """Stop taking requests, wait up to a few seconds for those under way, and release the sockets; False if
        some were still under way (granian's threads may then call into Python while the interpreter exits:
        the process must end with `os._exit`)."""
        if self._closed:
            return self._clean
        self._closed = True
        for signal in self._signals:
            signal.set()
        for sock in self._sockets:
            sock.close()
        deadline = time.monotonic() + _STOP_SECONDS
        # A worker stops once its connections are done; a request whose client hung up may still be running in
        # the app, so the app's own calls are waited for too.
        for stopped in [*self._stopped, self._running.idle]:
            if not stopped.wait(max(0.0, deadline - time.monotonic())):
                log.warning("requests still under way after %g s; stopping without them", _STOP_SECONDS)
                self._clean = False
                break
        if self._clean:
            self._loop.close()
        return self._clean


def _socket_holder(sock: socket.socket) -> Any:
    """granian's handle on a duplicate of `sock` (granian closes the listener it is given when it stops; ours
    is closed by `close()`). Its constructor differs by system: (fd, uds, backlog) on Linux and FreeBSD,
    (fd, uds) on macOS and the other Unixes, (socket,) on Windows; the others are tried if a version moves."""
    from granian._granian import SocketHolder

    handle = sock.dup().detach()
    forms = [(handle, False, _BACKLOG), (handle, False), (handle,)]
    if sys.platform == "win32":
        forms.reverse()
    elif not sys.platform.startswith(("linux", "freebsd")):
        forms = forms[1:] + forms[:1]
    for form in forms:
        try:
            return SocketHolder(*form)
        except TypeError:
            continue
    socket.socket(fileno=handle).close()
    raise RuntimeError("this version of granian takes a socket in none of the known ways")


def _bind(host: str, port: int, timeout: float) -> list[socket.socket]:
    """A listening socket for each address `host` names (IPv6 ones for IPv6 only, as an IPv4 one may follow),
    all on `port`, or each on a port of its own when it is 0, its connections dropped once their peer stops
    taking data or answering for about `timeout` (see `_drop_dead_peers`). Raises `OSError`
    (`socket.gaierror` for a name that does not resolve) and closes what it bound."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if sys.platform != "win32":  # there it would let another program take the port from us
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _drop_dead_peers(sock, timeout)
            sock.bind(address)
            sock.listen(_BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _drop_dead_peers(sock: socket.socket, seconds: float) -> None:
    """Set on a listening socket, for the connections it accepts (Linux copies them over): one whose peer has
    not taken our data for `seconds` (it stopped reading: hyper has no write timeout, so such a client would
    hold its connection for ever), or stopped answering keepalive probes (a machine gone), is dropped.
    Where the system lacks an option (TCP_USER_TIMEOUT is Linux's), that part is left to a proxy in front."""
    whole = max(1, round(seconds))
    options = [(socket.SOL_SOCKET, getattr(socket, "SO_KEEPALIVE", None), 1),
               (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), whole * 1000),
               (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), whole),
               (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), max(1, whole // 3)),
               (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3)]
    for level, option, value in options:
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


def _scheduler(callback: Callable[[Any, dict[str, Any]], int], loop: asyncio.AbstractEventLoop) -> Any:
    """granian's scheduler for `callback`, which its request threads call as `callback(protocol, scope)`."""
    from granian._futures import _new_cbscheduler
    return _new_cbscheduler(loop, callback, impl_asyncio=False)


# The app may answer a request after it returns, from any thread: it returns ANSWERED_LATER and calls
# environ[RESPOND_LATER](status, json_body) once (the webhook does, once its update's group is committed).
RESPOND_LATER = "gateway.respond_later"
ANSWERED_LATER: list[bytes] = []  # this very list: compared by identity
_LATER = -1
BODY_SLOTS = "gateway.body_slots"  # environ key: the semaphore a route takes while it reads a body (`read_body`)
_ENVIRON = {"wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False, "wsgi.input_terminated": True, "SCRIPT_NAME": "",
            "SERVER_SOFTWARE": "telegram-make-gateway"}
_SERVER_HEADER = ("Server", "telegram-make-gateway")
_TOO_LARGE = b'{"ok":false,"error":"body over the size limit"}\n'


class _Running:
    """How many calls into the app are under way; `idle` is set while there are none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self.idle = threading.Event()
        self.idle.set()

    def enter(self) -> None:
        with self._lock:
            self._count += 1
            self.idle.clear()

    def leave(self) -> None:
        with self._lock:
            self._count -= 1
            if not self._count:
                self.idle.set()


class _Responder:
    """`environ[RESPOND_LATER]`: answers its request with a JSON body, once, from any thread (granian takes an
    answer from any thread); the request counts as under way until then."""

    __slots__ = ("_protocol", "_running", "_lock")

    def __init__(self, protocol: Any, running: _Running) -> None:
        self._protocol: Any = protocol
        self._running = running
        self._lock = threading.Lock()

    def __call__(self, status: int, body: bytes) -> None:
        with self._lock:
            protocol, self._protocol = self._protocol, None
        if protocol is None:
            return  # answered already
        try:
            protocol.response_bytes(int(status), [("Content-Type", "application/json"),
                                                  ("Content-Length", str(len(body))), _SERVER_HEADER], body)
        finally:
            self._running.leave()


class BodySlotsTaken(Exception):
    """Every thread allowed to read a request body is reading one (stalled clients, most likely): answer 503."""


def _body_readers(threads: int) -> int:
    """How many of `threads` may read a body at once: a client with a secret that stalls its body holds its
    thread for as long as it likes, and the rest must stay for `GET /` and `/ready`."""
    return max(1, threads - max(1, threads // 8))


def _wsgi_callback(app: WSGIApp, body_slots: threading.BoundedSemaphore,
                   running: _Running) -> Callable[[Any, dict[str, Any]], int]:
    """What granian calls for each request: the WSGI environ from its scope (and nothing of this process's
    environment, where the bot token is), `app` called, its answer handed back; a body over the limit
    refused from its Content-Length before the app sees it. `running` counts the calls under way."""

    def callback(protocol: Any, scope: dict[str, Any]) -> int:
        running.enter()
        status = 0
        try:
            status = answer_request(protocol, scope)
            return status
        finally:
            if status != _LATER:  # else it is under way until answered
                running.leave()

    def answer_request(protocol: Any, scope: dict[str, Any]) -> int:
        environ = _ENVIRON | scope
        environ["wsgi.errors"] = sys.stderr  # looked up now: main() puts a masking stream there
        environ[BODY_SLOTS] = body_slots
        environ[RESPOND_LATER] = _Responder(protocol, running)
        try:
            declared = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:  # hyper refuses a malformed Content-Length itself; this is belt and braces
            declared = MAX_BODY_BYTES + 1
        if declared > MAX_BODY_BYTES:
            protocol.response_bytes(413, [("Content-Type", "application/json"), ("Connection", "close"),
                                          _SERVER_HEADER], _TOO_LARGE)
            return 413
        answer: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[..., Any]:
            answer[:] = [status, headers]
            return _no_write

        body: Any = None
        try:
            body = app(environ, start_response)
            if body is ANSWERED_LATER:
                return _LATER
            if isinstance(body, list):
                chunks, first = None, b"".join(body)
            else:  # the app may call start_response on the first step (PEP 3333): take it before answering
                chunks = iter(body)
                first = next(chunks, b"")
            status, headers = _status(answer), [*answer[1], _SERVER_HEADER]
            if chunks is None:
                protocol.response_bytes(status, headers, first)
            else:
                protocol.response_iter(status, headers, _Chunks(first, chunks, body))
            return status
        except Exception:  # noqa: BLE001 - one request's failure is logged and answered 500, never the server's
            log.exception("%s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            _close(body)
            protocol.response_bytes(500, [("Content-Type", "text/plain"), _SERVER_HEADER], b"internal error\n")
            return 500

    return callback


def _status(answer: list[Any]) -> int:
    """The status the app gave `start_response`, as a number hyper takes (an error if none, or out of range)."""
    if not answer:
        raise RuntimeError("the app returned without calling start_response")
    status = int(str(answer[0])[:3])
    if not 100 <= status <= 999:
        raise ValueError(f"status {answer[0]!r} is no HTTP status")
    return status


def _close(body: Any) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _no_write(data: bytes) -> None:
    raise NotImplementedError("write() is not supported: return the body from the app")


class _Chunks:
    """A WSGI body as granian reads it: its first chunk (already taken), then the rest; `close()` called once
    it is sent or given up."""

    __slots__ = ("_first", "_rest", "_body")

    def __init__(self, first: bytes, rest: Any, body: Any) -> None:
        self._first: bytes | None = first
        self._rest = rest
        self._body = body

    def __next__(self) -> bytes:
        first, self._first = self._first, None
        return first if first is not None else next(self._rest)

    def close(self) -> None:
        _close(self._body)
