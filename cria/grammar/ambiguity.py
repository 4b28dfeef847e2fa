"""The ambiguity analysis: how many parse stacks llama.cpp's sampler may keep for a grammar."""

from __future__ import annotations

import dataclasses
from typing import Any, Final, TypeAlias

from cria.grammar.base import UnsupportedSchema
from cria.grammar.limits import _MAX_AMBIGUITY

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


class _AmbiguityMixin:
    """The analysis part of GrammarBuilder."""

    _shapes: dict[str, _Shape]
    _weights: dict[str, int]
    _head_memo: dict[tuple[str, int], frozenset[_Head]]

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
