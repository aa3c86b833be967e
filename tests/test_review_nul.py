

def test_polling_stuck_behind_a_nul_payload(tmp_path: Path, service_env: dict, telegram: TelegramDouble,
                                            make: MakeDouble, postgres_url: str) -> None:
    """Polling mode on PostgreSQL: one pre_checkout_query whose payload holds a NUL, then ordinary messages from
    other users: the poller retries the first update for ever, nothing after it is ever stored."""
    env = {**service_env, "DATABASE_URL": postgres_url, "LOG_LEVEL": "INFO", "TYPING_MODE": "off",
           "DEBOUNCE_SECONDS": "0.3"}
    cluster = Cluster(tmp_path, env, 1)
    try:
        svc = cluster.start(0)
        telegram.push_update(precheckout(1, "order\x00x"))
        for n in range(2, 7):
            telegram.push_update(text(n, 100 + n, f"hello {n}"))
        time.sleep(20)
        health = svc.health()
        print("polling: Make got", len(make.events), "events; health last_update_id", health.get("last_update_id"),
              "status", health.get("status"), "problems", health.get("problems"))
        print([l for l in svc.text.splitlines() if "not stored" in l or "polling:" in l][-2:])
        assert len(make.events) >= 5
    finally:
        cluster.stop_all()
