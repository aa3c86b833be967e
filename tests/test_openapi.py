"""openapi.yaml describes the running service: schemathesis generates requests from it and checks every answer."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from config import derive_webhook_secret
from doubles import ROOT, TOKEN, MakeDouble, Service, TelegramDouble

schema = schemathesis.openapi.from_path(ROOT / "openapi.yaml")
REPLY_TOKEN = "openapi-reply-token"


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    """One real service (webhook mode, /reply on) for every generated case of this module."""
    telegram, make = TelegramDouble(), MakeDouble()
    with tempfile.TemporaryDirectory() as tmp:
        running = Service(Path(tmp), {
            "BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url, "TELEGRAM_API_URL": telegram.url,
            "WEBHOOK_URL": "https://gateway.example.test/webhook", "HOST": "127.0.0.1", "PORT": "0",
            "STATE_DB": str(Path(tmp) / "state.sqlite3"), "DEBOUNCE_SECONDS": "0.1", "REPLY_TOKEN": REPLY_TOKEN,
            # Hundreds of generated replies go to a few chat ids: spaced 1 s apart, each `/reply` would wait.
            "TYPING_MODE": "off", "TELEGRAM_CHAT_INTERVAL_SECONDS": "0"}).start()
        yield running
        assert running.stop() == 0
        assert TOKEN not in running.text and "Traceback" not in running.text
    telegram.close()
    make.close()
    telegram.check()
    make.check()


@schema.parametrize()
@settings(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_route_answers_as_documented(case, service: Service) -> None:
    """Each generated request gets a documented status and body, and never a 500."""
    headers = {}
    if case.path == "/webhook":
        headers["X-Telegram-Bot-Api-Secret-Token"] = derive_webhook_secret(TOKEN)
    if case.path == "/reply":
        headers["Authorization"] = f"Bearer {REPLY_TOKEN}"
    case.call_and_validate(base_url=service.url, headers=headers)
