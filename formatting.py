"""Formatted text as Telegram shows it: Markdown, HTML and MarkdownV2 turned into visible text plus
`MessageEntity` dicts, and that text split into messages without breaking a word or losing a style.

The gateway never sends `parse_mode`: it parses here and sends `entities`, so Telegram has nothing to
refuse for markup ("can't parse entities"), and a long text can be cut anywhere in its *visible* text,
each part carrying the entities that cover it. Offsets and lengths count UTF-16 code units, as
Telegram's do. The parsers are lenient: markup they cannot make sense of stays as literal text.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from html.parser import HTMLParser
from typing import Any

from telegramify_markdown import RenderConfig
from telegramify_markdown import convert as _convert_markdown

from markdown_v2 import parse_markdown_v2

FORMATS = ("plain", "markdown", "html")
PARSE_MODES = {"HTML": "html", "MarkdownV2": "markdown_v2"}  # `parse_mode` values, read as formats
TEXT_LIMIT = 4096  # a message's text, in UTF-16 code units after entity parsing
CAPTION_LIMIT = 1024  # a photo's or document's caption
MAX_ENTITIES = 100  # Telegram keeps the first 100 entities of a message and silently drops the rest

Entity = dict[str, Any]

# Headings become bold lines, without the emoji telegramify-markdown puts before them by default.
_MARKDOWN = RenderConfig.isolated()
for _level in range(1, 7):
    setattr(_MARKDOWN.markdown_symbol, f"heading_level_{_level}", "")

_NO_NESTING = {"code", "pre"}  # they contain no other entity
_QUOTES = {"blockquote", "expandable_blockquote"}  # they cannot be nested in each other
_LINKS = {"text_link", "text_mention", "custom_emoji"}  # cannot contain each other
_SAFE_URL = re.compile(r"(?i)(https?|tg|ton|mailto):\S+")
_BARE_DOMAIN = re.compile(r"(?i)[\w-]+(\.[\w-]+)*\.[a-z]{2,}(/\S*)?")
_LANGUAGE = re.compile(r"[\w#+.-]{1,32}")
MAX_NESTING = 10  # list and quote levels read; each level indents every line below it, so depth costs size
# A line that opens list items or quotes one after another (`- - - x`, `> 1. > - x`): every marker is a
# level, and the converter indents by the level, so 16,000 markers would read into 256 MB of text.
_MARKER = r"[ \t]*(?:>|[-*+](?=[ \t])|\d{1,9}[.)](?=[ \t]))[ \t]*"
_DEEP_LINE = re.compile(rf"(?m)^(?:{_MARKER}){{{MAX_NESTING + 1},}}")
_ONE_MARKER = re.compile(_MARKER)


def utf16_len(text: str) -> int:
    """Length of `text` in UTF-16 code units, as Telegram counts it (a lone surrogate counts as one)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def to_entities(source: str, fmt: str) -> tuple[str, list[Entity]]:
    """The visible text and entities of `source` written in `fmt` (`plain`, `markdown`, `html` or
    `markdown_v2`), cleaned so that Telegram accepts them: see `clean_entities`."""
    if fmt == "markdown":
        text, found = _markdown(source)
    elif fmt == "html":
        text, found = parse_html(source)
    elif fmt == "markdown_v2":
        text, found = parse_markdown_v2(source)
    elif fmt == "plain":
        return source, []
    else:
        raise ValueError(f"unknown format {fmt!r}")
    text = text.rstrip()  # Telegram trims a message; a list's or code block's last newline is not content
    return text, clean_entities(text, found)


def _markdown(source: str) -> tuple[str, list[Entity]]:
    text, found = _convert_markdown(_DEEP_LINE.sub(_shallower, source), config=_MARKDOWN)
    return text, [entity.to_dict() for entity in found]


def _shallower(line_start: re.Match[str]) -> str:
    """The first `MAX_NESTING` list or quote markers of a line that opens more."""
    end, prefix = 0, line_start.group(0)
    for _ in range(MAX_NESTING):
        end = _ONE_MARKER.match(prefix, end).end()
    return prefix[:end]


def clean_entities(text: str, entities: list[Entity]) -> list[Entity]:
    """`entities` sorted, clipped to `text`, and without what Telegram would refuse or misread: empty ones,
    partial overlaps, anything inside code, a quote in a quote, a link in a link, a link to no web
    address (`javascript:`, a relative path); a bare domain gets `https://`."""
    size = utf16_len(text)
    candidates = []
    for entity in entities:
        start, end = max(0, entity["offset"]), min(size, entity["offset"] + entity["length"])
        entity = _usable(entity)
        if entity is not None and end > start:
            candidates.append({**entity, "offset": start, "length": end - start})
    candidates.sort(key=lambda e: (e["offset"], -e["length"]))
    kept: list[Entity] = []
    open_: list[Entity] = []  # the kept entities that contain the current position, outermost first
    for entity in candidates:
        start, end = entity["offset"], entity["offset"] + entity["length"]
        while open_ and open_[-1]["offset"] + open_[-1]["length"] <= start:
            open_.pop()
        if open_ and end > open_[-1]["offset"] + open_[-1]["length"]:
            continue  # overlaps its neighbour partially: Telegram has no way to show that
        kinds = {e["type"] for e in open_}
        if (kinds & _NO_NESTING or (entity["type"] in _QUOTES and kinds & _QUOTES)
                or (entity["type"] in _NO_NESTING | _LINKS and kinds & _LINKS)
                or any(e["type"] == entity["type"] for e in open_)):  # bold in bold says nothing more
            continue
        kept.append(entity)
        open_.append(entity)
    return kept


def _usable(entity: Entity) -> Entity | None:
    """`entity` made acceptable to Telegram (a bare domain as an https link, a bad language dropped), or None."""
    kind = entity.get("type")
    if kind == "text_link":
        url = str(entity.get("url") or "").strip()
        if _BARE_DOMAIN.fullmatch(url):
            url = "https://" + url
        return {**entity, "url": url} if _SAFE_URL.fullmatch(url) else None
    if kind == "custom_emoji":
        return entity if str(entity.get("custom_emoji_id", "")).isdigit() else None
    if kind == "pre" and "language" in entity and not _LANGUAGE.fullmatch(str(entity["language"])):
        return {key: value for key, value in entity.items() if key != "language"}
    if kind == "text_mention":
        return None  # needs a User object; nothing in our inputs can supply one
    return entity if isinstance(kind, str) else None


def split_entities(text: str, entities: list[Entity], limit: int = TEXT_LIMIT,
                   max_entities: int = MAX_ENTITIES) -> list[tuple[str, list[Entity]]]:
    """Split `text` into parts of at most `limit` UTF-16 units, each with at most `max_entities` entities,
    cut after a paragraph break, else a line break, else a space (never in the first half of a part),
    else hard. The parts' texts joined are `text` exactly; an entity across a cut is in both parts."""
    starts = _unit_offsets(text)
    entities = sorted(entities, key=lambda e: (e["offset"], -e["length"]))
    parts: list[tuple[str, list[Entity]]] = []
    begin, first = 0, 0  # the part's first character; the first entity that starts in it or later
    crossing: list[Entity] = []  # entities that start before the part and go on into it
    while True:
        low = starts[begin]
        end = bisect_right(starts, low + limit) - 1  # the most characters that fit
        room = max_entities - len(crossing)
        if 0 < room and first + room < len(entities):  # cut before the first entity that would not fit
            cut = bisect_left(starts, entities[first + room]["offset"])
            end = min(end, cut) if cut > begin else end
        if end < len(text):
            end = _boundary(text, begin, end)
        else:
            end = len(text)
        high = starts[end]
        last = first
        while last < len(entities) and entities[last]["offset"] < high:
            last += 1
        inside = crossing + entities[first:last]
        parts.append((text[begin:end], [_clip(e, low, high) for e in inside if e["offset"] + e["length"] > low]))
        if end == len(text):
            return parts
        crossing = [e for e in inside if e["offset"] + e["length"] > high]
        begin, first = end, last


def _unit_offsets(text: str) -> list[int]:
    """The UTF-16 offset of each character of `text`, and of its end."""
    offsets, units = [0] * (len(text) + 1), 0
    for index, char in enumerate(text):
        offsets[index] = units
        units += 2 if ord(char) > 0xFFFF else 1
    offsets[len(text)] = units
    return offsets


def _boundary(text: str, begin: int, end: int) -> int:
    """Where to cut `text[begin:end]`: after the last paragraph break, line break or whitespace run in its
    second half, or at `end`. The next part then starts with what follows the separator."""
    half = begin + (end - begin) // 2
    for separator in ("\n\n", "\n", " "):
        at = text.rfind(separator, half, end)
        if at > begin:
            cut = at + len(separator)
            while cut < end and text[cut].isspace():
                cut += 1
            return cut
    return max(end, begin + 1)


def _clip(entity: Entity, low: int, high: int) -> Entity:
    """`entity` cut to the part from UTF-16 offset `low` to `high`, its offset made relative to the part."""
    start, stop = max(low, entity["offset"]), min(high, entity["offset"] + entity["length"])
    return {**entity, "offset": start - low, "length": stop - start}


def head(text: str, entities: list[Entity], chars: int) -> tuple[str, list[Entity]]:
    """The first `chars` characters of `text`, its entities clipped to them."""
    if len(text) <= chars:
        return text, entities
    kept = text[:chars]
    size = utf16_len(kept)
    clipped = [{**e, "length": min(e["length"], size - e["offset"])} for e in entities if e["offset"] < size]
    return kept, [e for e in clipped if e["length"] > 0]


def trim(text: str, entities: list[Entity]) -> tuple[str, list[Entity]]:
    """`text` without trailing whitespace (Telegram drops it), its entities clipped to what is left."""
    return head(text, entities, len(text.rstrip()))


class _TelegramHTML(HTMLParser):
    """Telegram's HTML (b, i, u, s, tg-spoiler, a, tg-emoji, code, pre, blockquote) to text and entities,
    and leniently the HTML models write: p and div as paragraphs, br, headings as bold, lists as bullets.
    Other tags are ignored with their text kept; an unclosed tag ends where the text does."""

    _STYLES = {"b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline", "ins": "underline",
               "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough", "tg-spoiler": "spoiler",
               "code": "code", "pre": "pre", **{f"h{n}": "bold" for n in range(1, 7)}}
    _BLOCKS = {"p", "div", "pre", "blockquote", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self.entities: list[Entity] = []
        self._units = 0
        self._open: list[tuple[str, Entity | None]] = []  # (tag, its entity, offset still to be set by close)
        self._lists: list[list[int]] = []  # for each open list: [next number] (ol) or [] (ul)
        self._open_count: dict[str, int] = {}  # how many of each tag are open: a stray end tag is found at once
        self._skip = 0  # inside <script> or <style>

    def _write(self, text: str) -> None:
        if text and not self._skip:
            self.pieces.append(text)
            self._units += utf16_len(text)

    def _ends_with(self, suffix: str) -> bool:
        tail = "".join(self.pieces[-2:])
        return not self.pieces or tail.endswith(suffix)

    def _break(self, blank_line: bool = False) -> None:
        """Start a new line (or leave a blank line) unless the text is empty or already does."""
        if self.pieces:
            for wanted in ("\n", "\n\n") if blank_line else ("\n",):
                if not self._ends_with(wanted):
                    self._write("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "br":
            self._write("\n")
            return
        elif tag == "hr":
            self._break()
            self._write("————————")
            self._break()
            return
        if tag in self._BLOCKS:
            self._break(blank_line=tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6"))
        if tag in ("ul", "ol"):
            self._lists.append([1] if tag == "ol" else [])
        elif tag == "li":
            numbering = self._lists[-1] if self._lists else []
            indent = "  " * min(MAX_NESTING, max(0, len(self._lists) - 1))
            self._write(f"{indent}{numbering[0]}. " if numbering else f"{indent}• ")
            if numbering:
                numbering[0] += 1
        self._open.append((tag, self._entity_for(tag, attributes)))
        self._open_count[tag] = self._open_count.get(tag, 0) + 1

    def _entity_for(self, tag: str, attributes: dict[str, str]) -> Entity | None:
        kind = self._STYLES.get(tag)
        if tag == "span" and "tg-spoiler" in attributes.get("class", "").split():
            kind = "spoiler"
        elif tag == "a" and attributes.get("href"):
            return {"type": "text_link", "offset": self._units, "url": attributes["href"]}
        elif tag == "tg-emoji" and attributes.get("emoji-id"):
            return {"type": "custom_emoji", "offset": self._units, "custom_emoji_id": attributes["emoji-id"]}
        elif tag == "blockquote":
            kind = "expandable_blockquote" if "expandable" in attributes else "blockquote"
        elif tag == "code" and self._open and self._open[-1][0] == "pre":
            language = attributes.get("class", "").removeprefix("language-")
            pre = self._open[-1][1]
            if pre is not None and language and attributes.get("class", "").startswith("language-"):
                pre["language"] = language
            return None  # <pre><code>: one pre entity
        return {"type": kind, "offset": self._units} if kind else None

    def handle_endtag(self, tag: str) -> None:
        if not self._open_count.get(tag):
            return  # a stray end tag closes nothing
        while self._open:
            open_tag, entity = self._open.pop()
            self._open_count[open_tag] -= 1
            self._close(open_tag, entity)
            if open_tag == tag:
                break

    def _close(self, tag: str, entity: Entity | None) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        if entity is not None:
            entity["length"] = self._units - entity["offset"]
            self.entities.append(entity)
        if tag in ("ul", "ol") and self._lists:
            self._lists.pop()
        if tag in self._BLOCKS:
            self._break()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr"):
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        self._write(data)

    def finish(self) -> tuple[str, list[Entity]]:
        self.close()
        while self._open:
            self._close(*self._open.pop())
        return "".join(self.pieces), self.entities


def parse_html(source: str) -> tuple[str, list[Entity]]:
    """The visible text and entities of `source`, written in Telegram's HTML (or the HTML models write)."""
    parser = _TelegramHTML()
    # `<!` other than a comment is a declaration, nothing Telegram's HTML has; html.parser fails on some.
    parser.feed(_DECLARATION.sub("&lt;!", source))
    return parser.finish()


_DECLARATION = re.compile(r"<!(?!--)")
