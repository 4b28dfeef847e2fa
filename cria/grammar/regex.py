"""ECMA-262 regular expressions (JSON Schema's `pattern`) translated to GBNF."""

from __future__ import annotations

import json
import math
import re
from typing import Final, TypeAlias, Union

from cria.grammar.base import SchemaError, UnsupportedSchema, _alts, _repeat, _seq, literal
from cria.grammar.limits import _MAX_REPEAT, _too_many
from cria.grammar.regex_text import _GROUP_NAME, _ungrouped

_Ranges: TypeAlias = list[tuple[int, int]]  # sorted, disjoint, inclusive code point ranges


# --- Character sets and patterns --------------------------------------------------------------

_MAX_CODE_POINT: Final = 0x10FFFF


def _union(*sets: _Ranges) -> _Ranges:
    merged: _Ranges = []
    for lo, hi in sorted(r for s in sets for r in s):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _complement(ranges: _Ranges) -> _Ranges:
    out, start = [], 0
    for lo, hi in _union(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= _MAX_CODE_POINT:
        out.append((start, _MAX_CODE_POINT))
    return out


def _contains(ranges: _Ranges, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _class_char(cp: int) -> str:
    if chr(cp).isascii() and chr(cp).isalnum():
        return chr(cp)
    if cp < 0x100:
        return f"\\x{cp:02X}"
    return f"\\u{cp:04X}" if cp < 0x10000 else f"\\U{cp:08X}"


def _char_class(ranges: _Ranges) -> str:
    """A GBNF character class for a non-empty, non-full set (negated when shorter)."""
    complement = _complement(ranges)
    negated = len(complement) < len(ranges)
    body = "".join(
        _class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"
        for lo, hi in (complement if negated else ranges)
    )
    return f"[{'^' if negated else ''}{body}]"


# Characters a JSON string cannot hold raw (and DEL and surrogates, which we never emit raw).
_JSON_SPECIAL: Final = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F), (0xD800, 0xDFFF)]
_JSON_ESCAPES: Final = {0x22: '\\"', 0x5C: "\\\\", 0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
# \d \w \s differ between regex dialects: ECMA-262 (what JSON Schema specifies) has ASCII \d
# and \w, Python's `re` and Rust's `regex` (pydantic) have Unicode ones, and their \s sets
# differ. So each class escape has a set that it matches in every dialect ("sure") and one that
# it may match in some ("maybe"): a grammar uses the first, a negated class excludes the second.
_NON_ASCII: Final = [(0x80, _MAX_CODE_POINT)]
_DIGIT: Final = [(0x30, 0x39)]
_WORD: Final = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE_SURE: Final = [
    (0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
    (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
]  # fmt: skip
_SPACE_MAYBE: Final = _union(_SPACE_SURE, [(0x1C, 0x1F), (0x85, 0x85), (0xFEFF, 0xFEFF)])
_CLASS_ESCAPES: Final[dict[str, tuple[_Ranges, _Ranges]]] = {
    "d": (_DIGIT, _union(_DIGIT, _NON_ASCII)),
    "D": (_complement(_union(_DIGIT, _NON_ASCII)), _complement(_DIGIT)),
    "w": (_WORD, _union(_WORD, _NON_ASCII)),
    "W": (_complement(_union(_WORD, _NON_ASCII)), _complement(_WORD)),
    "s": (_SPACE_SURE, _SPACE_MAYBE),
    "S": (_complement(_SPACE_MAYBE), _complement(_SPACE_SURE)),
}
_DOT: Final = _complement([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)])  # ECMA's, the smallest
_CHAR_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


def _set_expr(ranges: _Ranges, path: str) -> str:
    """GBNF for one character of a set, as it appears inside a JSON string: raw where JSON
    allows it, else as its short escape (other control characters are left out)."""
    raw = _complement(_union(_complement(ranges), _JSON_SPECIAL))
    alts = [_char_class(raw)] if raw else []
    alts += [literal(esc) for cp, esc in _JSON_ESCAPES.items() if _contains(ranges, cp)]
    if not alts:
        raise UnsupportedSchema(
            "pattern: control characters",
            "a character set in the pattern has no character a grammar can write",
            path=path,
        )
    return _alts(alts)


def _json_text(ch: str) -> str:
    """How a character appears inside a JSON string."""
    return json.dumps(ch, ensure_ascii=False)[1:-1]


# --- Pattern trees ----------------------------------------------------------------------------
# A translated pattern is first a tree, so that a length range (minLength / maxLength beside the
# pattern) can be imposed on it: ("lit", JSON text, code points), ("set", GBNF of one code
# point), ("seq", items), ("alt", options), ("rep", node, low, high or None).
_Node: TypeAlias = tuple  # type: ignore[type-arg]
_EMPTY: Final = ("seq", ())
_MAX_TRIES: Final = 32  # (count, item length) splits tried for one repetition
_Length: TypeAlias = tuple[int, Union[int, None]]  # noqa: UP007


def _length(node: _Node) -> _Length:
    """The fewest and most code points a node matches (None: no bound)."""
    kind = node[0]
    if kind == "lit":
        return node[2], node[2]
    if kind == "set":
        return 1, 1
    if kind == "rep":
        low, high = _length(node[1])
        if high == 0 or node[3] == 0:
            return 0, 0
        return low * node[2], None if high is None or node[3] is None else high * node[3]
    ranges = [_length(n) for n in node[1]]
    if kind == "seq":
        highs = [h for _, h in ranges]
        return sum(lo for lo, _ in ranges), None if None in highs else sum(highs)  # type: ignore[arg-type]
    highs = [h for _, h in ranges]
    return min(lo for lo, _ in ranges), None if None in highs else max(highs)  # type: ignore[type-var]


def _emit(node: _Node) -> str:
    """The GBNF of a node ("" when it matches only the empty string)."""
    kind = node[0]
    if kind == "lit":
        return literal(node[1]) if node[1] else ""
    if kind == "set":
        return node[1]
    if kind == "seq":
        return _seq(*map(_emit, node[1]))
    if kind == "alt":
        options = [_emit(n) or '""' for n in node[1]]
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"
    inner, low, high = _emit(node[1]), node[2], node[3]
    if not inner or high == 0:
        return ""
    single = node[1][0] in ("lit", "set") or (node[1][0] == "alt" and len(node[1][1]) > 1)
    return _repeat(inner if single else f"({inner})", low, high)


def _within(node: _Node, low: int, high: int | None) -> _Node | None:
    """A node matching only strings of low..high code points that the node matches (maybe
    fewer of them: stricter), or None when this finds none."""
    n_low, n_high = _length(node)
    if n_low >= low and (high is None or (n_high is not None and n_high <= high)):
        return node
    if high is not None and (max(low, n_low) > high or (n_high is not None and low > n_high)):
        return None
    if n_high is not None and low > n_high:
        return None
    kind = node[0]
    if kind == "alt":
        options = [o for o in (_within(n, low, high) for n in node[1]) if o is not None]
        return ("alt", tuple(options)) if options else None
    if kind == "rep":
        return _rep_within(node, low, high)
    if kind != "seq":
        return None
    items = node[1]
    ranges = [_length(n) for n in items]
    lows = [lo for lo, _ in ranges]
    highs = [h for _, h in ranges]
    deficit = low - sum(lows)
    for i in sorted(
        range(len(items)), key=lambda i: -(10**9 if highs[i] is None else highs[i] - lows[i])
    ):
        if deficit <= 0:
            break
        give = deficit if highs[i] is None else min(deficit, highs[i] - lows[i])  # type: ignore[operator]
        lows[i] += give
        deficit -= give
    if deficit > 0:
        return None
    if high is not None:
        tops = [lows[i] if h is None else h for i, h in enumerate(highs)]
        over = sum(tops) - high
        for i in sorted(range(len(items)), key=lambda i: lows[i] - tops[i]):
            if over <= 0:
                break
            cut = min(over, tops[i] - lows[i])
            tops[i] -= cut
            over -= cut
        if over > 0:
            return None
        open_ = [i for i, h in enumerate(highs) if h is None]
        left = high - sum(tops)
        for k, i in enumerate(open_):  # the room left, shared by the unbounded items
            tops[i] += left // len(open_) + (1 if k < left % len(open_) else 0)
        highs = tops  # type: ignore[assignment]
    out = []
    for item, lo, hi in zip(items, lows, highs, strict=True):
        sub = _within(item, lo, hi)
        if sub is None:
            return None
        out.append(sub)
    return ("seq", tuple(out))


def _rep_within(node: _Node, low: int, high: int | None) -> _Node | None:
    inner, m, n = node[1], node[2], node[3]
    a, b = _length(inner)
    if a == b:  # a fixed length: only the count changes
        c_low = max(m, math.ceil(low / a))
        c_high = n if high is None else high // a if n is None else min(n, high // a)
        return None if c_high is not None and c_low > c_high else ("rep", inner, c_low, c_high)
    if high is None:
        c_low = max(m, 1)
        if n is not None and c_low > n:
            return None
        sub = _within(inner, math.ceil(low / c_low), None)
        return None if sub is None else ("rep", sub, c_low, n)
    least = max(a, 1)
    most = high // least if n is None else min(n, high // least)  # repetitions that fit
    if most < m:
        return None
    if most == 0:
        return _EMPTY if low <= 0 else None
    balanced = max(m, 1, math.isqrt(most))  # with no bound, room for the count and each item
    tries = 0
    for c_high in dict.fromkeys([balanced if n is None else most, *range(most, max(m, 1) - 1, -1)]):
        for c_low in range(max(m, 1 if low > 0 else 0), c_high + 1):
            inner_low = max(least, math.ceil(low / c_low)) if c_low else least
            if inner_low > high // c_high:
                continue
            tries += 1
            if tries > _MAX_TRIES:
                return None
            sub = _within(inner, inner_low, high // c_high)
            if sub is not None:
                return ("rep", sub, c_low, c_high)
    return None


class _Pattern:
    """Translates an ECMA-262 regular expression (the subset of JSON Schema's `pattern` a
    grammar can express) into GBNF for the JSON-encoded content of a matching string."""

    def __init__(self, source: str, path: str) -> None:
        self.src = _ungrouped(source)
        self.pos = 0
        self.path = path
        self.unanchored = False  # whether the result refers to the `char` rule

    def translate(self, low: int = 0, high: int | None = None) -> str:
        """The GBNF of the pattern; with a length range, of the matches of that many code
        points (maybe fewer of them), or UnsupportedSchema when this finds none."""
        tree = self.tree()
        if low > 0 or high is not None:
            limited = _within(tree, low, high)
            if limited is None:
                raise UnsupportedSchema(
                    "pattern with minLength/maxLength",
                    "cannot limit the length of this pattern's matches",
                    path=self.path,
                )
            tree = limited
        return _emit(tree) or '""'

    def tree(self) -> _Node:
        self.pos = 0
        alternatives = []
        anywhere = ("rep", ("set", "char"), 0, None)
        while True:
            starts = self._eat("^")
            body, ends = self._sequence(top=True)
            if not (starts and ends):
                self.unanchored = True
            parts = [() if starts else (anywhere,), body[1], () if ends else (anywhere,)]
            alternatives.append(("seq", tuple(x for part in parts for x in part)))
            if not self._eat("|"):
                break
        if self.pos < len(self.src):
            raise SchemaError("pattern: unbalanced ')'", path=self.path)
        return ("alt", tuple(alternatives))

    def _eat(self, text: str) -> bool:
        if self.src.startswith(text, self.pos):
            self.pos += len(text)
            return True
        return False

    def _unsupported(self, what: str, message: str = "") -> UnsupportedSchema:
        return UnsupportedSchema(f"pattern: {what}", message, path=self.path)

    def _invalid(self, message: str) -> SchemaError:
        return SchemaError(f"invalid pattern {self.src!r}: {message}", path=self.path)

    def _escape(self, *, in_class: bool = False) -> str | tuple[_Ranges, _Ranges]:
        """After a backslash: a character, or the (sure, maybe) sets of \\d \\w \\s \\D..."""
        if self.pos >= len(self.src):
            raise self._invalid("trailing backslash")
        ch = self.src[self.pos]
        self.pos += 1
        if ch in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[ch]
        if ch in _CHAR_ESCAPES:
            return _CHAR_ESCAPES[ch]
        if in_class and ch == "b":
            return "\b"
        if ch in "bB":
            raise self._unsupported("word boundary")
        if ch == "0" and not self.src[self.pos : self.pos + 1].isdigit():
            return "\0"
        if ch.isdigit() or ch == "k":
            raise self._unsupported("backreference")
        if ch in "xu":
            digits = self.src[self.pos : self.pos + (2 if ch == "x" else 4)]
            if len(digits) != (2 if ch == "x" else 4) or not all(
                c in "0123456789abcdefABCDEF" for c in digits
            ):
                raise self._unsupported(f"escape \\{ch}")
            self.pos += len(digits)
            return chr(int(digits, 16))
        if ch.isalnum() or ch == "_":
            raise self._unsupported(f"escape \\{ch}")
        return ch

    def _class(self) -> _Ranges:
        """A [...] class: the characters it matches in every regex dialect."""
        negated = self._eat("^")
        sure: _Ranges = []
        maybe: _Ranges = []
        while True:
            if self.pos >= len(self.src):
                raise self._invalid("missing ']'")
            if self._eat("]"):
                break
            first = self._class_atom()
            if (
                self.src.startswith("-", self.pos)
                and self.src[self.pos + 1 : self.pos + 2] not in "]"
            ):
                self.pos += 1
                last = self._class_atom()
                if not isinstance(first, str) or not isinstance(last, str):
                    raise self._unsupported("class range with \\d, \\w or \\s")
                if ord(first) > ord(last):
                    raise self._invalid("range out of order in character class")
                sure.append((ord(first), ord(last)))
                maybe.append((ord(first), ord(last)))
            elif isinstance(first, str):
                sure.append((ord(first), ord(first)))
                maybe.append((ord(first), ord(first)))
            else:
                sure.extend(first[0])
                maybe.extend(first[1])
        return _complement(maybe) if negated else _union(sure)

    def _class_atom(self) -> str | tuple[_Ranges, _Ranges]:
        ch = self.src[self.pos]
        self.pos += 1
        if ch == "\\":
            return "-" if self._eat("-") else self._escape(in_class=True)
        return ch

    def _alternation(self) -> _Node:
        alternatives = [self._sequence(top=False)[0]]
        while self._eat("|"):
            alternatives.append(self._sequence(top=False)[0])
        return ("alt", tuple(alternatives))

    def _sequence(self, *, top: bool) -> tuple[_Node, bool]:
        """Terms up to "|", ")" or the end; at the top level, also whether "$" ended it."""
        items: list[_Node] = []
        text, count = "", 0  # consecutive literal characters, JSON-encoded, and how many

        def flush() -> None:
            nonlocal text, count
            if text:
                items.append(("lit", text, count))
                text, count = "", 0

        while self.pos < len(self.src) and self.src[self.pos] not in "|)":
            if top and self.src[self.pos] == "$" and self.src[self.pos + 1 : self.pos + 2] in "|":
                self.pos += 1
                flush()
                return ("seq", tuple(items)), True
            atom = self._atom()
            quantifier = self._quantifier()
            if isinstance(atom, str) and quantifier is None:
                text += atom
                count += 1
                continue
            flush()
            node = ("lit", atom, 1) if isinstance(atom, str) else atom
            items.append(node if quantifier is None else ("rep", node, *quantifier))
        flush()
        return ("seq", tuple(items)), False

    def _atom(self) -> str | _Node:
        """One atom: JSON text of a literal character (str) or a tree."""
        ch = self.src[self.pos]
        self.pos += 1
        if ch == "(":
            if self._eat("?"):
                if self.src.startswith(("=", "!", "<=", "<!"), self.pos):
                    raise self._unsupported("lookaround")
                named = _GROUP_NAME.match(self.src, self.pos)
                if named:
                    self.pos = named.end()
                elif not self._eat(":"):
                    raise self._unsupported("(?...) group")
            group = self._alternation()
            if not self._eat(")"):
                raise self._invalid("missing ')'")
            return group
        if ch == "[":
            return ("set", _set_expr(self._class(), self.path))
        if ch == ".":
            return ("set", _set_expr(_DOT, self.path))
        if ch == "\\":
            escaped = self._escape()
            if isinstance(escaped, str):
                return _json_text(escaped)
            return ("set", _set_expr(escaped[0], self.path))
        if ch in "*+?" or (ch == "{" and _QUANTIFIER.match(self.src, self.pos - 1)):
            raise self._invalid("nothing to repeat")
        if ch in "^$":
            raise self._unsupported(
                "anchor", "^ and $ are supported only at the ends of the pattern"
            )
        return _json_text(ch)

    def _quantifier(self) -> tuple[int, int | None] | None:
        """A quantifier after an atom, as (low, high or None); None when there is none. A
        lazy "?" changes nothing; a count above _MAX_REPEAT is lowered to it (stricter)."""
        ch = self.src[self.pos : self.pos + 1]
        if ch and ch in "*+?":
            self.pos += 1
            quantifier: tuple[int, int | None] = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        elif ch == "{" and (match := _QUANTIFIER.match(self.src, self.pos)):
            self.pos = match.end()
            low = int(match[1])
            high = low if match[2] is None else int(match[3]) if match[3] else None
            if high is not None and high < low:
                raise self._invalid("numbers out of order in {} quantifier")
            if low > _MAX_REPEAT:
                raise _too_many("pattern: quantifier", self.path)
            quantifier = (low, None if high is None else min(high, _MAX_REPEAT))
        else:
            return None
        self._eat("?")
        return quantifier
