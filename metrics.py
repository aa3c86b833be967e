"""Prometheus metrics of one gateway, in a registry of its own (so several apps can live in one test run)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class GatewayMetrics:
    """The counters, histograms and gauges `GET /metrics` serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.updates = Counter("gateway_updates_total", "Updates received, by kind and what became of them",
                               ["kind", "outcome"], registry=r)
        self.flood_held = Counter("gateway_flood_held_total", "Messages held back by flood control", registry=r)
        self.batches_closed = Counter("gateway_batches_closed_total", "Batches closed, by reason", ["reason"],
                                      registry=r)
        self.batch_size = Histogram("gateway_batch_size_messages", "Messages per closed batch",
                                    buckets=(1, 2, 3, 5, 10, 20, 50, 100), registry=r)
        self.deliveries = Counter("gateway_make_deliveries_total", "Attempts to deliver an event to Make, by outcome",
                                  ["outcome"], registry=r)
        self.delivery_seconds = Histogram("gateway_make_delivery_seconds", "Time Make took to answer", registry=r)
        self.batch_age = Histogram("gateway_batch_age_seconds", "Time from a batch's first message to its closing",
                                   buckets=(1, 2, 4, 8, 15, 30, 60, 300), registry=r)
        self.telegram_calls = Counter("gateway_telegram_calls_total",
                                      "Bot API requests by method and outcome (ok, RetryAfter for 429s, ...)",
                                      ["method", "outcome"], registry=r)

        self.chat_unreachable = Counter("gateway_chat_unreachable_total",
                                        "Messages not sent because the user blocked the bot or the chat is gone",
                                        ["method"], registry=r)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is read at scrape time (NaN when it cannot be read, e.g. a locked store)."""
        def safe() -> float:
            try:
                return read()
            except Exception:  # a scrape must not fail because one value is unavailable
                return float("nan")

        Gauge(name, documentation, registry=self.registry).set_function(safe)

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
