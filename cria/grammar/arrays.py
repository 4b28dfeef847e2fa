"""Arrays and strings."""

from __future__ import annotations

from typing import Any, Final

from cria.grammar.ambiguity import _LIGHT, _NUMBER_LEAF, _STRING_LEAF, _Array, _leaf
from cria.grammar.base import (
    _FORMATS,
    SchemaError,
    Unsatisfiable,
    UnsupportedSchema,
    _alts,
    _at,
    _canonical,
    _compact_json,
    _count,
    _is_any,
    _repeat,
    _seq,
    literal,
)
from cria.grammar.limits import _BIG_REPEAT, _MAX_REPEAT, _too_many
from cria.grammar.numbers import _bounds, _int_range, _multiples, _number_range
from cria.grammar.regex import _Pattern
from cria.grammar.regex_text import _scheme_prefixes

_NUMBER_BOUNDS: Final = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
_FINITE: Final[dict[str, list[Any]]] = {"boolean": [False, True], "null": [None]}


def _type_list(declared: Any) -> list[str]:
    return (
        [declared]
        if isinstance(declared, str)
        else list(declared)
        if isinstance(declared, list)
        else []
    )


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON Schema compares items (1 and 1.0 are equal, true and 1 are not)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return _canonical(a) == _canonical(b)


# The fewest and most characters of each format's grammar (None: no bound), see base.py.
_FORMAT_LENGTHS: Final[dict[str, tuple[int, int | None]]] = {
    "date": (10, 10), "time": (9, 24), "date-time": (20, 35), "duration": (3, 62),
    "uuid": (36, 36), "email": (3, 300), "hostname": (1, 251), "ipv4": (7, 15),
    "ipv6": (15, 39), "uri": (5, None), "uri-reference": (1, None),
}  # fmt: skip


def _short_email(high: int) -> str:
    """An email of at most `high` (7 or more) characters: a local part without dots, "@",
    one or two labels of at most b characters (a subset of the `email` format's grammar)."""
    a = min(32, max(1, (high - 2) // 3))
    b = min(62, (high - 2 - a) // 2)  # a + 1 + (b + 1) + b <= high
    tail = f" ([a-zA-Z0-9-]{{0,{b - 2}}} [a-zA-Z0-9])?" if b >= 2 else ""
    return f'[a-zA-Z0-9!#$%&\'*+/=?^_`{{|}}~-]{{1,{a}}} "@" ([a-zA-Z0-9]{tail} ".")? [a-zA-Z]{tail}'


class _ArraysMixin:
    def _array(self, schema: dict[str, Any], path: str, name: str) -> str:
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", True)
        if not isinstance(prefix, list):
            raise SchemaError("prefixItems must be an array of schemas", path=path)
        if not isinstance(items, dict | bool):
            raise SchemaError("items must be a schema (tuples use prefixItems)", path=path)
        low = _count(schema, "minItems", path) or 0
        high = _count(schema, "maxItems", path)
        if "contains" in schema:  # minContains / maxContains mean nothing without contains
            at_least = _count(schema, "minContains", path)
            at_least = 1 if at_least is None else at_least
            at_most = _count(schema, "maxContains", path)
            # maxContains bounds the matching items even when minContains is 0.
            if (at_least or at_most is not None) and not _is_any(schema["contains"]):
                raise UnsupportedSchema(
                    "contains",
                    "contains is supported only with a schema any item matches",
                    path=path,
                )
            low = max(low, at_least)  # any item matches: at least that many items
            if at_most is not None:  # ... and at most that many
                high = at_most if high is None else min(high, at_most)
        if high is not None and low > high:
            raise Unsatisfiable("minItems is greater than maxItems", path=path)
        if low > _MAX_REPEAT:
            raise _too_many("minItems", path)
        if high is not None and high > _MAX_REPEAT:  # stricter: at most _MAX_REPEAT items
            high = _MAX_REPEAT
        if schema.get("uniqueItems", False) is not False and (high is None or high > 1):
            unique = self._unique_array(schema, path, low, high)
            if unique is not None:
                return unique
            if low > 1:
                raise UnsupportedSchema(
                    "uniqueItems", "a grammar cannot keep items unique", path=path
                )
            high = 1  # stricter: one item at most is always unique
        if not prefix and _is_any(items) and low == 0 and high is None:
            return self._prim("array")

        if high is not None:
            prefix = prefix[:high]
        with self._nested(path):
            elements = []
            for i, sub in enumerate(prefix):  # an item no value matches ends the array
                where = _at(path, "prefixItems", i)
                expr = self._expr(sub, where, f"{name}-{i}") if i < low else None
                expr = expr or self._optional(sub, where, f"{name}-{i}")
                if expr is None:
                    items, high = False, i
                    break
                elements.append(self._named(f"{name}-{i}", expr))
            count = len(elements)
            item = None
            if items is not False and (high is None or high > count):
                expr = self._optional(items, _at(path, "items"), f"{name}-item")
                item = None if expr is None else self._named(f"{name}-item", expr)
            if item is None and low > count:
                raise Unsatisfiable("minItems is more than the items allowed", path=path)
        space = self._prim("space")
        comma = f'"," {space}'
        if item is None:
            body = ""
        else:
            later = f"({comma} {item} {space})"
            at_least = max(0, low - max(count, 1))
            at_most = None if high is None else high - max(count, 1)
            more = _repeat(later, at_least, at_most)
            if at_most is not None and at_most - at_least > _BIG_REPEAT:
                # llama.cpp makes a rule per optional repetition; a group around that many
                # would pass its limit (see _check_repetitions), a rule reference does not
                more = self.add_rule(f"{name}-more", more)
            if count:
                body = more
            else:
                body = _seq(item, space, more)
                body = body if low else f"({body})?"
        for i in reversed(range(count)):
            part = _seq(comma if i else "", elements[i], space, body)
            body = part if i < low else f"({part})?"
        return self._shaped(_seq('"["', space, body, '"]"'), _Array(elements, item, low, high))

    def _unique_array(
        self, schema: dict[str, Any], path: str, low: int, high: int | None
    ) -> str | None:
        """uniqueItems over a finite item domain (enum, const, boolean, null): the allowed
        values in a fixed order, each at most once. None when the domain is not finite."""
        items = schema.get("items", True)
        if schema.get("prefixItems") or not isinstance(items, dict):
            return None
        flat = self._flat(items, path)
        if flat is None:
            return None
        if "enum" in flat or "const" in flat:
            values = flat["enum"] if "enum" in flat else [flat["const"]]
            if not isinstance(values, list):
                return None
        elif "type" in flat and set(_type_list(flat["type"])) <= {"boolean", "null"}:
            values = [v for t in _type_list(flat["type"]) for v in _FINITE[t]]
        else:
            return None
        where = _at(path, "items")
        kept: list[Any] = []
        for value in values:
            if not any(_same(value, k) for k in kept) and self._valid(value, items, where):
                kept.append(value)
        if low > len(kept):
            raise Unsatisfiable("minItems is more than the distinct items allowed", path=path)
        high = len(kept) if high is None else min(high, len(kept))
        if not kept or len(kept) * (high + 1) > _MAX_REPEAT:
            return None
        space = self._prim("space")
        texts = [literal(_compact_json(v, where)) for v in kept]
        name = f"{path or 'root'}-unique"
        # rest(i, j): what follows once j values are written and the next is texts[i] or later.
        memo: dict[tuple[int, int], str] = {}

        def rest(i: int, j: int) -> str:
            if (i, j) in memo:
                return memo[(i, j)]
            alts = []
            if j >= low:
                alts.append('""')
            if j < high:
                alts += [
                    _seq(
                        '","' if j else "", space if j else "", texts[m], space, rest(m + 1, j + 1)
                    )
                    for m in range(i, len(kept))
                    if len(kept) - m - 1 >= low - j - 1
                ]
            memo[(i, j)] = self.add_rule(name, " | ".join(alts) or '""')
            return memo[(i, j)]

        return self._shaped(_seq('"["', space, rest(0, 0), '"]"'), _leaf(("[", _LIGHT)))

    def _string(self, schema: dict[str, Any], path: str) -> str:
        fmt = schema.get("format")
        pattern = schema.get("pattern")
        low = _count(schema, "minLength", path) or 0
        high = _count(schema, "maxLength", path)
        if high is not None and low > high:
            raise Unsatisfiable("minLength is greater than maxLength", path=path)
        if low > _MAX_REPEAT:
            raise _too_many("minLength", path)
        if high is not None and high > _MAX_REPEAT:  # stricter: at most _MAX_REPEAT characters
            high = _MAX_REPEAT
        lengths = low > 0 or high is not None
        excluded = (
            schema.get("not", {}).get("enum") if isinstance(schema.get("not"), dict) else None
        )
        if excluded is not None:  # `not` of string values (see schemas._negate)
            if fmt is not None or pattern is not None or lengths:
                raise UnsupportedSchema(
                    "not", "`not` of values is supported only beside a plain string", path=path
                )
            return self._shaped(
                self._key_not_in(list(excluded), f"{path or 'root'}-not"), _STRING_LEAF
            )
        quote = r'"\""'
        if fmt in ("uri", "uri-reference") and isinstance(pattern, str) and not lengths:
            prefixes = _scheme_prefixes(_Pattern(pattern, _at(path, "pattern")).tree())
            if prefixes:  # a uri starting with one of these `scheme://` (a uri-reference too)
                return self._shaped(
                    _seq(
                        quote, _alts([literal(p) for p in prefixes]), self._prim("uri-rest"), quote
                    ),
                    _STRING_LEAF,
                )
        if fmt is not None and pattern is not None:
            raise UnsupportedSchema(
                "combined string constraints",
                "use only one of format and pattern on a string",
                path=path,
            )
        if fmt is not None:
            if fmt not in _FORMATS:
                raise UnsupportedSchema(
                    f"format: {fmt}", f"supported formats: {', '.join(_FORMATS)}", path=path
                )
            shortest, longest = _FORMAT_LENGTHS[fmt]
            if fmt == "email" and low <= shortest and high is not None and 7 <= high < longest:
                return self._shaped(_seq(quote, _short_email(high), quote), _STRING_LEAF)
            if shortest < low or (high is not None and (longest is None or longest > high)):
                raise UnsupportedSchema(
                    "combined string constraints",
                    f"minLength/maxLength beside format {fmt!r} must allow every length of "
                    f"that format ({shortest} to {longest or 'any'} characters)",
                    path=path,
                )
            return self._shaped(_seq(quote, self._prim(fmt), quote), _STRING_LEAF)
        if pattern is not None:
            if not isinstance(pattern, str):
                raise SchemaError("pattern must be a string", path=path)
            translator = _Pattern(pattern, _at(path, "pattern"))
            body = translator.translate(low, high)
            if translator.unanchored:
                self._prim("char")
            return self._shaped(_seq(quote, body, quote), _STRING_LEAF)
        if not lengths:
            return self._prim("string")
        return self._shaped(
            _seq(quote, _repeat(self._prim("char"), low, high), quote), _STRING_LEAF
        )

    def _number(self, schema: dict[str, Any], path: str, *, integer: bool) -> str:
        step = schema.get("multipleOf")
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, int | float) or step <= 0:
                raise SchemaError("multipleOf must be a number above 0", path=path)
            if step > 1 and float(step).is_integer():  # the multiples within the bounds
                low, high = _bounds(schema, path, integer=True)
                values = _multiples(
                    int(step),
                    None if low is None else low[0] + (0 if low[1] else 1),
                    None if high is None else high[0] - (0 if high[1] else 1),
                )
                if values is None:
                    raise Unsatisfiable("no multiple of multipleOf is within the bounds", path=path)
                return self._shaped(_alts([literal(str(v)) for v in values]), _NUMBER_LEAF)
            inverse = 1 / step
            if step > 1 or abs(inverse - round(inverse)) > 1e-9:
                raise UnsupportedSchema(
                    "multipleOf",
                    "multipleOf is supported only as 1 or a fraction 1/n (integers are written)",
                    path=path,
                )
            integer = True  # every integer is a multiple of 1/n: stricter
        low, high = _bounds(schema, path, integer=integer)
        if low is None and high is None:
            return self._prim("integer" if integer else "number")
        if integer:
            lo_int = None if low is None else low[0] + (0 if low[1] else 1)
            hi_int = None if high is None else high[0] - (0 if high[1] else 1)
            if lo_int is not None and hi_int is not None and lo_int > hi_int:
                raise Unsatisfiable("no integer is within the bounds", path=path)
            return self._shaped(_int_range(lo_int, hi_int), _NUMBER_LEAF)
        expr = _number_range(low, high)
        if expr is None:
            if all(isinstance(schema.get(k, 0), int) for k in _NUMBER_BOUNDS):
                raise Unsatisfiable("no number is within the bounds", path=path)
            raise UnsupportedSchema(
                "non-integer bound on a number",
                "no integer is within the bounds of this number, and a grammar enforces "
                "only integer bounds on numbers",
                path=path,
            )
        return self._shaped(expr, _NUMBER_LEAF)

    # -- ambiguity --
