"""Field checks for untrusted JSON/YAML documents: one set of rules, each caller's messages.

Records (:mod:`registry.record`), ``adapter_config.json`` (:mod:`registry.formats.peft_keys`)
and gate policies (``gate/policy.py``) all check the same shapes -- a non-empty string, an
integer above a floor that is not a bool, a finite number, a list of strings -- but each
reports failures in its own words (``record.peft.r must be ...``, ``policy field ...``).
So the *rules* live here once and the *wording of the failure* is the caller's: a
:class:`FieldChecker` is built with a :data:`Failure` factory that turns
``(where, problem, got)`` into the caller's :class:`~registry.errors.BadInputError`.

The bare predicates (:func:`is_int`, :func:`is_finite_number`, :func:`is_string_list`) are
for callers that phrase one message for several alternatives (``a string or a list of
strings``). ``bool`` is never an integer or a number here, although Python says it is:
``true`` in a document is not ``1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from registry.errors import BadInputError

T = TypeVar("T")

Failure = Callable[[str, str, Any], BadInputError]
"""Builds the caller's error from ``(where, problem, got)``; ``problem`` reads
``"must be ..."``."""


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """True for an ``int`` or ``float`` (not ``bool``) that is finite, even as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range (e.g. 10**400)
        return False


def is_string_list(value: Any) -> bool:
    """True for a list (not a tuple: JSON has none) whose items are all non-empty strings."""
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


@dataclass(frozen=True)
class FieldChecker:
    """Checks one document's fields, raising errors built by ``fail``.

    Every method returns the value it accepted, so a caller can validate and copy in
    one expression (``out["r"] = fields.integer(obj["r"], "peft.r", minimum=1)``).

    Attributes:
        fail: The caller's error factory (see :data:`Failure`).
        blank_is_empty: A string of whitespace alone counts as empty (records: a name
            of spaces is no name; policies only refuse ``""``).
    """

    fail: Failure
    blank_is_empty: bool = False

    def _empty(self, value: str) -> bool:
        return not (value.strip() if self.blank_is_empty else value)

    def string(self, value: Any, where: str) -> str:
        """A non-empty string (see :attr:`blank_is_empty`).

        Raises:
            BadInputError: Anything else.
        """
        if not isinstance(value, str) or self._empty(value):
            raise self.fail(where, "must be a non-empty string", value)
        return value

    def optional_string(self, value: Any, where: str) -> str | None:
        """None, or a non-empty string as :meth:`string` checks it.

        Raises:
            BadInputError: Anything else.
        """
        if value is None:
            return None
        if not isinstance(value, str) or self._empty(value):
            raise self.fail(where, "must be a non-empty string or null", value)
        return value

    def integer(self, value: Any, where: str, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        """An integer (not a bool) within the optional bounds.

        Raises:
            BadInputError: Anything else.
        """
        if (not is_int(value) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum)):
            bounds = (f" in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                      else f" <= {maximum}" if maximum is not None
                      else f" >= {minimum}" if minimum is not None else "")
            raise self.fail(where, f"must be an integer{bounds}", value)
        return int(value)

    def number(self, value: Any, where: str, *, minimum: float | None = None,
               maximum: float | None = None) -> float | int:
        """A finite number (not a bool) within the optional bounds, returned unchanged.

        Raises:
            BadInputError: Anything else.
        """
        if (not is_finite_number(value) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum)):
            bounds = (f" in [{minimum}, {maximum}]" if maximum is not None
                      else f" >= {minimum}" if minimum is not None else "")
            raise self.fail(where, f"must be a finite number{bounds}", value)
        return value

    def boolean(self, value: Any, where: str) -> bool:
        """``True`` or ``False`` (no truthy stand-ins).

        Raises:
            BadInputError: Anything else.
        """
        if not isinstance(value, bool):
            raise self.fail(where, "must be true or false", value)
        return value

    def string_list(self, value: Any, where: str) -> list[str]:
        """A list (or tuple) of strings, each checked by :meth:`string` as ``where[i]``.

        The first bad item is reported by its index, so a long list's culprit is named.

        Raises:
            BadInputError: Not a list, or an item is not a non-empty string.
        """
        if not isinstance(value, (list, tuple)):
            raise self.fail(where, "must be a list of strings", value)
        return [self.string(item, f"{where}[{i}]") for i, item in enumerate(value)]

    def non_empty_string_list(self, value: Any, where: str) -> list[str]:
        """A non-empty list of non-empty strings, reported as a whole.

        Raises:
            BadInputError: Anything else.
        """
        if not isinstance(value, list) or not value or not is_string_list(value):
            raise self.fail(where, "must be a non-empty list of non-empty strings", value)
        return list(value)


def optional(check: Callable[[Any, str], T]) -> Callable[[Any, str], T | None]:
    """Wrap a ``check(value, where)`` so that None passes through unchecked."""
    def checked(value: Any, where: str) -> T | None:
        return None if value is None else check(value, where)
    return checked
