"""replies.py: splitting answers at Telegram's 4096-unit limit, counted in UTF-16 code units."""

from __future__ import annotations

import random
import string

import pytest

from replies import TEXT_LIMIT, split_text, utf16_len

SEPARATORS = "\n "


def units(text: str) -> int:
    """UTF-16 code units of `text`, counted independently of the code under test."""
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def without_separators(text: str) -> str:
    """`text` with the characters a cut may drop (newlines, spaces) removed."""
    return "".join(ch for ch in text if ch not in SEPARATORS)


def assert_valid_split(text: str, parts: list[str], limit: int = TEXT_LIMIT) -> None:
    """Every part fits, none is empty, and no character other than a cut newline or space went missing."""
    assert parts, "at least one part"
    for index, part in enumerate(parts):
        assert units(part) <= limit, f"part {index} has {units(part)} UTF-16 units"
        part.encode("utf-8")  # a half surrogate pair would make this raise
    assert without_separators("".join(parts)) == without_separators(text)


def test_limit_is_telegrams() -> None:
    """The default limit is Telegram's 4096."""
    assert TEXT_LIMIT == 4096


@pytest.mark.parametrize("text,expected", [
    ("", 0), ("abc", 3), ("привет", 6), ("é", 1), ("😀", 2), ("a😀b", 4), ("👨\u200d👩\u200d👧", 8), ("𝕏", 2),
])
def test_utf16_len_counts_code_units(text: str, expected: int) -> None:
    """Characters outside the BMP (most emoji) count as two units, everything else as one."""
    assert utf16_len(text) == expected == units(text)


@pytest.mark.parametrize("text", ["hi", "", "строка\nи ещё одна", "x" * TEXT_LIMIT, "😀" * (TEXT_LIMIT // 2)])
def test_text_within_the_limit_is_one_part(text: str) -> None:
    """A text of at most 4096 units is sent as it is, in one part."""
    assert split_text(text) == [text]


def test_one_unit_over_the_limit_gives_two_parts() -> None:
    """4097 characters with nowhere nice to cut become 4096 and 1."""
    assert split_text("x" * (TEXT_LIMIT + 1)) == ["x" * TEXT_LIMIT, "x"]


def test_ten_thousand_ascii_characters_keep_their_content() -> None:
    """10000 ASCII characters of prose split into parts that fit and together hold every non-separator character."""
    rng = random.Random(1)
    words = ["".join(rng.choices(string.ascii_letters + string.digits + ".,!?", k=rng.randint(1, 12)))
             for _ in range(2000)]
    text = " ".join(words)[:10_000]
    assert len(text) == 10_000
    parts = split_text(text)
    assert len(parts) == 3
    assert_valid_split(text, parts)


def test_ten_thousand_characters_without_separators_are_cut_exactly() -> None:
    """With no space or newline to cut at, parts are exactly 4096 units and nothing is lost."""
    text = "".join(random.Random(2).choices(string.ascii_letters, k=10_000))
    parts = split_text(text)
    assert [len(p) for p in parts] == [4096, 4096, 10_000 - 2 * 4096]
    assert "".join(parts) == text


def test_emoji_count_as_two_units_and_are_never_split() -> None:
    """A run of emoji splits at 2048 emoji per part (4096 units), each emoji whole."""
    text = "😀" * 3000
    parts = split_text(text)
    assert parts == ["😀" * 2048, "😀" * 952]
    assert_valid_split(text, parts)


def test_emoji_straddling_the_limit_moves_to_the_next_part() -> None:
    """When an emoji's two units would cross the limit, the whole emoji goes to the next part."""
    text = "a" + "😀" * 2048  # 4097 units; the last emoji would occupy units 4096 and 4097
    parts = split_text(text)
    assert parts == ["a" + "😀" * 2047, "😀"]
    assert units(parts[0]) == 4095


def test_mixed_scripts_and_emoji_fit_and_keep_content() -> None:
    """Cyrillic, emoji and newlines together still give fitting parts with nothing lost."""
    rng = random.Random(3)
    alphabet = list("абвгдеёжзийклмнопрстуфхцчшщъыьэюя") + ["😀", "🎉", "👍🏽", "𝕏", " ", " ", "\n"]
    text = "".join(rng.choices(alphabet, k=12_000))
    assert_valid_split(text, split_text(text))


def test_prefers_cutting_at_a_newline() -> None:
    """A newline near the limit is where the cut happens, and the newline itself is not sent."""
    text = "A" * 3000 + "\n" + "B" * 3000
    assert split_text(text) == ["A" * 3000, "B" * 3000]


def test_newline_is_preferred_over_a_later_space() -> None:
    """Given both, the cut goes at the newline even when a space comes later."""
    text = "A" * 2500 + "\n" + "C" * 1000 + " " + "B" * 3000
    parts = split_text(text)
    assert parts[0] == "A" * 2500
    assert_valid_split(text, parts)


def test_without_newlines_words_are_not_cut_in_half() -> None:
    """Prose without newlines is cut at a space, so no word is split across two messages."""
    words = [f"word{i}" for i in range(2000)]
    text = " ".join(words)
    parts = split_text(text)
    assert len(parts) > 1
    assert_valid_split(text, parts)
    assert [w for p in parts for w in p.split()] == words


def test_custom_limit() -> None:
    """A smaller limit is honoured the same way."""
    assert split_text("abcdef", limit=4) == ["abcd", "ef"]
    assert split_text("ab cdef gh", limit=8) == ["ab cdef ", "gh"]


@pytest.mark.parametrize("tail", ["\n", "\n\n", " ", "\n \n"])
def test_no_part_is_blank(tail: str) -> None:
    """A text just over the limit only because of trailing whitespace never yields a blank part (Telegram refuses it)."""
    text = "A" * TEXT_LIMIT + tail
    parts = split_text(text)
    blank = [repr(p) for p in parts if not p.strip()]
    assert not blank, (
        f"split_text('A' * 4096 + {tail!r}) gave blank part(s) {blank}: sendMessage refuses them with "
        "'Bad Request: message text is empty', after the first part was already sent")
