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
  against the document passed in; a `$ref` inside a subschema with its own `$id` (a new base)
  is refused.
* `allOf` is merged into one schema (the object case keeps JSON Schema's meaning:
  `additionalProperties` of each part restricts the merged keys). Keywords next to `anyOf` /
  `oneOf` / `$ref` are merged into each branch the same way.
* `enum` / `const` become literals of their compact JSON, keeping only the values that satisfy
  the rest of the schema (checked with `jsonschema`), so any keyword next to them is exact.
* `pattern` (an ECMA-262 regular expression) is translated to GBNF over the *JSON-encoded*
  string content; an unanchored side is padded with any characters, as JSON Schema searches.

* `oneOf` keeps only the branches proven to exclude every other branch (see `exclusive.py`:
  by type, const/enum values, required or forbidden keys, disjoint number ranges or counts,
  recursively through $ref and nested unions), after narrowing a branch where that makes it
  exclusive (a key another branch requires left out, a key another forbids required, at least
  one array item, a string that is none of another branch's values). Never read as `anyOf`.
* A part no value matches (an `enum` none of whose values has the declared type, a `false`
  schema...) is left out where it is optional: an optional property, a union's branch, a
  type of several, array items beyond `minItems`, extra keys. Where it is required, the
  schema is invalid (SchemaError).

Deliberate simplifications, all stricter than the schema
--------------------------------------------------------
* An absent `additionalProperties` closes the object (as llama.cpp's converter and xgrammar
  do): only declared keys (and required ones, any value) are written; `true` or a schema
  allows extra keys. Writing fewer keys than a schema allows is still valid output.
* Object properties come in declaration order; extra keys (when `additionalProperties` allows
  them) come after the declared ones, cannot repeat a declared name, and use no escapes.
* `minProperties` above the required keys makes the first optional declared keys required,
  then (one more at most) requires one extra key; `maxProperties` keeps the first optional
  keys that fit and bounds the extra keys by what is left.
* `uniqueItems`: over a finite item domain (enum, const, boolean, null) the values come in a
  fixed order, each at most once; otherwise at most one item (refused when minItems > 1).
* Upper counts above 2000 (maxLength, maxItems, a pattern's {m,n}) are lowered to 2000.
* minLength/maxLength beside a `pattern` keep only matches of that length (counts inside the
  pattern are narrowed, maybe more than needed); beside a `format`, the format's own length
  range must lie within them, except `email` under a maxLength of 7 or more (a shorter email
  grammar: no dot in the local part, at most two domain labels, lengths that fit).
* A `pattern` beside a `format` is refused, except `uri` / `uri-reference` beside a pattern
  that only says "starts with one of these `scheme://`" (^https?://): a uri with those
  schemes (exact for `uri`).
* A top-level alternative of a `pattern` that is one group is read as the group's own
  alternatives (the same language), so anchors inside, as in (^a$)|(^b$), are at its ends.
* Non-integer bounds on numbers are rounded inward to integers (minimum 0.5 -> 1).
* `if`/`then`: conditions that test one property against distinct const/enum values become an
  anyOf (one branch per condition with its `then`, one for a string none of them; objects
  only); any other `if` is taken to hold (its `then` applies, `else` never does), except an
  `if` of `not: C` whose `not` cannot be enforced: that `if` is taken to fail (C and `else`
  apply).
* `not`: of types, of required keys, of string values (beside a plain string: the raw
  strings but those), of ^[class]+$ (a string with a character outside the class).
* `allOf` of two different anyOf (or oneOf) becomes the union of their pairs (exact).
* `contains` only with a schema every item matches (at least minContains items);
  `multipleOf` only 1 or 1/n, as integers (every integer is a multiple of 1/n), or an integer
  k > 1: the multiples of k within the bounds are listed, at most the 256 nearest 0.
* Without `type`, the type is inferred from the keywords present (`properties` -> object...).
* A `\\u` escape of a UTF-16 surrogate must be half of a pair (the pair is one character), so
  one grammar character is one code point and `minLength` / `maxLength` are exact.
* Under a `pattern`, characters are written raw; only `"`, `\\` and tab, newline and carriage
  return use their short escapes (other control characters cannot match).
* Numbers with bounds have no exponent.
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
* "minLength above 2000" (minItems, "pattern: quantifier above 2000"): llama.cpp enforces
  repetition counts up to 2000 (it would drop a larger bound); upper bounds are lowered.
"""

from __future__ import annotations

from cria.grammar.base import Schema, SchemaError, UnsupportedSchema, literal
from cria.grammar.builder import GrammarBuilder

__all__ = [
    "GrammarBuilder",
    "Schema",
    "SchemaError",
    "UnsupportedSchema",
    "json_object_grammar",
    "json_schema_grammar",
    "literal",
]


# --- Entry points -----------------------------------------------------------------------------


def json_schema_grammar(schema: Schema) -> str:
    """A grammar whose root is one JSON value matching `schema` (no whitespace around it)."""
    builder = GrammarBuilder()
    return builder.render(builder.schema_rule(schema, name="json"))


def json_object_grammar() -> str:
    """A grammar whose root is any JSON object."""
    return json_schema_grammar({"type": "object"})
