"""Numbers: bounds, integer and decimal ranges as GBNF."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Final, TypeAlias

from cria.grammar.base import _INT_DIGITS, SchemaError, _alts, _repeat, _seq

_Bound: TypeAlias = tuple[int, bool]  # (value, inclusive)


def _bounds(
    schema: dict[str, Any], path: str, *, integer: bool
) -> tuple[_Bound | None, _Bound | None]:
    """(lower, upper) bounds as integers: non-integer bounds are rounded inward (for a number
    that leaves out the values between the bound and the next integer: stricter)."""
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
        else:  # round inward to an inclusive integer bound (stricter for a number)
            result.append((math.ceil(edge[0]) if is_low else math.floor(edge[0]), True))
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


# --- multipleOf -------------------------------------------------------------------------------

_MAX_MULTIPLES: Final = 256  # multiples of an integer step listed, the ones nearest 0


def _multiples(step: int, low: int | None, high: int | None) -> list[int] | None:
    """The multiples of `step` (an integer above 1) within the inclusive integer bounds: all
    of them, or the _MAX_MULTIPLES nearest 0 (stricter); None when there is none."""
    m_low = None if low is None else -((-low) // step)  # ceil(low / step)
    m_high = None if high is None else high // step
    if m_low is not None and m_high is not None and m_low > m_high:
        return None
    center = min(
        max(0, -(10**30) if m_low is None else m_low), 10**30 if m_high is None else m_high
    )
    chosen = [center]
    for distance in range(1, _MAX_MULTIPLES):
        for m in (center + distance, center - distance):
            if (m_low is None or m >= m_low) and (m_high is None or m <= m_high):
                chosen.append(m)
        if len(chosen) >= _MAX_MULTIPLES:
            break
    return sorted(m * step for m in chosen[:_MAX_MULTIPLES])
