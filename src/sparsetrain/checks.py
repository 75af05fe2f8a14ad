"""Checks of arguments and settings, shared by the library, the runner and the command line.

Every function takes the value and the name the user knows it by (``"epochs"``,
``"--jobs"``), returns the value in its plain Python type when it is acceptable, and otherwise
raises ``ValueError`` with one message that says what was wrong (the value given), what is
expected, and how to fix it. ``fix`` replaces the default advice where the caller knows better
(e.g. which option to pass).

    epochs = positive_int(epochs, "epochs")
    density = real_in_range(density, "density", 0, 1, low_open=True,
                            meaning="the fraction of weights kept")
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Collection


def shown(value: Any) -> str:
    """``repr(value)`` for a message: cut to a readable length, and never failing (Python
    refuses to print an int of more than 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        return "a number of more than 4300 digits"
    return text if len(text) <= 80 else text[:60] + "..." + text[-10:]


def _fail(name: str, expected: str, value: Any, fix: str | None, default_fix: str) -> None:
    raise ValueError(f"{name} must be {expected}, got {shown(value)}; {fix or default_fix}")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (a Python or numpy one; bools are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _at_most(high: int | None) -> str:
    return "" if high is None else f" (at most {high})"


def _int_from(value: Any, name: str, low: int, what: str, high: int | None,
              fix: str | None) -> int:
    """``value`` as an ``int`` if it is an integer >= ``low`` and, given ``high``, <= ``high``
    (bools are refused); ``what`` names that range in the message."""
    if not is_int(value) or value < low or (high is not None and value > high):
        _fail(name, what + _at_most(high), value, fix,
              f"give {name} a whole number of {low} or more{_at_most(high)}")
    return int(value)


def positive_int(value: Any, name: str, *, high: int | None = None,
                 fix: str | None = None) -> int:
    """``value`` as an ``int`` if it is an integer >= 1 and, given ``high``, <= ``high``
    (bools are refused)."""
    return _int_from(value, name, 1, "a positive integer", high, fix)


def non_negative_int(value: Any, name: str, *, high: int | None = None,
                     fix: str | None = None) -> int:
    """``value`` as an ``int`` if it is an integer >= 0 and, given ``high``, <= ``high``
    (bools are refused)."""
    return _int_from(value, name, 0, "a non-negative integer", high, fix)


def integer_in_range(value: Any, name: str, low: int, high: int, *,
                     fix: str | None = None) -> int:
    """``value`` as an ``int`` if it is an integer in [``low``, ``high``] (bools are refused),
    e.g. a seed, which torch takes only within 64 bits."""
    interval = f"[{low}, {high}]"
    if not is_int(value) or not low <= value <= high:
        _fail(name, f"a whole number in {interval}", value, fix,
              f"give {name} a whole number in {interval}")
    return int(value)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf and low == -math.inf:
        return "finite"
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    if low == -math.inf:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def real_in_range(value: Any, name: str, low: float = -math.inf, high: float = math.inf, *,
                  low_open: bool = False, high_open: bool = False, meaning: str | None = None,
                  fix: str | None = None) -> float:
    """``value`` as a ``float`` if it is a finite real number (not a bool, NaN or infinite)
    between ``low`` and ``high``; the bounds are included unless ``low_open`` / ``high_open``.
    ``meaning`` (e.g. "the fraction of weights kept") is added to the message after the
    range."""
    interval = _interval(low, high, low_open, high_open)
    expected = (interval if interval != "finite" else "a finite number") + (
        f" ({meaning})" if meaning else "")
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = real and _finite(value)
    if real and not ok and value == value and interval != "finite":  # infinite, not NaN
        expected = f"a finite number {expected}"
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        number = "a finite number" if interval == "finite" else f"a number {interval}"
        _fail(name, expected, value, fix, f"give {name} {number}")
    return float(value)


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def positive_real(value: Any, name: str, *, fix: str | None = None) -> float:
    """``value`` as a ``float`` if it is a finite real number > 0."""
    return real_in_range(value, name, 0.0, low_open=True, fix=fix)


def fraction(value: Any, name: str, *, zero: bool = False, one: bool = True,
             meaning: str | None = None, fix: str | None = None) -> float:
    """``value`` as a ``float`` if it is in [0, 1]; 0 is refused unless ``zero``, 1 is
    accepted unless ``one=False``."""
    return real_in_range(value, name, 0.0, 1.0, low_open=not zero, high_open=not one,
                         meaning=meaning, fix=fix)


def choice(value: Any, name: str, choices: Collection[Any], *, fix: str | None = None) -> Any:
    """``value`` itself if it is one of ``choices`` (compared with ``==``)."""
    listed = ", ".join(repr(c) for c in choices)
    try:
        found = value in choices
    except TypeError:  # an unhashable value asked of a set
        found = False
    if not found:
        _fail(name, f"one of {listed}", value, fix, f"choose one of {listed}")
    return value


def boolean(value: Any, name: str, *, fix: str | None = None) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        _fail(name, "True or False", value, fix, f"give {name} as true or false")
    return value


def integer(value: Any, name: str, *, fix: str | None = None) -> int:
    """``value`` as an ``int`` if it is an integer of any sign (bools are refused)."""
    if not is_int(value):
        _fail(name, "an integer", value, fix, f"give {name} a whole number")
    return int(value)
