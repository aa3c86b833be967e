"""config.py: settings from the environment and `.env`, defaults, every problem reported at once, secrets masked."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from config import Config, ConfigError, derive_webhook_secret
from doubles import TOKEN

ROOT = Path(__file__).resolve().parent.parent
MAKE_URL = "https://hook.eu1.make.com/abcdefghijklmnop"
REQUIRED = {"BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": MAKE_URL}
TELEGRAM_SECRET = re.compile(r"^[A-Za-z0-9_-]{1,256}$")  # setWebhook's secret_token rule


def load(**env: str) -> Config:
    """A Config from exactly these variables, with no `.env` file."""
    return Config.from_env(environ={**REQUIRED, **env}, dotenv_path=None)


def problems_of(env: dict[str, str]) -> list[str]:
    """The problems `ConfigError` lists for `env`."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ=env, dotenv_path=None)
    assert caught.value.problems, "a ConfigError must list its problems"
    for problem in caught.value.problems:
        assert problem in str(caught.value)
    return caught.value.problems


def test_defaults_follow_the_contract() -> None:
    """With only the two required variables every setting takes the contract's default."""
    config = load()
    assert config.bot_token == TOKEN
    assert config.make_webhook_url == MAKE_URL
    assert config.admin_chat_id is None
    assert config.telegram_api_url == "https://api.telegram.org"
    assert config.mode == "polling"
    assert config.webhook_url == ""
    assert (config.host, config.port) == ("0.0.0.0", 5000)
    assert config.debounce_seconds == 4
    assert config.max_wait_seconds == 15
    assert config.max_batch_messages == 50
    assert (config.flood_max_messages, config.flood_window_seconds) == (30, 60)
    assert config.typing_mode == "simulate"
    assert config.make_retry_max_seconds == 30
    assert config.make_max_age_hours == 72
    assert config.payment_hold_seconds == 30
    assert config.state_db == "data/state.sqlite3"
    assert config.reply_token == ""
    assert config.log_level == "INFO"
    assert config.webhook_secret == derive_webhook_secret(TOKEN)
    assert (config.make_max_concurrency, config.make_max_rate, config.callback_answer_seconds) == (50, 30, 5)
    assert (config.telegram_max_rate, config.telegram_chat_interval_seconds) == (30, 1)
    assert config.make_delivery_workers is None and config.deprecations() == []


def test_settings_are_read_and_typed() -> None:
    """Given values are parsed into their types, surrounding spaces ignored."""
    config = load(ADMIN_CHAT_ID=" -100123 ", DEBOUNCE_SECONDS="0.5", MAX_WAIT_SECONDS="20",
                  MAX_BATCH_MESSAGES="10", PORT="8080", TYPING_MODE="until_reply",
                  FORWARD_UPDATE_KINDS="callback_query, edited_message", TELEGRAM_API_URL="http://127.0.0.1:8081/")
    assert config.admin_chat_id == -100123
    assert config.debounce_seconds == 0.5 and config.max_wait_seconds == 20
    assert config.max_batch_messages == 10 and config.port == 8080
    assert config.typing_mode == "until_reply"
    assert config.forward_update_kinds == ("callback_query", "edited_message")
    assert config.telegram_api_url == "http://127.0.0.1:8081"


def test_webhook_url_selects_webhook_mode() -> None:
    """Setting WEBHOOK_URL without MODE runs in webhook mode."""
    config = load(WEBHOOK_URL="https://gateway.example.com/webhook")
    assert config.mode == "webhook"
    assert config.webhook_url == "https://gateway.example.com/webhook"


def test_config_is_frozen_and_replaceable() -> None:
    """A Config cannot be changed in place; tests vary it with dataclasses.replace."""
    config = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.debounce_seconds = 1  # type: ignore[misc]
    assert dataclasses.replace(config, debounce_seconds=0.2).debounce_seconds == 0.2


def test_every_problem_is_reported_at_once_naming_its_variable() -> None:
    """One ConfigError lists every bad setting, each problem naming its variable."""
    env = {
        "BOT_TOKEN": "not-a-token",
        "WEBHOOK_URL": "http://gateway.example.com/webhook",
        "WEBHOOK_SECRET": "has spaces and $ymbols!",
        "DEBOUNCE_SECONDS": "-1",
        "TYPING_MODE": "sometimes",
        "FORWARD_UPDATE_KINDS": "callback_query,telepathy",
    }
    problems = problems_of(env)
    for name in ("BOT_TOKEN", "MAKE_WEBHOOK_URL", "WEBHOOK_URL", "WEBHOOK_SECRET", "DEBOUNCE_SECONDS",
                 "TYPING_MODE", "FORWARD_UPDATE_KINDS"):
        assert any(re.search(rf"\b{name}\b", p) for p in problems), f"no problem names {name}: {problems}"
    assert any("telepathy" in p for p in problems)


@pytest.mark.parametrize("name,value", [
    ("BOT_TOKEN", ""),
    ("BOT_TOKEN", "123:short"),
    ("BOT_TOKEN", "abc:AAHk3x-TESTtokenTESTtokenTESTtoken_x9"),
    ("MAKE_WEBHOOK_URL", ""),
    ("MAKE_WEBHOOK_URL", "hook.eu1.make.com/abc"),
    ("WEBHOOK_URL", "http://gateway.example.com/webhook"),
    ("WEBHOOK_SECRET", "with space"),
    ("WEBHOOK_SECRET", "x" * 257),
    ("DEBOUNCE_SECONDS", "-1"),
    ("DEBOUNCE_SECONDS", "soon"),
    ("MAX_BATCH_MESSAGES", "2.5"),
    ("PORT", "70000"),
    ("TYPING_MODE", "sometimes"),
    ("FORWARD_UPDATE_KINDS", "telepathy"),
    ("ADMIN_CHAT_ID", "@admin"),
    ("MODE", "carrier-pigeon"),
    ("LOG_LEVEL", "LOUD"),
    ("MAKE_MAX_CONCURRENCY", "0"),
    ("MAKE_MAX_CONCURRENCY", "many"),
    ("MAKE_MAX_RATE", "-1"),
    ("MAKE_DELIVERY_WORKERS", "0"),
    ("CALLBACK_ANSWER_SECONDS", "11"),
    ("MAKE_MAX_RATE", "1e-12"),
    ("TELEGRAM_MAX_RATE", "-1"),
    ("TELEGRAM_MAX_RATE", "0.01"),
    ("TELEGRAM_MAX_RATE", "nan"),
    ("TELEGRAM_CHAT_INTERVAL_SECONDS", "-0.5"),
    ("TELEGRAM_CHAT_INTERVAL_SECONDS", "61"),
])
def test_each_bad_setting_is_refused_by_name(name: str, value: str) -> None:
    """A single bad variable gives a ConfigError whose problem names that variable."""
    problems = problems_of({**REQUIRED, name: value})
    assert any(name in p for p in problems), problems


def test_max_wait_shorter_than_debounce_is_refused() -> None:
    """MAX_WAIT_SECONDS below DEBOUNCE_SECONDS is a problem naming both variables."""
    problems = problems_of({**REQUIRED, "DEBOUNCE_SECONDS": "10", "MAX_WAIT_SECONDS": "5"})
    assert any("MAX_WAIT_SECONDS" in p and "DEBOUNCE_SECONDS" in p for p in problems), problems


def test_webhook_mode_without_webhook_url_is_refused() -> None:
    """MODE=webhook with no WEBHOOK_URL cannot work, and says so."""
    problems = problems_of({**REQUIRED, "MODE": "webhook"})
    assert any("WEBHOOK_URL" in p for p in problems), problems


def test_problems_do_not_reveal_the_token() -> None:
    """Problems in other settings never repeat a valid bot token."""
    problems = problems_of({"BOT_TOKEN": TOKEN, "TYPING_MODE": "x"})
    assert TOKEN not in "\n".join(problems)


def test_dotenv_file_is_read_and_the_real_environment_wins(tmp_path: Path) -> None:
    """Values come from `.env` unless the real environment sets the same variable."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        f"BOT_TOKEN={TOKEN}\n"
        f"MAKE_WEBHOOK_URL={MAKE_URL}\n"
        "DEBOUNCE_SECONDS=7\n"
        "MAX_WAIT_SECONDS=30\n"
        "# a comment\n"
        "TYPING_MODE=off\n",
        encoding="utf-8",
    )
    config = Config.from_env(environ={"DEBOUNCE_SECONDS": "2"}, dotenv_path=str(dotenv))
    assert config.bot_token == TOKEN and config.make_webhook_url == MAKE_URL
    assert config.debounce_seconds == 2  # the environment wins
    assert config.max_wait_seconds == 30 and config.typing_mode == "off"  # from .env


def test_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    """A `.env` path that does not exist is simply skipped."""
    config = Config.from_env(environ=REQUIRED, dotenv_path=str(tmp_path / "absent.env"))
    assert config.bot_token == TOKEN


def test_derived_webhook_secret_is_stable_and_telegram_accepts_it() -> None:
    """Without WEBHOOK_SECRET the secret is derived from the token: same token, same secret, in Telegram's charset."""
    secret = load().webhook_secret
    assert TELEGRAM_SECRET.match(secret), secret
    assert secret == load().webhook_secret == derive_webhook_secret(TOKEN)
    assert TOKEN not in secret and TOKEN.split(":")[1] not in secret
    other = TOKEN[:-1] + ("y" if TOKEN[-1] != "y" else "z")
    assert derive_webhook_secret(other) != secret


def test_given_webhook_secret_is_used() -> None:
    """A valid WEBHOOK_SECRET is used as given."""
    assert load(WEBHOOK_SECRET="My_Secret-123").webhook_secret == "My_Secret-123"


def test_redacted_masks_secrets_and_shows_the_rest() -> None:
    """`redacted()` names settings by variable and masks the token, webhook secret and reply token."""
    config = load(WEBHOOK_SECRET="My_Secret-123", REPLY_TOKEN="reply-bearer-xyz")
    shown = config.redacted()
    text = repr(shown)
    for secret in (TOKEN, TOKEN.split(":")[1], "My_Secret-123", "reply-bearer-xyz"):
        assert secret not in text
    assert shown["BOT_TOKEN"] != TOKEN and shown["WEBHOOK_SECRET"] != "My_Secret-123"
    assert shown["REPLY_TOKEN"] != "reply-bearer-xyz"
    assert shown["DEBOUNCE_SECONDS"] == config.debounce_seconds
    assert shown["MODE"] == "polling"
    assert load().redacted()["REPLY_TOKEN"] == ""  # an empty secret stays visibly empty


def _variables_config_reads() -> set[str]:
    source = (ROOT / "config.py").read_text(encoding="utf-8")
    return set(re.findall(r"\b(?:get|number|flag)\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']", source))


def test_every_setting_is_documented() -> None:
    """Every variable config.py reads (through get, number or flag) appears in `.env.example` and in the README."""
    names = _variables_config_reads()
    assert {"BOT_TOKEN", "MAKE_WEBHOOK_URL", "DEBOUNCE_SECONDS"} <= names, "the regex over config.py found too little"
    for doc in (".env.example", "README.md"):
        path = ROOT / doc
        assert path.exists(), f"{doc} is missing"
        text = path.read_text(encoding="utf-8")
        missing = sorted(n for n in names if not re.search(rf"\b{n}\b", text))
        assert not missing, f"{doc} does not mention: {', '.join(missing)}"


def test_polling_and_payment_defaults() -> None:
    """Long polls last 30 s by default, and checking checkouts with Make is off unless asked."""
    from config import Config as _Config
    config = _Config.from_env({"BOT_TOKEN": "123456789:AAHk3x-TESTtokenTESTtokenTESTtoken_x9",
                               "MAKE_WEBHOOK_URL": "https://hook.eu1.make.com/x"}, dotenv_path=None)
    assert config.poll_timeout_seconds == 30 and config.payment_check_with_make is False
    assert config.payment_auto_refund_stars is False and config.payment_hold_seconds == 30


def test_make_delivery_workers_is_read_as_the_concurrency_limit_and_flagged() -> None:
    """The old MAKE_DELIVERY_WORKERS still sets the limit (with one deprecation line); MAKE_MAX_CONCURRENCY
    wins when both are set, and the line then says the old one is ignored."""
    old = load(MAKE_DELIVERY_WORKERS="8")
    assert old.make_max_concurrency == 8
    assert len(old.deprecations()) == 1 and "MAKE_MAX_CONCURRENCY=8" in old.deprecations()[0]
    both = load(MAKE_DELIVERY_WORKERS="8", MAKE_MAX_CONCURRENCY="100")
    assert both.make_max_concurrency == 100
    assert both.deprecations() == ["MAKE_DELIVERY_WORKERS is deprecated and ignored: MAKE_MAX_CONCURRENCY=100 is "
                                   "set; remove MAKE_DELIVERY_WORKERS"]
    assert load(MAKE_MAX_RATE="0").make_max_rate == 0  # unpaced


def test_telegram_pacing_can_be_turned_off_or_set() -> None:
    """TELEGRAM_MAX_RATE=0 and TELEGRAM_CHAT_INTERVAL_SECONDS=0 turn each pacing off; other values are read as given."""
    off = load(TELEGRAM_MAX_RATE="0", TELEGRAM_CHAT_INTERVAL_SECONDS="0")
    assert (off.telegram_max_rate, off.telegram_chat_interval_seconds) == (0, 0)
    set_ = load(TELEGRAM_MAX_RATE="25", TELEGRAM_CHAT_INTERVAL_SECONDS="1.5")
    assert (set_.telegram_max_rate, set_.telegram_chat_interval_seconds) == (25, 1.5)


def test_renewal_notice_title_is_a_setting_in_russian_by_default() -> None:
    """TEXT_ADMIN_RENEWAL titles the admin's notice of a subscription renewal, like the other notice titles."""
    assert load().text_admin_renewal == "🔁 Продление подписки"
    assert load(TEXT_ADMIN_RENEWAL=" Renewal ").text_admin_renewal == "Renewal"
    assert load(TEXT_ADMIN_RENEWAL="").text_admin_renewal == "🔁 Продление подписки"


def test_reply_formats_are_the_formats_the_gateway_reads() -> None:
    """REPLY_FORMAT's choices (config.py stays free of the converters) are exactly what formatting.py reads."""
    from formatting import FORMATS
    from config import REPLY_FORMATS
    assert REPLY_FORMATS == FORMATS


# BotFather's tokens: the bot's id (8-10 digits today), ':', then 35 letters, digits, '_' and '-'.
GOOD_TOKENS = [
    TOKEN,
    "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",  # the Bot API documentation's example
    "7000000001:AAE-_x9ZzYy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0",  # a 10-digit id; '-' and '_' in the secret
    "8123456789:AAF4h2-0123456789_abcdefghijklmnopqr",
    "12345678:-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # a secret may start with '-'
    "12345678:012345678901234567890123456789012345",  # or be all digits
]
BAD_TOKENS = [
    ("123:short", "does not look like a bot token"),
    ("abc:AAHk3x-TESTtokenTESTtokenTESTtoken_x9", "does not look like a bot token"),
    ("123456789AAHk3x-TESTtokenTESTtokenTESTtoken_x9", "does not look like a bot token"),  # no ':'
    ("123456789:AAHk3x.TESTtokenTESTtokenTESTtoken_x9", "does not look like a bot token"),  # '.' is not issued
    ("5512345678:", "does not look like a bot token"),  # the id alone
    ("bot123456789:AAHk3x-TESTtokenTESTtokenTESTtoken_x9", "starts with 'bot'"),
    ('"123456789:AAHk3x-TESTtokenTESTtokenTESTtoken_x9"', "wrapped in quotes"),
    ("123456789:AAHk3x TESTtokenTESTtokenTESTtoken_x9", "contains spaces"),
    ("١٢٣٤٥٦٧٨٩:AAHk3x-TESTtokenTESTtokenTESTtoken_x9", "does not look like a bot token"),  # Arabic-Indic digits
    ("１２３４５６７８９:AAHk3x-TESTtokenTESTtokenTESTtoken_x9", "does not look like a bot token"),  # fullwidth
    ("123456789:AAHk3x-TESTtokenTESTtokenTESTtoken_x9# my bot", "a comment after a value needs a space before"),
]


@pytest.mark.parametrize("token", GOOD_TOKENS)
def test_bot_tokens_as_botfather_issues_them_are_accepted_and_masked(token: str) -> None:
    """Every token of BotFather's shape is accepted, and `redact()` masks each wherever it appears (a Bot API URL)."""
    from telegram_api import redact
    assert load(BOT_TOKEN=token).bot_token == token
    masked = redact(f"POST https://api.telegram.org/bot{token}/getMe failed")
    assert token.split(":")[1] not in masked and "<redacted-token>" in masked


@pytest.mark.parametrize("token,why", BAD_TOKENS)
def test_malformed_tokens_are_refused_saying_the_expected_shape(token: str, why: str) -> None:
    """A token not of BotFather's shape is refused with one problem naming BOT_TOKEN, saying what was expected
    and, where it is a common slip, what is wrong; never repeating the token."""
    problems = problems_of({**REQUIRED, "BOT_TOKEN": token})
    assert len(problems) == 1
    assert problems[0].startswith("BOT_TOKEN") and why in problems[0]
    assert "(digits), ':', then 30-64 letters, digits, '_' or '-'" in problems[0]
    secret = token.split(":")[-1].strip('"')
    assert token not in problems[0] and (len(secret) < 8 or secret not in problems[0])


def test_a_command_checks_only_the_settings_it_uses() -> None:
    """With `uses`, settings outside it can be missing or bad; those inside are checked and, if `requires`
    says so, must be set."""
    config = Config.from_env(environ={"STATE_DB": "x.sqlite3", "DEBOUNCE_SECONDS": "-1", "MODE": "carrier-pigeon",
                                      "BOT_TOKEN": "not-a-token", "LOG_LEVEL": "LOUD"},
                             dotenv_path=None, uses=("STATE_DB",), requires=())
    assert config.state_db == "x.sqlite3" and config.bot_token == ""  # a bad token is never carried along
    assert config.log_level == "INFO"  # every command logs: a bad level is never handed to logging
    problems = problems_of_command({"TELEGRAM_API_URL": "ftp://x", "DEBOUNCE_SECONDS": "-1"},
                                   uses=("BOT_TOKEN", "TELEGRAM_API_URL"), requires=("BOT_TOKEN",))
    assert len(problems) == 2
    assert problems[0].startswith("BOT_TOKEN is required") and problems[1].startswith("TELEGRAM_API_URL=")
    problems = problems_of_command({"BOT_TOKEN": TOKEN}, uses=("BOT_TOKEN", "WEBHOOK_URL"),
                                   requires=("BOT_TOKEN", "WEBHOOK_URL"))
    assert problems == ["WEBHOOK_URL is required (the public https:// URL of POST /webhook)"]


def problems_of_command(env: dict[str, str], **needs: tuple[str, ...]) -> list[str]:
    """The problems `ConfigError` lists for `env` read for a command with these `uses` and `requires`."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ=env, dotenv_path=None, **needs)  # type: ignore[arg-type]
    return caught.value.problems


def test_nothing_set_and_no_dotenv_is_one_line_saying_where_it_looked(tmp_path: Path) -> None:
    """No `.env` and none of the required settings: `no_dotenv` is one line with the absolute path looked at,
    what to copy and what to set. With a `.env`, or a required setting in the environment, problems are listed."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ={}, dotenv_path=str(tmp_path / ".env"))
    line = caught.value.no_dotenv
    assert line is not None and "\n" not in line
    assert str((tmp_path / ".env").resolve()) in line and ".env.example" in line
    assert "BOT_TOKEN and MAKE_WEBHOOK_URL" in line and "environment" in line
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ={}, dotenv_path=str(tmp_path / ".env"), uses=("BOT_TOKEN",), requires=("BOT_TOKEN",))
    assert caught.value.no_dotenv is not None and "MAKE_WEBHOOK_URL" not in caught.value.no_dotenv
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ={"BOT_TOKEN": TOKEN}, dotenv_path=str(tmp_path / ".env"))
    assert caught.value.no_dotenv is None and caught.value.problems == [
        "MAKE_WEBHOOK_URL is required (your Make custom webhook URL)"]
    (tmp_path / ".env").write_text("DEBOUNCE_SECONDS=2\n")
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ={}, dotenv_path=str(tmp_path / ".env"))
    assert caught.value.no_dotenv is None and len(caught.value.problems) == 2


# `.env` files as editors save them, and values that must not be echoed


def test_dotenv_with_a_byte_order_mark_is_read_as_without(tmp_path: Path) -> None:
    """A UTF-8 byte order mark at the start of `.env` (Notepad's "UTF-8 with BOM") is not part of the first name."""
    (tmp_path / ".env").write_text(f"BOT_TOKEN={TOKEN}\nMAKE_WEBHOOK_URL={MAKE_URL}\n", encoding="utf-8-sig")
    assert Config.from_env(environ={}, dotenv_path=str(tmp_path / ".env")).bot_token == TOKEN


@pytest.mark.parametrize("content,why", [
    ("Оплата невозможна".encode("cp1251"), "is not UTF-8 text"),
    (b"BOT_TOKEN=x\x00\n", "is not a text file (it holds NUL bytes)"),
], ids=["cp1251", "nul-bytes"])
def test_dotenv_that_cannot_be_read_is_one_line_naming_it(content: bytes, why: str, tmp_path: Path) -> None:
    """A `.env` that is not UTF-8 text is one line naming the file and why, in place of a traceback."""
    (tmp_path / ".env").write_bytes(b"MAKE_WEBHOOK_URL=" + MAKE_URL.encode() + b"\nTEXT_PAYMENT_REFUSED=" + content)
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ={"BOT_TOKEN": TOKEN}, dotenv_path=str(tmp_path / ".env"))
    line = caught.value.line
    assert line is not None and "\n" not in line
    assert line.startswith(f"{(tmp_path / '.env').resolve()} {why}")
    assert TOKEN in caught.value.secrets  # for whoever prints it: the environment's token is still a secret


def test_telegram_api_url_holding_the_token_is_refused_without_echoing_it() -> None:
    """TELEGRAM_API_URL with the token in it (`https://api.telegram.org/bot<token>`) is refused, and no problem
    line repeats a value that holds the token or its secret part."""
    problems = problems_of({**REQUIRED, "TELEGRAM_API_URL": f"https://api.telegram.org/bot{TOKEN}",
                            "MAKE_WEBHOOK_URL": f"ftp://example.com/{TOKEN.split(':')[1]}",
                            "WEBHOOK_URL": f"http://example.com/{TOKEN}", "PORT": f"{TOKEN}"})
    assert len(problems) == 4
    assert problems[1].startswith("TELEGRAM_API_URL holds the bot token (not shown)")
    for problem in problems:
        assert TOKEN.split(":")[1] not in problem
    assert "MAKE_WEBHOOK_URL (its value holds BOT_TOKEN" in problems[0]


def test_secrets_are_every_value_no_line_may_print() -> None:
    """`Config.secrets()` and a `ConfigError`'s `secrets` hold the token, its secret part, the webhook secret and
    the reply token, even when the token itself is refused."""
    config = load(WEBHOOK_SECRET="hook-secret-1", REPLY_TOKEN="reply-secret-2")
    assert set(config.secrets()) >= {TOKEN, TOKEN.split(":")[1], "hook-secret-1", "reply-secret-2"}
    bad = "١٢٣:" + TOKEN.split(":")[1]
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ={**REQUIRED, "BOT_TOKEN": bad}, dotenv_path=None)
    assert TOKEN.split(":")[1] in caught.value.secrets
