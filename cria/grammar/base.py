"""Shared pieces of the JSON Schema compiler: errors, keyword tables, GBNF helpers and the
shared rules."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

Schema: TypeAlias = dict[str, Any] | bool


class SchemaError(ValueError):
    """The schema is invalid (or not JSON Schema at all). `path` locates the problem, e.g.
    "properties.address.items" (empty: the root); `str()` is the message alone."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


class Unsatisfiable(SchemaError):
    """A valid schema (or subschema) that no value matches. Where the value is optional (an
    optional property, a union's branch, array items beyond minItems) the grammar leaves it
    out instead; elsewhere it is a SchemaError like any other."""


class UnsupportedSchema(SchemaError):
    """A valid schema that uses a feature a grammar cannot enforce; `feature` names it, e.g.
    "patternProperties", "format: uri", "pattern: lookaround"."""

    def __init__(self, feature: str, message: str = "", *, path: str = "") -> None:
        super().__init__(message or f"{feature} cannot be enforced by a grammar", path=path)
        self.feature = feature


# --- Keywords ---------------------------------------------------------------------------------

# Keywords that assert or apply subschemas (drafts 4 to 2020-12). Every other keyword is an
# annotation or unknown, and JSON Schema ignores those: so does the compiler.
_KNOWN: Final = frozenset(
    {
        "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
        "exclusiveMinimum", "maxLength", "minLength", "pattern", "format", "maxItems", "minItems",
        "uniqueItems", "maxContains", "minContains", "contains", "items", "prefixItems",
        "additionalItems", "unevaluatedItems", "maxProperties", "minProperties", "required",
        "dependentRequired", "properties", "patternProperties", "additionalProperties",
        "propertyNames", "unevaluatedProperties", "dependentSchemas", "dependencies", "allOf",
        "anyOf", "oneOf", "not", "if", "then", "else", "$ref", "$dynamicRef", "$recursiveRef",
    }
)  # fmt: skip
_TYPE_KEYWORDS: Final = {
    "object": ("properties", "required", "additionalProperties", "minProperties",
               "maxProperties", "unevaluatedProperties", "patternProperties", "propertyNames",
               "dependentRequired", "dependentSchemas"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "unevaluatedItems",
              "contains", "minContains", "maxContains"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
}  # fmt: skip
_APPLICATORS: Final = ("allOf", "anyOf", "oneOf", "$ref")
_TYPES: Final = ("object", "array", "string", "number", "integer", "boolean", "null")
_INT_DIGITS: Final = 16  # an unbounded integer part has at most this many digits

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
    # RFC 3339 appendix A, at most 9 digits a number.
    "duration": (
        '"P" (dur-date | dur-time | [0-9]{1,9} "W")',
        ("dur-date", "dur-time"),
    ),
    "dur-date": (
        '([0-9]{1,9} "D" | [0-9]{1,9} "M" ([0-9]{1,9} "D")? | [0-9]{1,9} "Y" ([0-9]{1,9} "M"'
        ' ([0-9]{1,9} "D")?)?) dur-time?',
        ("dur-time",),
    ),
    "dur-time": (
        '"T" ([0-9]{1,9} "H" ([0-9]{1,9} "M" ([0-9]{1,9} "S")?)? | [0-9]{1,9} "M"'
        ' ([0-9]{1,9} "S")? | [0-9]{1,9} "S")',
        (),
    ),
    # Labels of at most 62 characters, at most 4 of them (at most 251 characters in all), the
    # last one starting with a letter: valid for RFC 1123 and the `fqdn` checks.
    "hostname": ('(hn-label "."){0,3} [a-zA-Z] ([a-zA-Z0-9-]{0,60} [a-zA-Z0-9])?', ("hn-label",)),
    "hn-label": ("[a-zA-Z0-9] ([a-zA-Z0-9-]{0,60} [a-zA-Z0-9])?", ()),
    # A dot-atom local part (RFC 5322) of at most 64 characters, "@", a hostname.
    "email": (
        "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,32} (\".\" [a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,15})?"
        ' "@" hostname',
        ("hostname",),
    ),
    "ipv4": ('ipv4-octet "." ipv4-octet "." ipv4-octet "." ipv4-octet', ("ipv4-octet",)),
    "ipv4-octet": ('"25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9] [0-9] | [0-9]', ()),
    "ipv6": (f'{_HEX}{{1,4}} (":" {_HEX}{{1,4}}){{7}}', ()),  # the full form only
    # RFC 3986: scheme "://" host [":" port] path [query] [fragment], and for references also
    # an absolute path or a fragment alone.
    "uri": ('[a-zA-Z] [a-zA-Z0-9+.-]{0,15} "://" uri-rest', ("uri-rest",)),
    "uri-rest": (  # what follows "scheme://"
        '(hostname | ipv4) (":" [0-9]{1,5})?'
        ' ("/" uri-char*)* ("?" (uri-char | [/?])*)? ("#" (uri-char | [/?])*)?',
        ("hostname", "ipv4", "uri-char"),
    ),
    "uri-char": (f'[a-zA-Z0-9._~!$&\'()*+,;=:@-] | "%" {_HEX} {_HEX}', ()),
    "uri-reference": (
        'uri | "/" (uri-char+ ("/" uri-char*)*)? ("?" (uri-char | [/?])*)? ("#" (uri-char | [/?])*)?'
        ' | "#" (uri-char | [/?])*',
        ("uri", "uri-char"),
    ),
}
# The formats enforced (all others are annotations, as in 2020-12 by default: ignored).
_FORMATS: Final = (
    "date", "time", "date-time", "duration", "uuid", "email", "hostname", "ipv4", "ipv6", "uri",
    "uri-reference",
)  # fmt: skip
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
    """True for schemas that accept every value: `true` and objects without assertions."""
    if schema is True:
        return True
    if not isinstance(schema, dict):
        return False
    return all(k not in _KNOWN or (k == "format" and schema[k] not in _FORMATS) for k in schema)


def _canonical(value: Any) -> str | None:
    """A text equal for equal JSON values (None for what is not JSON)."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _json_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)
