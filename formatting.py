"""Formatted text as Telegram shows it: Markdown, HTML and MarkdownV2 turned into visible text plus
`MessageEntity` dicts, and that text split into messages without breaking a word or losing a style.

The gateway never sends `parse_mode`: it parses here and sends `entities`, so Telegram has nothing to
refuse for markup ("can't parse entities"), and a long text can be cut anywhere in its *visible* text,
each part carrying the entities that cover it. Offsets and lengths count UTF-16 code units, as
Telegram's do. The parsers are lenient: markup they cannot make sense of stays as literal text.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from typing import Any
from urllib.parse import urlsplit

from telegramify_markdown import RenderConfig
from telegramify_markdown import convert as _convert_markdown

from markdown_v2 import parse_markdown_v2
from telegram_html import parse_html

FORMATS = ("plain", "markdown", "html")
# `parse_mode` values (any case, as Telegram reads them), read as formats. Legacy Markdown is not among them:
# its rules differ from MarkdownV2's in escapes and styles; `format: markdown` reads what models write.
PARSE_MODES = {"html": "html", "markdownv2": "markdown_v2"}
TEXT_LIMIT = 4096  # a message's text, in UTF-16 code units after entity parsing
CAPTION_LIMIT = 1024  # a photo's or document's caption
MAX_ENTITIES = 100  # Telegram keeps the first 100 entities of a message and silently drops the rest
# telegramify-markdown takes time quadratic in the number of empty blocks (`$$` or ``` repeated), so a
# Markdown source is read only up to a little more than the most text a reply may show.
MAX_MARKDOWN_CHARS = 40_000

Entity = dict[str, Any]

# Headings become bold lines, without the emoji telegramify-markdown puts before them by default.
_MARKDOWN = RenderConfig.isolated()
for _level in range(1, 7):
    setattr(_MARKDOWN.markdown_symbol, f"heading_level_{_level}", "")

_NO_NESTING = {"code", "pre"}  # they contain no other entity
_QUOTES = {"blockquote", "expandable_blockquote"}  # they cannot be nested in each other
_LINKS = {"text_link", "text_mention", "custom_emoji"}  # cannot contain each other
# On a tie (one range), the entity that may contain the other comes first: a link around code keeps its
# link (the code goes), a quote around bold keeps both.
_RANK = {"blockquote": 0, "expandable_blockquote": 0, "text_link": 1, "custom_emoji": 1, "text_mention": 1,
         "code": 3, "pre": 3}
MAX_URL_CHARS = 2048  # a link longer than this is no address a user follows
_LANGUAGE = re.compile(r"[\w#+.-]{1,32}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins escaped pairs: any left is lone
MAX_NESTING = 10  # list and quote levels read; each level indents every line below it, so depth costs size
# A line that opens list items or quotes one after another (`- - - x`, `> 1. > - x`): every marker is a
# level, and the converter indents by the level, so 16,000 markers would read into 256 MB of text. The
# markers cannot share characters (atomic groups), so matching them never backtracks.
_MARKER = r"(?>[ \t]*)(?:>|[-*+](?=[ \t])|\d{1,9}[.)](?=[ \t]))"
_DEEP_LINE = re.compile(rf"(?m)^(?>(?:{_MARKER}){{{MAX_NESTING + 1},}})")
_ONE_MARKER = re.compile(_MARKER)
# Characters that belong to the one before them (besides combining marks): a cut just before one would
# split what the user sees as one character.
_JOINERS = re.compile("[\u200c\u200d\u1160-\u11ff\ufe00-\ufe0f\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f]")
_REGIONAL = re.compile("[\U0001f1e6-\U0001f1ff]")  # flags are pairs of these


def clean_text(text: str) -> str:
    """`text` with each lone surrogate (half an emoji, not encodable as UTF-8) replaced by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def utf16_len(text: str) -> int:
    """Length of `text` in UTF-16 code units, as Telegram counts it (a lone surrogate counts as one)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def to_entities(source: str, fmt: str) -> tuple[str, list[Entity]]:
    """The visible text and entities of `source` written in `fmt` (`plain`, `markdown`, `html` or
    `markdown_v2`), cleaned so that Telegram accepts them: see `clean_entities`."""
    source = clean_text(source)
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
    # LaTeX conversion is off: its pattern is quadratic on unclosed `\(` and it changes text that is no math.
    # A bare `\r` ends a line too: the nesting cap must see every line.
    source = source[:MAX_MARKDOWN_CHARS].replace("\r\n", "\n").replace("\r", "\n")
    text, found = _convert_markdown(_DEEP_LINE.sub(_shallower, source), config=_MARKDOWN, latex_escape=False)
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
    address (`javascript:`, a relative path, a host with no dot); `www.…` gets `https://`."""
    size = utf16_len(text)
    candidates = []
    for entity in entities:
        start, end = max(0, entity["offset"]), min(size, entity["offset"] + entity["length"])
        entity = _usable(entity)
        if entity is not None and end > start:
            candidates.append({**entity, "offset": start, "length": end - start})
    candidates.sort(key=lambda e: (e["offset"], -e["length"], _RANK.get(e["type"], 2)))
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
                or (entity["type"] in _NO_NESTING | _LINKS | _QUOTES and kinds & _LINKS)
                or any(e["type"] == entity["type"] for e in open_)):  # bold in bold says nothing more
            continue
        kept.append(entity)
        open_.append(entity)
    return kept


def _usable(entity: Entity) -> Entity | None:
    """`entity` made acceptable to Telegram (`www.` as an https link, a bad language dropped), or None."""
    kind = entity.get("type")
    if kind == "text_link":
        url = str(entity.get("url") or "").strip()
        if url.lower().startswith("www."):
            url = "https://" + url
        return {**entity, "url": url} if _safe_url(url) else None
    if kind == "custom_emoji":
        return entity if str(entity.get("custom_emoji_id", "")).isdigit() else None
    if kind == "pre" and "language" in entity and not _LANGUAGE.fullmatch(str(entity["language"])):
        return {key: value for key, value in entity.items() if key != "language"}
    if kind == "text_mention":
        return None  # needs a User object; nothing in our inputs can supply one
    return entity if isinstance(kind, str) else None


def _safe_url(url: str) -> bool:
    """Whether Telegram takes `url` as a link: http(s) to a host with a dot (it refuses `http://localhost`),
    or `tg:`, `ton:`, `mailto:`; no whitespace, at most `MAX_URL_CHARS`."""
    if len(url) > MAX_URL_CHARS or any(char.isspace() for char in url):
        return False
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:  # a malformed port or IPv6 address
        return False
    if parts.scheme.lower() in ("http", "https"):
        return "." in host.strip(".") and ".." not in host
    return parts.scheme.lower() in ("tg", "ton", "mailto") and len(url) > len(parts.scheme) + 1


def split_entities(text: str, entities: list[Entity], limit: int = TEXT_LIMIT,
                   max_entities: int = MAX_ENTITIES) -> list[tuple[str, list[Entity]]]:
    """Split `text` into parts of at most `limit` UTF-16 units, cut after a paragraph break, else a line
    break, else a space (never in the first half of a part), else between two characters the user sees as
    two. The parts' texts joined are `text` exactly; an entity across a cut is in both parts. A part keeps
    its first `max_entities` entities (Telegram ignores any more): their text is never dropped for them."""
    starts = _unit_offsets(text)
    entities = sorted(entities, key=lambda e: (e["offset"], -e["length"]))
    parts: list[tuple[str, list[Entity]]] = []
    begin, first = 0, 0  # the part's first character; the first entity that starts in it or later
    crossing: list[Entity] = []  # entities that start before the part and go on into it
    while True:
        low = starts[begin]
        end = bisect_right(starts, low + limit) - 1  # the most characters that fit
        end = len(text) if end >= len(text) else _boundary(text, begin, end)
        high = starts[end]
        last = first
        while last < len(entities) and entities[last]["offset"] < high:
            last += 1
        inside = crossing + entities[first:last]
        parts.append((text[begin:end], _fewest([e for e in inside if e["offset"] + e["length"] > low], low, high,
                                               max_entities)))
        if end == len(text):
            return parts
        crossing = [e for e in inside if e["offset"] + e["length"] > high]
        begin, first = end, last


def _fewest(entities: list[Entity], low: int, high: int, most: int) -> list[Entity]:
    """The entities of the part from UTF-16 offset `low` to `high`, clipped to it; when there are more than
    `most`, those that run across either cut first (a style goes on across a cut), then the earliest."""
    if len(entities) > most:
        across = [e for e in entities if e["offset"] < low or e["offset"] + e["length"] > high]
        entities = sorted((across + [e for e in entities if low <= e["offset"] and e["offset"] + e["length"] <= high]
                           )[:most], key=lambda e: (e["offset"], -e["length"]))
    return [_clip(e, low, high) for e in entities]


def _unit_offsets(text: str) -> list[int]:
    """The UTF-16 offset of each character of `text`, and of its end."""
    offsets, units = [0] * (len(text) + 1), 0
    for index, char in enumerate(text):
        offsets[index] = units
        units += 2 if ord(char) > 0xFFFF else 1
    offsets[len(text)] = units
    return offsets


def _boundary(text: str, begin: int, end: int) -> int:
    """Where to cut `text[begin:end]`: after the last paragraph break, line break or space run in its second
    half (the next part starts with the next line, its indentation kept, or the next word), else at `end`
    moved back off a joiner, a combining mark or the middle of a flag."""
    half = begin + (end - begin) // 2
    for separator in ("\n\n", "\n", " "):
        at = text.rfind(separator, half, end)
        if at > begin:
            cut = at + len(separator)
            while cut < end and text[cut] == separator[0]:
                cut += 1
            return cut
    cut = end
    flags = 0  # the regional indicators just before the cut, counted from the start of their run
    while cut - flags - 1 >= 0 and flags < 4096 and _REGIONAL.match(text, cut - flags - 1):
        flags += 1
    if flags % 2 and _REGIONAL.match(text, cut) and cut - 1 > begin:
        cut -= 1
    for _ in range(32):  # a longer cluster is no text a user reads; cut it anywhere
        if cut - 1 > begin and (_joins_previous(text[cut]) or text[cut - 1] == "\u200d"):
            cut -= 1
        else:
            break
    return cut


def _joins_previous(char: str) -> bool:
    """Whether `char` is shown as part of the character before it (a combining mark, a joiner, a variation
    selector, a skin tone, a keycap, a tag, a Hangul vowel or final)."""
    return unicodedata.category(char) in ("Mn", "Mc", "Me") or bool(_JOINERS.match(char))


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
    return kept, [_clip(e, 0, size) for e in entities if e["offset"] < size and e["length"] > 0]


def trim(text: str, entities: list[Entity]) -> tuple[str, list[Entity]]:
    """`text` without trailing whitespace (Telegram drops it), its entities clipped to what is left."""
    return head(text, entities, len(text.rstrip()))
