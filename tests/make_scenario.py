"""Plays a Make scenario blueprint against one event, the way Make runs it, for the modules and the mapping
syntax our blueprints use. Anything else fails loudly, so a blueprint cannot use what the tests cannot check.

What Make does and this copies: the trigger's output is the event as posted; a router hands the bundle to
each route in turn, and a route runs only if the filter on its first module passes (conditions are a list of
OR'ed lists of AND'ed `{a, o, b}`); `{{N.path}}` in a field is module N's output at `path` (array indexes
start at 1); a field holding one mapping and nothing else keeps the value's type, text around mappings turns
them into text; the first Webhook response answers the HTTP call, and a run that reaches none answers
`200 Accepted`; a module that fails runs its error handler (`onerror`, ending with `builtin:Ignore`), or
fails the run, which Make answers `500`. Stricter than Make: a mapped path the event does not have is an
error (Make would insert nothing), so a renamed field fails a test instead of sending an empty reply.

Assumed, as Make's documentation describes them but no kept export shows: Transform to JSON turns a text
into a JSON string, quotes included (as `json.dumps` does); `text:notequal` is `text:equal` negated; an
empty `b` is the empty text; `trim()` strips spaces at both ends; a boolean operator reads a missing value
as false.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

MAPPING = re.compile(r"\{\{(.*?)\}\}", re.S)
_REFERENCE = re.compile(r"(\d+)((?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?)+)")
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?")

TRIGGER = "gateway:CustomWebHook"
ROUTER = "builtin:BasicRouter"
RESPOND = "gateway:WebhookRespond"
TO_JSON = "json:TransformToJSON"
COMPLETION = "openai-gpt-3:CreateCompletion"
IGNORE = "builtin:Ignore"


class Unsupported(Exception):
    """The blueprint uses a module, operator or mapping form this player does not know."""


class ModuleFailed(Exception):
    """A module's service failed (raised by `complete`): the module's error handler runs, if it has one."""


@dataclass(frozen=True)
class Reference:
    """One `{{N.path}}` mapping: the module whose output it reads, and the path (names; 1-based indexes)."""

    module: int
    path: tuple[str | int, ...]

    def text(self) -> str:
        """The mapping as written in the blueprint, without braces."""
        out = str(self.module)
        for step in self.path:
            out += f"[{step}]" if isinstance(step, int) else f".{step}"
        return out


_TRIM = re.compile(r"trim\((.*)\)", re.S)
LITERALS = {"true": True, "false": False}


def parse_reference(expression: str) -> Reference:
    """The reference in one `{{…}}`, inside `trim(…)` or not; nothing else is allowed in our blueprints."""
    expression = expression.strip()
    inner = _TRIM.fullmatch(expression)
    match = _REFERENCE.fullmatch(inner.group(1).strip() if inner else expression)
    if match is None:
        raise Unsupported(f"mapping {{{{{expression}}}}} is not `N.path` or `trim(N.path)`")
    path: list[str | int] = []
    for name, index in _STEP.findall(match.group(2)):
        path.append(name)
        if index:
            path.append(int(index))
    return Reference(int(match.group(1)), tuple(path))


def lookup(value: Any, path: tuple[str | int, ...]) -> Any:
    """The value at `path` (KeyError when it is not there)."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(value, list) or not 1 <= step <= len(value):
                raise KeyError(step)
            value = value[step - 1]
        else:
            if not isinstance(value, dict) or step not in value:
                raise KeyError(step)
            value = value[step]
    return value


def modules(flow: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every module of a flow, routes and error handlers included, in order."""
    for module in flow:
        yield module
        for route in module.get("routes") or []:
            yield from modules(route["flow"])
        yield from modules(module.get("onerror") or [])


def strings(value: Any) -> Iterator[str]:
    """Every string inside a mapper or filter."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def references(blueprint: dict[str, Any]) -> list[Reference]:
    """Every mapping in the blueprint's mappers and filters."""
    found = []
    for module in modules(blueprint["flow"]):
        for text in strings([module.get("mapper"), module.get("filter")]):
            found.extend(parse_reference(m.group(1)) for m in MAPPING.finditer(text)
                         if m.group(1).strip() not in LITERALS)
    return found


def as_text(value: Any) -> str:
    """A value inserted into text, as Make writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise Unsupported(f"a collection or array mapped into text: {value!r:.80}")


@dataclass
class Response:
    """What Make answers the HTTP call with."""

    status: int
    headers: dict[str, str]
    body: str


@dataclass
class Scenario:
    """A blueprint, and the model a completion module asks (`complete(mapper) -> text`)."""

    blueprint: dict[str, Any]
    complete: Callable[[dict[str, Any]], str]
    resolved: set[str] = field(default_factory=set)  # mappings that have read a value, over all runs
    ran: set[int] = field(default_factory=set)  # ids of the modules that ran, over all runs

    def run(self, event: dict[str, Any]) -> Response:
        """One run of the scenario for the event posted to its webhook."""
        flow = self.blueprint["flow"]
        if flow[0]["module"] != TRIGGER:
            raise Unsupported(f"the trigger is {flow[0]['module']}, not {TRIGGER}")
        outputs = {flow[0]["id"]: event}
        self.ran.add(flow[0]["id"])
        answers: list[Response] = []
        self._run(flow[1:], outputs, answers)
        if len(answers) > 1:
            raise AssertionError(f"{len(answers)} Webhook responses in one run (Make allows one)")
        return answers[0] if answers else Response(200, {"Content-Type": "text/plain"}, "Accepted")

    def _run(self, flow: list[dict[str, Any]], outputs: dict[int, Any], answers: list[Response]) -> None:
        for module in flow:
            if module.get("filter") and not self._passes(module["filter"], outputs):
                return
            self.ran.add(module["id"])
            kind, mapper = module["module"], module.get("mapper") or {}
            if kind == ROUTER:
                for route in module["routes"]:
                    self._run(route["flow"], dict(outputs), answers)
                return
            if kind == IGNORE:
                return
            if kind == COMPLETION:
                try:
                    text = self.complete(self._value(mapper, outputs))
                except ModuleFailed:
                    if not module.get("onerror"):
                        raise
                    self._run(module["onerror"], outputs, answers)
                    return
                outputs[module["id"]] = {"result": text, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
            elif kind == TO_JSON:
                outputs[module["id"]] = {"json": json.dumps(self._value(mapper["object"], outputs),
                                                            ensure_ascii=False)}
            elif kind == RESPOND:
                headers = {h["key"]: self._text(h["value"], outputs) for h in mapper.get("headers") or []}
                answers.append(Response(int(self._text(str(mapper["status"]), outputs)), headers,
                                        self._text(mapper["body"], outputs)))
            else:
                raise Unsupported(f"module {kind}")

    def _passes(self, condition: dict[str, Any], outputs: dict[int, Any]) -> bool:
        """Whether a filter lets the bundle through (a missing value reads as empty, as in Make)."""
        for alternative in condition["conditions"]:
            if all(self._holds(term, outputs) for term in alternative):
                return True
        return False

    def _holds(self, term: dict[str, Any], outputs: dict[int, Any]) -> bool:
        kind, _, negated = term["o"].partition(":")
        if kind == "text" and negated in ("equal", "notequal"):
            a, b = (self._text(term.get(side, ""), outputs, strict=False) for side in ("a", "b"))
        elif kind == "boolean" and negated in ("equal", "notequal"):
            # Make reads `true` (or the text "true") as true, anything else, a missing value included, as false.
            a, b = (self._value(term.get(side, ""), outputs, strict=False) in (True, "true") for side in ("a", "b"))
        else:
            raise Unsupported(f"filter operator {term['o']}")
        return (a == b) if negated == "equal" else (a != b)

    def _read(self, expression: str, outputs: dict[int, Any], strict: bool = True) -> Any:
        if expression.strip() in LITERALS:
            return LITERALS[expression.strip()]
        reference = parse_reference(expression)
        try:
            value = lookup(outputs[reference.module], reference.path)
        except KeyError:
            if strict:
                raise AssertionError(f"{{{{{reference.text()}}}}} is not in module {reference.module}'s output: "
                                     f"{json.dumps(outputs.get(reference.module))[:300]}") from None
            return None
        self.resolved.add(reference.text())
        if _TRIM.fullmatch(expression.strip()):
            return as_text(value).strip()
        return value

    def _text(self, template: str, outputs: dict[int, Any], strict: bool = True) -> str:
        return MAPPING.sub(lambda m: as_text(self._read(m.group(1), outputs, strict)), template)

    def _value(self, value: Any, outputs: dict[int, Any], strict: bool = True) -> Any:
        """A mapper field as the module gets it: one mapping alone keeps its type; otherwise text."""
        if isinstance(value, dict):
            return {key: self._value(item, outputs, strict) for key, item in value.items()}
        if isinstance(value, list):
            return [self._value(item, outputs, strict) for item in value]
        if isinstance(value, str):
            alone = MAPPING.fullmatch(value.strip())
            return self._read(alone.group(1), outputs, strict) if alone else self._text(value, outputs, strict)
        return value
