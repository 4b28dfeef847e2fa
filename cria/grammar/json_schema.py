"""JSON Schema -> GBNF, the grammar language of llama.cpp's grammar sampler.

The grammar enforces a schema while the model writes: the sampler masks every token that would
leave the grammar. So a grammar may be *stricter* than its schema (the model simply cannot take
some valid spellings) but never *looser*: a constraint this module cannot express raises
`UnsupportedSchema` naming it, it is never dropped. Invalid schemas raise `SchemaError`.

Design
------
* A JSON value is a GBNF expression without surrounding whitespace. Containers add `space`
  where JSON allows whitespace (after "{", "[", ",", ":" and after each key and value), and
  `space` is bounded (one blank, or one newline and up to 20 blanks of indentation): a small
  model must not be able to stall in whitespace. Integer parts have at most 16 digits.
* Shared rules (`space`, `string`, `number`, the date/time formats...) are added once, under
  fixed names; every other rule gets a unique name derived from where it sits in the schema.
* `$ref` (local JSON pointers: "#", "#/$defs/X", "#/definitions/X", ...) becomes one rule per
  target, referenced by name, so recursive schemas are recursive grammars. Pointers resolve
  against the document passed in (a nested `$id` does not start a new base).
* `allOf` is merged into one schema (the object case keeps JSON Schema's meaning:
  `additionalProperties` of each part restricts the merged keys). Keywords next to `anyOf` /
  `oneOf` / `$ref` are merged into each branch the same way.
* `enum` / `const` become literals of their compact JSON, keeping only the values that satisfy
  the rest of the schema (checked with `jsonschema`), so any keyword next to them is exact.
* `pattern` (an ECMA-262 regular expression) is translated to GBNF over the *JSON-encoded*
  string content; an unanchored side is padded with any characters, as JSON Schema searches.

Deliberate simplifications, all stricter than the schema
--------------------------------------------------------
* `oneOf` is treated as `anyOf`: exclusivity is not enforced (documented, not detected).
* Object properties come in declaration order; extra keys (when `additionalProperties` allows
  them) come after the declared ones, cannot repeat a declared name, and use no escapes.
* Without `type`, the type is inferred from the keywords present (`properties` -> object...).
* A `\\u` escape of a UTF-16 surrogate must be half of a pair (the pair is one character), so
  one grammar character is one code point and `minLength` / `maxLength` are exact.
* Under a `pattern`, characters are written raw; only `"`, `\\` and tab, newline and carriage
  return use their short escapes (other control characters cannot match).
* Numbers with bounds have no exponent; bounds on `number` must be integers.
* Formats follow RFC 3339 (`time` needs an offset, leap seconds excluded); `date` checks
  month lengths and leap years.

Limits
------
llama.cpp's sampler keeps one parse stack per way of reading the text so far and checks every
token of the vocabulary against every stack, so a small grammar can still be slow to sample.
Branches of a union that match the same text stay alive together, and while they read a nested
value each keeps that value's stacks: nested such unions multiply them. So `anyOf` / `oneOf`
branches are first merged where that is exact (equal ones; ones differing only in minItems /
maxItems or minLength / maxLength whose ranges join up), then these raise UnsupportedSchema:

* "anyOf: too ambiguous" ("oneOf: ...", "type: ..."): more than _MAX_AMBIGUITY (64) stacks at
  once by the estimate of `GrammarBuilder._analyze`, or branches that may both be alive when
  they lead back to the union through a recursive $ref (the count would grow with every level).
  Branches told apart before any nested ambiguity (by their first character, as object, array,
  string and null are, or by a first property with distinct const values) cost nothing extra,
  recursive or not; a union of a few object types costs a few stacks.
* "recursive $ref without nesting": a $ref that comes back to itself before any object or array
  (left recursion, which llama.cpp refuses).
* "nesting too deep": objects and arrays more than 64 deep, subschemas more than 128 deep.
* "schema too large": a grammar over 512 KiB or 10,000 rules, or one llama.cpp's parser would
  refuse (a repeated group that makes more than 2000 rules, see `_check_repetitions`).
* "minLength above 2000" (maxLength, minItems, maxItems, "pattern: quantifier above 2000"):
  llama.cpp enforces repetition counts up to 2000 (it would drop a larger upper bound).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any, Final, TypeAlias

import referencing.exceptions

Schema: TypeAlias = dict[str, Any] | bool
_Bound: TypeAlias = tuple[int, bool]  # (value, inclusive)
_Ranges: TypeAlias = list[tuple[int, int]]  # sorted, disjoint, inclusive code point ranges


class SchemaError(ValueError):
    """The schema is invalid (or not JSON Schema at all). `path` locates the problem, e.g.
    "properties.address.items" (empty: the root); `str()` is the message alone."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class UnsupportedSchema(SchemaError):
    """A valid schema that uses a feature a grammar cannot enforce; `feature` names it, e.g.
    "patternProperties", "format: uri", "pattern: lookaround"."""

    def __init__(self, feature: str, message: str = "", *, path: str = "") -> None:
        super().__init__(message or f"{feature} cannot be enforced by a grammar", path=path)
        self.feature = feature


# --- Keywords ---------------------------------------------------------------------------------

_ANNOTATIONS: Final = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment",
        "deprecated", "readOnly", "writeOnly", "strict", "$anchor", "$dynamicAnchor",
        "$vocabulary", "contentEncoding", "contentMediaType", "contentSchema", "discriminator",
        "$defs", "definitions",
    }
)  # fmt: skip
_TYPE_KEYWORDS: Final = {
    "object": ("properties", "required", "additionalProperties", "minProperties",
               "maxProperties", "unevaluatedProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "unevaluatedItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"),
}  # fmt: skip
_APPLICATORS: Final = ("allOf", "anyOf", "oneOf", "$ref")
_SUPPORTED: Final = frozenset(
    {"type", "enum", "const", *_APPLICATORS}.union(*_TYPE_KEYWORDS.values())
)
_UNSUPPORTED: Final = {
    "not": ("not", "a grammar cannot exclude the values that match a subschema"),
    "if": ("if/then/else", "conditional subschemas cannot be enforced by a grammar"),
    "then": ("if/then/else", "conditional subschemas cannot be enforced by a grammar"),
    "else": ("if/then/else", "conditional subschemas cannot be enforced by a grammar"),
    "multipleOf": ("multipleOf", "a grammar cannot check divisibility"),
    "contains": ("contains", "a grammar cannot require some item to match a subschema"),
    "minContains": ("minContains", "a grammar cannot count matching items"),
    "maxContains": ("maxContains", "a grammar cannot count matching items"),
    "patternProperties": ("patternProperties", ""),
    "propertyNames": ("propertyNames", ""),
    "dependentRequired": ("dependentRequired", ""),
    "dependentSchemas": ("dependentSchemas", ""),
    "dependencies": ("dependencies", ""),
    "$dynamicRef": ("$dynamicRef", ""),
    "$recursiveRef": ("$recursiveRef", ""),
}
_TYPES: Final = ("object", "array", "string", "number", "integer", "boolean", "null")
_INT_DIGITS: Final = 16  # an unbounded integer part has at most this many digits

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

# --- Shared rules -----------------------------------------------------------------------------

_HEX = "[0-9a-fA-F]"
_HOUR = '([01] [0-9] | "2" [0-3])'
_PRIMITIVES: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "space": (r'| " " | "\n" [ \t]{0,20}', ()),
    # One code point: a raw character or an escape (a UTF-16 surrogate pair, never half of one).
    "char": (
        r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-C] '
        + f"{_HEX}{{3}} | [dD] [0-7] {_HEX}{{2}} | [eEfF] {_HEX}{{3}}"
        + f' | [dD] [89abAB] {_HEX}{{2}} "\\\\u" [dD] [c-fC-F] {_HEX}{{2}}))',
        (),
    ),
    "key-char": (r'[^"\\\x7F\x00-\x1F]', ()),
    "string": (r'"\"" char* "\""', ("char",)),
    "integer": (r'"-"? ("0" | [1-9] [0-9]{0,15})', ()),
    "number": (r'"-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?', ()),
    "boolean": ('"true" | "false"', ()),
    "null": ('"null"', ()),
    "value": (
        "object | array | string | number | boolean | null",
        ("object", "array", "string", "number", "boolean", "null"),
    ),
    "object": (
        '"{" space (string space ":" space value space '
        '("," space string space ":" space value space)*)? "}"',
        ("space", "string", "value"),
    ),
    "array": ('"[" space (value space ("," space value space)*)? "]"', ("space", "value")),
    "uuid": (' "-" '.join(f"{_HEX}{{{n}}}" for n in (8, 4, 4, 4, 12)), ()),
    "leap-year": (
        '[0-9]{2} ("0" [48] | [2468] [048] | [13579] [26]) | ([02468] [048] | [13579] [26]) "00"',
        (),
    ),
    "date": (
        '[0-9]{4} "-" (("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
        ' | ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30")'
        ' | "02-" ("0" [1-9] | "1" [0-9] | "2" [0-8])) | leap-year "-02-29"',
        ("leap-year",),
    ),
    "time": (
        f'{_HOUR} ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{{1,9}})?'
        f' ([Zz] | [-+] {_HOUR} ":" [0-5] [0-9])',
        (),
    ),
    "date-time": ("date [Tt] time", ("date", "time")),
}
_FORMATS: Final = ("date", "time", "date-time", "uuid")
_RESERVED: Final = frozenset({"root", *_PRIMITIVES})
_RULE_NAME = re.compile(r"[a-zA-Z0-9-]+")
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9-]+")


def literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in _LITERAL_ESCAPES:
            out.append(_LITERAL_ESCAPES[ch])
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\x{cp:02X}")
        elif 0xD800 <= cp <= 0xDFFF:  # a lone surrogate: not encodable as UTF-8
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_LITERAL_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _alts(alternatives: Sequence[str]) -> str:
    unique = list(dict.fromkeys(alternatives))
    return unique[0] if len(unique) == 1 else "(" + " | ".join(unique) + ")"


def _repeat(item: str, low: int, high: int | None) -> str:
    """`item` repeated low..high times (high None: unbounded); item must be one GBNF term."""
    if high == 0:
        return ""
    if (low, high) == (1, 1):
        return item
    suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
    if suffix is None:
        suffix = f"{{{low}}}" if low == high else f"{{{low},{'' if high is None else high}}}"
    return item + suffix


def _at(path: str, *parts: object) -> str:
    return ".".join([path, *map(str, parts)] if path else map(str, parts))


def _key_literal(key: str) -> str:
    return literal(json.dumps(key, ensure_ascii=False))


def _compact_json(value: Any, path: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"not a JSON value: {value!r}", path=path) from exc


def _count(schema: dict[str, Any], keyword: str, path: str) -> int | None:
    """A non-negative integer keyword (minItems...), or None when absent."""
    value = schema.get(keyword)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise SchemaError(f"{keyword} must be a non-negative integer", path=path)
    if isinstance(value, float) and not value.is_integer():
        raise SchemaError(f"{keyword} must be a non-negative integer", path=path)
    return int(value)


def _is_any(schema: Schema) -> bool:
    """True for schemas that accept every value: `true` and annotation-only objects."""
    return schema is True or (isinstance(schema, dict) and all(k in _ANNOTATIONS for k in schema))


# --- Shapes: what the ambiguity analysis knows of a compiled value ---------------------------
#
# Each expression the builder compiles for a JSON value gets a shape: a leaf (strings, numbers,
# literals, the generic `value`...), an object or array (with the expressions of its members
# or items), a union of branches, or a reference to a rule. Shapes are keyed by expression
# text: equal texts are equal grammars.
#
# How a value begins is described by "heads": token sequences of its compact JSON text (one
# character per token; a string or a number, wherever it is not a literal, is one marker token)
# and how each ends: the value is complete (_CLOSED), or it goes on, either with content that
# holds no ambiguity (_LIGHT), or into a nested value that does or may (_NEST), or it was cut
# short (_TRUNC). Heads go into nested values only while those are unambiguous.

_STR: Final = "<string>"
_NUM: Final = "<number>"
_NUM_CHARS: Final = frozenset("0123456789.eE+-")
_CLOSED, _LIGHT, _NEST, _TRUNC = range(4)
_Head: TypeAlias = tuple[tuple[str, ...], int]
_HEAD_BUDGET: Final = 48  # tokens of a head
_MAX_HEADS: Final = 32  # heads of one value (more are cut shorter)
_MAX_HEAD_STATES: Final = 256  # partial heads while an object's or array's are enumerated
_NONE, _ADDS, _MULTIPLIES = range(3)  # how two branches relate, see _relation
_MAX_COMPARISONS: Final = 100_000  # pairs of heads compared for one union


@dataclasses.dataclass(eq=False)
class _Leaf:
    heads: frozenset[_Head]


@dataclasses.dataclass(eq=False)
class _Object:
    members: list[tuple[str, str, bool]]  # (key as compact JSON, value expression, required)
    extra: str | None  # value expression of other keys; None: no other key


@dataclasses.dataclass(eq=False)
class _Array:
    prefix: list[str]  # expressions of the first items
    item: str | None  # expression of the items after them; None: no more
    low: int
    high: int | None


@dataclasses.dataclass(eq=False)
class _Union:
    branches: list[str]
    keyword: str  # anyOf, oneOf, type
    path: str


@dataclasses.dataclass(eq=False)
class _Ref:
    body: str | None  # None while the rule is being built


_Shape: TypeAlias = _Leaf | _Object | _Array | _Union | _Ref


def _leaf(*texts: str | tuple[str, int]) -> _Leaf:
    """A leaf whose heads are complete literal texts, or (text, end) pairs."""
    heads = set()
    for t in texts:
        text, end = (t, _CLOSED) if isinstance(t, str) else t
        heads.add(((text,) if text in (_STR, _NUM) else tuple(text), end))
    return _Leaf(frozenset(heads))


_STRING_LEAF: Final = _leaf(_STR)
_NUMBER_LEAF: Final = _leaf(_NUM)
_PRIM_SHAPES: Final[dict[str, _Shape]] = {
    "string": _STRING_LEAF,
    "integer": _NUMBER_LEAF,
    "number": _NUMBER_LEAF,
    "boolean": _leaf("true", "false"),
    "null": _leaf("null"),
    "object": _leaf(("{", _LIGHT)),
    "array": _leaf(("[", _LIGHT)),
    "value": _leaf(("{", _LIGHT), ("[", _LIGHT), _STR, _NUM, "true", "false", "null"),
}
_UNKNOWN_SHAPE: Final = _Leaf(frozenset({((), _TRUNC)}))


def _children(shape: _Shape) -> list[str]:
    if isinstance(shape, _Object):
        values = [value for _, value, _ in shape.members]
        return [*values, shape.extra] if shape.extra is not None else values
    if isinstance(shape, _Array):
        return [*shape.prefix, shape.item] if shape.item is not None else list(shape.prefix)
    if isinstance(shape, _Union):
        return list(shape.branches)
    if isinstance(shape, _Ref):
        return [shape.body] if shape.body is not None else []
    return []


def _coarsen(heads: set[_Head], cut: int) -> frozenset[_Head]:
    """At most _MAX_HEADS heads: cut them shorter (ending with `cut`) until there are."""
    if len(heads) <= _MAX_HEADS:
        return frozenset(heads)
    length = max(len(tokens) for tokens, _ in heads)
    while True:
        length -= 1
        shorter = {(t[:length], cut if len(t) > length else end) for t, end in heads}
        if len(shorter) <= _MAX_HEADS:
            return frozenset(shorter)


def _skip_leaf(marker: str, tokens: tuple[str, ...], j: int) -> int:
    """Where a string or number that starts at tokens[j] ends: -1 when none starts there,
    len(tokens) when it runs past the end."""
    first = tokens[j]
    if marker == _STR:
        if first != '"':
            return -1
        k = j + 1
        while k < len(tokens):
            token = tokens[k]
            if len(token) != 1:
                return -1
            if token == '"':
                return k + 1
            k += 2 if token == "\\" else 1
        return len(tokens)
    if first not in "-0123456789":
        return -1
    k = j + 1
    while k < len(tokens) and tokens[k] in _NUM_CHARS:
        k += 1
    return k


def _relation(a: _Head, b: _Head) -> int:
    """How two heads of different branches relate. _NONE: they part within literal text (a
    few characters at most with both alive); _MULTIPLIES: both may be alive while each reads
    a nested value that is or may be ambiguous (or is unknown), so that the parse stacks of
    both are kept, level after level; _ADDS: otherwise (alive together through a string, a
    number or other content without ambiguity, which costs one more stack meanwhile)."""
    (ta, ea), (tb, eb) = a, b
    i = j = 0
    variable = False  # a string or number was read with both alive
    while i < len(ta) and j < len(tb):
        x, y = ta[i], tb[j]
        if x == y:
            variable = variable or len(x) > 1
            i, j = i + 1, j + 1
            continue
        if len(x) > 1 and len(y) == 1:
            k = _skip_leaf(x, tb, j)
            if k >= 0:
                i, j, variable = i + 1, k, True
                continue
        elif len(y) > 1 and len(x) == 1:
            k = _skip_leaf(y, ta, i)
            if k >= 0:
                i, j, variable = k, j + 1, True
                continue
        return _ADDS if variable else _NONE
    if ea >= _NEST and eb >= _NEST:
        return _MULTIPLIES
    return _NONE if not variable and _CLOSED in (ea, eb) else _ADDS


def _relations(heads: list[frozenset[_Head]]) -> dict[tuple[int, int], int]:
    """The strongest _relation between heads of each two branches (i < j; absent: _NONE).

    Only heads whose literal starts (up to a first string or number marker) are one a prefix
    of the other can relate; sorted, those are found along a stack. Past _MAX_COMPARISONS,
    pairs are taken to multiply."""
    entries = []
    for i, branch_heads in enumerate(heads):
        for head in branch_heads:
            tokens = head[0]
            end = next((k for k, t in enumerate(tokens) if len(t) > 1), len(tokens))
            entries.append(("".join(tokens[:end]), i, head))
    entries.sort(key=lambda e: e[0])
    out: dict[tuple[int, int], int] = {}
    stack: list[tuple[str, int, _Head]] = []
    comparisons = 0
    for start, i, head in entries:
        while stack and not start.startswith(stack[-1][0]):
            stack.pop()
        for _, j, other in stack:
            if i == j:
                continue
            pair = (min(i, j), max(i, j))
            if out.get(pair) == _MULTIPLIES:
                continue
            comparisons += 1
            found = _relation(head, other) if comparisons <= _MAX_COMPARISONS else _MULTIPLIES
            if found > out.get(pair, _NONE):
                out[pair] = found
        stack.append((start, i, head))
    return out


def _sccs(root: str, children: Any) -> list[list[str]]:
    """Strongly connected components of the graph reachable from `root`, each after those it
    reaches (Tarjan's algorithm, without recursion)."""
    index: dict[str, int] = {root: 0}
    low: dict[str, int] = {root: 0}
    stack, on_stack, out = [root], {root}, []
    work = [(root, iter(children(root)))]
    while work:
        node, pending = work[-1]
        for child in pending:
            if child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(children(child))))
                break
            if child in on_stack:
                low[node] = min(low[node], index[child])
        else:
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(component)
    return out


# --- The builder ------------------------------------------------------------------------------


class GrammarBuilder:
    """Accumulates GBNF rules with unique names; shared rules are added once.

    `schema_rule` may be called for several schemas (one per tool, say); each is its own
    document for `$ref` resolution."""

    def __init__(self) -> None:
        self._rules: dict[str, str | None] = {}  # None: reserved for a $ref being built
        self._refs: dict[tuple[int, str], str] = {}  # (id(document), $ref) -> rule name
        self._documents: list[Schema] = []  # keeps ids in _refs valid
        self._doc: Schema = True
        self._size = 0  # characters of the rules so far
        # The ambiguity analysis (see "Shapes"): the shape of each value expression, the parse
        # stacks each may need at once (once known), and heads already enumerated.
        self._shapes: dict[str, _Shape] = {}
        self._weights: dict[str, int] = {}
        self._head_memo: dict[tuple[str, int], frozenset[_Head]] = {}
        # Limits on the compilation: objects/arrays we are inside of, subschemas we are inside
        # of, subschemas compiled for this schema, and the nesting where each $ref started.
        self._nesting = 0
        self._depth = 0
        self._work = 0
        self._ref_nesting: dict[str, int] = {}
        self._inlining: dict[tuple[int, str], int] = {}  # $ref being inlined -> its nesting

    def schema_rule(self, schema: Schema, *, name: str = "value") -> str:
        """Add the rules for one JSON value matching `schema`; return the rule to reference.

        Raises UnsupportedSchema ("... too ambiguous", "schema too large", "nesting too deep")
        for schemas whose grammar would be too slow for llama.cpp's sampler or too big."""
        self._documents.append(schema)
        outer, self._doc = self._doc, schema
        self._work = 0
        try:
            rule = self._named(name, self._expr(schema, "", name))
            self._analyze(rule)
            return rule
        except RecursionError:
            raise UnsupportedSchema("nesting too deep", "the schema is nested too deeply") from None
        finally:
            self._doc = outer

    def add_rule(self, name: str, body: str) -> str:
        """Add `name ::= body`; the name is sanitized and made unique (a rule with the same
        name and body is reused). Returns the name to reference."""
        unique = self._free_name(name, body)
        self._store(unique, body)
        return unique

    def render(self, root_body: str) -> str:
        """The whole grammar: `root ::= root_body` and every rule added so far. Raises
        UnsupportedSchema when it is too large for llama.cpp's sampler."""
        lines = [f"root ::= {root_body}"]
        for name, body in self._rules.items():
            if body is None:
                raise ValueError(f"rule {name} was never completed")
            lines.append(f"{name} ::= {body}")
        grammar = "\n".join(lines) + "\n"
        size = len(grammar.encode())
        if size > _MAX_GRAMMAR_BYTES:
            raise _too_large(f"its grammar would be {size} bytes, more than {_MAX_GRAMMAR_BYTES}")
        if len(lines) > _MAX_RULES:
            raise _too_large(f"its grammar would have {len(lines)} rules, more than {_MAX_RULES}")
        if _group_depth(grammar) > _MAX_GROUP_DEPTH:
            raise UnsupportedSchema(
                "nesting too deep",
                f"its grammar would nest parentheses more than {_MAX_GROUP_DEPTH} deep",
            )
        _check_repetitions(grammar)
        return grammar

    # -- helpers --

    def _store(self, name: str, body: str) -> None:
        if self._rules.get(name) is None:
            self._size += len(name) + len(body) + 5
            if self._size > _MAX_GRAMMAR_BYTES:
                raise _too_large(f"its grammar would be more than {_MAX_GRAMMAR_BYTES} bytes")
        self._rules[name] = body

    def _free_name(self, name: str, body: str | None) -> str:
        """`name` sanitized, with a suffix unless free (or holding `body` already)."""
        base = _INVALID_NAME_CHARS.sub("-", name).strip("-") or "rule"
        candidate, i = base, 0
        while candidate in _RESERVED or (
            candidate in self._rules and (body is None or self._rules[candidate] != body)
        ):
            i += 1
            candidate = f"{base}-{i}"
        return candidate

    def _prim(self, name: str) -> str:
        if name not in self._rules:
            body, deps = _PRIMITIVES[name]
            self._store(name, body)
            for dep in deps:
                self._prim(dep)
        return name

    def _named(self, name: str, expr: str) -> str:
        if _RULE_NAME.fullmatch(expr):
            return expr
        rule = self.add_rule(name, expr)
        self._shapes.setdefault(rule, _Ref(expr))
        return rule

    def _shaped(self, expr: str, shape: _Shape) -> str:
        """`expr`, recording its shape (the first one recorded for a text stays)."""
        self._shapes.setdefault(expr, shape)
        return expr

    @contextlib.contextmanager
    def _nested(self, path: str) -> Iterator[None]:
        """Around the compilation of the members or items of an object or array."""
        if self._nesting >= _MAX_NESTING:
            raise UnsupportedSchema(
                "nesting too deep",
                f"objects and arrays are nested more than {_MAX_NESTING} deep",
                path=path,
            )
        self._nesting += 1
        try:
            yield
        finally:
            self._nesting -= 1

    # -- schemas --

    def _expr(self, schema: Schema, path: str, name: str) -> str:
        """A GBNF expression for one JSON value that matches `schema`."""
        self._work += 1
        if self._work > _MAX_WORK:
            raise _too_large(f"it has more than {_MAX_WORK} subschemas to compile", path=path)
        if self._depth >= _MAX_EXPR_DEPTH:
            raise UnsupportedSchema(
                "nesting too deep",
                f"subschemas are nested more than {_MAX_EXPR_DEPTH} deep",
                path=path,
            )
        self._depth += 1
        try:
            return self._subschema(schema, path, name)
        finally:
            self._depth -= 1

    def _subschema(self, schema: Schema, path: str, name: str) -> str:
        if schema is True:
            return self._prim("value")
        if schema is False:
            raise SchemaError("the schema `false` matches no value", path=path)
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object or a boolean", path=path)
        if "enum" in schema or "const" in schema:
            _check_keywords(schema, path, only_unknown=True)
            return self._enum(schema, path)
        _check_keywords(schema, path)
        schema = _normalize_unevaluated(schema, path)
        constraints = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
        if "$ref" in schema:
            if len(constraints) == 1:
                return self._ref(schema["$ref"], path)
            return self._merged(schema, path, name)
        if "allOf" in schema:
            return self._merged(schema, path, name)
        if "anyOf" in schema and "oneOf" in schema:
            raise UnsupportedSchema("anyOf with oneOf", "use one of anyOf / oneOf", path=path)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self._union(schema, key, path, name)
        return self._typed(schema, path, name)

    def _enum(self, schema: dict[str, Any], path: str) -> str:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise SchemaError("enum must be a non-empty array", path=path)
        import jsonschema  # type: ignore[import-untyped, unused-ignore]  # lazily: ~4 MiB

        validator = jsonschema.Draft202012Validator(
            self._doc, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        ).evolve(schema=schema)
        try:
            kept = [v for v in values if validator.is_valid(v)]
        except (
            jsonschema.exceptions.UnknownType,
            referencing.exceptions.Unresolvable,
            re.error,
        ) as exc:
            raise SchemaError(f"cannot check the enum values: {exc}", path=path) from None
        if not kept:
            raise SchemaError("no enum/const value satisfies the rest of the schema", path=path)
        texts = [_compact_json(v, path) for v in kept]
        return self._shaped(_alts([literal(t) for t in texts]), _leaf(*texts))

    def _ref(self, ref: Any, path: str) -> str:
        key = (id(self._doc), ref)
        if key in self._refs:
            name = self._refs[key]
            if self._rules[name] is None and self._ref_nesting[name] == self._nesting:
                # Back to a $ref being built, with no object or array in between: the rule
                # would start with itself, which llama.cpp refuses (left recursion).
                raise UnsupportedSchema(
                    "recursive $ref without nesting",
                    f"$ref {ref!r} refers to itself without an object or array in between",
                    path=path,
                )
            return name
        target, target_path = _resolve(self._doc, ref, path)
        hint = target_path.rsplit(".", 1)[-1] or "root-ref"
        name = self._free_name(hint, None)
        self._rules[name] = None  # reserved: the target may refer to it
        self._refs[key] = name
        self._ref_nesting[name] = self._nesting
        shape = _Ref(None)
        self._shapes[name] = shape
        body = self._expr(target, target_path, name)  # never `name` alone: see above
        self._store(name, body)
        shape.body = body
        return name

    def _merged(self, schema: dict[str, Any], path: str, name: str) -> str:
        """A schema with allOf, or $ref with other keywords, compiled as one merged schema.
        A $ref that comes back while its target is being inlined, with no object or array in
        between, would be inlined forever (left recursion): refused."""
        refs: list[str] = []
        merged = self._merge([schema], path, refs)
        keys = [(id(self._doc), ref) for ref in refs]
        for key in keys:
            if self._inlining.get(key) == self._nesting:
                raise UnsupportedSchema(
                    "recursive $ref without nesting",
                    f"$ref {key[1]!r} refers to itself without an object or array in between",
                    path=path,
                )
        outer = {key: self._inlining.get(key) for key in keys}
        self._inlining.update(dict.fromkeys(keys, self._nesting))
        try:
            return self._expr(merged, path, name)
        finally:
            for key, level in outer.items():
                if level is None:
                    self._inlining.pop(key, None)
                else:
                    self._inlining[key] = level

    def _merge(
        self, parts: list[Schema], path: str, refs: list[str] | None = None
    ) -> dict[str, Any]:
        """allOf: one schema equivalent to all of `parts` (refs and nested allOf inlined; the
        refs followed are added to `refs`)."""
        flat: list[dict[str, Any]] = []

        def collect(part: Schema, where: str, inlining: frozenset[str]) -> None:
            self._work += 1
            if self._work > _MAX_WORK:
                raise _too_large(f"it has more than {_MAX_WORK} subschemas to compile", path=where)
            if _is_any(part):
                return
            if not isinstance(part, dict):
                raise SchemaError("allOf includes a schema that matches no value", path=where)
            _check_keywords(part, where)
            part = _normalize_unevaluated(part, where)
            rest = {k: v for k, v in part.items() if k not in ("$ref", "allOf")}
            if "$ref" in part:
                ref = part["$ref"]
                if ref in inlining:
                    raise UnsupportedSchema(
                        "recursive allOf", "allOf includes the schema itself", path=where
                    )
                target, target_path = _resolve(self._doc, ref, where)
                if refs is not None:
                    refs.append(ref)
                collect(target, target_path, inlining | {ref})
            if "allOf" in part:
                subschemas = part["allOf"]
                if not isinstance(subschemas, list) or not subschemas:
                    raise SchemaError("allOf must be a non-empty array", path=where)
                for i, sub in enumerate(subschemas):
                    collect(sub, _at(where, "allOf", i), inlining)
            if not _is_any(rest):
                flat.append(rest)

        for part in parts:
            collect(part, path, frozenset())
        return _combine(flat, path)

    def _union(self, schema: dict[str, Any], key: str, path: str, name: str) -> str:
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"{key} must be a non-empty array", path=path)
        rest = {k: v for k, v in schema.items() if k != key and k not in _ANNOTATIONS}
        indexed = [(i, {"allOf": [rest, b]} if rest else b) for i, b in enumerate(branches)]
        indexed = self._merge_branches(indexed, path)
        exprs = [self._expr(b, _at(path, key, i), f"{name}-{i}") for i, b in indexed]
        unique = list(dict.fromkeys(exprs))
        if len(unique) == 1:
            return unique[0]
        return self._shaped(_alts(unique), _Union(unique, key, path))

    def _merge_branches(
        self, branches: list[tuple[int, Schema]], path: str
    ) -> list[tuple[int, Schema]]:
        """Fewer branches matching the same values: equal ones once, and branches that differ
        only in minItems/maxItems (or minLength/maxLength) whose ranges join up as one branch
        with the joined range. Each kept branch keeps the index of its first one."""
        seen: set[str] = set()
        unique = []
        for i, branch in branches:
            text = _canonical(branch)
            if text is None or text not in seen:
                unique.append((i, branch))
                if text is not None:
                    seen.add(text)
        for low_key, high_key in (("minItems", "maxItems"), ("minLength", "maxLength")):
            if len(unique) < 2:
                break
            groups: dict[str, list[tuple[int, int, int | None, dict[str, Any]]]] = {}
            for i, branch in unique:
                flat = self._flat(branch, path)
                if flat is None or "type" not in flat:  # the type must not be inferred
                    continue
                try:
                    low = _count(flat, low_key, path) or 0
                    high = _count(flat, high_key, path)
                except SchemaError:
                    continue
                rest = {k: v for k, v in flat.items() if k not in (low_key, high_key)}
                text = _canonical(rest)
                if text is not None and (high is None or low <= high):
                    groups.setdefault(text, []).append((i, low, high, rest))
            merged_at: dict[int, Schema] = {}  # index of a run's first branch -> the run
            dropped: set[int] = set()  # the run's other branches
            for members in groups.values():
                members.sort(key=lambda m: m[1])
                runs: list[tuple[list[int], int, int | None]] = []  # indices, low, high
                for i, low, high, _ in members:
                    if runs and (runs[-1][2] is None or low <= runs[-1][2] + 1):
                        indices, run_low, run_high = runs[-1]
                        joined = None if run_high is None or high is None else max(run_high, high)
                        runs[-1] = ([*indices, i], run_low, joined)
                    else:
                        runs.append(([i], low, high))
                for indices, low, high in runs:
                    if len(indices) < 2:
                        continue
                    merged = {**members[0][3], low_key: low}
                    if high is not None:
                        merged[high_key] = high
                    first = min(indices)
                    merged_at[first] = merged
                    dropped.update(i for i in indices if i != first)
            unique = [(i, merged_at.get(i, b)) for i, b in unique if i not in dropped]
        return unique

    def _flat(self, branch: Schema, path: str) -> dict[str, Any] | None:
        """The branch as one schema without applicators, or None when it is not one."""
        if not isinstance(branch, dict):
            return None
        if "$ref" in branch or "allOf" in branch:
            try:
                branch = self._merge([branch], path)
            except SchemaError:
                return None
        if any(k in branch for k in ("anyOf", "oneOf", "$ref", "allOf")):
            return None
        return {k: v for k, v in branch.items() if k not in _ANNOTATIONS and not k.startswith("x-")}

    def _typed(self, schema: dict[str, Any], path: str, name: str) -> str:
        declared = schema.get("type")
        if declared is None:
            types = [t for t, kws in _TYPE_KEYWORDS.items() if any(k in schema for k in kws)]
            if not types:
                return self._prim("value")
        else:
            types = [declared] if isinstance(declared, str) else declared
            if (
                not isinstance(types, list)
                or not types
                or not all(isinstance(t, str) and t in _TYPES for t in types)
                or len(set(types)) != len(types)
            ):
                raise SchemaError(f"invalid type {declared!r}", path=path)
            types = list(types)
            if "number" in types and "integer" in types:
                types.remove("integer")
        alternatives = []
        for t in types:
            if t == "object":
                alternatives.append(self._object(schema, path, name))
            elif t == "array":
                alternatives.append(self._array(schema, path, name))
            elif t == "string":
                alternatives.append(self._string(schema, path))
            elif t in ("number", "integer"):
                alternatives.append(self._number(schema, path, integer=t == "integer"))
            else:
                alternatives.append(self._prim(t))
        unique = list(dict.fromkeys(alternatives))
        if len(unique) == 1:
            return unique[0]
        return self._shaped(_alts(unique), _Union(unique, "type", path))

    def _object(self, schema: dict[str, Any], path: str, name: str) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, dict):
            raise SchemaError("properties must be an object", path=path)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("required must be an array of strings", path=path)
        if not isinstance(extra, dict | bool):
            raise SchemaError("additionalProperties must be a schema", path=path)
        required = list(dict.fromkeys(required))
        if not props and not required and _is_any(extra):
            self._check_property_counts(schema, path, 0, None)
            return self._prim("object")

        members: list[tuple[str, str, bool]] = []  # (key, "key": value, required)
        shape = _Object([], None)
        with self._nested(path):
            for key, sub in props.items():
                if sub is False:
                    if key in required:
                        raise SchemaError(f"required property {key!r} has schema false", path=path)
                    continue
                where = _at(path, "properties", key)
                value = self._named(f"{name}-{key}", self._expr(sub, where, f"{name}-{key}"))
                members.append((key, self._member(_key_literal(key), value), key in required))
                shape.members.append((_json_key(key), value, key in required))
            for key in required:
                if key not in props:
                    if extra is False:
                        raise SchemaError(
                            f"required property {key!r} is not in properties, and "
                            "additionalProperties is false",
                            path=path,
                        )
                    where = _at(path, "additionalProperties")
                    value = self._named(f"{name}-{key}", self._expr(extra, where, f"{name}-{key}"))
                    members.append((key, self._member(_key_literal(key), value), True))
                    shape.members.append((_json_key(key), value, True))

            extra_member = None
            if extra is not False:
                key_rule = self._key_not_in([k for k, _, _ in members] + list(props), name)
                where = _at(path, "additionalProperties")
                value = self._named(f"{name}-extra", self._expr(extra, where, f"{name}-extra"))
                extra_member = self.add_rule(f"{name}-extra-kv", self._member(key_rule, value))
                shape.extra = value
        self._check_property_counts(
            schema, path, len(required), None if extra_member else len(members)
        )
        expr = _seq('"{"', self._prim("space"), self._members(name, members, extra_member), '"}"')
        return self._shaped(expr, shape)

    def _member(self, key: str, value: str) -> str:
        space = self._prim("space")
        return f'{key} {space} ":" {space} {value} {space}'

    def _members(self, name: str, members: list[tuple[str, str, bool]], extra: str | None) -> str:
        """The inside of an object: members in order (optional ones may be left out), then
        any number of extra members; commas between them."""
        comma = f'"," {self._prim("space")}'
        rest = f"({comma} {extra})*" if extra else ""  # what may follow, after a member
        firsts = [_seq(extra, rest)] if extra else []  # how the object may start
        nullable = True
        for key, member, is_required in reversed(members):
            if is_required:
                firsts, nullable = [_seq(member, rest)], False
                rest = _seq(comma, member, rest)
            else:
                if rest:  # referenced twice below
                    rest = self._named(f"{name}-after-{key}", rest)
                firsts = [_seq(member, rest), *firsts]
                rest = _seq(f"({comma} {member})?", rest)
        if not firsts:
            return ""
        return "(" + " | ".join(firsts) + ")?" if nullable else _alts(firsts)

    def _key_not_in(self, keys: list[str], name: str) -> str:
        """A JSON string (raw characters only) that differs from every one of `keys`."""
        if not keys:
            return self._prim("string")
        trie: dict[str, Any] = {}
        for key in keys:
            node = trie
            for ch in key:
                node = node.setdefault(ch, {})
            node[""] = {}  # a key ends here
        key_char = self._prim("key-char")

        def expr(node: dict[str, Any]) -> tuple[str, int]:
            """The GBNF of a trie node, and how many nodes it spells out."""
            chars = sorted(c for c in node if c and not _contains(_JSON_SPECIAL, ord(c)))
            alts, size = [], 1
            for c in chars:
                sub, sub_size = expr(node[c])
                alts.append(_seq(literal(c), sub))
                size += sub_size
            others = _complement(_union(_JSON_SPECIAL, [(ord(c), ord(c)) for c in chars]))
            alts.append(f"{_char_class(others)} {key_char}*")
            body = "(" + " | ".join(alts) + ")"
            body = body if "" in node else body + "?"
            if size > _BIG_REPEAT:  # keep llama.cpp's rules per repeated group low
                return self.add_rule(f"{name}-extra-key", body), 1
            return body, size

        return self.add_rule(f"{name}-extra-key", f'"\\"" {expr(trie)[0]} "\\""')

    @staticmethod
    def _check_property_counts(
        schema: dict[str, Any], path: str, at_least: int, at_most: int | None
    ) -> None:
        """min/maxProperties only when every object the grammar allows satisfies them."""
        low = _count(schema, "minProperties", path)
        high = _count(schema, "maxProperties", path)
        if low is not None and low > at_least:
            message = "minProperties is supported up to the number of required properties"
            raise UnsupportedSchema("minProperties", message, path=path)
        if high is not None and (at_most is None or high < at_most):
            message = (
                "maxProperties is supported only with additionalProperties false, "
                "when it allows every declared property"
            )
            raise UnsupportedSchema("maxProperties", message, path=path)

    def _array(self, schema: dict[str, Any], path: str, name: str) -> str:
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", True)
        if not isinstance(prefix, list):
            raise SchemaError("prefixItems must be an array of schemas", path=path)
        if not isinstance(items, dict | bool):
            raise SchemaError("items must be a schema (tuples use prefixItems)", path=path)
        low = _count(schema, "minItems", path) or 0
        high = _count(schema, "maxItems", path)
        if high is not None and low > high:
            raise SchemaError("minItems is greater than maxItems", path=path)
        if schema.get("uniqueItems", False) is not False and (high is None or high > 1):
            raise UnsupportedSchema("uniqueItems", "a grammar cannot keep items unique", path=path)
        for keyword, bound in (("minItems", low), ("maxItems", high)):
            if bound is not None and bound > _MAX_REPEAT:
                raise _too_many(keyword, path)
        if not prefix and _is_any(items) and low == 0 and high is None:
            return self._prim("array")

        if high is not None:
            prefix = prefix[:high]
        with self._nested(path):
            elements = [
                self._named(
                    f"{name}-{i}", self._expr(s, _at(path, "prefixItems", i), f"{name}-{i}")
                )
                for i, s in enumerate(prefix)
            ]
            count = len(elements)
            item = None
            if items is False or (high is not None and high <= count):
                if low > count:
                    raise SchemaError("minItems is more than the items allowed", path=path)
            else:
                item = self._named(
                    f"{name}-item", self._expr(items, _at(path, "items"), f"{name}-item")
                )
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

    def _string(self, schema: dict[str, Any], path: str) -> str:
        fmt = schema.get("format")
        pattern = schema.get("pattern")
        low = _count(schema, "minLength", path) or 0
        high = _count(schema, "maxLength", path)
        if high is not None and low > high:
            raise SchemaError("minLength is greater than maxLength", path=path)
        for keyword, count in (("minLength", low), ("maxLength", high)):
            if count is not None and count > _MAX_REPEAT:
                raise _too_many(keyword, path)
        lengths = low > 0 or high is not None
        if sum((fmt is not None, pattern is not None, lengths)) > 1:
            raise UnsupportedSchema(
                "combined string constraints",
                "use only one of format, pattern and minLength/maxLength on a string",
                path=path,
            )
        quote = r'"\""'
        if fmt is not None:
            if fmt not in _FORMATS:
                raise UnsupportedSchema(
                    f"format: {fmt}", f"supported formats: {', '.join(_FORMATS)}", path=path
                )
            return self._shaped(_seq(quote, self._prim(fmt), quote), _STRING_LEAF)
        if pattern is not None:
            if not isinstance(pattern, str):
                raise SchemaError("pattern must be a string", path=path)
            translator = _Pattern(pattern, _at(path, "pattern"))
            body = translator.translate()
            if translator.unanchored:
                self._prim("char")
            return self._shaped(_seq(quote, body, quote), _STRING_LEAF)
        if not lengths:
            return self._prim("string")
        return self._shaped(
            _seq(quote, _repeat(self._prim("char"), low, high), quote), _STRING_LEAF
        )

    def _number(self, schema: dict[str, Any], path: str, *, integer: bool) -> str:
        low, high = _bounds(schema, path, integer=integer)
        if low is None and high is None:
            return self._prim("integer" if integer else "number")
        if integer:
            lo_int = None if low is None else low[0] + (0 if low[1] else 1)
            hi_int = None if high is None else high[0] - (0 if high[1] else 1)
            if lo_int is not None and hi_int is not None and lo_int > hi_int:
                raise SchemaError("no integer is within the bounds", path=path)
            return self._shaped(_int_range(lo_int, hi_int), _NUMBER_LEAF)
        expr = _number_range(low, high)
        if expr is None:
            raise SchemaError("no number is within the bounds", path=path)
        return self._shaped(expr, _NUMBER_LEAF)

    # -- ambiguity --

    def _analyze(self, root: str) -> None:
        """Estimate the parse stacks llama.cpp's sampler may keep at once for values of `root`
        and raise UnsupportedSchema when there may be more than _MAX_AMBIGUITY, or when the
        count grows with every level of a recursive schema.

        Within a union, the branches that may be alive together while a nested value is read
        add up their counts (_relation says which); everything else (members, items, branches
        that are told apart before) takes the largest count. Values are visited bottom-up, a
        recursive group of them together."""
        for component in _sccs(root, self._children_of):
            members = set(component)
            weight = 1
            for expr in component:
                shape = self._shape(expr)
                for child in _children(shape):
                    if child not in members:
                        weight = max(weight, self._weights[child])
                if isinstance(shape, _Union):
                    weight = max(weight, self._union_weight(shape, members))
            for expr in component:
                self._weights[expr] = weight
            if len(component) > 1 or component[0] in self._children_of(component[0]):
                self._head_memo.clear()  # heads that met these values as unknown are stale

    def _shape(self, expr: str) -> _Shape:
        return self._shapes.get(expr) or _PRIM_SHAPES.get(expr) or _UNKNOWN_SHAPE

    def _children_of(self, expr: str) -> list[str]:
        return _children(self._shape(expr))

    def _union_weight(self, union: _Union, recursive: set[str]) -> int:
        """The parse stacks a union needs: for each branch, its own and those of the branches
        that may be alive with it while nested values are read; at least the number of
        branches alive together at all. `recursive`: the values in a cycle with the union."""
        relations = _relations([self._heads(b, _HEAD_BUDGET) for b in union.branches])
        best = 1
        for i, branch in enumerate(union.branches):
            total = 1 if branch in recursive else self._weights[branch]
            alive = 1
            for j, other in enumerate(union.branches):
                relation = relations.get((min(i, j), max(i, j)), _NONE)
                if i == j or relation == _NONE:
                    continue
                alive += 1
                if relation == _MULTIPLIES:
                    if branch in recursive or other in recursive:
                        raise UnsupportedSchema(
                            f"{union.keyword}: too ambiguous",
                            f"branches {min(i, j)} and {max(i, j)} can match the same text "
                            "into a nested value that leads back to this schema, so the "
                            "alternatives a grammar sampler must track multiply with every "
                            "level of nesting; make the branches differ early (e.g. by a "
                            "first property with a distinct const value)",
                            path=union.path,
                        )
                    total += self._weights[other]
            best = max(best, total, alive)
        if best > _MAX_AMBIGUITY:
            raise UnsupportedSchema(
                f"{union.keyword}: too ambiguous",
                f"its branches, and the unions nested in them, can match the same text in so "
                f"many ways that a grammar sampler would track about {best} alternatives at "
                f"once (the limit is {_MAX_AMBIGUITY}); make the branches differ early (e.g. "
                f"by a first property with a distinct const value) or nest fewer such unions",
                path=union.path,
            )
        return best

    def _heads(self, expr: str, budget: int) -> frozenset[_Head]:
        """How a value of `expr` may begin, in at most `budget` tokens (see "Shapes")."""
        if budget <= 0:
            return frozenset({((), _TRUNC)})
        key = (expr, budget)
        memo = self._head_memo.get(key)
        if memo is not None:
            return memo
        self._head_memo[key] = frozenset({((), _TRUNC)})  # in case a cycle comes back here
        shape = self._shape(expr)
        result: frozenset[_Head]
        if isinstance(shape, _Leaf):
            result = _coarsen(
                {(t[:budget], _LIGHT if len(t) > budget else end) for t, end in shape.heads},
                _LIGHT,
            )
        elif isinstance(shape, _Ref):
            result = self._heads(shape.body, budget) if shape.body else _UNKNOWN_SHAPE.heads
        elif isinstance(shape, _Union):
            result = _coarsen(
                {h for b in shape.branches for h in self._heads(b, budget)}, self._cut(expr)
            )
        else:
            result = self._container_heads(expr, shape, budget)
        self._head_memo[key] = result
        return result

    def _cut(self, expr: str) -> int:
        """How a head of `expr` ends where it is cut short."""
        return _LIGHT if self._weights.get(expr) == 1 else _TRUNC

    def _child_heads(self, expr: str, budget: int) -> frozenset[_Head]:
        """Heads of a member or item: followed only when it holds no ambiguity."""
        if budget <= 0:
            return frozenset({((), _TRUNC)})
        if self._weights.get(expr) != 1:
            return frozenset({((), _NEST)})
        return self._heads(expr, budget)

    def _container_heads(self, expr: str, shape: _Object | _Array, budget: int) -> frozenset[_Head]:
        """Heads of an object (members in order, optional ones left out, then other keys) or
        of an array, enumerated up to `budget` tokens."""
        cut = self._cut(expr)
        done: set[_Head] = set()
        # (tokens so far, next member / item index)
        opening = "{" if isinstance(shape, _Object) else "["
        pending: list[tuple[tuple[str, ...], int]] = [((opening,), 0)]
        while pending:
            if len(pending) + len(done) > _MAX_HEAD_STATES:
                return self._container_heads(expr, shape, budget // 2)
            tokens, index = pending.pop()
            if len(tokens) >= budget:
                done.add((tokens[:budget], cut))
                continue
            sep = (",",) if index else ()
            # (tokens before a value, the value, the index after it)
            choices: list[tuple[tuple[str, ...], str, int]] = []
            if isinstance(shape, _Object):
                members = shape.members
                can_close = True
                for j in range(index, len(members)):
                    key, value, required = members[j]
                    choices.append((tokens + sep + tuple(key) + (":",), value, j + 1))
                    if required:
                        can_close = False
                        break
                if can_close:
                    done.add(((*tokens, "}"), _CLOSED))
                    if shape.extra is not None:
                        done.add((tokens + sep + ('"',), cut))
            else:
                if index >= shape.low:
                    done.add(((*tokens, "]"), _CLOSED))
                element = (
                    shape.prefix[index]
                    if index < len(shape.prefix)
                    else shape.item
                    if shape.high is None or index < shape.high
                    else None
                )
                if element is not None:
                    choices.append((tokens + sep, element, index + 1))
            for before, value, after in choices:
                for value_tokens, end in self._child_heads(value, budget - len(before)):
                    head = before + value_tokens
                    if end != _CLOSED:
                        # what follows in this value is unambiguous only if the value is
                        done.add((head[:budget], cut if cut == _LIGHT or end == _LIGHT else end))
                    else:
                        pending.append((head, after))
        return _coarsen(done, cut)


# --- Schema-level helpers ---------------------------------------------------------------------


def _check_keywords(schema: dict[str, Any], path: str, *, only_unknown: bool = False) -> None:
    for key in schema:
        if key in _ANNOTATIONS or key in _SUPPORTED or key.startswith("x-"):
            continue
        if key in _UNSUPPORTED:
            if only_unknown:
                continue
            feature, message = _UNSUPPORTED[key]
            raise UnsupportedSchema(feature, message, path=path)
        raise UnsupportedSchema(key, f"unknown keyword {key!r}", path=path)


def _normalize_unevaluated(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """unevaluatedProperties / unevaluatedItems without in-place applicators mean
    additionalProperties / items (when those are absent; otherwise nothing is unevaluated)."""
    if "unevaluatedProperties" not in schema and "unevaluatedItems" not in schema:
        return schema
    if any(k in schema for k in _APPLICATORS):
        raise UnsupportedSchema(
            "unevaluatedProperties" if "unevaluatedProperties" in schema else "unevaluatedItems",
            "unevaluated* is supported only without allOf/anyOf/oneOf/$ref beside it",
            path=path,
        )
    out = dict(schema)
    if "unevaluatedProperties" in out:
        out.setdefault("additionalProperties", out.pop("unevaluatedProperties"))
    if "unevaluatedItems" in out:
        out.setdefault("items", out.pop("unevaluatedItems"))
    return out


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


def _canonical(value: Any) -> str | None:
    """A text equal for equal JSON values (None for what is not JSON)."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _json_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


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


def _resolve(document: Schema, ref: Any, path: str) -> tuple[Schema, str]:
    """The target of a local `$ref` and its path."""
    if not isinstance(ref, str):
        raise SchemaError("$ref must be a string", path=path)
    if not ref.startswith("#"):
        raise UnsupportedSchema(
            "remote $ref", f"only local $ref are supported, not {ref!r}", path=path
        )
    if ref != "#" and not ref.startswith("#/"):
        raise UnsupportedSchema("$ref to an $anchor", path=path)
    node: Any = document
    parts = [] if ref == "#" else ref[2:].split("/")
    for i, raw in enumerate(parts):
        part = urllib.parse.unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            missing = "/".join(parts[: i + 1])
            raise SchemaError(f"$ref {ref!r}: nothing at #/{missing}", path=path)
        parts[i] = part
    if not isinstance(node, dict | bool):
        raise SchemaError(f"$ref {ref!r} does not point to a schema", path=path)
    return node, ".".join(parts)


def _type_set(declared: Any, path: str) -> set[str]:
    """The types a `type` keyword allows ("number" includes "integer")."""
    types = [declared] if isinstance(declared, str) else declared
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise SchemaError(f"invalid type {declared!r}", path=path)
    return set(types) | {"integer"} if "number" in types else set(types)


def _combine(parts: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Merge schemas without $ref/allOf into one that matches exactly what all of them match,
    or raise UnsupportedSchema for combinations this cannot express."""
    out: dict[str, Any] = {}
    object_parts = [
        p for p in parts if any(k in p for k in ("properties", "additionalProperties", "required"))
    ]
    if object_parts:
        out.update(_combine_objects(object_parts, path))
    tuple_parts = [p for p in parts if any(k in p for k in ("prefixItems", "items"))]
    if len(tuple_parts) > 1 and any("prefixItems" in p for p in tuple_parts):
        raise UnsupportedSchema("allOf of tuple arrays", path=path)
    types: set[str] | None = None
    for part in parts:
        for key, value in part.items():
            if key in ("properties", "additionalProperties", "required") or key in _ANNOTATIONS:
                continue
            if key == "type":
                part_types = _type_set(value, path)
                types = part_types if types is None else types & part_types
            elif key not in out:
                out[key] = value
            elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
                out[key] = max(out[key], value)
            elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
                out[key] = min(out[key], value)
            elif key == "items":
                out[key] = {"allOf": [out[key], value]}
            elif key == "uniqueItems":
                out[key] = out[key] or value
            elif out[key] != value:
                raise UnsupportedSchema(
                    f"allOf: {key}", f"allOf combines two different {key!r}", path=path
                )
    if types is not None:
        if not types:
            raise SchemaError("allOf: no type satisfies every subschema", path=path)
        out["type"] = [t for t in _TYPES if t in types]
    return out


def _combine_objects(parts: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """A key is allowed when every part allows it (declared, or additionalProperties not
    false); its schema is every part's schema for it."""
    keys = list(dict.fromkeys(k for p in parts for k in p.get("properties", {})))
    properties: dict[str, Any] = {}
    for key in keys:
        schemas = []
        for part in parts:
            declared = part.get("properties", {})
            schemas.append(
                declared[key] if key in declared else part.get("additionalProperties", True)
            )
        if False in schemas:
            properties[key] = False
            continue
        kept = [s for s in schemas if not _is_any(s)]
        properties[key] = kept[0] if len(kept) == 1 else {"allOf": kept} if kept else True
    out: dict[str, Any] = {"properties": properties}
    required = list(dict.fromkeys(r for p in parts for r in p.get("required", [])))
    if required:
        out["required"] = required
    extras = [p["additionalProperties"] for p in parts if "additionalProperties" in p]
    if False in extras:
        out["additionalProperties"] = False
    elif any(not _is_any(e) for e in extras):
        out["additionalProperties"] = {"allOf": [e for e in extras if not _is_any(e)]}
    return out


def _bounds(
    schema: dict[str, Any], path: str, *, integer: bool
) -> tuple[_Bound | None, _Bound | None]:
    """(lower, upper) bounds as integers; an integer's bounds are rounded inward."""
    low: tuple[Fraction, bool] | None = None
    high: tuple[Fraction, bool] | None = None
    for key, inclusive, is_low in (
        ("minimum", True, True),
        ("exclusiveMinimum", False, True),
        ("maximum", True, False),
        ("exclusiveMaximum", False, False),
    ):
        value = schema.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise SchemaError(f"{key} must be a number", path=path)
        bound = (Fraction(value), inclusive)
        if is_low:
            if low is None or bound[0] > low[0] or (bound[0] == low[0] and not inclusive):
                low = bound
        elif high is None or bound[0] < high[0] or (bound[0] == high[0] and not inclusive):
            high = bound
    result: list[_Bound | None] = []
    for edge, is_low in ((low, True), (high, False)):
        if edge is None:
            result.append(None)
        elif edge[0].denominator == 1:
            result.append((int(edge[0]), edge[1]))
        elif integer:  # round inward to an inclusive integer bound
            result.append((math.ceil(edge[0]) if is_low else math.floor(edge[0]), True))
        else:
            raise UnsupportedSchema(
                "non-integer bound on a number",
                "minimum/maximum of a number must be integers to be enforced",
                path=path,
            )
    return result[0], result[1]


# --- Numbers ----------------------------------------------------------------------------------

_ANY_FRACTION: Final = '("." [0-9]{1,16})?'
_ZERO_FRACTION: Final = '("." "0"{1,16})?'
_NONZERO_FRACTION: Final = '"." "0"{0,15} [1-9] [0-9]{0,15}'


def _digits(low: str, high: str) -> str:
    return f'"{low}"' if low == high else f"[{low}-{high}]"


def _same_length(low: str, high: str) -> str:
    """Digit strings of len(low) characters between low and high (same length, low <= high)."""
    i = 0
    while i < len(low) and low[i] == high[i]:
        i += 1
    if i == len(low):
        return f'"{low}"'
    prefix = f'"{low[:i]}"' if i else ""
    rest = len(low) - i - 1
    if rest == 0:
        return _seq(prefix, _digits(low[i], high[i]))
    low_tail, high_tail = low[i + 1 :], high[i + 1 :]
    first, last = int(low[i]), int(high[i])
    alts = []
    if low_tail != "0" * rest:
        alts.append(_seq(f'"{low[i]}"', _same_length(low_tail, "9" * rest)))
        first += 1
    if high_tail != "9" * rest:
        last -= 1
    if first <= last:
        alts.append(_seq(_digits(str(first), str(last)), _repeat("[0-9]", rest, rest)))
    if high_tail != "9" * rest:
        alts.append(_seq(f'"{high[i]}"', _same_length("0" * rest, high_tail)))
    return _seq(prefix, _alts(alts))


def _natural_alts(low: int, high: int | None) -> list[str]:
    """Alternatives matching the canonical decimals of low..high (0 <= low; high None:
    up to max(16, len(low)) digits); empty when low > high."""
    alts = []
    if low == 0:
        alts.append('"0"')
        low = 1
    if high is not None and low > high:
        return alts
    low_s = str(low)
    high_s = str(high) if high is not None else "9" * max(_INT_DIGITS, len(low_s))
    run: list[int] = []  # consecutive widths where every number of that width is in range
    for width in range(len(low_s), len(high_s) + 2):
        start = low_s if width == len(low_s) else "1" + "0" * (width - 1)
        end = high_s if width == len(high_s) else "9" * width
        if width <= len(high_s) and start == "1" + "0" * (width - 1) and end == "9" * width:
            run.append(width)
            continue
        if run:
            alts.append(_seq("[1-9]", _repeat("[0-9]", run[0] - 1, run[-1] - 1)))
            run = []
        if width <= len(high_s):
            alts.append(_same_length(start, end))
    return alts


def _int_range(low: int | None, high: int | None) -> str:
    alts = []
    if low is None or low < 0:
        magnitudes = _natural_alts(
            1 if high is None or high >= 0 else -high, None if low is None else -low
        )
        alts.append(_seq('"-"', _alts(magnitudes)))
    if high is None or high >= 0:
        alts.extend(_natural_alts(0 if low is None or low < 0 else low, high))
    return _alts(alts)


def _magnitude_alts(low: _Bound, high: _Bound | None) -> list[str]:
    """Non-negative decimals without exponent between two integer bounds (low <= high)."""
    (lo, lo_in), hi = low, None if high is None else high[0]
    if hi == lo:
        return [f'"{lo}" {_ZERO_FRACTION}'] if lo_in and high is not None and high[1] else []
    alts = [f'"{lo}" {_ANY_FRACTION if lo_in else _NONZERO_FRACTION}']
    inner = _natural_alts(lo + 1, None if hi is None else hi - 1)
    if inner:
        alts.append(f"{_alts(inner)} {_ANY_FRACTION}")
    if high is not None and high[1]:
        alts.append(f'"{hi}" {_ZERO_FRACTION}')
    return alts


def _number_range(low: _Bound | None, high: _Bound | None) -> str | None:
    if low is not None and high is not None and low[0] > high[0]:
        return None
    alts = []
    if high is None or high[0] > 0 or high == (0, True):  # values >= 0
        start = low if low is not None and low[0] >= 0 else (0, True)
        alts.extend(_magnitude_alts(start, high))
    if low is None or low[0] < 0:  # values < 0, as "-" and a magnitude
        start = (-high[0], high[1]) if high is not None and high[0] < 0 else (0, False)
        negatives = _magnitude_alts(start, None if low is None else (-low[0], low[1]))
        if negatives:
            alts.append(_seq('"-"', _alts(negatives)))
    return _alts(alts) if alts else None


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
_GROUP_NAME = re.compile(r"<[A-Za-z_$][\w$]*>")


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


class _Pattern:
    """Translates an ECMA-262 regular expression (the subset of JSON Schema's `pattern` a
    grammar can express) into GBNF for the JSON-encoded content of a matching string."""

    def __init__(self, source: str, path: str) -> None:
        self.src = source
        self.pos = 0
        self.path = path
        self.unanchored = False  # whether the result refers to the `char` rule

    def translate(self) -> str:
        alternatives = []
        while True:
            starts = self._eat("^")
            body, ends = self._sequence(top=True)
            if not (starts and ends):
                self.unanchored = True
            alternatives.append(_seq("" if starts else "char*", body, "" if ends else "char*"))
            if not self._eat("|"):
                break
        if self.pos < len(self.src):
            raise SchemaError("pattern: unbalanced ')'", path=self.path)
        return _alts([a or '""' for a in alternatives])

    def _eat(self, text: str) -> bool:
        if self.src.startswith(text, self.pos):
            self.pos += len(text)
            return True
        return False

    def _unsupported(self, what: str, message: str = "") -> UnsupportedSchema:
        return UnsupportedSchema(f"pattern: {what}", message, path=self.path)

    def _invalid(self, message: str) -> SchemaError:
        return SchemaError(f"invalid pattern {self.src!r}: {message}", path=self.path)

    def _alternation(self) -> str:
        alternatives = [self._sequence(top=False)[0]]
        while self._eat("|"):
            alternatives.append(self._sequence(top=False)[0])
        return "(" + " | ".join(a or '""' for a in alternatives) + ")"

    def _sequence(self, *, top: bool) -> tuple[str, bool]:
        """Terms up to "|", ")" or the end; at the top level, also whether "$" ended it."""
        items: list[str] = []
        text = ""  # consecutive literal characters, JSON-encoded
        while self.pos < len(self.src) and self.src[self.pos] not in "|)":
            if top and self.src[self.pos] == "$" and self.src[self.pos + 1 : self.pos + 2] in "|":
                self.pos += 1
                return _seq(*items, literal(text) if text else ""), True
            atom = self._atom()
            quantifier = self._quantifier()
            if isinstance(atom, str) and not quantifier:
                text += atom
                continue
            if text:
                items.append(literal(text))
                text = ""
            term = literal(atom) if isinstance(atom, str) else atom[0]
            items.append(term + quantifier)
        return _seq(*items, literal(text) if text else ""), False

    def _atom(self) -> str | tuple[str]:
        """One atom: JSON text of a literal character (str) or a GBNF term (1-tuple)."""
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
            return (group,)
        if ch == "[":
            return (_set_expr(self._class(), self.path),)
        if ch == ".":
            return (_set_expr(_DOT, self.path),)
        if ch == "\\":
            escaped = self._escape()
            if isinstance(escaped, str):
                return _json_text(escaped)
            return (_set_expr(escaped[0], self.path),)
        if ch in "*+?" or (ch == "{" and _QUANTIFIER.match(self.src, self.pos - 1)):
            raise self._invalid("nothing to repeat")
        if ch in "^$":
            raise self._unsupported(
                "anchor", "^ and $ are supported only at the ends of the pattern"
            )
        return _json_text(ch)

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

    def _quantifier(self) -> str:
        """A quantifier after an atom, as GBNF ("" when none); a lazy "?" changes nothing."""
        ch = self.src[self.pos : self.pos + 1]
        if ch and ch in "*+?":
            self.pos += 1
            quantifier = ch
        elif ch == "{" and (match := _QUANTIFIER.match(self.src, self.pos)):
            self.pos = match.end()
            low = int(match[1])
            high = low if match[2] is None else int(match[3]) if match[3] else None
            if high is not None and high < low:
                raise self._invalid("numbers out of order in {} quantifier")
            if max(low, high or 0) > _MAX_REPEAT:
                raise self._unsupported(
                    f"quantifier above {_MAX_REPEAT}",
                    f"llama.cpp's grammar sampler repeats at most {_MAX_REPEAT} times",
                )
            quantifier = _repeat("", low, high) if high != 0 else "{0}"
        else:
            return ""
        self._eat("?")
        return quantifier


# --- Entry points -----------------------------------------------------------------------------


def json_schema_grammar(schema: Schema) -> str:
    """A grammar whose root is one JSON value matching `schema` (no whitespace around it)."""
    builder = GrammarBuilder()
    return builder.render(builder.schema_rule(schema, name="json"))


def json_object_grammar() -> str:
    """A grammar whose root is any JSON object."""
    return json_schema_grammar({"type": "object"})


def tool_call_grammar(functions: Sequence[tuple[str, dict[str, Any]]], *, parallel: bool) -> str:
    """A grammar for forced calls of `functions` ((name, parameters schema) pairs; an empty
    schema means any object): one block, or with `parallel` one or more (no upper bound)
    separated by "\\n", and nothing after the last:

        <tool_call>
        {"name": "NAME", "arguments": ARGS}
        </tool_call>
    """
    if not functions:
        raise SchemaError("no function to call")
    names = [name for name, _ in functions]
    if len(set(names)) != len(names):
        raise SchemaError("two functions have the same name")
    builder = GrammarBuilder()
    calls = []
    for name, parameters in functions:
        try:
            arguments = builder.schema_rule(parameters or {"type": "object"}, name=f"{name}-args")
        except SchemaError as exc:
            exc.message = f"function {name!r}: {exc.message}"
            raise
        calls.append(
            _seq(literal(json.dumps(name, ensure_ascii=False) + ', "arguments": '), arguments)
        )
    call = builder.add_rule(
        "tool-call",
        _seq(literal('<tool_call>\n{"name": '), _alts(calls), literal("}\n</tool_call>")),
    )
    return builder.render(f'{call} ("\\n" {call})*' if parallel else call)
