"""The real gateway's WSGI app served by granian instead of waitress: bench/ingest.py's server comparison.

Not a way to run the gateway (`python app.py` is): granian handles signals and threads its own way, and
the hardening of `http_server.py` (body limit from the headers, request and idle timeouts, connection
limit) is waitress's. Run by bench/ingest.py as
`granian --interface wsgi --factory bench.granian_gateway:app` with the gateway's settings in the environment.
"""

from __future__ import annotations

from typing import Any

from app import Gateway, configure_logging, create_app
from config import Config
from telegram_api import TelegramError


def app() -> Any:
    """Build the app and start its gateway's threads, as `serve()` does before listening."""
    config = Config.from_env()
    configure_logging(config)
    application = create_app(config)
    gateway: Gateway = application.extensions["gateway"]
    try:
        gateway.identify()
    except TelegramError:
        pass  # the telegram-getme thread asks again
    gateway.start()
    return application
