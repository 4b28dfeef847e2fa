"""Schema-level transformations: keyword checks, $ref resolution, allOf merging."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from cria.grammar.base import (
    _APPLICATORS,
    _FORMATS,
    _KNOWN,
    _TYPES,
    Schema,
    SchemaError,
    Unsatisfiable,
    UnsupportedSchema,
    _canonical,
    _is_any,
)


def _normalize(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The assertions and applicators of `schema` in 2020-12 spelling: annotations, unknown
    keywords and formats that are not enforced dropped; draft 4-2019 spellings (`items` as an
    array, `additionalItems`, boolean `exclusiveMinimum`, `dependencies`) converted; `if` /
    `then` merged into allOf (stricter: `else` is never taken); `not` applied where simple."""
    out = {k: v for k, v in schema.items() if k in _KNOWN}
    if "format" in out and (not isinstance(out["format"], str) or out["format"] not in _FORMATS):
        del out["format"]
    if isinstance(out.get("items"), list):
        if "prefixItems" not in out:
            out["prefixItems"] = out["items"]
        del out["items"]
        if "additionalItems" in out:
            out["items"] = out.pop("additionalItems")
    out.pop("additionalItems", None)
    for exclusive, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        flag = out.get(exclusive)
        if isinstance(flag, bool):  # draft 4: a flag on minimum / maximum
            del out[exclusive]
            if flag and inclusive in out:
                out[exclusive] = out.pop(inclusive)
    if "dependencies" in out:
        dependencies = out.pop("dependencies")
        if not isinstance(dependencies, dict):
            raise SchemaError("dependencies must be an object", path=path)
        for key, value in dependencies.items():
            target = "dependentRequired" if isinstance(value, list) else "dependentSchemas"
            merged = dict(out.get(target) or {})
            merged[key] = value
            out[target] = merged
    for keyword in ("dependentRequired", "dependentSchemas", "patternProperties", "properties"):
        if keyword in out and not isinstance(out[keyword], dict):
            raise SchemaError(f"{keyword} must be an object", path=path)
    _switch_conditions(out)
    condition = out.pop("if", True)
    then = out.pop("then", True)
    otherwise = out.pop("else", True)
    if not _is_any(condition):  # stricter: the `if` always holds, so `then` applies
        before = _list(out["allOf"], "allOf", path) if "allOf" in out else []
        out["allOf"] = [*before, *_taken_branch(condition, then, otherwise, path)]
    for keyword in ("$dynamicRef", "$recursiveRef"):
        if keyword in out:
            raise UnsupportedSchema(keyword, f"{keyword} is not supported", path=path)
    if "not" in out:
        out = _negate(out, out.pop("not"), path)
    return out


def _taken_branch(condition: Any, then: Any, otherwise: Any, path: str) -> list[Any]:
    """The schemas an `if` / `then` / `else` is replaced by (stricter): the condition and
    `then`; or, for a condition `not: C` that cannot be enforced, C and `else` (the `if`
    fails, which C ensures)."""
    if (
        isinstance(condition, dict)
        and {k for k in condition if k in _KNOWN} == {"not"}
        and isinstance(condition["not"], dict | bool)
    ):
        try:
            _normalize(condition, path)
        except UnsupportedSchema:
            return [condition["not"], otherwise]
    return [condition, then]


def _switch_conditions(out: dict[str, Any]) -> None:
    """if/then pairs (the schema's own and allOf members of only if/then) whose conditions
    test one property against distinct const/enum values become one anyOf: a branch per
    condition (the key present with that value, its `then`), and one for a string value that
    is none of them (a value that is not an object, or an object without the key, could
    satisfy every condition: objects with the key only, stricter)."""
    members = out.get("allOf") if isinstance(out.get("allOf"), list) else []
    if "if" not in out and not any(isinstance(m, dict) and "if" in m for m in members):
        return
    pairs, rest = [], []
    own = "if" in out and "else" not in out  # with an `else`, the own if/then stays as is
    if own:
        pairs.append((out["if"], out.get("then", True)))
    for member in out.get("allOf", []) if isinstance(out.get("allOf"), list) else []:
        known = {k for k in member if k in _KNOWN} if isinstance(member, dict) else None
        if known is not None and "if" in known and known <= {"if", "then"}:
            pairs.append((member["if"], member.get("then", True)))
        else:
            rest.append(member)
    tested = [_tested(condition) for condition, _ in pairs]
    if not pairs or None in tested or len({t[0] for t in tested}) != 1:  # type: ignore[index]
        return
    key = tested[0][0]  # type: ignore[index]
    texts = [_canonical(v) for _, values, _ in tested for v in values]  # type: ignore[misc]
    if len(set(texts)) != len(texts):
        return
    branches: list[Any] = [
        {"allOf": [{"type": "object", "required": [key]}, condition, then]}
        for condition, then in pairs
    ]
    values = [v for _, vs, _ in tested for v in vs]  # type: ignore[misc]
    if all(isinstance(v, str) for v in values):
        none: dict[str, Any] = {
            "type": "object",
            "properties": {key: {"type": "string", "not": {"enum": values}}},
        }
        if not all(required for _, _, required in tested):  # type: ignore[misc]
            none["required"] = [key]  # absent, it would satisfy every condition
        branches.append(none)
    if own:
        out.pop("if", None)
        out.pop("then", None)
    out["allOf"] = [*rest, {"anyOf": branches}]


def _tested(condition: Any) -> tuple[str, list[Any], bool] | None:
    """For a condition {properties: {k: {const: v} or {enum: [...]}}, required: [k]?}: the
    key, its values and whether it is required; None for any other condition."""
    if not isinstance(condition, dict):
        return None
    known = {k for k in condition if k in _KNOWN}
    props = condition.get("properties")
    required = condition.get("required", [])
    if (
        not known <= {"properties", "required", "type"}
        or condition.get("type", "object") != "object"
    ):
        return None
    if not isinstance(props, dict) or len(props) != 1 or not isinstance(required, list):
        return None
    key, test = next(iter(props.items()))
    if not isinstance(test, dict) or set(required) - {key}:
        return None
    test_known = {k for k in test if k in _KNOWN} - {"type"}
    if test_known == {"const"}:
        values = [test["const"]]
    elif test_known == {"enum"} and isinstance(test["enum"], list) and test["enum"]:
        values = test["enum"]
    else:
        return None
    return key, values, key in required


def _list(value: Any, keyword: str, path: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise SchemaError(f"{keyword} must be a non-empty array", path=path)
    return value


def _negate(schema: dict[str, Any], negated: Any, path: str) -> dict[str, Any]:
    """`schema` and `not: negated`, for the simple cases: a type, required keys (one of them
    is left out), an enum beside (checked value by value)."""
    if negated is False:
        return schema
    if not isinstance(negated, dict):
        raise SchemaError("not must be a schema", path=path)
    if "enum" in schema or "const" in schema:
        return {**schema, "not": negated}  # the values are checked against the whole schema
    negated = _normalize(negated, path)
    if not negated:
        raise Unsatisfiable("`not` of a schema that matches everything matches nothing", path=path)
    if set(negated) == {"type"}:
        excluded = _type_set(negated["type"], path)
        allowed = _type_set(schema.get("type", list(_TYPES)), path) - excluded
        if "number" in allowed and "integer" in excluded:
            raise UnsupportedSchema(
                "not", "a grammar cannot exclude integers from numbers", path=path
            )
        allowed.discard("integer" if "number" in allowed else "")
        if not allowed:
            raise Unsatisfiable("`not` excludes every type", path=path)
        return {**schema, "type": [t for t in _TYPES if t in allowed]}
    if set(negated) <= {"enum", "const", "type"} and _declares_string(schema):
        values = negated["enum"] if "enum" in negated else [negated.get("const")]
        if (
            set(negated) != {"type"}
            and isinstance(values, list)
            and all(isinstance(v, str) for v in values)
            and _type_set(negated.get("type", "string"), path) >= {"string"}
        ):
            excluded = schema.get("not", {}).get("enum", [])
            return {**schema, "not": {"enum": list(dict.fromkeys([*excluded, *values]))}}
    if set(negated) == {"pattern"} and _declares_string(schema) and "pattern" not in schema:
        inverse = (
            _ALL_OF_CLASS.fullmatch(negated["pattern"])
            if isinstance(negated["pattern"], str)
            else None
        )
        if inverse:  # not ^[S]+$ (or *): holds for strings with a character outside S
            body = inverse[1]
            return {
                **schema,
                "pattern": "[" + (body[1:] if body.startswith("^") else "^" + body) + "]",
            }
    forbidden = _required_sets(negated)
    if forbidden is not None:  # not all of one set: leave out the first key of each set
        properties = dict(schema.get("properties") or {})
        for keys in forbidden:
            properties[keys[0]] = False
        return {**schema, "properties": properties}
    raise UnsupportedSchema(
        "not", "only `not` of types or of required keys is supported", path=path
    )


# ^[S]+$ or ^[S]*$: a pattern of strings made only of a character class
_ALL_OF_CLASS = re.compile(r"\^\[((?:\\.|[^\]\\])+)\][+*]\$")


def _declares_string(schema: dict[str, Any]) -> bool:
    """Whether the schema declares type string alone (so no other type is written)."""
    return schema.get("type") in ("string", ["string"])


def _required_sets(negated: dict[str, Any]) -> list[list[str]] | None:
    """For `not: {required: [...]}` (or an anyOf / oneOf of those): the sets of keys of which
    an object must not have all; None for anything else."""
    if set(negated) == {"required"} and isinstance(negated["required"], list):
        keys = [k for k in negated["required"] if isinstance(k, str)]
        return [keys] if keys and len(keys) == len(negated["required"]) else None
    if set(negated) == {"allOf"} and isinstance(negated["allOf"], list) and negated["allOf"]:
        parts = [_required_sets(p) if isinstance(p, dict) else None for p in negated["allOf"]]
        if any(p is None or len(p) != 1 for p in parts):
            return None
        return [list(dict.fromkeys(k for p in parts for k in p[0]))]  # type: ignore[index]
    if len(negated) == 1 and next(iter(negated)) in ("anyOf", "oneOf"):
        branches = negated[next(iter(negated))]
        if not isinstance(branches, list) or not branches:
            return None
        out = []
        for branch in branches:
            sets = _required_sets(branch) if isinstance(branch, dict) else None
            if sets is None:
                return None
            out.extend(sets)
        return out
    return None


def _unevaluated(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """unevaluatedProperties / unevaluatedItems without in-place applicators mean
    additionalProperties / items (when those are absent; otherwise nothing is unevaluated).
    Beside applicators, properties the grammar writes are all evaluated (an object without
    additionalProperties is closed), so only a schema that allows no extra key at all is kept."""
    if "unevaluatedProperties" not in schema and "unevaluatedItems" not in schema:
        return schema
    out = dict(schema)
    if any(k in schema for k in _APPLICATORS):
        for keyword in ("unevaluatedProperties", "unevaluatedItems"):
            if keyword in out and not _is_any(out[keyword]):
                raise UnsupportedSchema(
                    keyword,
                    f"{keyword} is supported only without allOf/anyOf/oneOf/$ref beside it",
                    path=path,
                )
            out.pop(keyword, None)
        return out
    if "unevaluatedProperties" in out:
        out.setdefault("additionalProperties", out.pop("unevaluatedProperties"))
    if "unevaluatedItems" in out:
        out.setdefault("items", out.pop("unevaluatedItems"))
    return out


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


_MAX_PAIRS = 64  # branches of a union made from an allOf of unions
_OBJECT_KEYS = ("properties", "additionalProperties", "required", "patternProperties")


def _combine(parts: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Merge schemas without $ref/allOf into one that matches exactly what all of them match
    (or less), or raise UnsupportedSchema for combinations this cannot express."""
    out: dict[str, Any] = {}
    object_parts = [p for p in parts if any(k in p for k in _OBJECT_KEYS)]
    if object_parts:
        out.update(_combine_objects(object_parts, path))
    tuple_parts = [p for p in parts if any(k in p for k in ("prefixItems", "items"))]
    if len(tuple_parts) > 1 and any("prefixItems" in p for p in tuple_parts):
        raise UnsupportedSchema("allOf of tuple arrays", path=path)
    types: set[str] | None = None
    for part in parts:
        for key, value in part.items():
            if key in _OBJECT_KEYS:
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
            elif key in ("items", "propertyNames", "contains"):
                if key == "contains" and out[key] != value:
                    raise UnsupportedSchema("allOf: contains", path=path)
                out[key] = {"allOf": [out[key], value]}
            elif key == "uniqueItems":
                out[key] = out[key] or value
            elif key == "not":
                out[key] = {"anyOf": [out[key], value]}
            elif key == "enum" and isinstance(value, list) and isinstance(out[key], list):
                texts = {_canonical(v) for v in value}
                out[key] = [v for v in out[key] if _canonical(v) in texts]
                if not out[key]:
                    raise Unsatisfiable("allOf: no enum value is in every enum", path=path)
            elif key in ("dependentRequired", "dependentSchemas") and isinstance(value, dict):
                merged = dict(out[key])
                for name, dependent in value.items():
                    if name not in merged:
                        merged[name] = dependent
                    elif key == "dependentRequired":
                        merged[name] = list(dict.fromkeys([*merged[name], *dependent]))
                    else:
                        merged[name] = {"allOf": [merged[name], dependent]}
                out[key] = merged
            elif _canonical(out[key]) == _canonical(value):
                continue
            elif (
                key in ("anyOf", "oneOf") and isinstance(value, list) and isinstance(out[key], list)
            ):
                # allOf of two unions: a union of the pairs (exact for oneOf too: a value
                # matches exactly one pair when it matches exactly one branch of each)
                if len(out[key]) * len(value) > _MAX_PAIRS:
                    raise UnsupportedSchema(
                        f"allOf: {key}", f"allOf combines {key}s with too many branches", path=path
                    )
                out[key] = [{"allOf": [x, y]} for x in out[key] for y in value]
            elif key == "const" and _canonical(out[key]) != _canonical(value):
                raise Unsatisfiable("allOf: two different const values", path=path)
            elif out[key] != value:
                raise UnsupportedSchema(
                    f"allOf: {key}", f"allOf combines two different {key!r}", path=path
                )
    if types is not None:
        if not types:
            raise Unsatisfiable("allOf: no type satisfies every subschema", path=path)
        out["type"] = [t for t in _TYPES if t in types]
    return out


def _matching(patterns: dict[str, Any], key: str, path: str) -> list[Any]:
    """The schemas of the patternProperties that `key` matches."""
    out = []
    for pattern, schema in patterns.items():
        try:
            if re.search(pattern, key):
                out.append(schema)
        except re.error:
            raise UnsupportedSchema(
                "patternProperties", f"cannot read the pattern {pattern!r}", path=path
            ) from None
    return out


def _combine_objects(parts: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """A key is allowed when every part allows it (declared, matching patternProperties, or
    additionalProperties not false); its schema is every part's schema for it. Extra keys
    matching patternProperties stay allowed only when one part has patternProperties and the
    others allow any extra key (else no extra key is, which is stricter)."""
    keys = list(dict.fromkeys(k for p in parts for k in p.get("properties", {})))
    properties: dict[str, Any] = {}
    for key in keys:
        schemas = []
        for part in parts:
            declared = part.get("properties", {})
            if key in declared:
                schemas.append(declared[key])
                continue
            by_pattern = _matching(part.get("patternProperties", {}), key, path)
            schemas.extend(by_pattern or [part.get("additionalProperties", True)])
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
    with_patterns = [p for p in parts if p.get("patternProperties")]
    if with_patterns:
        others = [p for p in parts if p is not with_patterns[0]]
        if len(with_patterns) == 1 and all(
            _is_any(p.get("additionalProperties", True)) for p in others
        ):
            out["patternProperties"] = with_patterns[0]["patternProperties"]
        else:
            out["additionalProperties"] = False
    return out


def _required_closure(schema: dict[str, Any], path: str) -> list[str]:
    """`required`, with the keys that dependentRequired makes required through them."""
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError("required must be an array of strings", path=path)
    dependents = schema.get("dependentRequired", {})
    out = list(dict.fromkeys(required))
    for key in out:  # grows while it is read
        more = dependents.get(key, [])
        if not isinstance(more, list) or not all(isinstance(m, str) for m in more):
            raise SchemaError("dependentRequired values must be arrays of strings", path=path)
        out.extend(m for m in more if m not in out)
    return out


def _triggered_schemas(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The dependentSchemas of keys that are required (so they always apply)."""
    dependents = schema.get("dependentSchemas")
    if not dependents:
        return {}
    required = _required_closure(schema, path)
    return {k: v for k, v in dependents.items() if k in required}

