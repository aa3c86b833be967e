"""Telegram's MarkdownV2 parse mode read leniently: the visible text plus `MessageEntity` dicts.

What Telegram accepts is read as tdlib's `parse_markdown_v2` (which the Bot API runs) reads it: a pre
block keeps the newline before its closing ```, a quote the newline that ends it. Where Telegram would
refuse the message ("can't parse entities"), the refused markup stays in the text as literal characters.
Style markers match like brackets: a closer ends the nearest open marker of its kind, and markers opened
after that one stay literal; no marker matches across a quote's edge. `[text]` with no `(url)` stays
literal too, where Telegram would drop the brackets.
"""

from __future__ import annotations

import re
from typing import Any

Entity = dict[str, Any]

# Everything else is text. `>` matters only at a line start, `(` only right after a link's `]`.
_SPECIAL = re.compile(r"[\\_*\[\]~`|!\n]")
_ESCAPE = r"\\[\x01-\x7e]"  # any character from 1 to 126 can be escaped, anywhere
_UNESCAPE = re.compile(r"\\([\x01-\x7e])")
_CODE_END = re.compile(_ESCAPE + "|`")
_PRE_END = re.compile(_ESCAPE + "|```")
_URL_END = re.compile(_ESCAPE + r"|\)")
_LANGUAGE = re.compile(r"([^\s`]*)\r?\n")  # ```python then a newline; the newline is markup too
_EMOJI_URL = re.compile(r"tg://emoji\?id=(\d+)")
_STYLES = {"*": "bold", "_": "italic", "__": "underline", "~": "strikethrough", "||": "spoiler"}


def parse_markdown_v2(source: str) -> tuple[str, list[Entity]]:
    """The visible text of a MarkdownV2 message and its entities (Telegram MessageEntity dicts, offsets and
    lengths in UTF-16 code units), parsed leniently: markup Telegram would refuse is kept as literal text."""
    return _Parser(source).parse()


def _units(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-16-le", "surrogatepass")) // 2


class _Parser:
    """One left-to-right pass over the source; no recursion, so nesting depth costs no stack."""

    def __init__(self, source: str) -> None:
        self.src = source
        # The output, in pieces: an open marker's piece holds its source text until a closer matches it
        # (then it becomes ""), so whatever is left unmatched at the end is literal text with no rework.
        self.pieces: list[str] = []
        self.spans: list[tuple[int, int, Entity]] = []  # (first piece, piece after the last, entity)
        self.stack: list[tuple[str, int, bool]] = []  # open markers: (kind, their piece, is a custom emoji)
        self.depths: dict[str, list[int]] = {}  # kind -> stack indices of its open markers, so no search
        self.expandable = False  # the open quote's last line ended with `||`
        self.scans: dict[re.Pattern[str], tuple[int, int]] = {}  # pattern -> (scanned from, closer found)

    def parse(self) -> tuple[str, list[Entity]]:
        src, at = self.src, self._line_start(0)
        while (found := _SPECIAL.search(src, at)) is not None:
            if found.start() > at:
                self.pieces.append(src[at:found.start()])
            at = self._markup(found.start())
        self.pieces.append(src[at:])
        self._end_quote()
        return self._result()

    def _markup(self, i: int) -> int:
        """Handle the special character at `i`; return where the text after it starts."""
        src, char = self.src, self.src[i]
        after = src[i + 1:i + 2]
        if char == "\\":
            escaped = "\x01" <= after <= "\x7e"
            self.pieces.append(after if escaped else char)  # a `\` escaping nothing is just a backslash
            return i + 1 + escaped
        if char == "\n":
            return self._newline(i)
        if char == "`":
            return self._code(i)
        if char == "]":
            return self._link_end(i)
        if char == "[" or (char == "!" and after == "["):
            self._open("link", src[i:i + 2] if char == "!" else "[", emoji=char == "!")
            return i + (2 if char == "!" else 1)
        if char == "!" or (char == "|" and after != "|"):
            self.pieces.append(char)
            return i + 1
        marker = char * 2 if char in "_|" and after == char else char
        kind = _STYLES[marker]
        depth = self._closable(kind)
        if depth is not None:
            self._close(depth, {"type": kind})
        elif marker == "||" and self._ends_quote(i + 2):
            self.expandable = True  # `||` ending a quote's last line is the expandability mark, not text
        else:
            self._open(kind, marker)
        return i + len(marker)

    def _open(self, kind: str, marker: str, emoji: bool = False) -> None:
        self.depths.setdefault(kind, []).append(len(self.stack))
        self.stack.append((kind, len(self.pieces), emoji))
        self.pieces.append(marker)

    def _closable(self, kind: str) -> int | None:
        """Stack index of the innermost open `kind` marker a closer here may match, if any."""
        depths, quote = self.depths.get(kind), self.depths.get("quote")
        if not depths or (quote and kind != "quote" and depths[-1] < quote[-1]):
            return None
        return depths[-1]

    def _close(self, depth: int, entity: Entity | None) -> None:
        """Match the marker at stack index `depth`; the ones opened after it stay literal text."""
        for kind, _, _ in self.stack[depth:]:
            self.depths[kind].pop()
        at = self.stack[depth][1]
        del self.stack[depth:]
        self.pieces[at] = ""
        if entity is not None:
            self.spans.append((at, len(self.pieces), entity))

    def _find(self, pattern: re.Pattern[str], start: int) -> int:
        """Index of the first unescaped closer `pattern` finds from `start`, or -1."""
        # Scans from later starts see the same escapes (a start never falls inside `\x`), so the last
        # answer holds for any start up to the closer it found: `](` repeated costs no rescan.
        begun, found = self.scans.get(pattern, (len(self.src) + 1, -1))
        if not (begun <= start and (found < 0 or start <= found)):
            found = next((m.start() for m in pattern.finditer(self.src, start) if m[0][0] != "\\"), -1)
            self.scans[pattern] = (start, found)
        return found

    def _code(self, i: int) -> int:
        """Inline code or a pre block from `i`, whose content is verbatim but for escapes."""
        if self.src.startswith("```", i):
            language = _LANGUAGE.match(self.src, i + 3)
            start = language.end() if language else i + 3
            end = self._find(_PRE_END, start)
            if end < 0:
                self.pieces.append("```")
                return i + 3
            entity: Entity = {"type": "pre"}
            if language and language[1]:
                entity["language"] = language[1]
            stop = end + 3
        else:
            start, end, entity = i + 1, self._find(_CODE_END, i + 1), {"type": "code"}
            if end < 0:
                self.pieces.append("`")
                return i + 1
            stop = end + 1
        self.spans.append((len(self.pieces), len(self.pieces) + 1, entity))
        self.pieces.append(_UNESCAPE.sub(r"\1", self.src[start:end]))
        return stop

    def _link_end(self, i: int) -> int:
        """`](url)` closing a link or custom emoji; a `]` that closes nothing usable is text."""
        depth = self._closable("link")
        end = self._find(_URL_END, i + 2) if depth is not None and self.src.startswith("(", i + 1) else -1
        entity = self._link(self.stack[depth][2], i + 2, end) if depth is not None and end >= 0 else None
        if depth is None or entity is None:
            self.pieces.append("]")
            return i + 1
        self._close(depth, entity)
        return end + 1

    def _link(self, emoji: bool, start: int, end: int) -> Entity | None:
        """The entity of a link or custom emoji whose URL is `src[start:end]`, or None where Telegram
        would refuse it (an emoji without its id) or make no link (`[note]()`)."""
        if emoji:
            # Emoji URLs are short: unescaping a long one again at each of many `](` would be quadratic.
            found = _EMOJI_URL.fullmatch(_UNESCAPE.sub(r"\1", self.src[start:end])) if end - start < 80 else None
            return {"type": "custom_emoji", "custom_emoji_id": found[1]} if found else None
        url = _UNESCAPE.sub(r"\1", self.src[start:end])
        return {"type": "text_link", "url": url} if url.strip() else None

    def _newline(self, i: int) -> int:
        self.pieces.append("\n")
        if not self._continues_quote(i + 1):
            self._end_quote()  # Telegram counts the newline that ends a quote as part of it
        return self._line_start(i + 1)

    def _continues_quote(self, i: int) -> bool:
        return self.src.startswith(">", i)

    def _ends_quote(self, i: int) -> bool:
        """Whether position `i` ends the last line of an open quote."""
        if not self.depths.get("quote"):
            return False
        if self.src.startswith("\r", i):
            i += 1
        return i == len(self.src) or (self.src[i] == "\n" and not self._continues_quote(i + 1))

    def _line_start(self, i: int) -> int:
        """Open a quote at `>` (or at `**>`, an empty bold that separates it from the quote above)."""
        marker = 1 if self.src.startswith(">", i) else 3 if self.src.startswith("**>", i) else 0
        if marker and not self.depths.get("quote"):
            self.expandable = False
            self._open("quote", "")
        return i + marker

    def _end_quote(self) -> None:
        depth = self._closable("quote")
        if depth is not None:
            self._close(depth, {"type": "expandable_blockquote" if self.expandable else "blockquote"})

    def _result(self) -> tuple[str, list[Entity]]:
        offsets = [0]
        for piece in self.pieces:
            offsets.append(offsets[-1] + _units(piece))
        entities = []
        for first, after, entity in self.spans:
            offset, length = offsets[first], offsets[after] - offsets[first]
            if length > 0:
                entities.append({"type": entity["type"], "offset": offset, "length": length,
                                 **{key: value for key, value in entity.items() if key != "type"}})
        entities.sort(key=lambda e: (e["offset"], -e["length"]))
        return "".join(self.pieces), entities
