"""DATABASE_URL from the command line: the start's one-line refusals, the password kept out of everything
printed, `migrate`, `copy-state` and the dead-letter commands on PostgreSQL."""

from __future__ import annotations

import subprocess
import time
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from batching import build_batch_event
from doubles import ROOT, MakeDouble, Service, child_env, free_port, wait_until
from store import NewEvent, SQLiteStore, lock_instance

PASSWORD = "s3cr3t-Pa55w0rd"


def run_app(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd, env=child_env(**env),
                          capture_output=True, text=True, timeout=60)


def with_password(url: str) -> str:
    """The URL with a password in it (the tests' server trusts every local connection: it is not checked)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def lines_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    output = result.stdout + result.stderr
    assert PASSWORD not in output and "Traceback" not in output, output
    return [line for line in output.splitlines() if line.strip()]


@pytest.fixture
def env(service_env: dict[str, str], postgres_url: str) -> dict[str, str]:
    return {**service_env, "DATABASE_URL": with_password(postgres_url), "LOG_LEVEL": "INFO",
            "HTTP_MAX_CONNECTIONS": "100"}


@pytest.mark.parametrize("form", ["credentials", "unencoded", "query", "keywords"])
def test_a_gateway_on_postgresql_never_prints_its_password(form: str, tmp_path: Path, env: dict[str, str],
                                                           postgres_url: str) -> None:
    """The start's log, health and metrics name the database without its password, however DATABASE_URL carries
    it: in the URL's credentials, there with characters a URL should have encoded ('#', '?'), as `?password=`
    (with an '@' in the query), or in libpq's `key=value` form."""
    port, database = postgres_url.rsplit(":", 1)[1].split("/")
    if form == "unencoded":
        env["DATABASE_URL"] = env["DATABASE_URL"].replace(PASSWORD, PASSWORD + "#?x")
    elif form == "query":
        env["DATABASE_URL"] = f"{postgres_url}?password={PASSWORD}&application_name=ops@site"
    elif form == "keywords":
        env["DATABASE_URL"] = f"host=127.0.0.1 port={port} user=postgres password={PASSWORD} dbname={database}"
    service = Service(tmp_path, env).start()
    try:
        assert f"state postgresql://postgres:***@127.0.0.1:{port}/{database}" in service.text
        health = service.get("/").text
        assert '"database":"postgresql"' in health.replace(" ", "") and PASSWORD not in health
        assert PASSWORD not in service.get("/metrics").text
        assert not (tmp_path / "data").exists()  # no SQLite file, no lock file
    finally:
        assert service.stop() == 0
    assert PASSWORD not in service.text


def test_a_postgresql_that_may_lose_commits_stops_the_start_with_one_line(
        tmp_path: Path, env: dict[str, str], postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET synchronous_commit = off')
    result = run_app(tmp_path, env)
    lines = lines_of(result)
    assert result.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: DATABASE_URL=postgresql://postgres:***@127.0.0.1:")
    assert "synchronous_commit=off" in lines[0] and "DATABASE_DURABILITY=relaxed" in lines[0]
    relaxed = Service(tmp_path, {**env, "DATABASE_DURABILITY": "relaxed"}).start()
    assert relaxed.stop() == 0


def test_an_unreachable_or_wrong_database_url_is_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    """Nothing listening at the address: one line, at once, without the password; a URL that is not
    PostgreSQL's: a settings problem naming it."""
    closed = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/gateway"
    result = run_app(tmp_path, {**env, "DATABASE_URL": closed})
    lines = lines_of(result)
    assert result.returncode == 2 and len(lines) == 1 and "cannot connect to PostgreSQL" in lines[0], lines
    result = run_app(tmp_path, {**env, "DATABASE_URL": f"mysql://root:{PASSWORD}@localhost/db"})
    output = "\n".join(lines_of(result))
    assert result.returncode == 2 and "DATABASE_URL" in output and "not a PostgreSQL connection string" in output
    # An '@' left unencoded in the password: libpq reads part of it as the host, and says so when it cannot
    # connect there; neither part is printed.
    halves = ("Sec3t-Half1", "Half2-Sec3t")
    split = f"postgresql://postgres:{halves[0]}@{halves[1]}@127.0.0.1:{free_port()}/gateway"
    result = run_app(tmp_path, {**env, "DATABASE_URL": split})
    output = result.stdout + result.stderr
    assert result.returncode == 2 and all(half not in output for half in halves), output


def test_migrate_creates_the_schema_and_dead_letters_read_it(tmp_path: Path, env: dict[str, str],
                                                            postgres_url: str) -> None:
    nothing = run_app(tmp_path, env, "dead-letters")
    assert nothing.returncode == 1 and "no gateway has stored anything there" in lines_of(nothing)[0]
    migrated = run_app(tmp_path, env, "migrate")
    assert migrated.returncode == 0 and "schema is up to date" in lines_of(migrated)[-1]
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM gateway_schema").fetchone() == (1,)
    listed = run_app(tmp_path, env, "dead-letters")
    assert listed.returncode == 0 and lines_of(listed)[-1] == "no dead letters"


def _old_state(path: Path) -> dict[str, Any]:
    """A stopped single instance's state: an open batch, a dead letter, a payment."""
    store = SQLiteStore(str(path))
    store.add_message(1, 7, 7, {"id": 7}, {"update_id": 1, "type": "text", "text": "hi"}, 1.0e9, 50,
                      build_batch_event)
    store.enqueue_event(NewEvent("gone", "chat:8", "update", {"event_id": "gone"}), 1.0e9)
    row = store.claim_due_events(1.0e9, "make", 1)[0]
    store.mark_failed(row.id, 1.0e9, "410 Gone", dead=True)
    store.record_payment(2, "charge-1", "order-1", 7, "XTR", 5, {"total_amount": 5}, 1.0e9, lambda dup: [])
    store.close()
    return {"batches": 1, "dead": 1, "payments": 1}


def test_copy_state_moves_a_stopped_gateway_into_an_empty_database_once(tmp_path: Path, env: dict[str, str],
                                                                        make: MakeDouble) -> None:
    old = tmp_path / "old" / "state.sqlite3"
    _old_state(old)
    holder = lock_instance(str(old))  # a gateway still running on it
    try:
        refused = run_app(tmp_path, env, "copy-state", "--from", str(old))
        assert refused.returncode == 1 and "another gateway is already running" in lines_of(refused)[-1]
    finally:
        holder.close()
    missing = run_app(tmp_path, env, "copy-state", "--from", str(tmp_path / "nothing.sqlite3"))
    assert missing.returncode == 1 and not (tmp_path / "nothing.sqlite3.lock").exists()
    copied = run_app(tmp_path, env, "copy-state", "--from", str(old))
    assert copied.returncode == 0, copied.stderr
    assert "1 batches" in lines_of(copied)[-1] and "1 payments" in lines_of(copied)[-1]
    again = run_app(tmp_path, env, "copy-state", "--from", str(old))
    assert again.returncode == 1 and "already holds gateway state" in lines_of(again)[-1]
    dead = run_app(tmp_path, env, "dead-letters")
    assert dead.returncode == 0 and lines_of(dead)[-1].startswith("gone\tupdate")
    service = Service(tmp_path, env).start()
    try:
        health = service.health()
        assert health["payments_recorded"] == 1 and health["outbox_dead"] == 1
        replayed = run_app(tmp_path, env, "replay-dead")  # beside a running instance, as on a shared database
        assert replayed.returncode == 0 and lines_of(replayed)[-1] == "1 dead letter(s) queued again"
        wait_until(lambda: any(e["event_id"] == "gone" for e in make.accepted()), timeout=15,
                   what="the replayed letter at Make")
    finally:
        assert service.stop() == 0


def test_copy_state_takes_the_previous_release_s_file(tmp_path: Path, env: dict[str, str]) -> None:
    """A state file of the schema before leases (the release before this one) is copied (a snapshot of it is
    upgraded); the file itself stays as it was, so the old release can still start on it, even after a copy that
    failed."""
    import sqlite3

    import store as store_module
    old = tmp_path / "state.sqlite3"
    with sqlite3.connect(old) as db:
        for version, migration in enumerate(store_module._MIGRATIONS[:4], start=1):
            db.executescript(f"BEGIN; {migration}; PRAGMA user_version={version}; COMMIT;")
        db.execute("INSERT INTO outbox (event_id, order_key, event_type, payload, created_at, next_attempt_at, "
                   "is_head) VALUES ('e1', 'chat:1', 'update', '{}', 1.0e9, 1.0e9, 1)")
    copied = run_app(tmp_path, env, "copy-state", "--from", str(old))
    assert copied.returncode == 0, copied.stderr
    assert "1 outbox" in lines_of(copied)[-1]
    again = run_app(tmp_path, env, "copy-state", "--from", str(old))
    assert again.returncode == 1 and "already holds gateway state" in lines_of(again)[-1]
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (x)")
    before = foreign.read_bytes()
    refused = run_app(tmp_path, env, "copy-state", "--from", str(foreign))
    assert refused.returncode == 1 and "not a gateway state database" in lines_of(refused)[-1]
    assert foreign.read_bytes() == before


def test_a_database_holding_another_program_s_tables_is_refused_in_one_line(
        tmp_path: Path, env: dict[str, str], postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE refunds (id int)")
    for args, status in (((), 2), (("migrate",), 1)):
        result = run_app(tmp_path, env, *args)
        lines = lines_of(result)
        assert result.returncode == status and len(lines) == 1, lines
        assert "tables named like the gateway's (refunds)" in lines[0]
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('outbox')").fetchone() == (None,)


def test_a_version_table_that_is_not_the_gateway_s_is_refused_in_one_line(
        tmp_path: Path, env: dict[str, str], postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE gateway_schema (version text)")
        conn.execute("INSERT INTO gateway_schema VALUES ('x')")
    for args, status in (((), 2), (("migrate",), 1), (("dead-letters",), 1)):
        result = run_app(tmp_path, env, *args)
        lines = lines_of(result)
        assert result.returncode == status and len(lines) == 1, lines
        assert "a table gateway_schema that is not the gateway's" in lines[0]


def test_an_instance_starting_while_another_migrates_waits_for_it(
        tmp_path: Path, env: dict[str, str], postgres_url: str) -> None:
    """The schema's lock held longer than the store's usual lock wait (3 s), as by a long migration: a second
    instance waits for it rather than give up, then finds the schema made."""
    from store_postgres import _MIGRATION_LOCK
    with psycopg.connect(postgres_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        started = time.monotonic()
        waiting = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "migrate"], cwd=tmp_path,
                                   env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def still_waiting_past_the_lock_wait() -> bool:
            assert waiting.poll() is None, waiting.communicate()
            return time.monotonic() - started > 4.0 and holder.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()[0] == 1

        wait_until(still_waiting_past_the_lock_wait, timeout=30, what="the second instance to wait past 3 s")
        holder.rollback()
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0 and "schema is up to date" in out, err
