"""Several gateway processes on one PostgreSQL, for the tests: start, kill, pause and resume instances, post
updates the way a load balancer in front of them does, and check what Make received."""

from __future__ import annotations

import collections
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from config import derive_webhook_secret
from doubles import TOKEN, MakeDouble, Service

HEADERS = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}


class Cluster:
    """N instances of the real gateway sharing one database, each in a working directory of its own."""

    def __init__(self, tmp_path: Path, env: dict[str, str], size: int) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.instances: list[Service | None] = [None] * size
        self.paused: set[int] = set()
        self.retired: list[Service] = []  # instances killed: their output is still checked for secrets

    def start(self, index: int, **overrides: str) -> Service:
        """Start instance `index` (again)."""
        folder = self.tmp_path / f"instance-{index}"
        folder.mkdir(exist_ok=True)
        service = Service(folder, {**self.env, **overrides}).start(timeout=30)
        self.instances[index] = service
        return service

    def start_all(self) -> "Cluster":
        for index in range(len(self.instances)):
            self.start(index)
        return self

    def live(self) -> list[int]:
        """Indexes of instances running and not paused."""
        return [i for i, s in enumerate(self.instances)
                if s is not None and s.proc is not None and s.proc.poll() is None and i not in self.paused]

    def kill(self, index: int) -> None:
        """`kill -9` instance `index`."""
        service = self.instances[index]
        assert service is not None
        if index in self.paused:
            self.resume(index)
        service.kill()
        self.retired.append(service)
        self.instances[index] = None

    def pause(self, index: int) -> None:
        """SIGSTOP: the process stays, its connections stay open, it does nothing."""
        service = self.instances[index]
        assert service is not None and service.proc is not None
        os.kill(service.proc.pid, signal.SIGSTOP)
        self.paused.add(index)

    def resume(self, index: int) -> None:
        service = self.instances[index]
        assert service is not None and service.proc is not None
        os.kill(service.proc.pid, signal.SIGCONT)
        self.paused.discard(index)

    def post(self, update: dict[str, Any], rng: random.Random, deadline: float) -> int:
        """Post `update` to a random live instance until one answers 2xx, as Telegram retries a webhook (each
        try may reach another instance behind the balancer); return the index that took it."""
        while time.monotonic() < deadline:
            live = self.live()
            if live:
                index = rng.choice(live)
                service = self.instances[index]
                try:
                    assert service is not None
                    answer = httpx.post(service.url + "/webhook", json=update, headers=HEADERS, timeout=5)
                    if 200 <= answer.status_code < 300:
                        return index
                except (httpx.HTTPError, AssertionError):
                    pass
            time.sleep(0.05)
        raise AssertionError(f"no instance took update {update['update_id']} in time")

    def stop_all(self) -> None:
        for index, service in enumerate(self.instances):
            if service is not None and service.proc is not None and service.proc.poll() is None:
                if index in self.paused:
                    self.resume(index)
                service.kill()
            if service is not None:
                self.retired.append(service)

    def outputs(self) -> str:
        """Everything every instance printed."""
        return "".join(s.text for s in self.retired + [s for s in self.instances if s is not None])


def text(update_id: int, user_id: int, body: str) -> dict[str, Any]:
    """A private text message from `user_id`."""
    return {"update_id": update_id, "message": {
        "message_id": update_id, "date": int(time.time()), "text": body,
        "chat": {"id": user_id, "type": "private", "first_name": f"U{user_id}"},
        "from": {"id": user_id, "is_bot": False, "first_name": f"U{user_id}"}}}


def delivered_batches(make: MakeDouble) -> dict[str, dict[str, Any]]:
    """Every message_batch Make accepted, by event id (a repeat of one event is the same batch)."""
    batches: dict[str, dict[str, Any]] = {}
    for event in make.accepted():
        if event.get("event_type") == "message_batch":
            first = batches.setdefault(event["event_id"], event)
            assert [m["update_id"] for m in event["messages"]] == [m["update_id"] for m in first["messages"]], \
                f"event {event['event_id']} posted twice with different messages"
    return batches


def check_batches(make: MakeDouble, sent: dict[int, list[int]]) -> dict[str, int]:
    """Every update of `sent` (user -> their update ids in the order posted) is in exactly one delivered batch,
    and each user's batches reached Make (first deliveries) in the order the messages were posted. Returns
    counts to print."""
    batches = delivered_batches(make)
    where: dict[int, str] = {}
    for event_id, batch in batches.items():
        for message in batch["messages"]:
            assert message["update_id"] not in where, f"update {message['update_id']} in two batches"
            where[message["update_id"]] = event_id
    expected = {u for ids in sent.values() for u in ids}
    missing = expected - set(where)
    assert not missing, f"{len(missing)} acknowledged update(s) never reached Make: {sorted(missing)[:10]}"
    first_seen: dict[str, int] = {}
    for n, event in enumerate(make.accepted()):
        first_seen.setdefault(event["event_id"], n)
    for user, ids in sent.items():
        order = sorted({where[u] for u in ids}, key=first_seen.__getitem__)
        got = [m["update_id"] for event_id in order for m in batches[event_id]["messages"]]
        assert got == ids, f"user {user}: Make got {got}, posted {ids}"
    repeats = collections.Counter(e["event_id"] for e in make.accepted())
    return {"batches": len(batches), "repeated posts": sum(n - 1 for n in repeats.values())}
