"""Every setting of the gateway, read once from the environment (and `.env`), validated at start.

Only this module reads `os.environ`. `Config.from_env()` returns a frozen `Config` or raises one
`ConfigError` that lists every problem, each naming its variable.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Collection, Mapping
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

TYPING_MODES = ("simulate", "until_reply", "off")
REPLY_FORMATS = ("plain", "markdown", "html")  # how a reply text without its own format is read
MODES = ("polling", "webhook")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Update kinds Telegram can send besides `message`; any of them may be forwarded to Make.
FORWARDABLE_KINDS = (
    "message", "edited_message", "channel_post", "edited_channel_post", "business_connection",
    "business_message", "edited_business_message", "deleted_business_messages", "message_reaction",
    "message_reaction_count", "inline_query", "chosen_inline_result", "callback_query",
    "shipping_query", "purchased_paid_media", "poll", "poll_answer", "my_chat_member",
    "chat_member", "chat_join_request", "chat_boost", "removed_chat_boost",
)

# A bot token as @BotFather issues it: the bot's id (digits; 8-10 today, room to grow), ':', then a secret of
# letters, digits, '_' and '-' (35 today). telegram_api.redact() masks this same shape wherever it appears.
# ASCII digits only: `\d` would also take Arabic-Indic or fullwidth digits, which no token has.
BOT_TOKEN_SHAPE = r"[0-9]{3,20}:[A-Za-z0-9_-]{30,64}"
_TOKEN_RE = re.compile(rf"^{BOT_TOKEN_SHAPE}$")
# A secret shorter than this is not masked in printed lines: masking every "ab" would garble them and hide little.
MIN_SECRET_CHARS = 6
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
# What the service needs set; a CLI command may need less (`Config.from_env(requires=...)`).
REQUIRED = ("BOT_TOKEN", "MAKE_WEBHOOK_URL")
_REQUIRED_HINTS = {
    "BOT_TOKEN": "the token from @BotFather",
    "MAKE_WEBHOOK_URL": "your Make custom webhook URL",
    "WEBHOOK_URL": "the public https:// URL of POST /webhook",
}
_PROJECT = Path(__file__).resolve().parent


class ConfigError(Exception):
    """One or more settings are missing or invalid; `problems` lists each, naming its variable.

    `line` is set instead when one line says it all: `.env` cannot be read (not UTF-8, no permission), or
    (then also `no_dotenv`) nothing required was set and no `.env` file was found, where it looked and what
    to do, which is all a first run needs to read. `secrets` are the values read that must never be printed
    (the token, its secret part, the webhook secret, the reply token), for whoever prints this error."""

    def __init__(self, problems: list[str], no_dotenv: str | None = None, *, line: str | None = None,
                 secrets: tuple[str, ...] = ()) -> None:
        self.problems = problems
        self.no_dotenv = no_dotenv
        self.line = line or no_dotenv
        self.secrets = secrets
        super().__init__(self.line or "invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Config:
    """The gateway's settings; build it with `Config.from_env()` or `dataclasses.replace()`."""

    bot_token: str
    make_webhook_url: str
    admin_chat_id: int | None = None
    telegram_api_url: str = "https://api.telegram.org"
    mode: str = "polling"
    webhook_url: str = ""
    webhook_secret: str = ""
    host: str = "0.0.0.0"
    port: int = 5000
    http_threads: int = 32
    http_max_connections: int = 1000
    http_request_timeout_seconds: float = 10.0
    debounce_seconds: float = 4.0
    max_wait_seconds: float = 15.0
    max_batch_messages: int = 50
    flood_max_messages: int = 30
    flood_window_seconds: float = 60.0
    typing_mode: str = "simulate"
    typing_interval_seconds: float = 4.0
    typing_max_seconds: float = 120.0
    forward_update_kinds: tuple[str, ...] = ("callback_query",)
    make_timeout_seconds: float = 45.0
    make_retry_max_seconds: float = 30.0
    make_max_age_hours: float = 72.0
    make_max_concurrency: int = 50
    make_max_rate: float = 30.0
    make_delivery_workers: int | None = None  # deprecated name of make_max_concurrency; None: not set
    callback_answer_seconds: float = 5.0
    telegram_max_rate: float = 30.0
    telegram_chat_interval_seconds: float = 1.0
    poll_timeout_seconds: int = 30
    payment_hold_seconds: float = 30.0
    payment_check_with_make: bool = False
    payment_check_timeout_seconds: float = 3.0
    payment_auto_refund_stars: bool = False
    text_already_paid: str = "Этот счёт уже оплачен."
    text_payment_in_progress: str = "Этот счёт уже оплачивается. Попробуйте через минуту."
    text_payment_refused: str = "Оплата сейчас невозможна."
    text_admin_payment: str = "💰 Новая оплата"
    text_admin_duplicate_payment: str = "⚠️ Повторная оплата уже оплаченного счёта: нужен возврат"
    text_admin_refund: str = "↩️ Возврат платежа"
    text_admin_renewal: str = "🔁 Продление подписки"
    health_max_outbox_age_seconds: float = 300.0
    state_db: str = "data/state.sqlite3"
    database_url: str = ""  # postgresql://...: several instances share it (state_db is then not used)
    database_durability: str = "strict"
    reply_token: str = ""
    reply_format: str = "plain"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv_path: str | None = ".env",
                 overrides: Mapping[str, str] | None = None, *, uses: Collection[str] | None = None,
                 requires: Collection[str] = REQUIRED) -> "Config":
        """Read settings from `.env` (if present) overlaid by the environment, then by `overrides` (the sandbox's
        wiring); raise `ConfigError` listing every problem (or, when `.env` cannot be read, one `line` saying
        so). A command that reads only some settings names them in `uses` (None: all), so a setting it does not
        read can neither be missing nor stop it; `requires` are those that must be set."""
        values: dict[str, str] = {}
        found = bool(dotenv_path) and os.path.isfile(str(dotenv_path))
        environ = os.environ if environ is None else environ
        if found:
            try:
                values.update(read_dotenv(str(dotenv_path)))
            except ConfigError as err:  # what the environment holds must not be printed either
                raise ConfigError([], line=err.line, secrets=secret_values(environ)) from None
        values.update(environ)
        values.update(overrides or {})
        try:
            return _parse(values, uses, tuple(requires))
        except ConfigError as err:
            secrets = secret_values(values)
            if dotenv_path and not found and requires and not any(values.get(n, "").strip() for n in requires):
                raise ConfigError(err.problems, no_dotenv_line(str(dotenv_path), tuple(requires)),
                                  secrets=secrets) from None
            raise ConfigError(err.problems, secrets=secrets) from None

    def deprecations(self) -> list[str]:
        """One line per deprecated setting in use, for the log at start."""
        if self.make_delivery_workers is None:
            return []
        if self.make_delivery_workers != self.make_max_concurrency:
            return [f"MAKE_DELIVERY_WORKERS is deprecated and ignored: MAKE_MAX_CONCURRENCY="
                    f"{self.make_max_concurrency} is set; remove MAKE_DELIVERY_WORKERS"]
        return [f"MAKE_DELIVERY_WORKERS is deprecated: read as MAKE_MAX_CONCURRENCY={self.make_max_concurrency} "
                "(Make calls in flight at once); rename it"]

    def secrets(self) -> tuple[str, ...]:
        """Every value that must never be printed: the token (and its secret part), the webhook secret, the
        reply token and the database's password."""
        return (*_token_secrets(self.bot_token), self.webhook_secret, self.reply_token,
                *_url_passwords(self.database_url))

    def state_setting(self) -> str:
        """The setting that says where the state is, as error lines name it (`STATE_DB=path`, or the
        DATABASE_URL without its password)."""
        if self.database_url:
            return f"DATABASE_URL={shown_url(self.database_url)}"
        return f"STATE_DB={self.state_db}"

    def redacted(self) -> dict[str, object]:
        """Every setting by variable name, with secrets masked: safe to log or show."""
        shown: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "***"
            elif f.name == "database_url" and value:
                value = shown_url(str(value))
            shown[f.name.upper()] = value
        return shown


_SECRET_FIELDS = {"bot_token", "webhook_secret", "reply_token"}


def _token_secrets(token: str) -> tuple[str, ...]:
    # The whole token and the part after ':' (the secret itself, which shows alone where the id is mangled).
    secret = token.partition(":")[2].strip()
    return tuple(s for s in (token, secret) if s)


def secret_values(values: Mapping[str, str]) -> tuple[str, ...]:
    """The secret settings among raw `values` (valid or not): what no printed line may hold."""
    found = [*_token_secrets(values.get("BOT_TOKEN", "").strip())]
    found += [values.get(name, "").strip() for name in ("WEBHOOK_SECRET", "REPLY_TOKEN")]
    found += _url_passwords(values.get("DATABASE_URL", "").strip())
    return tuple(s for s in found if s)


def _conninfo(url: str) -> dict[str, str] | None:
    """DATABASE_URL read as libpq reads it (a URL or `key=value` pairs), or None if it cannot be read."""
    try:
        from psycopg.conninfo import conninfo_to_dict  # only a PostgreSQL deployment loads psycopg
        return {key: str(value) for key, value in conninfo_to_dict(url).items()}
    except Exception:  # noqa: BLE001 - ProgrammingError for a string libpq refuses (its text repeats the string)
        return None


def _url_passwords(url: str) -> tuple[str, ...]:
    """Every form of the password in DATABASE_URL that a line might show: the one libpq reads, and, for a URL
    whose password holds characters it should have encoded ('@', '/', '#', '?'), what the writer meant and the
    pieces libpq may then show as a host or a database name."""
    info = _conninfo(url) or {}
    found = [info.get("password", "")]
    rest = url.partition("://")[2]
    credentials = rest.partition("?")[0].rpartition("@")[0]  # up to the last '@' before the options
    meant = credentials.partition(":")[2]
    found += [meant, *re.split(r"[@/#?]", meant), *re.findall(r"(?:^|[?&])password=([^&]*)", rest)]
    return tuple({form for p in found for form in (p, unquote(p))} - {""})


def shown_url(url: str) -> str:
    """DATABASE_URL fit to print: user, host, port and database as libpq reads them, never the password (nor
    the options, which may carry one)."""
    info = _conninfo(url)
    if info is None:
        return "(not shown: PostgreSQL cannot read it)"
    user = info.get("user", "")
    credentials = f"{user}:***@" if info.get("password") else (f"{user}@" if user else "")
    shown = f"{info.get('host', '')}" + (f":{info['port']}" if info.get("port") else "") + f"/{info.get('dbname', '')}"
    for piece in sorted(_url_passwords(url), key=len, reverse=True):  # a password libpq read partly as a host
        if len(piece) >= 3:
            shown = shown.replace(piece, "***")
    return f"postgresql://{credentials}{shown}"


def read_dotenv(path: str) -> dict[str, str]:
    """The settings in the `.env` file at `path`; a `ConfigError` whose `line` names the file and why it cannot
    be read (no permission, not UTF-8 text, binary). A UTF-8 byte order mark at its start is ignored."""
    where = Path(path).resolve()
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        reason = "permission denied" if isinstance(err, PermissionError) else (err.strerror or str(err))
        raise ConfigError([], line=f"cannot read {where}: {reason}; make it readable by this user, or set the "
                                   "settings in the environment") from None
    try:
        # utf-8-sig: Windows editors start a UTF-8 file with a byte order mark, which would glue onto the
        # first name (`\ufeffBOT_TOKEN`).
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError([], line=f"{where} is not UTF-8 text (byte {err.start + 1} cannot be read): save it "
                                   "as UTF-8 (the settings are plain ASCII; a text in another language needs "
                                   "UTF-8)") from None
    if "\x00" in text:
        raise ConfigError([], line=f"{where} is not a text file (it holds NUL bytes): it should hold lines "
                                   "like BOT_TOKEN=..., as in .env.example") from None
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


def derive_webhook_secret(bot_token: str) -> str:
    """A stable secret for `setWebhook` derived from the token (hex, so Telegram accepts it)."""
    return hmac.new(bot_token.encode(), b"telegram-make-gateway webhook secret", hashlib.sha256).hexdigest()


def no_dotenv_line(dotenv_path: str, requires: tuple[str, ...]) -> str:
    """The one line for a start with nothing set and no `.env`: where it looked, and what to do."""
    looked = Path(dotenv_path).resolve()
    names = " and ".join(requires)
    example = _PROJECT / ".env.example"
    copy = ".env.example" if example.parent == looked.parent else str(example)
    line = (f"no .env file at {looked}, and {names} {'is' if len(requires) == 1 else 'are'} not set: copy {copy} "
            f"to {looked} and fill in {names} (or set {'it' if len(requires) == 1 else 'them'} in the environment)")
    beside = _PROJECT / ".env"
    if beside != looked and beside.is_file():
        line += f"; a .env is at {beside}: run python app.py from {_PROJECT}, where it is read"
    return line


def token_problem(token: str) -> str | None:
    """What is wrong with `token` as a bot token, or None; never repeats the token."""
    if _TOKEN_RE.match(token):
        return None
    expected = ("expected what @BotFather gives: the bot's id (digits), ':', then 30-64 letters, digits, "
                "'_' or '-', e.g. 123456789:AAH...")
    if len(token) > 1 and token[0] in "\"'" and token[-1] == token[0]:
        return f"BOT_TOKEN is wrapped in quotes; give the token alone ({expected})"
    if token.lower().startswith("bot") and _TOKEN_RE.match(token[3:]):
        return f"BOT_TOKEN starts with 'bot' (that belongs to the API URL); give the token alone ({expected})"
    if "#" in token:  # `BOT_TOKEN=123:abc# my bot`: .env reads a comment only after a space
        return (f"BOT_TOKEN has a '#' in it: a comment after a value needs a space before the '#', or a line of "
                f"its own ({expected})")
    if any(c.isspace() for c in token):
        return f"BOT_TOKEN contains spaces; {expected}"
    return f"BOT_TOKEN does not look like a bot token: {expected}"


def _parse(env: Mapping[str, str], uses: Collection[str] | None = None,
           requires: tuple[str, ...] = REQUIRED) -> Config:
    found: list[tuple[str, str]] = []  # (variable, problem): only those of variables in `uses` are reported

    def problem(name: str, text: str) -> None:
        found.append((name, text))

    def get(name: str, default: str = "") -> str:
        return env.get(name, default).strip()

    secrets = secret_values(env)

    def said(name: str, raw: str) -> str:
        """`NAME='value'` for a problem line, unless the value holds a secret: then the name alone."""
        if any(secret in raw for secret in secrets if len(secret) >= MIN_SECRET_CHARS):
            return f"{name} (its value holds BOT_TOKEN or another secret, so it is not shown)"
        return f"{name}={raw!r}"

    def flag(name: str) -> bool:
        raw = get(name).lower()
        if raw in ("", "0", "false", "no", "off"):
            return False
        if raw in ("1", "true", "yes", "on"):
            return True
        problem(name, f"{said(name, raw)} must be true or false")
        return False

    def number(name: str, default: float, kind: Callable[[str], float], low: float, high: float) -> float:
        raw = get(name)
        if raw == "":
            return default
        try:
            value = kind(raw)
        except ValueError:
            problem(name, f"{said(name, raw)} is not a {'whole ' if kind is int else ''}number")
            return default
        if not low <= value <= high:
            problem(name, f"{said(name, raw)} must be between {low:g} and {high:g}")
            return default
        return value

    for name in requires:
        if not get(name):
            problem(name, f"{name} is required ({_REQUIRED_HINTS.get(name, 'see .env.example')})")

    token = get("BOT_TOKEN")
    bad_token = token_problem(token) if token else None
    if bad_token:
        problem("BOT_TOKEN", bad_token)
        token = ""  # a command that does not use it must not use it by accident either

    make_url = get("MAKE_WEBHOOK_URL")
    if make_url and not _is_http_url(make_url):
        problem("MAKE_WEBHOOK_URL", f"{said('MAKE_WEBHOOK_URL', make_url)} is not an http(s) URL")

    admin_raw = get("ADMIN_CHAT_ID")
    admin_chat_id: int | None = None
    if admin_raw:
        try:
            admin_chat_id = int(admin_raw)
        except ValueError:
            problem("ADMIN_CHAT_ID", f"{said('ADMIN_CHAT_ID', admin_raw)} is not a chat id (an integer)")

    api_url = (get("TELEGRAM_API_URL") or Config.telegram_api_url).rstrip("/")
    if any(secret in api_url for secret in _token_secrets(get("BOT_TOKEN"))):
        # A common slip: the URL of a tutorial's request (https://api.telegram.org/bot<token>/getMe) pasted whole.
        problem("TELEGRAM_API_URL", "TELEGRAM_API_URL holds the bot token (not shown): give only the Bot API "
                                    "server, e.g. https://api.telegram.org; the gateway adds /bot<BOT_TOKEN>/ itself")
    elif not _is_http_url(api_url):
        problem("TELEGRAM_API_URL", f"{said('TELEGRAM_API_URL', api_url)} is not an http(s) URL")

    webhook_url = get("WEBHOOK_URL")
    if webhook_url and urlsplit(webhook_url).scheme != "https":
        problem("WEBHOOK_URL",
                f"{said('WEBHOOK_URL', webhook_url)} must be an https:// URL (Telegram calls only HTTPS)")
    elif webhook_url and not urlsplit(webhook_url).hostname:
        problem("WEBHOOK_URL", f"{said('WEBHOOK_URL', webhook_url)} has no host")

    mode = get("MODE").lower() or ("webhook" if webhook_url else "polling")
    if mode not in MODES:
        problem("MODE", f"{said('MODE', mode)} must be one of {', '.join(MODES)}")
    elif mode == "webhook" and not webhook_url:
        problem("MODE", "MODE=webhook needs WEBHOOK_URL (the public https:// URL of POST /webhook)")

    secret = get("WEBHOOK_SECRET")
    if secret and not _SECRET_RE.match(secret):
        problem("WEBHOOK_SECRET", "WEBHOOK_SECRET must be 1-256 characters of A-Z a-z 0-9 _ - (Telegram's rule)")
    if not secret and token:
        secret = derive_webhook_secret(token)

    host = get("HOST") or Config.host
    port = int(number("PORT", Config.port, int, 0, 65535))
    http_threads = int(number("HTTP_THREADS", Config.http_threads, int, 1, 256))
    http_connections = int(number("HTTP_MAX_CONNECTIONS", Config.http_max_connections, int, 1, 100000))
    http_request_timeout = number("HTTP_REQUEST_TIMEOUT_SECONDS", Config.http_request_timeout_seconds, float, 0.1, 300)
    before = len(found)
    debounce = number("DEBOUNCE_SECONDS", Config.debounce_seconds, float, 0.01, 3600)
    max_wait = number("MAX_WAIT_SECONDS", Config.max_wait_seconds, float, 0.01, 86400)
    if len(found) == before and max_wait < debounce:
        problem("MAX_WAIT_SECONDS",
                f"MAX_WAIT_SECONDS ({max_wait:g}) must not be shorter than DEBOUNCE_SECONDS ({debounce:g})")
    max_batch = int(number("MAX_BATCH_MESSAGES", Config.max_batch_messages, int, 1, 1000))
    flood_max = int(number("FLOOD_MAX_MESSAGES", Config.flood_max_messages, int, 1, 100000))
    flood_window = number("FLOOD_WINDOW_SECONDS", Config.flood_window_seconds, float, 0.1, 86400)

    typing_mode = get("TYPING_MODE").lower() or Config.typing_mode
    if typing_mode not in TYPING_MODES:
        problem("TYPING_MODE", f"{said('TYPING_MODE', typing_mode)} must be one of {', '.join(TYPING_MODES)}")
    typing_interval = number("TYPING_INTERVAL_SECONDS", Config.typing_interval_seconds, float, 0.5, 5.0)
    typing_max = number("TYPING_MAX_SECONDS", Config.typing_max_seconds, float, 1, 3600)

    kinds_raw = get("FORWARD_UPDATE_KINDS", ",".join(Config.forward_update_kinds))
    kinds = tuple(k.strip() for k in kinds_raw.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FORWARDABLE_KINDS]
    if unknown:
        problem("FORWARD_UPDATE_KINDS", f"FORWARD_UPDATE_KINDS has unknown kinds: {', '.join(unknown)}")

    make_timeout = number("MAKE_TIMEOUT_SECONDS", Config.make_timeout_seconds, float, 1, 600)
    retry_max = number("MAKE_RETRY_MAX_SECONDS", Config.make_retry_max_seconds, float, 0.1, 3600)
    max_age = number("MAKE_MAX_AGE_HOURS", Config.make_max_age_hours, float, 0.001, 24 * 365)
    concurrency = int(number("MAKE_MAX_CONCURRENCY", Config.make_max_concurrency, int, 1, 1000))
    workers: int | None = None
    if get("MAKE_DELIVERY_WORKERS"):  # the old name stays valid: read as MAKE_MAX_CONCURRENCY unless that is set
        workers = int(number("MAKE_DELIVERY_WORKERS", 0, int, 1, 1000))
        if not get("MAKE_MAX_CONCURRENCY"):
            concurrency = workers
    max_rate = number("MAKE_MAX_RATE", Config.make_max_rate, float, 0, 1000)
    if 0 < max_rate < 0.1:
        problem("MAKE_MAX_RATE", f"MAKE_MAX_RATE={max_rate:g} is below 0.1 calls a second; 0 turns pacing off")
    # Telegram refuses an answer to a button press 10-15 s after the press: a later fallback would be refused.
    callback_answer_seconds = number("CALLBACK_ANSWER_SECONDS", Config.callback_answer_seconds, float, 0, 10)
    # Telegram's Bot FAQ: about 30 messages a second overall, about 1 a second per chat.
    telegram_rate = number("TELEGRAM_MAX_RATE", Config.telegram_max_rate, float, 0, 1000)
    if 0 < telegram_rate < 0.1:
        problem("TELEGRAM_MAX_RATE",
                f"TELEGRAM_MAX_RATE={telegram_rate:g} is below 0.1 messages a second; 0 turns pacing off")
    chat_interval = number("TELEGRAM_CHAT_INTERVAL_SECONDS", Config.telegram_chat_interval_seconds, float, 0, 60)
    poll_timeout = int(number("POLL_TIMEOUT_SECONDS", Config.poll_timeout_seconds, int, 1, 50))
    hold = number("PAYMENT_HOLD_SECONDS", Config.payment_hold_seconds, float, 1, 3600)
    check_with_make = flag("PAYMENT_CHECK_WITH_MAKE")
    check_timeout = number("PAYMENT_CHECK_TIMEOUT_SECONDS", Config.payment_check_timeout_seconds, float, 0.5, 5)
    auto_refund = flag("PAYMENT_AUTO_REFUND_STARS")
    texts = {
        "text_already_paid": get("TEXT_ALREADY_PAID"),
        "text_payment_in_progress": get("TEXT_PAYMENT_IN_PROGRESS"),
        "text_payment_refused": get("TEXT_PAYMENT_REFUSED"),
        "text_admin_payment": get("TEXT_ADMIN_PAYMENT"),
        "text_admin_duplicate_payment": get("TEXT_ADMIN_DUPLICATE_PAYMENT"),
        "text_admin_refund": get("TEXT_ADMIN_REFUND"),
        "text_admin_renewal": get("TEXT_ADMIN_RENEWAL"),
    }
    texts = {name: value or getattr(Config, name) for name, value in texts.items()}
    for name in ("text_already_paid", "text_payment_in_progress", "text_payment_refused"):
        if len(texts[name]) > 255:
            problem(name.upper(), f"{name.upper()} is too long for Telegram's error_message (255 characters at most)")

    outbox_age_alert = number("HEALTH_MAX_OUTBOX_AGE_SECONDS", Config.health_max_outbox_age_seconds, float, 1,
                              7 * 86400)
    state_db = get("STATE_DB") or Config.state_db
    database_url = get("DATABASE_URL")
    if database_url and _conninfo(database_url) is None:
        problem("DATABASE_URL", "DATABASE_URL (not shown: it may hold a password) is not a PostgreSQL connection "
                                "string: give postgresql://user:password@host:5432/database (or leave it empty: "
                                "one SQLite file, STATE_DB)")
    durability = get("DATABASE_DURABILITY").lower() or Config.database_durability
    if durability not in ("strict", "relaxed"):
        problem("DATABASE_DURABILITY", f"{said('DATABASE_DURABILITY', durability)} must be strict (the default: "
                                       "refuse a PostgreSQL that may lose commits) or relaxed")
    reply_token = get("REPLY_TOKEN")
    reply_format = get("REPLY_FORMAT").lower() or Config.reply_format
    if reply_format not in REPLY_FORMATS:
        problem("REPLY_FORMAT", f"{said('REPLY_FORMAT', reply_format)} must be one of {', '.join(REPLY_FORMATS)}")
    log_level = get("LOG_LEVEL").upper() or Config.log_level
    if log_level not in LOG_LEVELS:
        problem("LOG_LEVEL", f"{said('LOG_LEVEL', log_level)} must be one of {', '.join(LOG_LEVELS)}")
        log_level = Config.log_level  # every command logs: a level logging refuses must never reach it

    problems = [text for name, text in found if uses is None or name in uses]
    if problems:
        raise ConfigError(problems)
    return Config(
        bot_token=token, make_webhook_url=make_url, admin_chat_id=admin_chat_id,
        telegram_api_url=api_url, mode=mode, webhook_url=webhook_url, webhook_secret=secret,
        host=host, port=port, http_threads=http_threads, http_max_connections=http_connections,
        http_request_timeout_seconds=http_request_timeout, debounce_seconds=debounce,
        max_wait_seconds=max_wait, max_batch_messages=max_batch, flood_max_messages=flood_max,
        flood_window_seconds=flood_window, typing_mode=typing_mode,
        typing_interval_seconds=typing_interval, typing_max_seconds=typing_max,
        forward_update_kinds=kinds, make_timeout_seconds=make_timeout,
        make_retry_max_seconds=retry_max, make_max_age_hours=max_age,
        make_max_concurrency=concurrency, make_max_rate=max_rate, make_delivery_workers=workers,
        callback_answer_seconds=callback_answer_seconds, telegram_max_rate=telegram_rate,
        telegram_chat_interval_seconds=chat_interval, poll_timeout_seconds=poll_timeout,
        payment_hold_seconds=hold, payment_check_with_make=check_with_make,
        payment_check_timeout_seconds=check_timeout, payment_auto_refund_stars=auto_refund, **texts,
        health_max_outbox_age_seconds=outbox_age_alert, state_db=state_db, database_url=database_url,
        database_durability=durability, reply_token=reply_token,
        reply_format=reply_format, log_level=log_level,
    )


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)
