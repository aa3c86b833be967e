"""What reading and splitting a reply costs: Markdown, HTML and MarkdownV2 to text + entities, then the split.

Prints, in one run, the median milliseconds per reply (of several runs) for:
1. realistic answers: an AI model's Markdown of 2,000 and of 30,000 characters, the same as HTML;
2. hostile ones at the largest source the gateway reads (131,072 characters): unclosed markers,
   10,000 nested tags or quotes, a MarkdownV2 of nothing but openers;
beside, for the split, telegramify-markdown's own `split_entities` on the same text (the peer; it cuts
only at newlines and otherwise hard, and drops whitespace-only parts).

Run: python bench/formatting.py
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from telegramify_markdown import MessageEntity
from telegramify_markdown import split_entities as library_split

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from formatting import split_entities, to_entities  # noqa: E402
from replies import MAX_SOURCE_CHARS  # noqa: E402


def ai_markdown(chars: int, seed: int = 1) -> str:
    """Markdown shaped like a model's answer: headings, paragraphs with bold and code, lists, a code block."""
    rng = random.Random(seed)
    words = "заказ доставка оплата the order is ready please check status 😀 👍🏽".split()
    blocks: list[str] = []
    while sum(len(b) for b in blocks) < chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
        kind = rng.random()
        if kind < 0.1:
            blocks.append(f"## {sentence[:40]}")
        elif kind < 0.3:
            blocks.append("\n".join(f"- **{w}**: {sentence[:60]}" for w in words[:4]))
        elif kind < 0.35:
            blocks.append(f"```python\nprint({sentence[:50]!r})\n```")
        else:
            blocks.append(f"{sentence}, **{rng.choice(words)}** and `{rng.choice(words)}` [link](https://e.com/{kind}).")
    return "\n\n".join(blocks)[:chars]


def as_html(markdown: str) -> str:
    """The same answer as HTML, built from the Markdown's text and entities."""
    text, entities = to_entities(markdown, "markdown")
    tags = {"bold": "b", "italic": "i", "code": "code", "pre": "pre", "text_link": "a", "underline": "u",
            "blockquote": "blockquote", "strikethrough": "s"}
    raw = text.encode("utf-16-le")
    marks: list[tuple[int, int, str]] = []
    for order, e in enumerate(entities):
        tag = tags.get(e["type"], "b")
        attrs = f' href="{e["url"]}"' if tag == "a" else ""
        marks.append((e["offset"], 1, f"<{tag}{attrs}>"))
        marks.append((e["offset"] + e["length"], 0, f"</{tag}>"))
    marks.sort(key=lambda m: (m[0], m[1]))
    out, at = [], 0
    for offset, _, mark in marks:
        out.append(raw[at * 2:offset * 2].decode("utf-16-le").replace("&", "&amp;").replace("<", "&lt;"))
        out.append(mark)
        at = offset
    out.append(raw[at * 2:].decode("utf-16-le"))
    return "".join(out)


def median_ms(work: Callable[[], object], runs: int = 7) -> float:
    """Median wall time of `work` in milliseconds."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    """Print the figures."""
    long_markdown = ai_markdown(30_000)
    cases = [
        ("markdown, AI answer 2,000 chars", ai_markdown(2_000), "markdown"),
        ("markdown, AI answer 30,000 chars", long_markdown, "markdown"),
        ("html, the same 30,000-char answer", as_html(long_markdown), "html"),
        ("hostile markdown: '**_' x 43,690", ("**_" * 43_690)[:MAX_SOURCE_CHARS], "markdown"),
        ("hostile markdown: 10,000 nested quotes", ">" * 10_000 + " deep " * 20_000, "markdown"),
        ("hostile html: 10,000 nested <b>", "<b>" * 10_000 + "x" + "</b>" * 10_000, "html"),
        ("hostile html: 131,072 chars of '<'", "<" * MAX_SOURCE_CHARS, "html"),
        ("hostile html: 16,000 <b>, 16,000 stray </i>", "<b>" * 16_000 + "</i>" * 16_000, "html"),
        ("hostile html: 16,000 nested <ul><li>", "<ul><li>" * 16_000 + "x", "html"),
        ("hostile html: 14,000 nested <ul><li>x + space", "<ul><li>x " * 14_000, "html"),
        ("hostile html: 'x<y ' x 32,768", "x<y " * 32_768, "html"),
        ("hostile html: a link to 60,000 'a.' and a space", '<a href="https://' + "a." * 60_000 + ' x">l</a>', "html"),
        ("hostile markdown: '$$' x 20,000", "$$" * 20_000, "markdown"),
        ("hostile markdown: '```\\n' x 10,000", "```\n" * 10_000, "markdown"),
        ("hostile markdown: '- ' x 65,000", "- " * 65_000 + "x", "markdown"),
        ("hostile MarkdownV2: openers", ("*_~||__[![" * 13_108)[:MAX_SOURCE_CHARS], "markdown_v2"),
        ("hostile MarkdownV2: unclosed links", ("[a](" * 32_768)[:MAX_SOURCE_CHARS], "markdown_v2"),
    ]
    print(f"{'input':44} {'source':>8} {'visible':>8} {'entities':>8} {'read ms':>8} {'split ms':>9} "
          f"{'parts':>5} {'peer split ms':>13} {'peer parts':>10}")
    for name, source, fmt in cases:
        text, entities = to_entities(source, fmt)
        read = median_ms(lambda: to_entities(source, fmt))
        split = median_ms(lambda: split_entities(text, entities))
        parts = split_entities(text, entities)
        objects = [MessageEntity(**e) for e in entities]
        peer = median_ms(lambda: library_split(text, objects, 4096))
        peer_parts = len(library_split(text, objects, 4096))
        print(f"{name:44} {len(source):>8} {len(text):>8} {len(entities):>8} {read:>8.1f} {split:>9.2f} "
              f"{len(parts):>5} {peer:>13.2f} {peer_parts:>10}")


if __name__ == "__main__":
    main()
