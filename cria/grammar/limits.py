"""Limits that keep grammars within what llama.cpp's grammar sampler parses and samples fast."""

from __future__ import annotations

import re
from typing import Final

from cria.grammar.base import UnsupportedSchema

# --- Limits -----------------------------------------------------------------------------------
# llama.cpp's grammar sampler keeps one parse stack per way the text so far can be read; every
# token of the vocabulary is checked against every stack. Branches of a union that match the
# same text stay alive together, and when they are alive while a nested value is read, the
# stacks of that value are tracked once per branch: the count multiplies level by level.
_MAX_AMBIGUITY: Final = 64  # estimated parse stacks alive at once
_MAX_NESTING: Final = 64  # objects and arrays inside one another, as compiled
_MAX_EXPR_DEPTH: Final = 128  # subschemas inside one another (anyOf, $ref... included)
_MAX_WORK: Final = 100_000  # subschemas compiled for one schema
_MAX_GRAMMAR_BYTES: Final = 512 * 1024
_MAX_RULES: Final = 10_000
_MAX_GROUP_DEPTH: Final = 512  # parentheses inside one another in one rule
# llama.cpp's MAX_REPETITION_THRESHOLD: its parser refuses a count above it in x{m,n} (it
# silently drops an upper bound above it) and refuses to repeat a group that makes more than
# this many rules, times the count (see _check_repetitions).
_MAX_REPEAT: Final = 2000
_BIG_REPEAT: Final = 64  # a longer optional repetition gets a rule of its own


def _too_large(reason: str, *, path: str = "") -> UnsupportedSchema:
    return UnsupportedSchema(
        "schema too large", f"the schema is too large for a grammar: {reason}", path=path
    )


def _too_many(keyword: str, path: str) -> UnsupportedSchema:
    return UnsupportedSchema(
        f"{keyword} above {_MAX_REPEAT}",
        f"llama.cpp's grammar sampler enforces counts up to {_MAX_REPEAT}",
        path=path,
    )


_GBNF_TOKEN = re.compile(
    r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[a-zA-Z0-9-]+|\{(\d+)(,(\d*))?\}|[()|*+?]'
)


def _check_repetitions(grammar: str) -> None:
    """Raise UnsupportedSchema where llama.cpp's grammar parser would fail or drop a bound:
    it rewrites x{m,n} into rules (one per optional repetition), refuses m above
    _MAX_REPEAT, turns n above it into no bound, and refuses to repeat an item when the rules
    that item made (a group: every rule first named or made inside it), times the count,
    exceed _MAX_REPEAT. This follows its parser over the text, one token at a time."""
    named: set[str] = set()
    made = 0  # rules made for groups and repetitions
    for line in grammar.splitlines():
        name, _, body = line.partition(" ::= ")
        named.add(name)
        opened: list[int] = []  # rules so far, at each open group
        item_rules = 1  # rules the latest item stands for (llama.cpp's n_prev_rules)
        for token in _GBNF_TOKEN.finditer(body):
            text = token[0]
            if text == "(":
                opened.append(len(named) + made)
                made += 1
            elif text == ")":
                item_rules = max(1, len(named) + made - opened.pop())
            elif text in "*+?" or text[0] == "{":
                if text[0] == "{":
                    low = int(token[1])
                    high = low if token[2] is None else int(token[3]) if token[3] else None
                else:
                    low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[text]
                if low > _MAX_REPEAT or (high is not None and high > _MAX_REPEAT):
                    raise _too_large(f"its grammar would repeat {text}, more than {_MAX_REPEAT}")
                count = high or low or 1
                if item_rules * count > _MAX_REPEAT:
                    raise _too_large(
                        f"its grammar would repeat {count} times a group that makes "
                        f"{item_rules} rules, more than llama.cpp's limit of {_MAX_REPEAT}"
                    )
                made += 1 if high is None else high - low
                item_rules *= count
            elif text == "|" or text[0] in '"[':
                item_rules = 1
            else:
                named.add(text)
                item_rules = 1


def _group_depth(grammar: str) -> int:
    """How deep parentheses nest in a GBNF text (literals and classes skipped)."""
    depth = deepest = 0
    i, n = 0, len(grammar)
    while i < n:
        ch = grammar[i]
        if ch in '"[':
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        i += 1
    return deepest
