"""markdown_v2.py: Telegram's MarkdownV2 read into visible text + entities, leniently and in linear time."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from markdown_v2 import parse_markdown_v2

RESERVED = "_*[]()~`>#+-=|{}.!\\"  # what MarkdownV2 asks to escape outside code and URLs, and `\` itself
TYPES = {"bold", "italic", "underline", "strikethrough", "spoiler", "code", "pre", "text_link", "custom_emoji",
         "blockquote", "expandable_blockquote"}
STYLES = {"bold": "*", "italic": "_", "underline": "__", "strikethrough": "~"}


def units(text: str) -> int:
    """UTF-16 code units of `text`, counted independently of the code under test."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def covered(text: str, entity: dict[str, Any]) -> str:
    """The characters of `text` an entity covers, cut from its UTF-16 encoding as Telegram counts."""
    raw = text.encode("utf-16-le", "surrogatepass")
    return raw[entity["offset"] * 2:(entity["offset"] + entity["length"]) * 2].decode("utf-16-le", "surrogatepass")


def spans(text: str, entities: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each entity as (type, the text it covers), plus its extra fields (url, language, id) when it has any."""
    result = []
    for entity in entities:
        extra = {key: value for key, value in entity.items() if key not in ("type", "offset", "length")}
        span = (entity["type"], covered(text, entity))
        result.append((*span, extra) if extra else span)
    return result


def escape(text: str) -> str:
    """`text` as MarkdownV2 that shows it verbatim: every reserved character after a backslash."""
    return "".join("\\" + char if char in RESERVED else char for char in text)


def assert_well_formed(source: str, text: str, entities: list[dict[str, Any]]) -> None:
    """What Telegram accepts: entities inside the text, non-empty, sorted, nested and never inside code."""
    size = units(text)
    for entity in entities:
        assert entity["type"] in TYPES
        assert entity["length"] > 0 and entity["offset"] >= 0 and entity["offset"] + entity["length"] <= size
        if entity["type"] == "text_link":
            assert entity["url"].strip()
        if entity["type"] == "custom_emoji":
            assert entity["custom_emoji_id"].isdigit()
    keys = [(e["offset"], -e["length"]) for e in entities]
    assert keys == sorted(keys)
    ranges = [(e["offset"], e["offset"] + e["length"], e["type"]) for e in entities]
    for start, end, kind in ranges:
        for other_start, other_end, _ in ranges:
            holds_other = start <= other_start and other_end <= end
            apart = other_end <= start or end <= other_start
            assert holds_other or apart or (other_start <= start and end <= other_end), "overlap without nesting"
            if kind in ("code", "pre") and (start, end) != (other_start, other_end):
                assert not holds_other, "an entity inside code"
    remaining = iter(source)
    assert all(char in remaining for char in text), "the text is not the source with markup taken out"


DOCUMENTED = [
    (r"*bold \*text*", "bold *text", [("bold", "bold *text")]),
    (r"_italic \*text_", "italic *text", [("italic", "italic *text")]),
    ("__underline__", "underline", [("underline", "underline")]),
    ("~strikethrough~", "strikethrough", [("strikethrough", "strikethrough")]),
    ("||spoiler||", "spoiler", [("spoiler", "spoiler")]),
    ("*bold _italic bold ~italic bold strikethrough ||italic bold strikethrough spoiler||~ __underline italic bold___"
     " bold*",
     "bold italic bold italic bold strikethrough italic bold strikethrough spoiler underline italic bold bold",
     [("bold", "bold italic bold italic bold strikethrough italic bold strikethrough spoiler underline italic bold"
                " bold"),
      ("italic", "italic bold italic bold strikethrough italic bold strikethrough spoiler underline italic bold"),
      ("strikethrough", "italic bold strikethrough italic bold strikethrough spoiler"),
      ("spoiler", "italic bold strikethrough spoiler"),
      ("underline", "underline italic bold")]),
    ("[inline URL](http://www.example.com/)", "inline URL",
     [("text_link", "inline URL", {"url": "http://www.example.com/"})]),
    ("[inline mention of a user](tg://user?id=123456789)", "inline mention of a user",
     [("text_link", "inline mention of a user", {"url": "tg://user?id=123456789"})]),
    ("![👍](tg://emoji?id=5368324170671202286)", "👍",
     [("custom_emoji", "👍", {"custom_emoji_id": "5368324170671202286"})]),
    ("`inline fixed-width code`", "inline fixed-width code", [("code", "inline fixed-width code")]),
    ("```\npre-formatted fixed-width code block\n```", "pre-formatted fixed-width code block\n",
     [("pre", "pre-formatted fixed-width code block\n")]),
    ("```python\npre-formatted fixed-width code block written in the Python programming language\n```",
     "pre-formatted fixed-width code block written in the Python programming language\n",
     [("pre", "pre-formatted fixed-width code block written in the Python programming language\n",
       {"language": "python"})]),
    (">Block quotation started\n>Block quotation continued\n>Block quotation continued\n"
     ">The last line of the block quotation",
     "Block quotation started\nBlock quotation continued\nBlock quotation continued\n"
     "The last line of the block quotation",
     [("blockquote", "Block quotation started\nBlock quotation continued\nBlock quotation continued\n"
                     "The last line of the block quotation")]),
    ("**>The expandable block quotation started right after the previous block quotation\n"
     ">It is separated from the previous block quotation by an empty bold entity\n"
     ">Expandable block quotation continued\n"
     ">Hidden by default part of the expandable block quotation started\n"
     ">Expandable block quotation continued\n"
     ">The last line of the expandable block quotation with the expandability mark||",
     "The expandable block quotation started right after the previous block quotation\n"
     "It is separated from the previous block quotation by an empty bold entity\n"
     "Expandable block quotation continued\n"
     "Hidden by default part of the expandable block quotation started\n"
     "Expandable block quotation continued\n"
     "The last line of the expandable block quotation with the expandability mark",
     [("expandable_blockquote",
       "The expandable block quotation started right after the previous block quotation\n"
       "It is separated from the previous block quotation by an empty bold entity\n"
       "Expandable block quotation continued\n"
       "Hidden by default part of the expandable block quotation started\n"
       "Expandable block quotation continued\n"
       "The last line of the expandable block quotation with the expandability mark")]),
]


@pytest.mark.parametrize("source,text,expected", DOCUMENTED, ids=[row[0][:24] for row in DOCUMENTED])
def test_each_documented_example_parses(source: str, text: str, expected: list[tuple[Any, ...]]) -> None:
    """Each example of the Bot API's MarkdownV2 section gives its visible text and exactly its entities."""
    parsed, entities = parse_markdown_v2(source)
    assert parsed == text
    assert spans(parsed, entities) == expected
    assert_well_formed(source, parsed, entities)


def test_the_documented_examples_parse_as_one_message() -> None:
    """The whole documented sample as one message gives the examples' texts on their lines and all their entities;
    the first quote also holds the newline that ends it, as in Telegram."""
    text, entities = parse_markdown_v2("\n".join(source for source, _, _ in DOCUMENTED))
    assert text == "\n".join(text for _, text, _ in DOCUMENTED)
    expected = [span for _, _, found in DOCUMENTED for span in found]
    quote = next(index for index, span in enumerate(expected) if span[0] == "blockquote")
    expected[quote] = ("blockquote", expected[quote][1] + "\n")
    assert spans(text, entities) == expected


@pytest.mark.parametrize("char", RESERVED)
def test_an_escaped_reserved_character_is_literal(char: str) -> None:
    """A backslash makes any reserved character (and a backslash) plain text and disappears itself."""
    assert parse_markdown_v2(f"a\\{char}b\\{char}") == (f"a{char}b{char}", [])


@pytest.mark.parametrize("source,text", [
    ("a\\", "a\\"), ("\\é", "\\é"), ("\\😀", "\\😀"), ("\\\x00", "\\\x00"), ("\\a\\ \\\t", "a \t"),
])
def test_a_backslash_escaping_nothing_stays(source: str, text: str) -> None:
    """A backslash at the end or before a character above 126 (or NUL) escapes nothing and is kept; an escaped
    ordinary ASCII character is just that character."""
    assert parse_markdown_v2(source) == (text, [])


def test_escapes_inside_entities() -> None:
    """Escaped markers inside styles, code and pre are text; in code and pre only `\\` and a backtick need it."""
    text, entities = parse_markdown_v2(r"*a \* b* `x\`y\\z *k*` ```c\`\`\`d```")
    assert text == "a * b x`y\\z *k* c```d"
    assert spans(text, entities) == [("bold", "a * b"), ("code", "x`y\\z *k*"), ("pre", "c```d")]


@pytest.mark.parametrize("source,before,inside", [
    ("😀 *bold*", "😀 ", "bold"),
    ("👨\u200d👩\u200d👧 _family_", "👨\u200d👩\u200d👧 ", "family"),
    ("𝕏 ~𝕐 and 😀~", "𝕏 ", "𝕐 and 😀"),
    ("\ud800 ||half an emoji||", "\ud800 ", "half an emoji"),
])
def test_offsets_and_lengths_count_utf16_units(source: str, before: str, inside: str) -> None:
    """Characters above U+FFFF count two units before and inside an entity; a lone surrogate counts one."""
    text, entities = parse_markdown_v2(source)
    assert text == before + inside
    assert [(e["offset"], e["length"]) for e in entities] == [(units(before), units(inside))]
    assert covered(text, entities[0]) == inside


@pytest.mark.parametrize("source,text,expected", [
    ("__u__ _i_", "u i", [("underline", "u"), ("italic", "i")]),
    ("_it __both__ it_", "it both it", [("italic", "it both it"), ("underline", "both")]),
    ("___italic underline_**__", "italic underline",
     [("italic", "italic underline"), ("underline", "italic underline")]),
    # The docs call this ambiguous: `__` is read first, so the underline closes and the italic's `_` stay text.
    ("___a___", "_a_", [("underline", "_a")]),
])
def test_double_underscore_is_read_greedily_as_underline(source: str, text: str,
                                                         expected: list[tuple[str, str]]) -> None:
    """`__` always opens or closes an underline, from left to right; a single `_` is italic."""
    parsed, entities = parse_markdown_v2(source)
    assert parsed == text
    assert spans(parsed, entities) == expected


@pytest.mark.parametrize("source", [
    "2*3 = 6", "snake_case", "~5 minutes", "a || b", "a|b", "wow!", "[link", "`code", "```pre", "__init",
    "[a](http://x", "![👍](tg://emoji?id=1", "![x](http://example.com)", "see [note] here", "[a]()", "x > y",
    "[![" * 3000 + "*_~||__ thousands of openers",
], ids=lambda source: source[:24])
def test_unclosed_or_unusable_markup_is_kept_as_text(source: str) -> None:
    """A marker never closed, code without its end, a link without its URL: all stay as typed, with no entity."""
    assert parse_markdown_v2(source) == (source, [])


@pytest.mark.parametrize("source,text,expected", [
    ("*bold* and 2*3", "bold and 2*3", [("bold", "bold")]),
    ("*a _b* c", "a _b c", [("bold", "a _b")]),
    ("*a _b* c_ d_", "a _b c d", [("bold", "a _b"), ("italic", " d")]),
    ("```a\n`b`", "```a\nb", [("code", "b")]),
])
def test_markup_around_a_stray_marker_still_parses(source: str, text: str, expected: list[tuple[str, str]]) -> None:
    """A closer ends the nearest open marker of its kind; markers opened after it and left open become text."""
    parsed, entities = parse_markdown_v2(source)
    assert parsed == text
    assert spans(parsed, entities) == expected


@pytest.mark.parametrize("source,text,expected", [
    (r"[docs](https://example.com/a_\(b\))", "docs", [("text_link", "docs", {"url": "https://example.com/a_(b)"})]),
    (r"[x](http://a.b/\\)!", "x!", [("text_link", "x", {"url": "http://a.b/\\"})]),
    ("[*bold* link](http://e.com)", "bold link",
     [("text_link", "bold link", {"url": "http://e.com"}), ("bold", "bold")]),
    ("😀 [me](tg://user?id=42)", "😀 me", [("text_link", "me", {"url": "tg://user?id=42"})]),
    ("a ![🙂](tg://emoji?id=7) b", "a 🙂 b", [("custom_emoji", "🙂", {"custom_emoji_id": "7"})]),
])
def test_links_and_custom_emoji(source: str, text: str, expected: list[tuple[Any, ...]]) -> None:
    """A link's URL ends at the first unescaped `)` and is unescaped; its text may hold styles."""
    parsed, entities = parse_markdown_v2(source)
    assert parsed == text
    assert spans(parsed, entities) == expected


@pytest.mark.parametrize("source,text,expected", [
    ("```python\nprint(1)\n```", "print(1)\n", [("pre", "print(1)\n", {"language": "python"})]),
    ("```\nx = 1\n```", "x = 1\n", [("pre", "x = 1\n")]),
    ("```print(1)```", "print(1)", [("pre", "print(1)")]),
    ("```\n*not bold* _no_ [no](x)\n```", "*not bold* _no_ [no](x)\n", [("pre", "*not bold* _no_ [no](x)\n")]),
    ("*run `ls -l` now*", "run ls -l now", [("bold", "run ls -l now"), ("code", "ls -l")]),
    ("`*a*` *b*", "*a* b", [("code", "*a*"), ("bold", "b")]),
])
def test_code_and_pre(source: str, text: str, expected: list[tuple[Any, ...]]) -> None:
    """A pre block's language is the word on its first line, whose newline is markup; code holds no entities."""
    parsed, entities = parse_markdown_v2(source)
    assert parsed == text
    assert spans(parsed, entities) == expected


@pytest.mark.parametrize("source,text,expected", [
    (">quoted\nplain", "quoted\nplain", [("blockquote", "quoted\n")]),
    (">one\n>two", "one\ntwo", [("blockquote", "one\ntwo")]),
    (">*bold* quote\n>more", "bold quote\nmore", [("blockquote", "bold quote\nmore"), ("bold", "bold")]),
    (">a\n>b||\nafter", "a\nb\nafter", [("expandable_blockquote", "a\nb\n")]),
    (">a\n**>b\n>c||", "a\nb\nc", [("blockquote", "a\n"), ("expandable_blockquote", "b\nc")]),
    (">a ||b||", "a b", [("blockquote", "a b"), ("spoiler", "b")]),
    (">a ||b||||", "a b", [("expandable_blockquote", "a b"), ("spoiler", "b")]),
    (">a||\n>b", "a||\nb", [("blockquote", "a||\nb")]),
    (">a||\r\nb", "a\r\nb", [("expandable_blockquote", "a\r\n")]),
    ("*a\n>b*", "*a\nb*", [("blockquote", "b*")]),
    (">*a\nb*", "*a\nb*", [("blockquote", "*a\n")]),
    ("\\>not a quote\na > b", ">not a quote\na > b", []),
])
def test_block_quotes(source: str, text: str, expected: list[tuple[str, str]]) -> None:
    """Consecutive `>` lines form one quote, `**>` starts another, `||` ending the last line makes it expandable,
    and no style marker matches across a quote's edge."""
    parsed, entities = parse_markdown_v2(source)
    assert parsed == text
    assert spans(parsed, entities) == expected


def test_thousands_of_nested_links_need_no_recursion() -> None:
    """5000 links nested in each other all close, innermost first, each covering the one character."""
    text, entities = parse_markdown_v2("[" * 5000 + "x" + "](http://e.com)" * 5000)
    assert text == "x"
    assert entities == [{"type": "text_link", "offset": 0, "length": 1, "url": "http://e.com"}] * 5000


ADVERSARIAL = {
    "stars": "*" * 100_000,
    "openers": "*_~||__[![" * 10_000,
    "nested": "*_~||[" * 8_000 + "x" + "](u)||~_*" * 8_000,
    "unclosed links": "[a](" * 25_000,
    "bad emoji": "![a](" + "\\.](" * 25_000 + ")",  # one long URL, unescaped again at each `](` were it not cut short
    "backticks": "`" * 100_000,
    "unclosed pre": "```x\n" * 20_000,
    "quotes": ">a||\n" * 20_000,
    "backslashes": "\\" * 100_000,
    "mixed": ("a\\*😀_b__c~d||e[f](g)`h`\n>i||\n**>j " * 3_000)[:100_000],
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_hostile_inputs_of_100k_characters_give_valid_entities(name: str) -> None:
    """Hostile inputs of 100,000 characters parse without error into entities inside the text (their speed is
    measured by bench/formatting.py, not here)."""
    text, entities = parse_markdown_v2(ADVERSARIAL[name])
    assert all(e["length"] > 0 and e["offset"] + e["length"] <= units(text) for e in entities)


MARKUPISH = st.one_of(
    st.sampled_from(list("\\_*[]()~`>|!\n") + ["](", "](http://e.com)", "](tg://emoji?id=5)", "```", "```py\n",
                                               "**>", "||\n", "\\\n", "\x00", "\ud83d", "\ude00", "😀"]),
    st.characters(),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(MARKUPISH, max_size=60).map("".join))
def test_any_text_parses_into_well_formed_entities(source: str) -> None:
    """For any input the parser returns; every entity lies inside the text, is non-empty, and nests."""
    text, entities = parse_markdown_v2(source)
    assert_well_formed(source, text, entities)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_escaped_text_comes_back_unchanged(plain: str) -> None:
    """Escaping every reserved character of any text and parsing it gives back exactly that text, unstyled."""
    assert parse_markdown_v2(escape(plain)) == (plain, [])


WORDS = st.text(min_size=1, max_size=6)
TREES = st.recursive(
    WORDS,
    lambda inner: st.tuples(st.sampled_from(sorted(STYLES)), WORDS, st.lists(st.tuples(inner, WORDS), max_size=3)),
    max_leaves=12,
)


def render(tree: Any, offset: int, outer: frozenset[str]) -> tuple[str, str, list[tuple[str, int, int]]]:
    """MarkdownV2 for `tree`, its plain text and expected (type, offset, length); a style already applied
    by an ancestor is written without markers, since bold inside bold is no entity of its own."""
    if isinstance(tree, str):
        return escape(tree), tree, []
    style, first, rest = tree
    source, plain, expected = escape(first), first, []
    for child, word in rest:
        child_source, child_plain, child_expected = render(child, offset + units(plain), outer | {style})
        source += child_source + escape(word)
        plain += child_plain + word
        expected += child_expected
    if style not in outer:
        source = STYLES[style] + source + STYLES[style]
        expected.append((style, offset, units(plain)))
    return source, plain, expected


@settings(max_examples=300, deadline=None)
@given(TREES)
def test_generated_nested_styles_parse_to_their_structure(tree: Any) -> None:
    """Bold, italic, underline and strikethrough nested around words give the words and one entity per style."""
    source, plain, expected = render(tree, 0, frozenset())
    text, entities = parse_markdown_v2(source)
    assert text == plain
    assert sorted((e["type"], e["offset"], e["length"]) for e in entities) == sorted(expected)
