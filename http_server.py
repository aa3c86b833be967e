"""The WSGI server in front of the routes: waitress, bounded against hostile or broken clients.

- A body over `MAX_BODY_BYTES` is refused with 413 from its headers, before a byte of it is read (also
  when the client asks `Expect: 100-continue`: it gets the 413, never a "go ahead"); a chunked body is
  cut off at the same limit. Flask's `MAX_CONTENT_LENGTH` is the same constant.
- A request must arrive whole within `HTTP_REQUEST_TIMEOUT_SECONDS` of its first byte (slowloris), and a
  connection with no request under way (just opened, or between kept-alive requests) closes after as
  long; a request the app is working on is never cut.
- At most `HTTP_MAX_CONNECTIONS` connections are held; more wait in the system's accept queue.
"""

from __future__ import annotations

import errno
import logging
import math
import select
import socket
import time
from typing import Any

from config import Config

log = logging.getLogger("gateway.http")

MAX_BODY_BYTES = 1024 * 1024  # far above any real update; anything bigger is refused with 413
_SELECT_LIMIT = 500  # sockets select() watches safely where poll() is missing (Windows: 512)
_OTHER_FILES = 128  # besides Make's connections: Telegram's pool (32), the state files, logs, listening sockets
_MIN_CONNECTIONS = 16  # fewer would leave the service all but deaf; past the file limit, accepts fail instead
_OWN_SOCKETS = 2  # waitress counts its listening socket and its wake-up pipe against its connection limit


def connection_limit(config: Config) -> int:
    """`HTTP_MAX_CONNECTIONS`, raising the process's open-file limit to fit it (and the outgoing
    connections to Make and Telegram) where the system allows, else lowered to what fits, with a warning."""
    wanted = config.http_max_connections
    if not hasattr(select, "poll") and wanted > _SELECT_LIMIT:  # Windows: select() alone
        log.warning("HTTP_MAX_CONNECTIONS=%d is more than select() can watch here; holding %d", wanted, _SELECT_LIMIT)
        return _SELECT_LIMIT
    try:
        import resource
    except ImportError:
        return wanted
    reserve = config.make_max_concurrency + _OTHER_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + reserve:
        target = wanted + reserve if hard == resource.RLIM_INFINITY else min(hard, wanted + reserve)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as err:
            log.warning("cannot raise the open-file limit to %d: %s", target, err)
    if soft != resource.RLIM_INFINITY and soft < wanted + reserve:
        fits = max(_MIN_CONNECTIONS, soft - reserve)
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


def listening_urls(server: Any) -> list[str]:
    """The base URL of each address `server` listens on, IPv4 first (the one tools and people try first).

    A HOST that resolves to several addresses (localhost: 127.0.0.1 and ::1) makes waitress return a
    `MultiSocketServer`, which lists them in `effective_listen`, each with its own port when PORT is 0."""
    listening = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    addresses = [(str(host), int(port)) for host, port in listening]
    return [url_of(host, port) for host, port in sorted(addresses, key=lambda address: ":" in address[0])]


def create_http_server(app: Any, config: Config) -> Any:
    """The waitress server for the WSGI `app`, with the limits above, bound and listening; raises `OSError` if it
    cannot listen (see `listen_problem`)."""
    from waitress import create_server
    from waitress.channel import HTTPChannel

    request_timeout = config.http_request_timeout_seconds

    class BoundedChannel(HTTPChannel):  # type: ignore[misc]
        """A connection whose each request must arrive whole within `request_timeout` of its first byte."""

        request_started: float | None = None

        def received(self, data: bytes) -> bool:
            if self.request is None and data:
                self.request_started = time.monotonic()
            try:
                result = super().received(data)
            except ValueError as err:  # e.g. a Content-Length of 5,000 digits: Python will not read it
                log.warning("closing a connection from %s: unreadable request (%s)", self._peer(), err)
                self.will_close = True
                return False
            if self.request is None:  # complete (or refused): the next request's clock starts at its first byte
                self.request_started = None
            return bool(result)

        def send_continue(self) -> None:
            # waitress would say "100 Continue" to a request it has already refused (a body over the
            # limit), and then read that body: the refusal goes out instead.
            if self.request is not None and self.request.error is not None:
                self.request.expect_continue = False
                return
            super().send_continue()

        def writable(self) -> bool:
            # While a request's task runs, the task flushes its own output (write_soon sends at once, and wakes
            # the loop if the socket took only part). waitress would still have the loop watch the socket for
            # room whenever output waits: the socket has room, poll() returns at once, handle_write cannot take
            # the output lock the task holds while it waits for the GIL, and the loop spins, keeping the GIL
            # from the task. With 64 connections that spin was 86% of the process. The loop is woken when the
            # task ends (pull_trigger) and flushes what is left; past the high watermark the task waits for
            # the loop to drain its output, so then the loop must watch the socket.
            # Only while the task holds the output lock, though (it is in write_soon, and wakes the loop on
            # leaving with output left, see write_soon below): output a task left behind and is not writing to
            # (a pipelined request's response, the next request's task running; a streaming response between
            # chunks) is the loop's to send as the client reads it, or it would wait for the task's next write.
            if (self.requests and not self.will_close and not self.close_when_flushed
                    and self.total_outbufs_len < self.adj.outbuf_high_watermark):
                if not self.outbuf_lock.acquire(False):
                    return False
                self.outbuf_lock.release()
            return bool(super().writable())

        def write_soon(self, data: Any) -> int:
            written = int(super().write_soon(data))
            # waitress wakes the loop while still holding the output lock, when writable() above may yet say
            # no: wake it again now that the lock is free, so output left over is watched.
            if self.total_outbufs_len and self.connected:
                self.server.pull_trigger()
            return written

        def readable(self) -> bool:
            # The server's loop asks every connection this at least once a second.
            started = self.request_started
            if (started is not None and not self.requests and not self.will_close
                    and time.monotonic() - started > request_timeout):
                log.warning("closing a connection from %s: its request did not arrive whole in %g s",
                            self._peer(), request_timeout)
                self.will_close = True
            return bool(super().readable())

        def _peer(self) -> str:
            return str(self.addr[0]) if self.addr else "?"

    # waitress turns a HOST that does not resolve into a bare ValueError: resolve it first, for a clear error.
    socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    idle_seconds = max(1, math.ceil(request_timeout))  # waitress takes whole seconds
    connections = connection_limit(config)
    server = create_server(
        app, host=config.host, port=config.port, threads=config.http_threads, ident="telegram-make-gateway",
        # waitress refuses a Content-Length >= this limit; Flask's MAX_CONTENT_LENGTH refuses > its own.
        max_request_body_size=MAX_BODY_BYTES + 1, connection_limit=connections + _OWN_SOCKETS,
        channel_timeout=idle_seconds, cleanup_interval=1,
        # select() cannot watch more than about 1,000 sockets; poll() can, where the system has it.
        asyncore_use_poll=hasattr(select, "poll"))
    # Several listening addresses (a HOST that resolves to IPv4 and IPv6) make several servers in one map.
    listeners = [server] if hasattr(server, "channel_class") else list(server.map.values())
    for listener in listeners:
        listener.channel_class = BoundedChannel
    return server
