"""Pattern source rewrites and readings done before (or besides) translation to GBNF."""

from __future__ import annotations

import re
from typing import Final

_GROUP_NAME: Final = re.compile(r"<[A-Za-z_$][\w$]*>")
_SCHEME: Final = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]{0,15}://")
_ANYWHERE: Final = ("rep", ("set", "char"), 0, None)  # what pads an unanchored side
_MAX_STRINGS: Final = 16
_MAX_UNGROUP: Final = 16  # groups unwrapped one in another (deeper ones are left as they are)


def _top_level(source: str) -> tuple[list[str], list[int]] | None:
    """The top-level alternatives of a pattern, and for each the index of the ")" that
    closes a group opened at its first character (-1 if none); None if unbalanced."""
    parts, closes, depth, start, opened, in_class, i = [], [], 0, 0, -1, False, 0
    while i < len(source):
        ch = source[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return None
            if depth == 0 and i + 1 < len(source) and source[i + 1] not in "|":
                opened = -2  # something follows the group
            elif depth == 0 and opened != -2:
                opened = i - start
        elif ch == "|" and depth == 0:
            parts.append(source[start:i])
            closes.append(opened)
            start, opened = i + 1, -1
        i += 1
    if depth or in_class:
        return None
    parts.append(source[start:])
    closes.append(opened)
    return parts, closes


def _ungrouped(source: str, depth: int = 0) -> str:
    """The pattern with every top-level alternative that is one plain group (no quantifier
    after it) replaced by the group's own alternatives, recursively: the same language, and
    anchors inside such groups, as in (^a$)|(^b$), are then at the ends of an alternative."""
    split = _top_level(source)
    if split is None or depth > _MAX_UNGROUP:
        return source
    out = []
    for part, close in zip(*split, strict=True):
        inner = None
        if part.startswith("(") and close == len(part) - 1:
            named = _GROUP_NAME.match(part, 2) if part.startswith("(?<") else None
            if named and not part.startswith(("(?<=", "(?<!")):
                inner = part[named.end() : -1]
            elif part.startswith("(?:"):
                inner = part[3:-1]
            elif not part.startswith("(?"):
                inner = part[1:-1]
        out.append(part if inner is None else _ungrouped(inner, depth + 1))
    return "|".join(out)


def _strings(node: tuple) -> set[str] | None:  # type: ignore[type-arg]
    """The JSON texts a pattern tree matches, when there are few (None otherwise)."""
    kind = node[0]
    if kind == "lit":
        return {node[1]}
    if kind in ("seq", "alt"):
        parts = [_strings(n) for n in node[1]]
        if any(p is None for p in parts):
            return None
        if kind == "alt":
            out = set().union(*parts)  # type: ignore[arg-type]
        else:
            out = {""}
            for part in parts:
                out = {a + b for a in out for b in part}  # type: ignore[union-attr]
                if len(out) > _MAX_STRINGS:
                    return None
        return out if len(out) <= _MAX_STRINGS else None
    if kind == "rep" and node[3] is not None and node[3] <= 4:
        inner = _strings(node[1])
        if inner is None:
            return None
        out = set()
        for count in range(node[2], node[3] + 1):
            texts = {""}
            for _ in range(count):
                texts = {a + b for a in texts for b in inner}
            out |= texts
            if len(out) > _MAX_STRINGS:
                return None
        return out
    return None


def _scheme_prefixes(tree: tuple) -> list[str] | None:  # type: ignore[type-arg]
    """For a pattern that means "starts with one of a few `scheme://`" (e.g. ^https?://):
    those prefixes; None for any other pattern."""
    prefixes: set[str] = set()
    for alternative in tree[1]:
        items = alternative[1]
        if not items or items[-1] != _ANYWHERE or _ANYWHERE in items[:-1]:
            return None
        strings = _strings(("seq", items[:-1]))
        if strings is None or not all(_SCHEME.fullmatch(s) for s in strings):
            return None
        prefixes |= strings
    return sorted(prefixes)
