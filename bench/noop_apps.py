"""No-op apps for bench/ingest.py's server comparison: what a WSGI server costs before any app work."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

from flask import Flask, jsonify

flask_noop = Flask("noop")


@flask_noop.post("/webhook")
def webhook() -> Any:
    """Answer 200 with a small JSON body, as the gateway does."""
    return jsonify(ok=True)


def wsgi_noop(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The same answer from bare WSGI (no framework): the server's own cost alone."""
    environ["wsgi.input"].read()
    body = b'{"ok":true}\n'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


if __name__ == "__main__":  # python bench/noop_apps.py flask_noop|wsgi_noop PORT: on waitress
    import logging

    from waitress import serve
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a line per queued request otherwise
    serve(globals()[sys.argv[1]], host="127.0.0.1", port=int(sys.argv[2]), threads=8, _quiet=True)
