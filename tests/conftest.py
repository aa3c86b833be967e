"""Fixtures: Bot API and Make doubles on 127.0.0.1, and the real service started in a subprocess."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from doubles import TOKEN, MakeDouble, Service, TelegramDouble  # noqa: E402
from postgres import PostgresServer, server_binaries  # noqa: E402

SAMPLES = Path(__file__).resolve().parent / "data" / "telegram_updates.json"


@pytest.fixture
def telegram() -> Iterator[TelegramDouble]:
    double = TelegramDouble()
    yield double
    double.close()
    double.check()


@pytest.fixture
def make() -> Iterator[MakeDouble]:
    double = MakeDouble()
    yield double
    double.close()
    double.check()


@pytest.fixture
def service_env(tmp_path: Path, telegram: TelegramDouble, make: MakeDouble) -> dict[str, str]:
    """Settings for a fast test run: short debounce, short polls, quick retries."""
    return {
        "BOT_TOKEN": TOKEN,
        "MAKE_WEBHOOK_URL": make.url + "/hook",
        "TELEGRAM_API_URL": telegram.url,
        "HOST": "127.0.0.1",
        "PORT": "0",
        "STATE_DB": str(tmp_path / "state.sqlite3"),
        "DEBOUNCE_SECONDS": "0.4",
        "MAX_WAIT_SECONDS": "5",
        "POLL_TIMEOUT_SECONDS": "1",
        "MAKE_RETRY_MAX_SECONDS": "0.5",
        "TYPING_MODE": "simulate",
        "LOG_LEVEL": "DEBUG",
    }


@pytest.fixture
def start_service(tmp_path: Path, service_env: dict[str, str]) -> Iterator[Callable[..., Service]]:
    """Start the real service with `service_env` plus overrides; every one is stopped at teardown,
    and nothing it printed may contain the bot token."""
    started: list[Service] = []

    def start(**overrides: str) -> Service:
        service = Service(tmp_path, {**service_env, **overrides})
        started.append(service)
        return service.start()

    yield start
    for service in started:
        if service.proc and service.proc.poll() is None:
            service.kill()
    for service in started:
        assert TOKEN not in service.text
        assert TOKEN.split(":")[1] not in service.text


@pytest.fixture(scope="session")
def samples() -> list[dict]:
    """The 80 real updates of shared/data."""
    return json.loads(SAMPLES.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL for this test process (each xdist worker has its own), stopped and removed at the end.
    Skipped where Debian's `postgresql` is not installed (`.ci/run` installs it)."""
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(binaries)
    server.start()
    yield server
    server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the tests' PostgreSQL."""
    return postgres_server.new_database()
