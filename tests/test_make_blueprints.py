"""The Make scenarios we ship (`make/*.blueprint.json`): shaped like Make's own exports, mapping only fields the
gateway really sends, listing exactly the contract's fields, and answering in a way the gateway reads.

Nothing here can reach Make. What can be known is checked: the shape against real exported blueprints
(`tests/data/make_exports`), and the behaviour by playing each blueprint (`make_scenario.Scenario`) as the
Make double's answer while the real gateway runs end to end against it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from doubles import ROOT, TOKEN, MakeDouble, Service, TelegramDouble, child_env, wait_until
from make_scenario import (COMPLETION, IGNORE, RESPOND, ROUTER, TO_JSON, TRIGGER, ModuleFailed, Response,
                           Scenario, modules, references)

MAKE_DIR = ROOT / "make"
BLUEPRINTS = sorted(MAKE_DIR.glob("*.blueprint.json"))
EXPORTS = sorted((Path(__file__).parent / "data" / "make_exports").glob("*.blueprint.json"))
SAMPLES = Path(__file__).parent / "data" / "telegram_updates.json"
MAIN = MAKE_DIR / "telegram-gateway.blueprint.json"
ECHO = MAKE_DIR / "echo.blueprint.json"

# Telegram's own objects, carried verbatim: the blueprint lists the fields a scenario usually maps, each of
# which must really arrive; every other level is the gateway's own and is listed exactly.
VERBATIM = {"update", "pre_checkout_query", "payment.order_info", "messages[].contact", "messages[].location",
            "messages[].venue", "messages[].poll", "messages[].dice"}
MAKE_TYPES = {"text": (str,), "number": (int, float), "boolean": (bool,), "collection": (dict,), "array": (list,)}


def load(path: Path) -> dict[str, Any]:
    """A blueprint file, parsed."""
    return json.loads(path.read_text(encoding="utf-8"))


MODEL_DOWN = "(the model fails on this one)"
MODEL_SILENT = "(the model answers this one with nothing)"


def model_answer(mapper: dict[str, Any]) -> str:
    """The model's answer in the tests: Markdown with quotes, a backslash and line breaks, as models write,
    which breaks any JSON body typed by hand around it. It fails on `MODEL_DOWN`, and answers nothing but
    blanks to `MODEL_SILENT`."""
    system, user = mapper["messages"]
    assert mapper["select"] == "chat" and mapper["model"] and system["role"] == "system" and system["content"]
    assert user["role"] == "user" and user["content"].strip()
    if MODEL_DOWN in user["content"]:
        raise ModuleFailed("[500] The server had an error while processing your request.")
    if MODEL_SILENT in user["content"]:
        return " \n"
    said = user["content"]
    return f'Вы написали: "{said}" \\o/\n\n**Спасибо!**'


def model_visible(said: str) -> str:
    """What the chat shows of `model_answer`: the Markdown read, the rest as written."""
    return f'Вы написали: "{said}" \\o/\n\nСпасибо!'


# ---------------------------------------------------------------------------------------------- shape


def check_shape(blueprint: dict[str, Any]) -> None:
    """Assert the shape every blueprint exported by Make has."""
    assert isinstance(blueprint["name"], str) and blueprint["name"]
    assert isinstance(blueprint["flow"], list) and blueprint["flow"]
    ids = [module["id"] for module in modules(blueprint["flow"])]
    assert len(ids) == len(set(ids)), f"module ids repeat: {ids}"
    for module in modules(blueprint["flow"]):
        assert isinstance(module["id"], int) and not isinstance(module["id"], bool)
        app, _, name = module["module"].partition(":")
        assert app and name, module["module"]
        assert isinstance(module["version"], int) and module["version"] >= 1
        assert isinstance(module.get("parameters", {}), dict)
        assert isinstance(module.get("mapper", {}), (dict, type(None)))
        designer = module["metadata"]["designer"]
        assert isinstance(designer["x"], (int, float)) and isinstance(designer["y"], (int, float))
        if "routes" in module:
            assert module["module"] == ROUTER
            assert all(isinstance(route["flow"], list) for route in module["routes"])
        if module.get("filter"):
            assert isinstance(module["filter"]["name"], str)
            for alternative in module["filter"]["conditions"]:
                assert all({"a", "o"} <= set(term) for term in alternative)
    metadata = blueprint["metadata"]
    assert isinstance(metadata["instant"], bool) and isinstance(metadata["version"], int)
    assert isinstance(metadata["scenario"], dict) and isinstance(metadata["designer"], dict)


@pytest.mark.parametrize("path", EXPORTS, ids=lambda p: p.name)
def test_real_exports_have_the_shape_checked(path: Path) -> None:
    """The shape rule is Make's, not ours: every real export kept as test data passes it."""
    check_shape(load(path))


def test_real_exports_are_kept_with_their_sources() -> None:
    """At least two real exports, each named in the folder's README with where it came from."""
    readme = (EXPORTS[0].parent / "README.md").read_text(encoding="utf-8") if EXPORTS else ""
    assert len(EXPORTS) >= 2
    for path in EXPORTS:
        assert path.name in readme


@pytest.mark.parametrize("path", BLUEPRINTS, ids=lambda p: p.name)
def test_blueprint_has_the_shape_of_real_exports(path: Path) -> None:
    """Each blueprint has the shape of Make's exports, keys the real exports use at each level, and the
    scenario settings the issue asks: instant, run in parallel."""
    blueprint = load(path)
    check_shape(blueprint)
    exports = [load(p) for p in EXPORTS]
    assert set(blueprint) <= set().union(*(set(e) for e in exports))
    assert set(blueprint["metadata"]) <= set().union(*(set(e["metadata"]) for e in exports))
    assert set(blueprint["metadata"]["scenario"]) == set().union(*(set(e["metadata"]["scenario"]) for e in exports))
    known_module_keys = set().union(*(set(m) for e in exports for m in modules(e["flow"])))
    for module in modules(blueprint["flow"]):
        assert set(module) <= known_module_keys, (module["id"], set(module) - known_module_keys)
    assert blueprint["metadata"]["instant"] is True
    assert blueprint["metadata"]["scenario"]["sequential"] is False
    assert blueprint["flow"][0]["module"] == TRIGGER


def field_problems(value: Any, spec: dict[str, Any], where: str) -> list[str]:
    """What is wrong with a mapper value against the field spec a real export's `expect` gives for it."""
    kind, rules = spec.get("type"), spec.get("validate") or {}
    if isinstance(value, str) and "{{" in value:
        return []  # mapped: its value is known only when the scenario runs
    if kind in ("number", "uinteger", "integer"):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return [f"{where}: {value!r} is not a number"]
        low, high = rules.get("min", float("-inf")), rules.get("max", float("inf"))
        return [] if low <= number <= high else [f"{where}: {value!r} outside {low}..{high}"]
    if kind == "select":
        allowed = rules.get("enum") or [o["value"] for o in spec.get("options") or []]
        return [] if not allowed or value in allowed else [f"{where}: {value!r} is not one of {allowed}"]
    if kind == "array":
        if not isinstance(value, list) or len(value) > rules.get("maxItems", len(value)):
            return [f"{where}: {value!r:.60} is not a list of at most {rules.get('maxItems')}"]
        inner = spec.get("spec")
        if isinstance(inner, dict) and inner.get("type") == "collection":
            return [p for i, item in enumerate(value) for p in mapper_problems(item, inner["spec"], f"{where}[{i}]")]
    return []


def mapper_problems(mapper: dict[str, Any], expect: list[dict[str, Any]], where: str) -> list[str]:
    """Fields an export's `expect` does not know, missing required ones, and values outside their rules."""
    known = {spec["name"]: spec for spec in expect}
    problems = [f"{where}.{name}: not a field of this module" for name in mapper if name not in known]
    problems += [f"{where}.{name}: required" for name, spec in known.items() if spec.get("required") and
                 name not in mapper]
    for name, value in mapper.items():
        if name in known:
            problems += field_problems(value, known[name], f"{where}.{name}")
    return problems


@pytest.mark.parametrize("path", BLUEPRINTS, ids=lambda p: p.name)
def test_module_settings_are_those_make_exports_know(path: Path) -> None:
    """Each module that a real export also uses has that export's version and parameter names, and its mapper
    names only fields the export's `expect` lists for the module, required ones present, numbers within the
    bounds it gives and choices among the allowed (Make would drop a misspelt `max_tokens` without a word)."""
    exported: dict[str, list[dict[str, Any]]] = {}
    for export in EXPORTS:
        for module in modules(load(export)["flow"]):
            exported.setdefault(module["module"], []).append(module)
    problems = []
    for module in modules(load(path)["flow"]):
        where = f"module {module['id']} ({module['module']})"
        seen = exported.get(module["module"])
        if not seen:
            continue
        if module["version"] not in {m["version"] for m in seen}:
            problems.append(f"{where}: version {module['version']}, exports have {[m['version'] for m in seen]}")
        names = set().union(*(set(m.get("parameters") or {}) for m in seen))
        problems += [f"{where}: parameter {name} unknown" for name in set(module.get("parameters") or {}) - names]
        expects = [m["metadata"]["expect"] for m in seen if m["metadata"].get("expect")]
        if expects:
            problems += mapper_problems(module.get("mapper") or {}, expects[0], where)
    assert len({m["module"] for m in modules(load(path)["flow"])} & set(exported)) >= 3
    assert not problems, "\n".join(problems)


def test_the_shipped_blueprints_are_the_two_the_readme_describes() -> None:
    """The main scenario and the echo one exist, and the README walks through both by file name."""
    assert BLUEPRINTS == sorted([MAIN, ECHO])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for path in BLUEPRINTS:
        assert f"make/{path.name}" in readme


def test_main_blueprint_routes_each_event_type_to_its_answer() -> None:
    """Webhook → router; a route per kind of event (batch with text → model → answered? JSON → response, or an
    apology, and an apology when the model fails; batch without text, button press, payment, payment made
    twice → response), each answer JSON with its Content-Type."""
    blueprint = load(MAIN)
    flow = blueprint["flow"]
    assert [m["module"] for m in flow] == [TRIGGER, ROUTER]
    kinds = [[m["module"] for m in route["flow"]] for route in flow[1]["routes"]]
    assert kinds == [[COMPLETION, ROUTER], [RESPOND], [RESPOND], [RESPOND], [RESPOND]]
    model, answered = flow[1]["routes"][0]["flow"]
    assert [m["module"] for m in model["onerror"]] == [RESPOND, IGNORE]
    # The gateway reads one answer (`result`), of a length a chat can take.
    assert model["mapper"]["n_completions"] == "1" and 1 <= int(model["mapper"]["max_tokens"]) <= 4000
    assert [[m["module"] for m in route["flow"]] for route in answered["routes"]] == [[TO_JSON, RESPOND], [RESPOND]]
    for module in modules(flow):
        if module["module"] == RESPOND:
            headers = {h["key"].lower(): h["value"] for h in module["mapper"]["headers"]}
            assert headers["content-type"] == "application/json"
            assert str(module["mapper"]["status"]) == "200"


def test_echo_blueprint_is_webhook_json_response() -> None:
    """The echo: webhook → (batches only) text as JSON → response, no AI and no connection to pick."""
    blueprint = load(ECHO)
    assert [m["module"] for m in blueprint["flow"]] == [TRIGGER, TO_JSON, RESPOND]
    assert not any("__IMTCONN__" in (m.get("parameters") or {}) for m in modules(blueprint["flow"]))


# ---------------------------------------------------------------------------- the data structure


def interface_tree(spec: list[dict[str, Any]]) -> dict[str, Any]:
    """A Make interface (the webhook's data structure) as {name: (type, children)}; an array's item is `[]`."""
    tree = {}
    for item in spec:
        tree[item["name"]] = _node(item)
    return tree


def _node(item: dict[str, Any]) -> tuple[str, Any]:
    kind = item["type"]
    if kind == "collection":
        return kind, interface_tree(item.get("spec") or [])
    if kind == "array":
        inner = item.get("spec")
        return kind, {"[]": _node(inner)} if isinstance(inner, dict) else {}
    return kind, {}


def observed_tree(values: list[Any]) -> dict[str, Any]:
    """The fields seen at one level across `values` (dicts), as {name: (python types, children)}."""
    tree: dict[str, Any] = {}
    for value in values:
        if not isinstance(value, dict):
            continue
        for name, item in value.items():
            types, _ = tree.get(name, (set(), None))
            types.add(type(item))
            tree[name] = (types, None)
    for name in tree:
        items = [v[name] for v in values if isinstance(v, dict) and name in v]
        children = observed_tree([i for i in items if isinstance(i, dict)])
        inner = [x for i in items if isinstance(i, list) for x in i]
        if inner:
            children = {"[]": (set(map(type, inner)), observed_tree([x for x in inner if isinstance(x, dict)]))}
        tree[name] = (tree[name][0], children)
    return tree


def compare(listed: dict[str, Any], seen: dict[str, Any], where: str = "") -> list[str]:
    """What is wrong with the listed fields against those seen: missing, never sent, or of another type."""
    problems = []
    verbatim = where.rstrip(".") in VERBATIM or any(where.startswith(v + ".") for v in VERBATIM)
    if not verbatim:
        problems += [f"{where}{name}: sent but not listed" for name in sorted(set(seen) - set(listed))]
    for name, (kind, children) in listed.items():
        if name not in seen:
            problems.append(f"{where}{name}: listed but never sent")
            continue
        types, seen_children = seen[name]
        allowed = MAKE_TYPES.get(kind, ())
        wrong = {t.__name__ for t in types if t is not type(None) and not (issubclass(t, allowed) and not (
            t is bool and kind == "number"))}
        if wrong:
            problems.append(f"{where}{name}: listed as {kind}, sent as {sorted(wrong)}")
        elif types <= {type(None)}:
            problems.append(f"{where}{name}: listed as {kind}, but only ever sent as null")
        if children:
            problems += compare(children, seen_children or {}, f"{where}{name}." if name != "[]" else where[:-1]
                                + "[].")
    return problems


# ------------------------------------------------------------------------- end to end, played


HOSTILE_TEXT = 'Он сказал "привет" \\ и ушёл\nИ ещё\tодно'


def extra_updates() -> list[dict[str, Any]]:
    """Updates the shared samples lack, so that every field of the contract is sent and every module runs: a
    text that needs escaping in JSON, texts the model fails on or answers with nothing, a venue, a Stars
    subscription's first payment, and a payment in roubles made twice for one invoice."""
    now = int(time.time())

    def message(user_id: int, **content: Any) -> dict[str, Any]:
        user = {"id": user_id, "is_bot": False, "first_name": "Вера", "username": "vera", "language_code": "ru"}
        chat = {"id": user_id, "first_name": "Вера", "username": "vera", "type": "private"}
        return {"update_id": 771000000 + len(updates), "message": {
            "message_id": len(updates) + 1, "from": user, "chat": chat, "date": now, **content}}

    venue = {"location": {"latitude": 55.7539, "longitude": 37.6208}, "title": "Красная площадь",
             "address": "Москва"}
    stars = {"currency": "XTR", "total_amount": 250, "invoice_payload": "club-monthly",
             "subscription_expiration_date": now + 30 * 86400, "is_recurring": True, "is_first_recurring": True,
             "telegram_payment_charge_id": "stxsub-771003-1"}
    roubles = {"currency": "RUB", "total_amount": 149050, "invoice_payload": "order-771006",
               "telegram_payment_charge_id": "rub-771006-1", "provider_payment_charge_id": "prov-771006-1"}
    updates: list[dict[str, Any]] = []
    for user_id, content in ((771001, {"text": HOSTILE_TEXT}),
                             (771002, {"venue": venue, "location": venue["location"]}),
                             (771003, {"successful_payment": stars}), (771004, {"text": MODEL_DOWN}),
                             (771005, {"text": MODEL_SILENT}), (771006, {"successful_payment": roubles}),
                             (771006, {"successful_payment": {**roubles, "telegram_payment_charge_id": "rub-771006-2",
                                                              "provider_payment_charge_id": "prov-771006-2"}})):
        updates.append(message(user_id, **content))
    return updates


@dataclass
class Played:
    """One end-to-end run of the gateway against a Make double playing `blueprint`."""

    path: Path
    blueprint: dict[str, Any]
    scenario: Scenario
    telegram: TelegramDouble
    answers: list[tuple[dict[str, Any], Response]] = field(default_factory=list)
    sample_output: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for event, _ in self.answers]


@pytest.fixture(scope="module", params=[MAIN, ECHO], ids=lambda p: p.name)
def played(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Played]:
    """Every shared sample update and `extra_updates()` posted to the real gateway (webhook mode, Make checks
    checkouts), and `send-sample --all` run, while the Make double answers as the blueprint would."""
    blueprint = load(request.param)
    run = Played(request.param, blueprint, Scenario(blueprint, model_answer), TelegramDouble())
    make = MakeDouble()
    lock = threading.Lock()

    def answer(event: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
        try:
            response = run.scenario.run(event)
        except Exception as err:  # kept for the test to report; the gateway sees a failing scenario
            with lock:
                run.errors.append(f"{event.get('event_type')} {event.get('event_id')}: {err}")
            return 500, b"Scenario failed to complete.", {}
        with lock:
            run.answers.append((event, response))
        return response.status, response.body.encode(), response.headers

    make.reject_if = answer
    tmp = tmp_path_factory.mktemp("played")
    env = {"BOT_TOKEN": TOKEN, "MAKE_WEBHOOK_URL": make.url + "/hook", "TELEGRAM_API_URL": run.telegram.url,
           "HOST": "127.0.0.1", "PORT": "0", "STATE_DB": str(tmp / "state.sqlite3"), "DEBOUNCE_SECONDS": "0.3",
           "MAX_WAIT_SECONDS": "5", "MAKE_RETRY_MAX_SECONDS": "0.5", "TYPING_MODE": "simulate",
           "WEBHOOK_URL": "https://gateway.example.test/webhook", "PAYMENT_CHECK_WITH_MAKE": "true",
           "TELEGRAM_CHAT_INTERVAL_SECONDS": "0.05", "TELEGRAM_MAX_RATE": "1000"}
    service = Service(tmp, env).start()
    try:
        from config import derive_webhook_secret
        headers = {"X-Telegram-Bot-Api-Secret-Token": derive_webhook_secret(TOKEN)}
        updates = [s["update"] for s in json.loads(SAMPLES.read_text(encoding="utf-8"))] + extra_updates()
        for update in updates:
            response = service.post("/webhook", json=update, headers=headers)
            assert response.status_code == 200, response.text

        def settled() -> bool:
            if run.errors:  # the gateway would retry a failing scenario for ever: say why at once
                raise AssertionError("the scenario failed:\n" + "\n".join(run.errors[:5]))
            health = service.health()
            return health["active_batches"] == 0 and health["outbox_pending"] == 0 and any(
                e.get("event_id") == "payment-rub-771006-2" for e in run.events)

        wait_until(settled, 30, "every event delivered")
        sample = subprocess.run([sys.executable, str(ROOT / "app.py"), "send-sample", "--all"], cwd=tmp,
                                env=child_env(MAKE_WEBHOOK_URL=make.url + "/hook"), capture_output=True,
                                text=True, timeout=60)
        assert sample.returncode == 0, sample.stderr
        run.sample_output = sample.stdout
        yield run
    finally:
        service.stop()
        make.close()
        run.telegram.close()
        assert TOKEN not in service.text


def test_played_runs_had_no_error(played: Played) -> None:
    """Every event played through the blueprint without a mapping that reads a missing field (Make would insert
    nothing there, and a reply would go out empty) or a module the player does not know."""
    assert played.events
    assert not played.errors, "\n".join(played.errors)


def test_every_mapping_read_a_field_the_gateway_sent(played: Played) -> None:
    """Each `{{N.…}}` of the blueprint read a value from a real event at least once (the strict player fails on
    any it could not read), so no mapping names a field the gateway does not send."""
    written = {reference.text() for reference in references(played.blueprint)}
    assert written and written <= played.scenario.resolved, sorted(written - played.scenario.resolved)


def test_every_module_ran(played: Played) -> None:
    """Every module, each route and the error handler included, ran for some event: no route waits for an
    event type that never comes, and every answer it can give was checked."""
    ids = {module["id"] for module in modules(played.blueprint["flow"])}
    assert ids == played.scenario.ran, sorted(ids - played.scenario.ran)


def test_the_data_structure_lists_exactly_the_contracts_fields(played: Played) -> None:
    """The webhook's data structure (its `interface`) lists every field the gateway sent in any event, none it
    never sends, each with its type; Telegram's verbatim objects list only fields that arrive."""
    interface = played.blueprint["flow"][0]["metadata"]["interface"]
    types = {event["event_type"] for event in played.events}
    assert types == {"message_batch", "update", "payment", "payment_refunded", "pre_checkout"}
    problems = compare(interface_tree(interface), observed_tree(played.events))
    for kind in types:  # a field every event of one type sends as null is a field that type lost
        events = [event for event in played.events if event["event_type"] == kind]
        problems += [f"{kind}.{name}: only ever null" for name in sorted({n for e in events for n in e})
                     if all(e.get(name) is None for e in events)]
    assert not problems, "\n".join(problems)


def test_the_chat_gets_the_scenarios_answer(played: Played) -> None:
    """A text with quotes, a backslash, a line break and a tab came back as the scenario answered it: through the JSON
    module, the text is whole (a hand-typed JSON body would have broken on it)."""
    said = HOSTILE_TEXT
    batch = next(e for e in played.events if e.get("chat_id") == 771001 and e["event_type"] == "message_batch")
    assert batch["text"] == said
    sent = wait_until(lambda: [m["text"] for m in played.telegram.calls_of("sendMessage")
                               if m["chat_id"] == 771001], 10, "the reply in the chat")
    assert sent == [model_visible(said) if played.path == MAIN else said]


def json_of(response: Response) -> dict[str, Any]:
    """A JSON answer's body, or {} for Make's plain `Accepted`."""
    return json.loads(response.body) if response.headers.get("Content-Type") == "application/json" else {}


def test_every_answer_reaches_the_chat(played: Played) -> None:
    """Every reply the scenario gave reached its chat (a long one in parts), and every press on a button was
    answered: with the scenario's `callback_answer`, or empty where it gives none (the echo)."""

    def squeezed(text: str) -> str:
        return "".join(text.split())

    replies = [(e["chat_id"], json_of(r)["reply"]) for e, r in played.answers
               if not e.get("sample") and "reply" in json_of(r)]
    assert len(replies) > 20
    for chat_id, reply in replies:
        def arrived() -> bool:
            sent = "".join(squeezed(m["text"]) for m in played.telegram.calls_of("sendMessage")
                           if m["chat_id"] == chat_id)
            return squeezed(reply) in sent if isinstance(reply, str) else bool(sent)
        wait_until(arrived, 10, f"the reply {str(reply)[:40]!r} in chat {chat_id}")
    presses = {e["update"]["callback_query"]["id"]: r for e, r in played.answers
               if e.get("update_type") == "callback_query" and not e.get("sample")}
    assert presses
    wait_until(lambda: set(presses) <= set(played.telegram.callback_answers), 10, "every press answered")
    for query_id, response in presses.items():
        wanted = json.loads(response.body)["callback_answer"]["text"] if played.path == MAIN else None
        assert played.telegram.callback_answers[query_id].get("text") == wanted


def test_what_each_route_says_reaches_its_chat(played: Played) -> None:
    """The main scenario thanks each one-off payment with its amount and currency as the contract writes them
    (`1490.50 RUB`, not minor units) and tells a second payment of one invoice that it will be refunded;
    apologises when the model fails (its error handler: the batch is answered, not posted again) or answers
    nothing; asks for text when a burst has none (`model_answer` fails on an empty text). The echo sends back
    each text and nothing else."""
    def said_to(chat_id: int) -> list[str]:
        return wait_until(lambda: [m["text"] for m in played.telegram.calls_of("sendMessage")
                                   if m["chat_id"] == chat_id], 10, f"a message to {chat_id}")

    payments = [e for e in played.events if e["event_type"] == "payment" and not e.get("sample")]
    assert {e["payment"]["currency"] for e in payments} >= {"RUB", "XTR"}
    textless = [e for e in played.events if e["event_type"] == "message_batch" and not e["text"].strip()]
    assert textless
    if played.path == ECHO:
        assert said_to(771004) == [MODEL_DOWN] and said_to(771005) == [MODEL_SILENT]
        assert all(r.body == "Accepted" for e, r in played.answers if e in textless)
        assert any(e["chat_id"] == 771002 for e in textless)  # the venue alone: a burst without text
        assert not any(m["chat_id"] in (771002, 771003, 771006) for m in played.telegram.calls_of("sendMessage"))
        return
    for event in payments:
        amount = f"{event['payment']['amount']} {event['payment']['currency']}"
        wait_until(lambda: any(amount in text for text in said_to(event["chat_id"])), 10, f"{amount} thanked")
    assert sum(e["duplicate"] for e in payments) == 1
    paid_twice = wait_until(lambda: len(said_to(771006)) == 2 and said_to(771006), 10, "two answers to 771006")
    assert "1490.50 RUB" in paid_twice[0] and "1490.50" not in paid_twice[1]
    apology, silence = said_to(771004), said_to(771005)
    assert len(apology) == 1 and apology == silence and MODEL_DOWN not in apology[0]
    assert sum(1 for e in played.events if e.get("chat_id") == 771004) == 1  # answered, never posted again
    asked = said_to(771002)  # the venue alone
    assert len(asked) == 1 and asked[0] not in apology
    assert all(asked[0] in said_to(e["chat_id"]) for e in textless)


def test_send_sample_reads_the_scenarios_answers(played: Played) -> None:
    """`send-sample --all` against the played scenario says what the gateway would do with each answer: the
    main scenario answers a batch, a button and a payment; the echo one a batch only."""
    lines = dict(line.split(": ", 1) for line in played.sample_output.splitlines())
    assert "would send 1 message(s)" in lines["message_batch"]
    assert "checkout would be approved" in lines["pre_checkout"]
    if played.path == MAIN:
        assert "callback_answer would answer the button" in lines["update"]
        assert "would send 1 message(s)" in lines["payment"]
    else:
        assert "gateway would send nothing" in lines["update"] and "gateway would send nothing" in lines["payment"]


# --------------------------------------------------------------- answers read by the gateway's code

HOSTILE = ['Кавычки " и \\ обратная черта', "строка\nи\r\nещё\tтаб", "}} {{1.text}} ]",
           "\u2028 \u0000 😀👍🏽 \ud83d", '{"reply": "not me"}', "**жирный** _курсив_ `код`", "слово " * 1000]


@pytest.mark.parametrize("said", HOSTILE, ids=range(len(HOSTILE)))
@pytest.mark.parametrize("path", [MAIN, ECHO], ids=lambda p: p.name)
def test_answer_bodies_are_json_the_gateway_reads_whole(path: Path, said: str) -> None:
    """Each Webhook response body, with hostile text substituted as Make would (the model's answer, or the
    user's text for the echo), is JSON that the gateway's own code (`make_client.classify`, then
    `delivery.answer_calls`) reads as exactly the reply the scenario meant: the same messages as an answer
    built by a JSON library."""
    from delivery import answer_calls
    from make_client import classify
    from samples import sample_events
    from store import OutboxRow
    event = sample_events(time.time())[0]
    payload = {**event.payload, "text": said}
    row = OutboxRow(1, event.event_id, event.order_key, event.event_type, payload, time.time(), 1, None)
    answer = Scenario(load(path), lambda mapper: said).run(payload)
    assert answer.status == 200 and answer.headers == {"Content-Type": "application/json"}
    outcome = classify(answer.status, answer.headers, answer.body)
    meant = {"reply": {"text": said, "format": "markdown"}} if path == MAIN else {"reply": said}
    reference = classify(200, {}, json.dumps(meant))
    assert not outcome.problem and outcome.body == meant
    calls = [call.payload for call in answer_calls(row, outcome, "plain")]
    assert calls and calls == [call.payload for call in answer_calls(row, reference, "plain")]
