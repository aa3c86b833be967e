"""formatting.py: Markdown and HTML read into text + entities, and that text split into parts that fit."""

from __future__ import annotations

import random
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formatting import MAX_ENTITIES, MAX_NESTING, TEXT_LIMIT, clean_entities, split_entities, to_entities, trim


def units(text: str) -> int:
    """UTF-16 code units of `text`, counted independently of the code under test."""
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def covered(text: str, entity: dict[str, Any]) -> str:
    """The characters of `text` an entity covers (offsets in UTF-16 units)."""
    raw = text.encode("utf-16-le")
    return raw[entity["offset"] * 2:(entity["offset"] + entity["length"]) * 2].decode("utf-16-le")


def spans(text: str, entities: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each entity as (type, the text it covers)."""
    return [(e["type"], covered(text, e)) for e in entities]


def assert_valid_parts(text: str, entities: list[dict[str, Any]], parts: list[tuple[str, list[dict]]],
                       limit: int) -> None:
    """The parts partition the text, fit, hold their entities, and style exactly what the whole text styled."""
    assert "".join(part for part, _ in parts) == text
    start = 0
    for index, (part, part_entities) in enumerate(parts):
        assert units(part) <= limit, f"part {index} has {units(part)} UTF-16 units"
        assert len(part_entities) <= MAX_ENTITIES
        for entity in part_entities:
            assert entity["length"] > 0 and 0 <= entity["offset"]
            assert entity["offset"] + entity["length"] <= units(part), f"entity {entity} outside part {index}"
            # The same characters carry the same entity in the whole text.
            absolute = (start + entity["offset"], start + entity["offset"] + entity["length"])
            assert any(e["type"] == entity["type"] and e["offset"] <= absolute[0]
                       and absolute[1] <= e["offset"] + e["length"] for e in entities), entity
        start += units(part)
    # Every styled character of the whole text is styled in its part too (nothing lost at a cut), unless a
    # part had more entities than Telegram keeps.
    if any(len(part_entities) == MAX_ENTITIES for _, part_entities in parts):
        return
    for entity in entities:
        begin, end, offset = entity["offset"], entity["offset"] + entity["length"], 0
        for part, part_entities in parts:
            low, high = max(begin, offset), min(end, offset + units(part))
            if high > low:
                assert any(e["type"] == entity["type"] and e["offset"] <= low - offset
                           and high - offset <= e["offset"] + e["length"] for e in part_entities), entity
            offset += units(part)


def test_markdown_as_models_write_it() -> None:
    """Bold, italic, code, code blocks, links, lists and headings become Telegram's entities, markers gone."""
    source = ("### Plan\nSome **bold**, *italic*, `code` and [a link](https://example.com).\n\n"
              "- first\n- second\n\n```python\nprint('hi')\n```\n")
    text, entities = to_entities(source, "markdown")
    assert "**" not in text and "###" not in text and "```" not in text
    assert ("bold", "Plan") in spans(text, entities)
    assert ("bold", "bold") in spans(text, entities)
    assert ("italic", "italic") in spans(text, entities)
    assert ("code", "code") in spans(text, entities)
    assert ("text_link", "a link") in spans(text, entities)
    assert ("pre", "print('hi')") in spans(text, entities)
    assert next(e for e in entities if e["type"] == "pre")["language"] == "python"
    assert "first" in text and "second" in text
    assert text == text.rstrip()


def test_markdown_keeps_emoji_offsets_in_utf16() -> None:
    """An emoji before a styled word counts two units, so the entity still covers the word."""
    text, entities = to_entities("😀😀 **жирный** 👍🏽", "markdown")
    assert spans(text, entities) == [("bold", "жирный")]


def test_markdown_drops_links_telegram_would_refuse_and_keeps_their_text() -> None:
    """A relative, `javascript:` or dotless-host link keeps its text but loses its link (`README.md` is a file,
    not the domain of Moldova); `www.` gets https."""
    text, entities = to_entities("[a](/rel) [b](javascript:alert(1)) [c](README.md) [d](tg://user?id=1) "
                                 "[e](www.example.com) [f](http://localhost:8080/x) [g](https://t.me/x)", "markdown")
    assert text == "a b c d e f g"
    assert [(covered(text, e), e.get("url")) for e in entities] == [
        ("d", "tg://user?id=1"), ("e", "https://www.example.com"), ("g", "https://t.me/x")]


def test_plain_is_sent_as_written() -> None:
    """`plain` leaves every character alone, markup included."""
    assert to_entities("**not bold** <b>", "plain") == ("**not bold** <b>", [])


def test_html_of_telegram() -> None:
    """Telegram's HTML tags become entities; entities (&lt;) are decoded; attributes give urls and languages."""
    source = ('<b>bold <i>both</i></b> &lt;tag&gt; &amp; <a href="https://x.org">link</a> '
              '<tg-spoiler>hidden</tg-spoiler> <span class="tg-spoiler">also</span> <s>gone</s> <u>under</u> '
              '<code>x = 1</code>\n<pre><code class="language-go">fmt.Println()</code></pre>'
              '<blockquote expandable>quoted</blockquote><tg-emoji emoji-id="5368324170671202286">👍</tg-emoji>')
    text, entities = to_entities(source, "html")
    got = spans(text, entities)
    assert text.startswith("bold both <tag> & link hidden also gone under x = 1\nfmt.Println()\nquoted\n👍")
    for expected in [("bold", "bold both"), ("italic", "both"), ("text_link", "link"), ("spoiler", "hidden"),
                     ("spoiler", "also"), ("strikethrough", "gone"), ("underline", "under"), ("code", "x = 1"),
                     ("pre", "fmt.Println()"), ("expandable_blockquote", "quoted"), ("custom_emoji", "👍")]:
        assert expected in got
    assert next(e for e in entities if e["type"] == "pre")["language"] == "go"


def test_html_as_models_write_it() -> None:
    """Paragraphs, line breaks, headings and lists read as Telegram would show them; unknown tags keep their text."""
    text, entities = to_entities("<h2>Title</h2><p>One<br>two</p><ul><li>a</li><li>b</li></ul>"
                                 "<ol><li>x</li><li>y</li></ol><span>kept</span> List<String>", "html")
    assert text == "Title\n\nOne\ntwo\n• a\n• b\n1. x\n2. y\nkept List<String>"
    assert spans(text, entities) == [("bold", "Title")]


def test_pretty_printed_html_reads_as_it_looks() -> None:
    """The indentation and newlines of pretty-printed HTML are layout: bullets and cells come out tight; a
    paragraph in a list item stays beside its bullet; whitespace inside pre is kept."""
    source = """
    <p>Your order is confirmed.</p>
    <ul>
      <li>
        <p>Item: <b>Book</b></p>
      </li>
      <li>Price: 10 €</li>
    </ul>
    <table><tr><th>Name</th><th>Qty</th></tr>
      <tr><td>Book</td> <td>1</td></tr></table>
    <pre>  indented
    code</pre>
    """
    text, entities = to_entities(source, "html")
    assert text == ("Your order is confirmed.\n• Item: Book\n• Price: 10 €\nName | Qty\nBook | 1\n"
                    "  indented\n    code")
    assert ("bold", "Book") in spans(text, entities)
    assert ("pre", "  indented\n    code") in spans(text, entities)


@pytest.mark.parametrize("source,text", [
    ("Put it in a <code><script></code> tag, then <style> it", "Put it in a <script> tag, then <style> it"),
    ("<script>alert(1)</script>", "<script>alert(1)</script>"),
    ("#include <iostream>", "#include <iostream>"),
])
def test_tags_html_has_no_use_for_here_are_text(source: str, text: str) -> None:
    """`<script>` or `<style>` in a message is something the user wrote about, not a block to hide: it is
    text, and the rest of the message stays."""
    assert to_entities(source, "html")[0] == text


@pytest.mark.parametrize("source,text", [
    ("<b>unclosed", "unclosed"), ("</i>stray end", "stray end"), ("<b>a<i>b</b>c</i>", "abc"),
    ("a < b and c > d", "a < b and c > d"), ("AT&T", "AT&T"), ("<a>no href</a>", "no href"),
])
def test_broken_html_is_read_leniently(source: str, text: str) -> None:
    """Broken HTML never fails: its text is kept, and what cannot be an entity is not one."""
    got, entities = to_entities(source, "html")
    assert got == text
    for entity in entities:
        assert entity["offset"] + entity["length"] <= units(got)


def test_deep_nesting_is_no_problem() -> None:
    """Ten thousand nested tags or quote markers neither recurse nor raise, and give one entity of each kind."""
    text, entities = to_entities("<b>" * 10_000 + "deep" + "</b>" * 10_000, "html")
    assert (text, spans(text, entities)) == ("deep", [("bold", "deep")])
    text, entities = to_entities(">" * 3000 + " deep", "markdown")
    assert text == "deep" and spans(text, entities) == [("blockquote", "deep")]


def test_clean_entities_keeps_what_telegram_can_show() -> None:
    """Partial overlaps, entities inside code, quotes in quotes and out-of-range parts are removed or clipped."""
    text = "abcdefghij"
    entities = [{"type": "bold", "offset": 0, "length": 5}, {"type": "italic", "offset": 3, "length": 5},
                {"type": "code", "offset": 6, "length": 4}, {"type": "bold", "offset": 7, "length": 1},
                {"type": "blockquote", "offset": 0, "length": 10}, {"type": "blockquote", "offset": 1, "length": 2},
                {"type": "underline", "offset": 8, "length": 50}, {"type": "spoiler", "offset": 20, "length": 3}]
    assert sorted(spans(text, clean_entities(text, entities))) == sorted(
        [("blockquote", "abcdefghij"), ("bold", "abcde"), ("code", "ghij")])


def test_trim_clips_entities_to_the_kept_text() -> None:
    """Trailing whitespace goes, and an entity reaching into it ends where the text does."""
    assert trim("code\n\n", [{"type": "pre", "offset": 0, "length": 6}]) == (
        "code", [{"type": "pre", "offset": 0, "length": 4}])


def test_a_bold_run_across_the_cut_is_bold_in_both_parts() -> None:
    """A style that spans the cut is carried into each part, covering its share of the run."""
    text = "intro1" + " word" * 1500  # cut 4096 units in, and the cut would fall inside a word
    entities = [{"type": "bold", "offset": 6, "length": units(text) - 6}]
    parts = split_entities(text, entities)
    assert len(parts) == 2
    assert_valid_parts(text, entities, parts, TEXT_LIMIT)
    assert all(part_entities[0]["type"] == "bold" for _, part_entities in parts)
    assert parts[0][0].endswith(" ") and parts[1][0].startswith("word")


def test_prefers_a_paragraph_then_a_line_then_a_space() -> None:
    """The cut goes after the last paragraph break that leaves the first part at least half full."""
    text = "a" * 2500 + "\n\n" + "b" * 1000 + "\n" + "c" * 400 + " " + "d" * 3000
    parts = [part for part, _ in split_entities(text, [])]
    assert parts[0] == "a" * 2500 + "\n\n"
    assert "".join(parts) == text


def test_a_part_holds_at_most_a_hundred_entities() -> None:
    """300 bold words in a short text stay one message (text is never dropped for formatting), with the
    first 100 of them bold, as Telegram would keep no more."""
    text = " ".join(f"w{i}" for i in range(300))
    entities, offset = [], 0
    for word in text.split(" "):
        entities.append({"type": "bold", "offset": offset, "length": len(word)})
        offset += len(word) + 1
    [(part, kept)] = split_entities(text, entities)
    assert part == text and kept == entities[:MAX_ENTITIES]


def test_entities_across_a_cut_are_kept_first() -> None:
    """When a part has more entities than Telegram keeps, a style that runs across a cut is kept before
    the others, so it shows on both sides."""
    text = "x " * 3000
    entities = [{"type": "italic", "offset": 2 * i, "length": 1} for i in range(1000)]
    entities.append({"type": "bold", "offset": 3000, "length": 2000})  # across the cut at about 4096
    parts = split_entities(text, entities)
    assert [any(e["type"] == "bold" for e in kept) for _, kept in parts] == [True, True]
    assert len(parts[0][1]) == MAX_ENTITIES


def test_a_densely_formatted_answer_keeps_all_its_text() -> None:
    """700 lines of `- **T**: `code` [doc](url)` (2,100 entities): three messages with all of the text, not
    thirty of which the last ten would be dropped."""
    source = "\n".join(f"- **T{i}**: `c{i}` [doc](https://ex.com/{i})" for i in range(700))
    text, entities = to_entities(source, "markdown")
    parts = split_entities(text, entities)
    assert len(parts) == 3 and "".join(p for p, _ in parts) == text and "T699" in parts[-1][0]


def test_emoji_is_never_cut_in_half() -> None:
    """A run of emoji splits between emoji: 2048 per part."""
    parts = split_entities("😀" * 3000, [])
    assert [part for part, _ in parts] == ["😀" * 2048, "😀" * 952]


# Generated Markdown and HTML: nested styles, code blocks, emoji, long words.
WORDS = st.one_of(
    st.sampled_from(["hello", "привет", "😀", "👍🏽", "𝕏", "a_b", "x*y", "1.", "#", "<>", "&"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzабв😀", min_size=1, max_size=12),
    st.integers(1, 5000).map(lambda n: "long" * (n // 4 + 1)),
)
SENTENCE = st.lists(WORDS, min_size=1, max_size=30).map(" ".join)


@st.composite
def markdown_documents(draw: st.DrawFn) -> str:
    """A Markdown document of headings, styled sentences, nested styles, lists, quotes and code blocks."""
    blocks = []
    for _ in range(draw(st.integers(1, 25))):
        sentence = draw(SENTENCE)
        kind = draw(st.sampled_from(["para", "bold", "nested", "heading", "list", "quote", "code", "link"]))
        blocks.append({
            "para": sentence, "bold": f"**{sentence}** and _{sentence}_",
            "nested": f"**bold *italic ~~strike `code` {sentence}~~* still bold**",
            "heading": f"## {sentence}", "list": f"- {sentence}\n- **{sentence}**\n  1. {sentence}",
            "quote": f"> {sentence}\n> **{sentence}**", "code": f"```python\n{sentence}\n```",
            "link": f"[{sentence}](https://example.com/{len(sentence)})",
        }[kind])
    return "\n\n".join(blocks)


@st.composite
def html_documents(draw: st.DrawFn) -> str:
    """An HTML document of nested Telegram tags, paragraphs and pre blocks around generated sentences."""
    tags = ["b", "i", "u", "s", "tg-spoiler", "code", "pre", "blockquote", "p"]
    pieces = []
    for _ in range(draw(st.integers(1, 25))):
        sentence = draw(SENTENCE).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        opened = draw(st.lists(st.sampled_from(tags), max_size=4))
        pieces.append("".join(f"<{t}>" for t in opened) + sentence + "".join(f"</{t}>" for t in reversed(opened)))
        pieces.append(draw(st.sampled_from([" ", "\n", "\n\n", "<br>", ""])))
    return "".join(pieces)


SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SLOW
@given(markdown_documents(), st.sampled_from([TEXT_LIMIT, 300, 64]))
def test_generated_markdown_splits_into_valid_parts(source: str, limit: int) -> None:
    """Any generated Markdown: every part within the limit, every entity inside its part, the parts joined
    equal the whole text, each style kept on both sides of a cut."""
    text, entities = to_entities(source, "markdown")
    assert_valid_parts(text, entities, split_entities(text, entities, limit), limit)


@SLOW
@given(html_documents(), st.sampled_from([TEXT_LIMIT, 300, 64]))
def test_generated_html_splits_into_valid_parts(source: str, limit: int) -> None:
    """Any generated HTML: the same guarantees."""
    text, entities = to_entities(source, "html")
    assert_valid_parts(text, entities, split_entities(text, entities, limit), limit)


@SLOW
@given(st.text(max_size=3000), st.sampled_from(["markdown", "html", "markdown_v2"]))
def test_any_text_reads_without_failing(source: str, fmt: str) -> None:
    """Whatever a scenario sends, reading it never raises and yields entities inside the text."""
    text, entities = to_entities(source, fmt)
    for entity in entities:
        assert entity["length"] > 0 and entity["offset"] + entity["length"] <= units(text)


def test_ten_thousand_characters_of_html_split_at_words() -> None:
    """A 10,000-character HTML answer: three parts at word boundaries, styles carried across the cuts."""
    rng = random.Random(4)
    words = [rng.choice(["<b>жирный</b>", "<i>курсив 😀</i>", "<code>x+1</code>"] + ["слово", "word", "😀"] * 10)
             for _ in range(1700)]
    source = " ".join(words)
    text, entities = to_entities(source, "html")
    parts = split_entities(text, entities)
    assert len(parts) == 3
    assert_valid_parts(text, entities, parts, TEXT_LIMIT)
    for part, _ in parts[:-1]:
        assert part.endswith(" "), "cut at a space, not inside a word"


@pytest.mark.parametrize("source,fmt", [
    ("- " * 19_000 + "x", "markdown"), ("- 1. " * 7_900 + "x", "markdown"), ("> - " * 9_900 + "x", "markdown"),
    ("x\r" + "- " * 19_000 + "x", "markdown"), ("<ul><li>" * 16_000 + "x", "html"), ("<ol><li>" * 16_000 + "x", "html"),
], ids=["dashes", "dash-numbers", "quote-dashes", "after-a-bare-cr", "ul", "ol"])
def test_deep_lists_cost_text_in_proportion_to_their_source(source: str, fmt: str) -> None:
    """Each list level indents what is below it: 16,000 levels on one line once read into 256 MB of text.
    Past MAX_NESTING levels no more indent is added, so the text stays within a few times its source."""
    text, entities = to_entities(source, fmt)
    assert text.endswith("x") and len(text) < 4 * len(source)
    assert max(len(line) - len(line.lstrip()) for line in text.split("\n")) <= 2 * MAX_NESTING


@pytest.mark.parametrize("source,text", [
    ("if a <![ b", "if a <![ b"), ("<!DOCTYPE html><b>x</b>", "<!DOCTYPE html>x"), ("a<!-- note -->b", "ab"),
    ("<b>" * 3 + "</i>" * 5 + "y", "y"), ("x<y " * 3, "x<y x<y x<y"), ("<b " * 3, "<b <b <b"),
])
def test_html_declarations_and_stray_end_tags(source: str, text: str) -> None:
    """`<!` that is no comment stays text (html.parser used to fail on `<![`); comments are dropped; stray end
    tags close nothing."""
    assert to_entities(source, "html")[0] == text


def test_a_link_of_many_dots_is_checked_in_linear_time() -> None:
    """An address of 60,000 `a.` and a space is no link; checking it must not backtrack (a regular expression
    once held the GIL for 37 s on it, freezing every thread)."""
    source = '<a href="https://' + "a." * 60_000 + ' x">link</a>'
    assert to_entities(source, "html") == ("link", [])


@pytest.mark.parametrize("text", ["🇺🇸" * 3000, "a" + "🇺🇸" * 3000, "b" + "ก\u0e34" * 5000, "ب\u0650" * 5000,
                                  "1\ufe0f\u20e3" * 3000], ids=["flags", "flags-after-a", "thai", "arabic", "keycaps"])
def test_a_hard_cut_keeps_what_the_user_sees_as_one_character(text: str) -> None:
    """Without a space to cut at, no part starts with the second half of a flag or with a mark that belongs to
    the character before it."""
    parts = [part for part, _ in split_entities(text, [])]
    assert "".join(parts) == text and len(parts) > 1
    for part in parts[1:]:
        assert not (part[0] == "🇸" or unicodedata.category(part[0]) in ("Mn", "Mc", "Me") or part[0] == "\u20e3"
                    or part[0] == "\ufe0f"), repr(part[:3])


def test_a_paragraph_in_a_table_cell_stays_on_its_row() -> None:
    """`<td><p>Name</p></td>` reads as a cell of its row, not as a paragraph of its own."""
    text, _ = to_entities("<table><tr><td><p>Name</p></td><td><p>Qty</p></td></tr>"
                          "<tr><td>Apple</td><td>3</td></tr></table>", "html")
    assert text == "Name | Qty\nApple | 3"
