"""Several gateway processes on one PostgreSQL, end to end: behind a load balancer in webhook mode, one poller
at a time in polling mode, an instance killed with batches open and calls in flight, and PostgreSQL restarted
under load."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from doubles import MakeDouble, TelegramDouble, wait_until
from postgres import PostgresServer
from several import HEADERS, Cluster, check_batches, text


@pytest.fixture
def cluster_env(service_env: dict[str, str], postgres_url: str) -> dict[str, str]:
    """Settings every instance shares: one database, short timings."""
    return {**service_env, "DATABASE_URL": postgres_url, "DEBOUNCE_SECONDS": "0.5", "MAX_WAIT_SECONDS": "3",
            "FLOOD_MAX_MESSAGES": "1000", "TYPING_MODE": "off", "LOG_LEVEL": "INFO", "MAKE_TIMEOUT_SECONDS": "2",
            "MAKE_RETRY_MAX_SECONDS": "0.5"}


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for cluster in made:
        cluster.stop_all()
        assert "AAHk3x-TESTtoken" not in cluster.outputs()


def webhook_cluster(clusters: list[Cluster], tmp_path: Path, env: dict[str, str], size: int) -> Cluster:
    cluster = Cluster(tmp_path, {**env, "WEBHOOK_URL": "https://gateway.example.test/webhook"}, size)
    clusters.append(cluster)
    return cluster.start_all()


def send_users(cluster: Cluster, users: range, per_user: int, first_id: int, seed: int,
               pick: list[int] | None = None) -> dict[int, list[int]]:
    """Each user posts `per_user` messages one after another (a thread per user), each to a random instance (of
    `pick`, if given) until one takes it; a fifth is posted again to another instance, as Telegram repeats an
    update whose answer it missed. Returns each user's update ids in the order posted."""
    sent: dict[int, list[int]] = {user: [] for user in users}
    deadline = time.monotonic() + 60

    def user_writes(user: int) -> None:
        rng = random.Random(seed * 1000 + user)
        for n in range(per_user):
            update_id = first_id + user * per_user + n
            update = text(update_id, user, f"u{user} m{n}")
            if pick is not None:
                live = Cluster(cluster.tmp_path, {}, 0)
                live.instances, live.paused = [cluster.instances[i] for i in pick], set()
                live.post(update, rng, deadline)
            else:
                cluster.post(update, rng, deadline)
            sent[user].append(update_id)
            if rng.random() < 0.2:
                cluster.post(update, rng, deadline)

    threads = [threading.Thread(target=user_writes, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return sent


def test_three_instances_behind_a_balancer_take_every_update_once(
        clusters: list[Cluster], tmp_path: Path, cluster_env: dict[str, str], make: MakeDouble) -> None:
    """Twelve users' messages spread over three instances (and some posted twice, to two of them): each update
    reaches Make once, in one batch, each user's in order, one call per chat at a time."""
    cluster = webhook_cluster(clusters, tmp_path, cluster_env, 3)
    sent = send_users(cluster, range(1, 13), 6, 10_000, seed=1)
    wait_until(lambda: sum(len(b["messages"]) for b in _batches(make)) >= 72, timeout=30, what="every batch")
    counts = check_batches(make, sent)
    assert make.overlapping_chats == [] and counts["repeated posts"] == 0
    for index in cluster.live():
        health = cluster.instances[index].health()  # type: ignore[union-attr]
        assert health["database"] == "postgresql" and health["status"] in ("ok", "degraded"), health


def test_an_instance_killed_with_batches_open_and_a_call_in_flight_loses_nothing(
        clusters: list[Cluster], tmp_path: Path, cluster_env: dict[str, str], make: MakeDouble) -> None:
    """Instance 0 holds open batches and a Make call when it is killed: another instance's sweep closes the
    batches (reason `restart`), and the call is posted again, with the same event id, once its lease runs out."""
    cluster = webhook_cluster(clusters, tmp_path, {**cluster_env, "DEBOUNCE_SECONDS": "1", "MAX_WAIT_SECONDS": "5"}, 3)
    rng = random.Random(2)
    deadline = time.monotonic() + 30
    arrived, held = threading.Event(), threading.Event()

    def hang_first_call(event: dict) -> None:  # user 1's first call hangs until instance 0 is dead
        if event.get("user_id") == 1 and not held.is_set():
            arrived.set()
            held.wait(30)
        return None

    make.reject_if = hang_first_call
    only_0 = Cluster(tmp_path, {}, 0)
    only_0.instances, only_0.paused = [cluster.instances[0]], set()
    only_0.post(text(1, 1, "in flight"), rng, deadline)
    assert arrived.wait(10), "user 1's batch never reached Make"
    for user in (2, 3, 4):
        only_0.post(text(user, user, f"open {user}"), rng, deadline)
    assert cluster.instances[0].health()["active_batches"] == 3  # type: ignore[union-attr]
    cluster.kill(0)
    held.set()
    # The sweep: deadline (1 s) plus its grace (5 s), every 2 s; the lease: 20 s after its last renewal.
    wait_until(lambda: {b["user_id"] for b in _batches(make)} >= {2, 3, 4}, timeout=20, what="the swept batches")
    assert {b["reason"] for b in _batches(make) if b["user_id"] != 1} == {"restart"}
    # The hung call is recorded once it is let go (its answer then finds instance 0 gone): the second is the new
    # claim's.
    wait_until(lambda: sum(e.get("user_id") == 1 for e in make.accepted()) >= 2, timeout=40,
               what="user 1's batch posted again")
    posts = [e for e in make.events if e.get("user_id") == 1]
    assert len({e["event_id"] for e in posts}) == 1 and len(posts) >= 2
    check_batches(make, {user: [user] for user in (1, 2, 3, 4)})


def test_one_instance_polls_and_another_takes_over_when_it_is_killed(
        clusters: list[Cluster], tmp_path: Path, cluster_env: dict[str, str], telegram: TelegramDouble,
        make: MakeDouble) -> None:
    """Three instances in polling mode: exactly one polls; killed, another polls within seconds; every update
    pushed before and after reaches Make once, and no two instances ever polled at once."""
    cluster = Cluster(tmp_path, cluster_env, 3)
    clusters.append(cluster)
    cluster.start_all()

    def pollers() -> list[int]:
        return [i for i in cluster.live() if cluster.instances[i].health()["polling"]]  # type: ignore[union-attr]

    first = wait_until(lambda: pollers(), timeout=15, what="an instance to poll")
    assert len(first) == 1
    for n in range(1, 6):
        telegram.push_update(text(n, 7, f"before {n}"))
    wait_until(lambda: sum(len(b["messages"]) for b in _batches(make)) == 5, timeout=15, what="the first updates")
    cluster.kill(first[0])
    killed_at = time.monotonic()
    second = wait_until(lambda: pollers(), timeout=15, what="another instance to poll")
    took = time.monotonic() - killed_at
    assert len(second) == 1 and second != first and took < 10
    for n in range(6, 11):
        telegram.push_update(text(n, 7, f"after {n}"))
    # If the first batch's delivery was not recorded before the kill, the chat's queue waits for its lease
    # (20 s after its last renewal): then it is posted again, with the same event id, and the next follows.
    wait_until(lambda: sum(len(b["messages"]) for b in _batches(make)) == 10, timeout=40, what="the later updates")
    check_batches(make, {7: list(range(1, 11))})
    # The killed poller's last long poll may be ended by its successor's first: that one alone.
    assert telegram.overlapping_polls <= 1
    for index in cluster.live():
        assert "another process is polling" not in cluster.instances[index].text  # type: ignore[union-attr]


def test_postgresql_restarted_under_load_loses_nothing_acknowledged(
        clusters: list[Cluster], tmp_path: Path, cluster_env: dict[str, str], make: MakeDouble,
        postgres_server: PostgresServer) -> None:
    """PostgreSQL stops at once (as on a crash) while updates keep coming: the instances answer 503 while it is
    down (Telegram keeps those), recover on their own when it is back, and every update they acknowledged is
    delivered."""
    cluster = webhook_cluster(clusters, tmp_path, cluster_env, 2)
    acknowledged: list[int] = []
    refused = 0
    stop = threading.Event()

    def sender() -> None:
        nonlocal refused
        update_id = 1
        while not stop.is_set():
            service = cluster.instances[update_id % 2]
            assert service is not None
            try:
                answer = httpx.post(service.url + "/webhook", json=text(update_id, 100 + update_id % 5, "x"),
                                    headers=HEADERS, timeout=15)
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 200:
                acknowledged.append(update_id)
                update_id += 1
            else:
                refused += 1
                time.sleep(0.05)

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        wait_until(lambda: len(acknowledged) >= 20, timeout=20, what="updates before the restart")
        postgres_server.stop("immediate")
        wait_until(lambda: refused >= 3, timeout=30, what="503s while PostgreSQL is down")
        during = len(acknowledged)
        postgres_server.start()
        wait_until(lambda: len(acknowledged) >= during + 20, timeout=40, what="updates taken again")
    finally:
        stop.set()
        thread.join(30)
    by_user: dict[int, list[int]] = {}
    for update_id in acknowledged:
        by_user.setdefault(100 + update_id % 5, []).append(update_id)
    wait_until(lambda: sum(len(b["messages"]) for b in _batches(make)) >= len(acknowledged), timeout=40,
               what="every acknowledged update delivered")
    check_batches(make, by_user)


def _batches(make: MakeDouble) -> list[dict]:
    """The distinct message_batch events Make accepted."""
    return list({e["event_id"]: e for e in make.accepted() if e.get("event_type") == "message_batch"}.values())


def test_an_invoice_is_sold_once_across_instances(
        clusters: list[Cluster], tmp_path: Path, cluster_env: dict[str, str], telegram: TelegramDouble,
        make: MakeDouble) -> None:
    """Two buyers' checkouts of one invoice reach two instances at the same moment: one is approved, the other
    told it is being paid; the payment, reaching a third instance (and again a second), is recorded once, with
    one event for Make and one notice for the admin; a later checkout of it is told it is paid."""
    cluster = webhook_cluster(clusters, tmp_path, {**cluster_env, "ADMIN_CHAT_ID": "999000"}, 3)

    def checkout(update_id: int, buyer: int) -> dict:
        return {"update_id": update_id, "pre_checkout_query": {
            "id": f"q{update_id}", "from": {"id": buyer, "is_bot": False, "first_name": f"B{buyer}"},
            "currency": "XTR", "total_amount": 5, "invoice_payload": "order-77"}}

    start = threading.Barrier(2)

    def post(index: int, update: dict) -> None:
        start.wait()
        service = cluster.instances[index]
        assert service is not None
        assert httpx.post(service.url + "/webhook", json=update, headers=HEADERS, timeout=10).status_code == 200

    threads = [threading.Thread(target=post, args=(0, checkout(1, 501))),
               threading.Thread(target=post, args=(1, checkout(2, 502)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    answers = wait_until(lambda: len(telegram.calls_of("answerPreCheckoutQuery")) == 2 and
                         telegram.calls_of("answerPreCheckoutQuery"), timeout=10, what="both checkouts answered")
    assert sorted(a["ok"] for a in answers) == [False, True]
    winner = next(a["pre_checkout_query_id"] for a in answers if a["ok"])
    buyer = 501 if winner == "q1" else 502
    paid = {"update_id": 3, "message": {
        "message_id": 3, "date": int(time.time()), "chat": {"id": buyer, "type": "private"},
        "from": {"id": buyer, "is_bot": False, "first_name": "B"},
        "successful_payment": {"currency": "XTR", "total_amount": 5, "invoice_payload": "order-77",
                               "telegram_payment_charge_id": "charge-77", "provider_payment_charge_id": ""}}}
    for index in (2, 1):  # Telegram sent it again, and the balancer chose another instance
        service = cluster.instances[index]
        assert service is not None
        assert httpx.post(service.url + "/webhook", json=paid, headers=HEADERS, timeout=10).status_code == 200
    wait_until(lambda: any(e.get("event_type") == "payment" for e in make.accepted()), timeout=15,
               what="the payment event")
    wait_until(lambda: telegram.calls_of("sendMessage"), timeout=15, what="the admin's notice")
    service = cluster.instances[0]
    assert service is not None
    assert httpx.post(service.url + "/webhook", json=checkout(4, 503), headers=HEADERS, timeout=10).status_code == 200
    late = wait_until(lambda: [a for a in telegram.calls_of("answerPreCheckoutQuery")
                               if a["pre_checkout_query_id"] == "q4"], timeout=10, what="the late checkout answered")
    assert late[0]["ok"] is False and late[0]["error_message"] == "Этот счёт уже оплачен."
    assert [e["event_id"] for e in make.accepted() if e.get("event_type") == "payment"] == ["payment-charge-77"]
    assert [m["chat_id"] for m in telegram.calls_of("sendMessage")] == [999000]
    assert all(s.health()["payments_recorded"] == 1 for s in cluster.instances if s is not None)
