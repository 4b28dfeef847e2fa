"""Detokenizer (incremental, UTF-8 safe) and StopMatcher (stop strings across token boundaries)."""

from __future__ import annotations

import random

import pytest

from cria.engine.text import Detokenizer, StopMatcher

REPLACEMENT = "\ufffd"

# ---------------------------------------------------------------- Detokenizer


def test_ascii_passes_through_piece_by_piece() -> None:
    d = Detokenizer()
    assert d.push(b"Hel") == "Hel"
    assert d.push(b"lo") == "lo"
    assert d.push(b"") == ""
    assert d.flush() == ""


@pytest.mark.parametrize("char", ["é", "日", "€", "😀"])
def test_multibyte_character_split_at_every_byte_boundary(char: str) -> None:
    data = char.encode("utf-8")
    assert len(data) > 1
    for cut in range(1, len(data)):
        d = Detokenizer()
        assert d.push(data[:cut]) == "", f"partial character leaked at cut {cut}"
        assert d.push(data[cut:]) == char
        assert d.flush() == ""


@pytest.mark.parametrize("text", ["é", "日本", "a😀b", "naïve café 日本語 🦙🦙"])
def test_one_byte_per_push_yields_only_whole_characters(text: str) -> None:
    data = text.encode("utf-8")
    d = Detokenizer()
    out = []
    for i in range(len(data)):
        piece = d.push(data[i : i + 1])
        assert REPLACEMENT not in piece
        out.append(piece)
        # What was emitted so far is exactly the characters whose bytes are all in.
        assert "".join(out) == data[: i + 1].decode("utf-8", errors="ignore")
    assert "".join(out) + d.flush() == text


def test_random_splits_reassemble_exactly() -> None:
    rng = random.Random(1234)
    alphabet = "aZ é ß 日本 語 € 😀 🦙 \n"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        data = text.encode("utf-8")
        cuts = sorted(rng.sample(range(len(data) + 1), k=min(len(data) + 1, rng.randint(0, 6))))
        bounds = [0, *cuts, len(data)]
        d = Detokenizer()
        out = "".join(d.push(data[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert out + d.flush() == text


def test_two_characters_in_one_piece_with_a_split_tail() -> None:
    d = Detokenizer()
    data = "日本".encode()  # 6 bytes
    assert d.push(data[:4]) == "日"
    assert d.push(data[4:]) == "本"


def test_invalid_byte_becomes_replacement_character() -> None:
    d = Detokenizer()
    assert d.push(b"a\xffb") == f"a{REPLACEMENT}b"
    assert d.push(b"\xfe") == REPLACEMENT


def test_broken_sequence_followed_by_ascii_is_replaced_then_continues() -> None:
    d = Detokenizer()
    assert d.push(b"\xe6\x97") == ""  # could still become 日
    assert d.push(b"A") == f"{REPLACEMENT}A"  # it cannot any more
    assert d.push("é".encode()) == "é"  # and the decoder recovered


def test_flush_turns_a_truncated_character_into_one_replacement() -> None:
    d = Detokenizer()
    assert d.push("😀".encode()[:3]) == ""
    assert d.flush() == REPLACEMENT
    assert d.flush() == ""


def test_stray_continuation_bytes_are_replaced() -> None:
    d = Detokenizer()
    out = d.push(b"\x80\x80x")
    assert out.endswith("x")
    assert set(out[:-1]) == {REPLACEMENT}


# ---------------------------------------------------------------- StopMatcher


def run(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    """Push pieces until a stop; return what was emitted for each push and whether it stopped."""
    emitted = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        emitted.append(text)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def test_no_stops_passes_everything_through() -> None:
    m = StopMatcher([])
    assert m.push("abc") == ("abc", False)
    assert m.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    m = StopMatcher(["", ""])
    assert m.push("anything") == ("anything", False)


def test_stop_inside_one_piece_truncates_before_it() -> None:
    m = StopMatcher(["END"])
    assert m.push("hello END world") == ("hello ", True)


def test_stop_at_the_very_start() -> None:
    m = StopMatcher(["\n\n"])
    assert m.push("\n\nrest") == ("", True)


def test_stop_split_across_many_pushes_is_never_emitted() -> None:
    m = StopMatcher(["<|im_end|>"])
    pieces = ["Hi", " there", "<", "|", "im", "_", "end", "|", ">", "after"]
    emitted, stopped = run(m, pieces)
    assert stopped
    assert "".join(emitted) == "Hi there"
    assert emitted[:2] == ["Hi", " there"]
    assert all(e == "" for e in emitted[2:]), "parts of the stop string leaked"


def test_text_after_the_stop_in_the_same_piece_is_dropped() -> None:
    m = StopMatcher(["###"])
    assert m.push("ab#") == ("ab", False)
    assert m.push("##tail") == ("", True)


def test_earliest_of_two_stops_wins() -> None:
    m = StopMatcher(["world", "lo"])
    assert m.push("hello world") == ("hel", True)
    m = StopMatcher(["lo", "world"])  # order of the list does not matter
    assert m.push("hello world") == ("hel", True)


def test_earliest_of_two_stops_wins_across_pushes() -> None:
    m = StopMatcher(["STOP", "END"])
    assert m.push("xx S") == ("xx ", False)  # "S" may start "STOP"
    assert m.push("TOEND") == ("STO", True)  # it did not; "END" is the stop


def test_partial_prefix_is_held_then_released_when_not_a_stop() -> None:
    m = StopMatcher(["</s>"])
    assert m.push("a <") == ("a ", False)
    assert m.push("/") == ("", False)
    assert m.push("x") == ("</x", False)  # "</x" cannot start "</s>": released at once
    assert m.flush() == ""


def test_released_text_keeps_a_new_partial_suffix_held() -> None:
    m = StopMatcher(["abc"])
    assert m.push("ab") == ("", False)
    assert m.push("ab") == ("ab", False)  # the first "ab" is not a stop; the second may be
    assert m.push("c") == ("", True)


def test_overlapping_prefix_restarts_correctly() -> None:
    m = StopMatcher(["aab"])
    assert m.push("a") == ("", False)
    assert m.push("a") == ("", False)
    assert m.push("a") == ("a", False)  # "aaa": only the last "aa" can still start "aab"
    assert m.push("b") == ("", True)


def test_flush_returns_held_text_when_generation_ends_without_a_stop() -> None:
    m = StopMatcher(["<|end|>"])
    assert m.push("done <|en") == ("done ", False)
    assert m.flush() == "<|en"
    assert m.flush() == "", "flush must empty the buffer"


def test_longest_possible_prefix_among_several_stops_is_held() -> None:
    m = StopMatcher(["xy", "abcd"])
    assert m.push("-abc") == ("-", False)
    assert m.push("x") == ("abc", False)  # "abcx" rules out abcd, but "x" may start "xy"
    assert m.push("y") == ("", True)


def test_multibyte_stop_across_pushes() -> None:
    m = StopMatcher(["日本"])
    assert m.push("こんにちは日") == ("こんにちは", False)
    assert m.push("本語") == ("", True)


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i != -1]
    return (text[: min(hits)], True) if hits else (text, False)


def test_random_chunkings_agree_with_a_whole_text_search() -> None:
    """For stop sets where no stop contains another, the emitted text does not depend on how
    the text is split into pieces: it is the text up to the earliest stop."""
    rng = random.Random(42)
    checked = 0
    for _ in range(1500):
        stops = [
            "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        if any(a != b and a in b for a in stops for b in stops):
            continue
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        emitted, stopped = run(StopMatcher(stops), pieces)
        assert ("".join(emitted), stopped) == _reference(text, stops), (stops, pieces)
        checked += 1
    assert checked > 500
