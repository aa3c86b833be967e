"""The `telegram-poller` thread: long-polls `getUpdates` and confirms an offset only after storing."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from retry import BackoffPolicy, backoff
from router import UpdateRouter
from store import StoreError
from telegram_api import Conflict, InvalidToken, RetryAfter, TelegramClient, TelegramError
from updates import is_int

log = logging.getLogger("gateway.polling")

# Some Bot API servers answer at once with nothing, whatever the timeout: pause so the loop cannot spin.
_EMPTY_ANSWER_PAUSE = 0.5
# How often an instance standing by asks for the poller's turn (one that polls asks before every getUpdates).
STANDBY_SECONDS = 1.0


class Poller:
    """Receives updates by long polling and hands each to the router."""

    def __init__(self, client: TelegramClient, router: UpdateRouter, *, timeout: int = 30,
                 allowed_updates: list[str] | None = None,
                 policy: BackoffPolicy = BackoffPolicy(initial=1.0, maximum=60.0, jitter=1.0),
                 turn: Callable[[], bool] = lambda: True) -> None:
        """`turn()` says whether this process may poll now (several instances on one database: only the one
        holding the poller lock; the others stand by and ask again every second)."""
        self._client = client
        self._router = router
        self._timeout = timeout
        self._allowed = allowed_updates
        self._policy = policy
        self._offset: int | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.last_ok_at: float | None = None
        self._turn = turn
        self.polling = False  # this instance holds the poller's turn (else it stands by)

    def start(self) -> None:
        """Start the `telegram-poller` thread."""
        self._thread = threading.Thread(target=self._run, name="telegram-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling (the current long poll is abandoned; its updates are not confirmed). Safe twice."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """True while the poller thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        self._until_done("deleteWebhook", self._client.delete_webhook)
        failures = 0
        while not self._stopping.is_set():
            try:
                if not self._take_turn():
                    self._stopping.wait(STANDBY_SECONDS)
                    continue
                started = time.monotonic()
                updates = self._client.get_updates(self._offset, self._timeout, 100, self._allowed)
                self.last_ok_at, self.last_error, failures = time.time(), None, 0
                self._take(updates)
                if not updates and time.monotonic() - started < self._timeout / 2:
                    self._stopping.wait(_EMPTY_ANSWER_PAUSE)
                continue
            except Conflict as err:
                failures += 1
                if "webhook" in err.description.lower():
                    self._explain(err, "a webhook is set for this bot; removing it so polling can work")
                    self._until_done("deleteWebhook", self._client.delete_webhook)
                else:
                    self._explain(err, "another process is polling with this bot token; stop it "
                                       "(only one poller per bot can run)")
                delay = backoff(failures, self._policy)
            except RetryAfter as err:
                delay = err.retry_after
                self._explain(err, f"Telegram asks to wait {delay:.0f} s")
            except InvalidToken as err:
                failures += 1
                self._explain(err, "Telegram rejects BOT_TOKEN; check it with @BotFather")
                delay = self._policy.maximum
            except TelegramError as err:
                failures += 1
                delay = backoff(failures, self._policy)
                self._explain(err, f"Telegram unreachable; retrying in {delay:.1f} s")
            except StoreError as err:
                failures += 1
                delay = backoff(failures, self._policy)
                self._explain(err, "updates not stored, so not confirmed; Telegram keeps them")
            except Exception as err:
                failures += 1
                delay = backoff(failures, self._policy)
                log.exception("polling pass failed")
                self.last_error = type(err).__name__
            self._stopping.wait(delay)

    def _take_turn(self) -> bool:
        """Whether this instance polls now; says so in the log when that changes."""
        try:
            mine = self._turn()
        except Exception:  # noqa: BLE001 - no turn is certain: stand by, ask again
            log.exception("polling: cannot tell whose turn it is to poll; standing by")
            mine = False
        if mine != self.polling:
            self.polling = mine
            log.info("polling: %s", "this instance polls Telegram now" if mine else
                     "another instance polls Telegram; standing by to take over")
        return mine

    def _take(self, updates: list[Any]) -> None:
        """Store each update, moving the offset past it only once it is stored."""
        for update in updates:
            update_id = update.get("update_id") if isinstance(update, dict) else None
            self._router.handle(update)  # raises StoreError: the offset stays, Telegram resends
            if is_int(update_id):
                self._offset = update_id + 1  # ids are not always rising (Telegram may restart them)

    def _until_done(self, what: str, call: Any) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                call()
                return
            except TelegramError as err:
                failures += 1
                self._explain(err, f"{what} failed; retrying")
                self._stopping.wait(backoff(failures, self._policy))

    def _explain(self, err: Exception, advice: str) -> None:
        self.last_error = f"{err} ({advice})"
        log.warning("polling: %s: %s", advice, err)
