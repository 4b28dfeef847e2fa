"""GrammarBuilder: compiles schemas into GBNF rules."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import referencing.exceptions

from cria.grammar.ambiguity import _AmbiguityMixin, _Head, _leaf, _Ref, _Shape, _Union
from cria.grammar.arrays import _ArraysMixin
from cria.grammar.base import (
    _INVALID_NAME_CHARS,
    _KNOWN,
    _PRIMITIVES,
    _RESERVED,
    _RULE_NAME,
    _TYPE_KEYWORDS,
    _TYPES,
    Schema,
    SchemaError,
    Unsatisfiable,
    UnsupportedSchema,
    _alts,
    _at,
    _canonical,
    _compact_json,
    _is_any,
    literal,
)
from cria.grammar.exclusive import _ExclusiveMixin
from cria.grammar.limits import (
    _MAX_EXPR_DEPTH,
    _MAX_GRAMMAR_BYTES,
    _MAX_GROUP_DEPTH,
    _MAX_NESTING,
    _MAX_RULES,
    _MAX_WORK,
    _check_repetitions,
    _group_depth,
    _too_large,
)
from cria.grammar.objects import _ObjectsMixin
from cria.grammar.refs import check_nested_ids
from cria.grammar.schemas import (
    _combine,
    _normalize,
    _resolve,
    _triggered_schemas,
    _unevaluated,
)

# --- The builder ------------------------------------------------------------------------------


class GrammarBuilder(_ObjectsMixin, _ArraysMixin, _ExclusiveMixin, _AmbiguityMixin):
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
        self._validators: dict[int, tuple[Any, Schema]] = {}  # id(schema) -> (validator, schema)

    def schema_rule(self, schema: Schema, *, name: str = "value") -> str:
        """Add the rules for one JSON value matching `schema`; return the rule to reference.

        Raises UnsupportedSchema ("... too ambiguous", "schema too large", "nesting too deep")
        for schemas whose grammar would be too slow for llama.cpp's sampler or too big."""
        self._documents.append(schema)
        outer, self._doc = self._doc, schema
        self._work = 0
        try:
            check_nested_ids(schema)
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

    def _optional(self, schema: Schema, path: str, name: str) -> str | None:
        """`_expr`, or None (and the rules it added removed) when no value matches `schema`:
        for values the grammar may leave out."""
        try:
            with self._rollback():
                return self._expr(schema, path, name)
        except Unsatisfiable:
            return None

    @contextlib.contextmanager
    def _rollback(self) -> Iterator[None]:
        """Removes the rules added inside when an Unsatisfiable leaves it."""
        marks = (len(self._rules), len(self._refs), len(self._shapes), self._size)
        try:
            yield
        except Unsatisfiable:
            for table, mark in zip((self._rules, self._refs, self._shapes), marks, strict=False):
                for key in list(table)[mark:]:
                    del table[key]  # type: ignore[attr-defined]
            self._size = marks[3]
            raise

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
            raise Unsatisfiable("the schema `false` matches no value", path=path)
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be an object or a boolean", path=path)
        if "enum" in schema or "const" in schema:
            return self._enum(schema, path)
        schema = _unevaluated(_normalize(schema, path), path)
        triggered = _triggered_schemas(schema, path)
        if triggered:  # dependentSchemas of required keys apply: merged
            rest = {k: v for k, v in schema.items() if k != "dependentSchemas"}
            left = {k: v for k, v in schema["dependentSchemas"].items() if k not in triggered}
            if left:
                rest["dependentSchemas"] = left
            return self._merged({"allOf": [rest, *triggered.values()]}, path, name)
        if "$ref" in schema:
            if len(schema) == 1:
                return self._ref(schema["$ref"], path)
            return self._merged(schema, path, name)
        if "allOf" in schema:
            return self._merged(schema, path, name)
        for key in ("oneOf", "anyOf"):  # oneOf first: an anyOf beside goes into its branches
            if key in schema:
                return self._union(schema, key, path, name)
        return self._typed(schema, path, name)

    def _enum(self, schema: dict[str, Any], path: str) -> str:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise SchemaError("enum must be a non-empty array", path=path)
        rest = {k: v for k, v in schema.items() if k != "enum"}  # each value is in its enum
        checked = bool(_KNOWN & rest.keys())
        try:
            kept = [v for v in values if not checked or self._valid(v, rest, path)]
        except SchemaError as exc:
            exc.message = f"cannot check the enum values: {exc.message}"
            raise
        if not kept:
            raise Unsatisfiable("no enum/const value satisfies the rest of the schema", path=path)
        texts = [_compact_json(v, path) for v in kept]
        return self._shaped(_alts([literal(t) for t in texts]), _leaf(*texts))

    def _valid(self, value: Any, schema: Schema, path: str) -> bool:
        """Whether `value` matches `schema` (a subschema of the document), by `jsonschema`."""
        import jsonschema  # type: ignore[import-untyped, unused-ignore]  # lazily: ~4 MiB

        key = id(schema)
        validator = self._validators.get(key)
        if validator is None:
            document = self._doc if isinstance(self._doc, dict) else {}
            cls = jsonschema.validators.validator_for(document, jsonschema.Draft202012Validator)
            validator = cls(document, format_checker=cls.FORMAT_CHECKER).evolve(schema=schema)
            self._validators[key] = (validator, schema)
        else:
            validator = validator[0]
        try:
            return bool(validator.is_valid(value))
        except (
            jsonschema.exceptions.SchemaError,
            jsonschema.exceptions.UnknownType,
            referencing.exceptions.Unresolvable,
            re.error,
            TypeError,
            ValueError,
            RecursionError,
        ) as exc:
            raise SchemaError(
                f"cannot check a value against the schema: {exc}", path=path
            ) from None

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
        text = _canonical(merged) if any(key in self._inlining for key in keys) else None
        if text is not None:
            # Back to a $ref inlined further out: the merged schema becomes a rule of its own
            # (like a $ref's), so that the recursion is a recursive rule, not endless inlining.
            memo = (id(self._doc), "allOf " + text)
            if memo in self._refs:
                rule = self._refs[memo]
                if self._rules[rule] is None and self._ref_nesting[rule] == self._nesting:
                    raise UnsupportedSchema(
                        "recursive $ref without nesting",
                        "a $ref refers to itself without an object or array in between",
                        path=path,
                    )
                return rule
            rule = self._free_name(name, None)
            self._rules[rule] = None
            self._refs[memo] = rule
            self._ref_nesting[rule] = self._nesting
            shape = _Ref(None)
            self._shapes[rule] = shape
            body = self._expr(merged, path, rule)
            self._store(rule, body)
            shape.body = body
            return rule
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
                raise Unsatisfiable("allOf includes a schema that matches no value", path=where)
            part = _unevaluated(_normalize(part, where), where)
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
            if rest:
                flat.append(rest)

        for part in parts:
            collect(part, path, frozenset())
        return _combine(flat, path)

    def _union(self, schema: dict[str, Any], key: str, path: str, name: str) -> str:
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"{key} must be a non-empty array", path=path)
        rest = {k: v for k, v in schema.items() if k != key}
        indexed = [(i, {"allOf": [rest, b]} if rest else b) for i, b in enumerate(branches)]
        if key == "oneOf" and len(indexed) > 1:
            indexed = self._exclusive(indexed, path)
            if not indexed:
                raise UnsupportedSchema(
                    "oneOf: branches not exclusive",
                    "no branch of this oneOf can be proven to exclude the others (by type, "
                    "by const/enum values or by required keys), so a grammar could write "
                    "values that match several; make them differ e.g. by a required property "
                    "with distinct const values, or use anyOf",
                    path=path,
                )
        indexed = self._merge_branches(indexed, path)
        exprs = [self._optional(b, _at(path, key, i), f"{name}-{i}") for i, b in indexed]
        unique = list(dict.fromkeys(e for e in exprs if e is not None))  # none: no branch matches
        if not unique:
            raise Unsatisfiable(f"no branch of this {key} matches any value", path=path)
        if len(unique) == 1:
            return unique[0]
        return self._shaped(_alts(unique), _Union(unique, key, path))

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
        failure: Unsatisfiable | None = None
        for t in types:
            try:
                with self._rollback():
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
            except Unsatisfiable as exc:  # no value of this type matches: the others may
                if len(types) == 1:
                    raise
                failure = exc
        if not alternatives:
            assert failure is not None
            raise failure
        unique = list(dict.fromkeys(alternatives))
        if len(unique) == 1:
            return unique[0]
        return self._shaped(_alts(unique), _Union(unique, "type", path))
