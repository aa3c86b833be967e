"""HTML read leniently into Telegram's visible text plus `MessageEntity` dicts (UTF-16 offsets).

Telegram's own HTML (b, i, u, s, tg-spoiler, a, tg-emoji, code, pre, blockquote) becomes entities, and
the HTML models write reads as it would look: paragraphs and headings on lines of their own, lists as
bullets, table cells side by side, and the indentation of pretty-printed source dropped (whitespace
inside `pre` is kept). A `<` that opens no known HTML tag is text (`List<String>`, `#include <iostream>`,
`a < b`), so html.parser never waits for the end of a tag that does not come; an unclosed tag ends where
the text does; a stray end tag closes nothing.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

Entity = dict[str, Any]
MAX_LIST_INDENT = 10  # list levels that indent: each level indents every line below it, so depth costs size

_KNOWN_TAGS = frozenset("""
    a abbr address article aside b big blockquote body br caption center cite code dd del details dfn div dl dt
    em figcaption figure font footer h1 h2 h3 h4 h5 h6 head header hr html i img ins kbd label li main mark nav
    ol p pre q s samp section small span strike strong sub summary sup table tbody td tfoot tg-emoji tg-spoiler
    th thead time title tr tt u ul var wbr""".split())
# A whole tag (its attributes hold no `<` or `>` before its end) or a comment; any other `<` is text. Each
# attempt stops at the next `<`, so escaping is linear however the source is built.
_TAG_START = re.compile(r"<(?:/?([A-Za-z][\w-]*)(?:\s[^<>]*)?/?>|!--[^<]*?-->)?")
_STYLES = {"b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline", "ins": "underline",
           "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough", "tg-spoiler": "spoiler",
           "code": "code", "pre": "pre", **{f"h{n}": "bold" for n in range(1, 7)}}
_PARAGRAPHS = {"p", "h1", "h2", "h3", "h4", "h5", "h6"}  # a blank line before them
_BLOCKS = _PARAGRAPHS | {"div", "pre", "blockquote", "ul", "ol", "li", "table", "tr", "dl", "dt", "dd",
                         "section", "article", "header", "footer", "figure", "details", "summary"}
_EDGES = _BLOCKS | {"td", "th", "thead", "tbody", "tfoot", "br", "hr"}  # source whitespace beside them is layout
_TRIMS = _EDGES - {"br"}  # what comes before them loses its trailing whitespace (a `<br><br>` stays two lines)
_SPACE = " \t\r\n"


def parse_html(source: str) -> tuple[str, list[Entity]]:
    """The visible text and entities of `source`, written in Telegram's HTML (or the HTML models write)."""
    parser = _TelegramHTML()
    parser.feed(_TAG_START.sub(_escape_unknown, source))
    return parser.finish()


def _escape_unknown(found: re.Match[str]) -> str:
    """A known tag or a comment as it is; any other `<` as `&lt;`."""
    name = found.group(1)
    if found.group(0) == "<" or (name is not None and name.lower() not in _KNOWN_TAGS):
        return "&lt;" + found.group(0)[1:]
    return found.group(0)


def _units(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-16-le", "surrogatepass")) // 2


class _TelegramHTML(HTMLParser):
    """The parser behind `parse_html`: writes the visible text in pieces and records entities as tags close."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self._from_source: list[bool] = []  # for each piece: text of the source (else written for layout)
        self.entities: list[Entity] = []  # in the order they closed, so their ends never decrease
        self._units = 0
        self._open: list[tuple[str, Entity | None]] = []  # open tags and the entity each started
        self._open_entities: list[Entity] = []  # the entities of `_open`, their offsets rising to the top
        self._open_count: dict[str, int] = {}  # how many of each tag are open: a stray end tag is found at once
        self._lists: list[list[int]] = []  # for each open list: [next number] (ol) or [] (ul)
        self._pre = 0  # open <pre> tags: whitespace inside them is content
        self._edge = True  # just after a block's edge: source whitespace here is layout, not text
        self._after_bullet = False  # a list item's bullet was the last thing written
        self._cells = 0  # cells so far in the current table row
        self._in_cell = 0  # open td/th: a paragraph in a cell stays on the row's line

    def _write(self, text: str, from_source: bool = False) -> None:
        if text:
            self.pieces.append(text)
            self._from_source.append(from_source)
            self._units += _units(text)
            self._after_bullet = False

    def _trim(self) -> None:
        """Drop the source's whitespace at the end of the text (its layout, before a block's edge; not the
        breaks and bullets written for the blocks), and end the entities there too."""
        while self.pieces and self._from_source[-1] and self.pieces[-1].rstrip(_SPACE) != self.pieces[-1]:
            popped = self.pieces.pop()
            self._from_source.pop()
            self._units -= _units(popped)
            kept = popped.rstrip(_SPACE)
            if kept:
                self.pieces.append(kept)
                self._from_source.append(True)
                self._units += _units(kept)
                break
        for entity in reversed(self.entities):
            if entity["offset"] + entity["length"] <= self._units:
                break
            entity["length"] = max(0, self._units - entity["offset"])
        for entity in reversed(self._open_entities):
            if entity["offset"] <= self._units:
                break
            entity["offset"] = self._units

    def _break(self, blank_line: bool = False) -> None:
        """Start a new line (or leave a blank line) unless the text is empty, already does, or a bullet
        was just written (`<li><p>` keeps its text beside the bullet)."""
        if not self.pieces or self._after_bullet or self._in_cell:
            return
        tail = "".join(self.pieces[-2:])
        wanted = "\n\n" if blank_line else "\n"
        if not tail.endswith(wanted):
            self._write("\n" if tail.endswith("\n") else wanted)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag in _TRIMS and not self._pre:
            self._trim()
        if tag == "br":
            self._write("\n")
        elif tag == "hr":
            self._break()
            self._write("————————")
            self._break()
        if tag in _EDGES:
            self._edge = True
        if tag in ("br", "hr", "img", "wbr"):
            return  # void elements: nothing to close
        if tag in _BLOCKS:
            self._break(blank_line=tag in _PARAGRAPHS)
        if tag in ("ul", "ol"):
            self._lists.append([1] if tag == "ol" else [])
        elif tag == "li":
            numbering = self._lists[-1] if self._lists else []
            indent = "  " * min(MAX_LIST_INDENT, max(0, len(self._lists) - 1))
            self._write(f"{indent}{numbering[0]}. " if numbering else f"{indent}• ")
            self._after_bullet = True
            if numbering:
                numbering[0] += 1
        elif tag == "tr":
            self._cells = 0
        elif tag in ("td", "th"):
            if self._cells:
                self._write(" | ")
            self._cells += 1
            self._in_cell += 1
        elif tag == "pre":
            self._pre += 1
        entity = self._entity_for(tag, attributes)
        self._open.append((tag, entity))
        if entity is not None:
            self._open_entities.append(entity)
        self._open_count[tag] = self._open_count.get(tag, 0) + 1

    def _entity_for(self, tag: str, attributes: dict[str, str]) -> Entity | None:
        kind = _STYLES.get(tag)
        if tag == "span" and "tg-spoiler" in attributes.get("class", "").split():
            kind = "spoiler"
        elif tag == "a" and attributes.get("href"):
            return {"type": "text_link", "offset": self._units, "url": attributes["href"]}
        elif tag == "tg-emoji" and attributes.get("emoji-id"):
            return {"type": "custom_emoji", "offset": self._units, "custom_emoji_id": attributes["emoji-id"]}
        elif tag == "blockquote":
            kind = "expandable_blockquote" if "expandable" in attributes else "blockquote"
        elif tag == "code" and self._open and self._open[-1][0] == "pre":
            css = attributes.get("class", "")
            pre = self._open[-1][1]
            if pre is not None and css.startswith("language-") and len(css) > len("language-"):
                pre["language"] = css.removeprefix("language-")
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
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        elif tag in ("td", "th"):
            self._in_cell = max(0, self._in_cell - 1)
        if tag in _TRIMS and not self._pre:
            self._trim()
        if entity is not None:
            self._open_entities.pop()
            entity["length"] = self._units - entity["offset"]
            self.entities.append(entity)
        if tag in ("ul", "ol") and self._lists:
            self._lists.pop()
        if tag in _BLOCKS:
            self._break()
        if tag in _EDGES:
            self._edge = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img", "wbr"):
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        if self._edge and not self._pre:
            data = data.lstrip(_SPACE)
        if data:
            self._edge = False
            self._write(data, from_source=True)

    def finish(self) -> tuple[str, list[Entity]]:
        """Close what is still open; the text and the entities."""
        self.close()
        while self._open:
            self._close(*self._open.pop())
        return "".join(self.pieces), self.entities
