"""Objects: properties, required keys, extra keys."""

from __future__ import annotations

from typing import Any

from cria.grammar.ambiguity import _Object
from cria.grammar.base import (
    SchemaError,
    Unsatisfiable,
    UnsupportedSchema,
    _alts,
    _at,
    _count,
    _is_any,
    _json_key,
    _key_literal,
    _repeat,
    _seq,
    literal,
)
from cria.grammar.limits import _BIG_REPEAT
from cria.grammar.regex import _JSON_SPECIAL, _char_class, _complement, _contains, _Pattern, _union
from cria.grammar.schemas import _matching, _required_closure


class _ObjectsMixin:
    def _object(self, schema: dict[str, Any], path: str, name: str) -> str:
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")  # None: absent, the object is closed
        patterns = schema.get("patternProperties", {})
        names = schema.get("propertyNames", True)
        dependent = schema.get("dependentRequired", {})
        dependent_schemas = schema.get("dependentSchemas", {})
        if not isinstance(extra, dict | bool | None):
            raise SchemaError("additionalProperties must be a schema", path=path)
        required = _required_closure(schema, path)
        declares = props or required or patterns or dependent or dependent_schemas
        undeclared = True if extra is None else extra  # the schema of required undeclared keys
        if extra is None:  # absent: closed, unless nothing is declared
            extra = not declares
        counted = schema.get("minProperties") or schema.get("maxProperties") is not None
        if not declares and _is_any(extra) and _is_any(names) and not counted:
            self._check_property_counts(schema, path, 0, None)
            return self._prim("object")
        # Keys with dependents that are not required anyway are never written (stricter).
        triggers = {k for k, v in dependent.items() if k not in required and set(v) - set(required)}
        triggers |= {
            k for k, v in dependent_schemas.items() if k not in required and not _is_any(v)
        }
        # (key, schema, required): declared keys in order, then required undeclared ones.
        planned: list[tuple[str, Any, bool]] = []
        for key in [*props, *(k for k in required if k not in props)]:
            by_pattern = _matching(patterns, key, path)
            own = props[key] if key in props else by_pattern.pop(0) if by_pattern else undeclared
            parts = [own, *by_pattern]
            if key in triggers or False in parts or not self._name_ok(key, names, path):
                if key in required:
                    raise Unsatisfiable(f"required property {key!r} cannot be present", path=path)
                continue
            kept = [s for s in parts if not _is_any(s)]
            planned.append((key, {"allOf": kept} if len(kept) > 1 else kept[0] if kept else True,
                            key in required))  # fmt: skip
        low = _count(schema, "minProperties", path) or 0
        high = _count(schema, "maxProperties", path)
        if high is not None and high < len(required):
            raise Unsatisfiable("maxProperties is less than the required properties", path=path)
        must = sum(r for _, _, r in planned)
        for i, (key, sub, is_required) in enumerate(planned):  # stricter: more are required
            if must < low and not is_required:
                planned[i] = (key, sub, True)
                must += 1
        room = None  # how many extra keys may be written (None: any number)
        if high is not None:  # stricter: the first optional ones, then extra keys if room
            room = high - must
            kept_plan = []
            for key, sub, is_required in planned:
                if not is_required:
                    if room <= 0:
                        continue
                    room -= 1
                kept_plan.append((key, sub, is_required))
            planned = kept_plan
            if room <= 0:
                extra, patterns = False, {}

        members: list[tuple[str, str, bool]] = []  # (key, "key": value, required)
        shape = _Object([], None)
        with self._nested(path):
            for key, sub, is_required in planned:
                where = _at(path, "properties", key)
                if is_required:
                    expr: str | None = self._expr(sub, where, f"{name}-{key}")
                else:  # an optional key no value matches is left out
                    expr = self._optional(sub, where, f"{name}-{key}")
                    if expr is None:
                        continue
                value = self._named(f"{name}-{key}", expr)
                members.append((key, self._member(_key_literal(key), value), is_required))
                shape.members.append((_json_key(key), value, is_required))
            excluded = [*dict.fromkeys([*props, *required, *triggers])]
            extra_member = self._extra_member(name, path, extra, patterns, names, excluded, shape)
        written = sum(r for _, _, r in members)
        # minProperties one above what is written: one extra key at least (two could repeat a key)
        force = extra_member is not None and low == written + 1 and all(r for _, _, r in members)
        at_most = None if extra_member and room is None else len(members) + (room or 0)
        self._check_property_counts(schema, path, written + force, at_most)
        body = self._members(name, members, extra_member, force=force, room=room)
        expr = _seq('"{"', self._prim("space"), body, '"}"')
        return self._shaped(expr, shape)

    def _name_ok(self, key: str, names: Any, path: str) -> bool:
        return _is_any(names) or self._valid(key, names, _at(path, "propertyNames"))

    def _extra_member(
        self,
        name: str,
        path: str,
        extra: Any,
        patterns: dict[str, Any],
        names: Any,
        excluded: list[str],
        shape: _Object,
    ) -> str | None:
        """The rule of one extra member, or None when the grammar writes none. Extra keys
        are: keys matching a patternProperties pattern (only when no declared key does, the
        value then matches every pattern's schema); else, under propertyNames, names that
        match it (only when no key is declared); else any key but the declared ones."""
        where = _at(path, "additionalProperties")
        if patterns:
            if not _is_any(names) or any(_matching(patterns, k, path) for k in excluded):
                return None
            bodies = []
            for pattern in patterns:
                translator = _Pattern(pattern, _at(path, "patternProperties", pattern))
                bodies.append(translator.translate())
                if translator.unanchored:
                    self._prim("char")
            key_rule = self.add_rule(f"{name}-pattern-key", _seq(r'"\""', _alts(bodies), r'"\""'))
            kept = [s for s in patterns.values() if not _is_any(s)]
            value_schema = {"allOf": kept} if len(kept) > 1 else kept[0] if kept else True
            value = self._optional(value_schema, _at(path, "patternProperties"), f"{name}-extra")
        elif extra is False:
            return None
        elif not _is_any(names):
            if excluded:
                return None
            key_schema = {"allOf": [names, {"type": "string"}]}
            key_rule = self._expr(key_schema, _at(path, "propertyNames"), f"{name}-key")
            value = self._optional(extra, where, f"{name}-extra")
        else:
            key_rule = self._key_not_in(excluded, name)
            value = self._optional(extra, where, f"{name}-extra")
        if value is None:  # no value matches additionalProperties: no extra key
            return None
        value = self._named(f"{name}-extra", value)
        shape.extra = value
        return self.add_rule(f"{name}-extra-kv", self._member(key_rule, value))

    def _member(self, key: str, value: str) -> str:
        space = self._prim("space")
        return f'{key} {space} ":" {space} {value} {space}'

    def _members(
        self,
        name: str,
        members: list[tuple[str, str, bool]],
        extra: str | None,
        *,
        force: bool = False,
        room: int | None = None,
    ) -> str:
        """The inside of an object: members in order (optional ones may be left out), then
        extra members (`force`: at least one; `room`: at most that many); commas between."""
        comma = f'"," {self._prim("space")}'
        more = _repeat(f"({comma} {extra})", 0, None if room is None else room - 1) if extra else ""
        after = more if room is None or not extra else _repeat(f"({comma} {extra})", 0, room)
        rest = _seq(f"{comma} {extra}", more) if force else after  # what follows a member
        firsts = [_seq(extra, more)] if extra else []  # how the object may start
        nullable = not force
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
