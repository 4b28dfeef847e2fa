"""oneOf: which branches are exclusive of the others, so that writing them is never looser.

A value matches `oneOf` when it matches exactly one branch. The grammar of a oneOf is the union
of the branches it keeps, and a branch is kept only when every value its grammar writes is
proven to fail every other branch (as a schema, not as a grammar): then whatever the grammar
writes matches that branch alone. A branch that cannot be proven so is left out (stricter);
when none is left, the oneOf is refused. The proofs (`_excludes`), for the grammar of A and the
schema of B:

* the types A's grammar writes (declared, or inferred from its keywords) are not B's types;
* A is an enum / const whose values all fail B (checked with `jsonschema`);
* both are objects and: B requires a key A's grammar never writes (A's objects are closed
  unless additionalProperties allows more), or A always writes a key that B forbids (its
  schema `false`, or B's additionalProperties false), or A always writes a key whose value
  grammar is, recursively, exclusive of B's schema for that key.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final

from cria.grammar.base import _TYPE_KEYWORDS, _TYPES, SchemaError, _canonical, _count, _is_any
from cria.grammar.schemas import (
    _matching,
    _normalize,
    _required_closure,
    _type_set,
    _unevaluated,
)

_MAX_PROOF_DEPTH: Final = 4

if TYPE_CHECKING:
    from cria.grammar.base import Schema

    _Base = Any
else:
    _Base = object


def _written_types(flat: dict[str, Any], path: str) -> set[str]:
    """The types the grammar of a flat schema writes ("number" includes "integer")."""
    if "type" in flat:
        return _type_set(flat["type"], path)
    inferred = [t for t, keywords in _TYPE_KEYWORDS.items() if any(k in flat for k in keywords)]
    return _type_set(inferred or list(_TYPES), path)


def _schema_types(flat: dict[str, Any], path: str) -> set[str]:
    """The types a flat schema accepts."""
    return _type_set(flat["type"], path) if "type" in flat else set(_TYPES)


def _closed(flat: dict[str, Any]) -> bool:
    """Whether the grammar of a flat object schema writes no key but the declared ones."""
    extra = flat.get("additionalProperties")
    if flat.get("patternProperties"):
        return False
    if extra is None:
        return any(
            flat.get(k) for k in ("properties", "required", "dependentRequired", "dependentSchemas")
        )
    return extra is False


def _range(
    flat: dict[str, Any],
) -> tuple[tuple[Fraction, bool] | None, tuple[Fraction, bool] | None]:
    """A flat schema's numeric bounds as ((value, inclusive) or None, same)."""
    low = high = None
    for key, inclusive, is_low in (
        ("minimum", True, True), ("exclusiveMinimum", False, True),
        ("maximum", True, False), ("exclusiveMaximum", False, False),
    ):  # fmt: skip
        value = flat.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        bound = (Fraction(value), inclusive)
        current = low if is_low else high
        if (
            current is None
            or (bound[0] > current[0] if is_low else bound[0] < current[0])
            or (bound[0] == current[0] and not inclusive)
        ):
            if is_low:
                low = bound
            else:
                high = bound
    return low, high


def _ranges_disjoint(a: dict[str, Any], b: dict[str, Any], path: str) -> bool:
    """Whether no number is within the bounds of both."""
    try:
        (a_low, a_high), (b_low, b_high) = _range(a), _range(b)
    except (ValueError, OverflowError):
        return False
    for high, low in ((a_high, b_low), (b_high, a_low)):
        if high is not None and low is not None:
            if high[0] < low[0] or (high[0] == low[0] and not (high[1] and low[1])):
                return True
    return False


def _disjoint(a: dict[str, Any], b: dict[str, Any], low_key: str, high_key: str) -> bool:
    """Whether the count ranges (minLength/maxLength, minItems/maxItems) do not overlap."""
    try:
        a_low, b_low = int(a.get(low_key, 0)), int(b.get(low_key, 0))
        a_high, b_high = a.get(high_key), b.get(high_key)
    except (TypeError, ValueError):
        return False
    return (a_high is not None and a_high < b_low) or (b_high is not None and b_high < a_low)


class _ExclusiveMixin(_Base):
    """The union part of GrammarBuilder: oneOf exclusivity, merging equal branches."""

    def _exclusive(self, branches: list[tuple[int, Schema]], path: str) -> list[tuple[int, Schema]]:
        """The branches whose grammar is proven exclusive of every other branch's schema. An
        object branch that is not, against a branch that requires keys it does not, is first
        made to never write one of those keys (stricter)."""
        flats = [self._flat(b, path) for _, b in branches]
        kept = []
        for i, (index, branch) in enumerate(branches):
            flat = flats[i]
            others = [(other, flats[j]) for j, (_, other) in enumerate(branches) if j != i]
            if flat is None:  # a union: kept when each of its branches excludes the others
                if all(self._excl(branch, other, path, 0) for other, _ in others):
                    kept.append((index, branch))
                continue
            if "enum" in flat or "const" in flat:  # only the values that fail every other
                values = flat["enum"] if "enum" in flat else [flat["const"]]
                if not isinstance(values, list):
                    continue
                try:
                    alone = [
                        v for v in values if not any(self._valid(v, o, path) for o, _ in others)
                    ]
                except SchemaError:
                    continue
                if alone:
                    kept.append((index, {"allOf": [branch, {"enum": alone}]}))
                continue
            patches: list[dict[str, Any]] = []
            proven = True
            for other, other_flat in others:
                if self._excludes(flat, other, other_flat, path, 0):
                    continue
                patch = self._narrowing(flat, other, other_flat, path)
                narrowed = None if patch is None else self._flat({"allOf": [flat, patch]}, path)
                if narrowed is None or not self._excludes(narrowed, other, other_flat, path, 0):
                    proven = False
                    break
                patches.append(patch)
                flat = narrowed
            if proven:
                kept.append((index, {"allOf": [branch, *patches]} if patches else branch))
        return kept

    def _narrowing(
        self, a: dict[str, Any], b: Schema, b_flat: dict[str, Any] | None, path: str
    ) -> dict[str, Any] | None:
        """A schema that, beside `a`, makes a's grammar exclude `b` (stricter), or None: a key
        `b` requires left out, or a key `b` forbids required, or at least one array item."""
        if b_flat is None:
            return None
        written = _written_types(a, path)
        if written == {"array"} and _schema_types(b_flat, path) & written == {"array"}:
            return {"minItems": 1} if not a.get("minItems") else None
        b_values = (
            b_flat["enum"] if "enum" in b_flat else [b_flat["const"]] if "const" in b_flat else None
        )
        if (
            written == {"string"}
            and set(a) <= {"type", "not"}
            and isinstance(b_values, list)
            and all(isinstance(v, str) for v in b_values)
        ):  # a plain string: leave out the values of b
            return {"type": "string", "not": {"enum": b_values}}
        key = self._key_to_forbid(a, b_flat, path)
        if key is not None:
            return {"properties": {key: False}}
        if written != {"object"}:
            return None
        b_props = b_flat.get("properties", {})
        b_closed = b_flat.get("additionalProperties") is False and not b_flat.get(
            "patternProperties"
        )
        for key, value in a.get("properties", {}).items():
            if value is not False and (
                b_props.get(key) is False or (b_closed and key not in b_props)
            ):
                return {"required": [key]}
        return None

    @staticmethod
    def _key_to_forbid(a: dict[str, Any], b: dict[str, Any] | None, path: str) -> str | None:
        """A key that `b` requires, `a` does not and could write, when both are objects."""
        if b is None or _written_types(a, path) != {"object"}:
            return None
        if "enum" in a or "const" in a:
            return None
        a_required = set(_required_closure(a, path))
        for key in _required_closure(b, path):
            if key not in a_required:
                return key
        return None

    def _excludes(
        self, a: dict[str, Any], b: Schema, b_flat: dict[str, Any] | None, path: str, depth: int
    ) -> bool:
        """Whether every value the grammar of the flat schema `a` writes fails schema `b`."""
        if b is False:
            return True
        if _is_any(b) or depth > _MAX_PROOF_DEPTH:
            return False
        if b_flat is None:  # a union: excluded when each of its branches is
            return self._excl(a, b, path, depth + 1)
        try:
            if "enum" in a or "const" in a:
                values = a["enum"] if "enum" in a else [a["const"]]
                return isinstance(values, list) and not any(self._valid(v, b, path) for v in values)
            if b_flat is None:
                return False
            shared = _written_types(a, path) & _schema_types(b_flat, path)
            excluded = a.get("not", {}).get("enum") if isinstance(a.get("not"), dict) else None
            b_values = (
                b_flat["enum"]
                if "enum" in b_flat
                else [b_flat["const"]]
                if "const" in b_flat
                else None
            )
            if shared == {"string"} and isinstance(excluded, list) and isinstance(b_values, list):
                texts = {_canonical(v) for v in excluded}
                if all(_canonical(v) in texts for v in b_values):
                    return True
            if not shared:
                return True
            if shared == {"object"}:
                return self._objects_exclude(a, b_flat, path, depth)
            if shared == {"string"}:
                return _disjoint(a, b_flat, "minLength", "maxLength")
            if shared == {"array"}:
                if _disjoint(a, b_flat, "minItems", "maxItems"):
                    return True
                return bool(
                    (a.get("minItems") or 0) >= 1
                    and not a.get("prefixItems")
                    and not b_flat.get("prefixItems")
                    and self._excl(a.get("items", True), b_flat.get("items", True), path, depth + 1)
                )
            if shared <= {"number", "integer"}:
                return _ranges_disjoint(a, b_flat, path)
            return False
        except SchemaError:
            return False

    def _excl(self, a: Schema, b: Schema, path: str, depth: int) -> bool:
        """`_excludes` for any two schemas: a union (anyOf / oneOf, also behind $ref or allOf)
        on either side excludes the other when each of its branches does."""
        if b is False:
            return True
        if depth > _MAX_PROOF_DEPTH or _is_any(b):
            return False
        self._work += 1
        for side in (a, b):
            branches = self._branches(side, path)
            if branches:
                return all(
                    self._excl(x, b, path, depth + 1)
                    if side is a
                    else self._excl(a, x, path, depth + 1)
                    for x in branches
                )
        a_flat, b_flat = self._flat(a, path), self._flat(b, path)
        if a_flat is None or b_flat is None:
            return False
        return self._excludes(a_flat, b, b_flat, path, depth)

    def _branches(self, schema: Schema, path: str) -> list[Schema] | None:
        """The branches of a union schema (with the keywords beside merged into each), or None
        when it is not one."""
        if not isinstance(schema, dict):
            return None
        try:
            merged = self._merge([schema], path)
            merged = _normalize(merged, path)
        except SchemaError:
            return None
        for key in ("oneOf", "anyOf"):
            if isinstance(merged.get(key), list) and merged[key]:
                rest = {k: v for k, v in merged.items() if k != key}
                return [{"allOf": [rest, x]} if rest else x for x in merged[key]]
        return None

    def _objects_exclude(self, a: dict[str, Any], b: dict[str, Any], path: str, depth: int) -> bool:
        a_props = a.get("properties", {})
        b_props = b.get("properties", {})
        written = _required_closure(a, path)
        may_write = {k for k, v in a_props.items() if v is not False} | set(written)
        if _closed(a) and any(k not in may_write for k in _required_closure(b, path)):
            return True
        for key in written:  # b's schema for the key: declared, by pattern, or the extra one
            b_value = b_props.get(key)
            if b_value is None:
                try:
                    matched = _matching(b.get("patternProperties") or {}, key, path)
                except SchemaError:
                    continue
                b_value = matched[0] if matched else b.get("additionalProperties", True)
            if b_value is False or self._excl(a_props.get(key, True), b_value, path, depth + 1):
                return True
        return False

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
        """The branch as one normalized schema without applicators (enum and const allowed),
        or None when it is not one."""
        if not isinstance(branch, dict):
            return None
        try:
            if "$ref" in branch or "allOf" in branch:
                branch = self._merge([branch], path)
            branch = _unevaluated(_normalize(branch, path), path)
        except SchemaError:
            return None
        if any(k in branch for k in ("anyOf", "oneOf", "$ref", "allOf")):
            return None
        return branch
