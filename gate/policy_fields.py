"""The field checkers of gate policies: one small set, shared by the policy and its checks.

A policy file is untrusted input, so every field goes through one of these: each
takes ``(value, where)`` and returns the cleaned value or raises a one-line
:class:`~registry.errors.BadInputError` naming the field (``checks[2].min_ratio``)
with the offending value shown by a bounded ``repr`` (:func:`show`, at most 200
characters), never the whole structure. :mod:`gate.policy` checks the top-level
fields with them and each check module (:mod:`gate.checks`) declares its own
parameters with them, so adding a check touches only its own file.

The rules themselves (what an integer, a finite number, a non-empty string is) are the
ones every document of the project is checked by, :class:`registry.formats.fields.FieldChecker`;
this module gives them the policy's wording (:func:`bad`: ``policy field WHERE ...``) and
adds what only a policy has: a choice among names, data file paths, stop strings.

Factories (:func:`int_at_least`, :func:`number`, :func:`choice`, :func:`optional`)
return a checker; the rest are checkers themselves. :data:`REQUIRED` as a default
means the field must be given.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from typing import Any

from registry.errors import BadInputError
from registry.formats import fields
from registry.formats.fields import FieldChecker, is_string_list

FIX = "see examples/gate.yaml for a documented policy"
MAX_SHOWN = 200
_MISSING = object()
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6


def show(value: Any) -> str:
    """A ``repr`` of an untrusted value bounded in depth, width and to 200 characters."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= MAX_SHOWN else shown[: MAX_SHOWN - 3] + "..."


Checker = Callable[[Any, str], Any]
"""``(value, where) -> cleaned value``; raises BadInputError naming ``where``."""

REQUIRED: Any = object()
"""A parameter's default meaning: the policy must give it."""


def bad(where: str, msg: str, got: Any = _MISSING) -> BadInputError:
    """The error for field ``where``: ``policy field WHERE MSG[, got VALUE]`` (bounded)."""
    detail = "" if got is _MISSING else f", got {show(got)}"
    where = where if len(where) <= MAX_SHOWN else where[: MAX_SHOWN - 3] + "..."
    return BadInputError(f"policy field {where} {msg}{detail}", fix=FIX)


POLICY = FieldChecker(bad)
"""The shared field rules (:mod:`registry.formats.fields`) with the policy's wording."""

boolean = POLICY.boolean
"""``true``/``false`` (raises BadInputError for anything else)."""

text = POLICY.string
"""A non-empty string (raises BadInputError for anything else)."""

text_list = POLICY.non_empty_string_list
"""A non-empty list of non-empty strings (raises BadInputError for anything else)."""

optional = fields.optional
"""``optional(checker)``: the checker, or None for a null value."""


MAX_INT = 2**31 - 1
"""Largest integer any policy field takes (counts, ranks, lengths): generous, so no policy
written before the bound existed is refused, while a typo of 10^20 is an error."""
MAX_NEW_TOKENS = 65_536
"""Largest ``max_new_tokens`` (10^23 decoded until EOS, for ever on a model that never emits it)."""


def int_at_least(lo: int | None = None, hi: int = MAX_INT) -> Callable[[Any, str], int]:
    """A checker of integers (not booleans) in ``[lo, hi]`` (``lo`` optional).

    Raises:
        BadInputError: (the checker) Not such an integer.
    """
    def check(v: Any, where: str) -> int:
        return POLICY.integer(v, where, minimum=lo, maximum=hi)
    return check


def number(lo: float | None = None, hi: float | None = None) -> Callable[[Any, str], float]:
    """A checker of finite numbers in ``[lo, hi]`` (either bound optional), as float.

    Raises:
        BadInputError: (the checker) Not a finite number in range.
    """
    def check(v: Any, where: str) -> float:
        # a plain 1e-3 is already a number (gate.safe_yaml reads YAML 1.2 floats); a quoted
        # "1e-3" is a string, refused like "0.001"
        return float(POLICY.number(v, where, minimum=lo, maximum=hi))
    return check


def choice(*choices: str) -> Callable[[Any, str], str]:
    """A checker accepting exactly one of ``choices``.

    Raises:
        BadInputError: (the checker) Anything else.
    """
    def check(v: Any, where: str) -> str:
        if v not in choices:
            raise bad(where, f"must be one of {', '.join(choices)}", v)
        return v
    return check


MAX_LABEL = 200
"""Longest check name or set label."""


def choice_list(*choices: str) -> Callable[[Any, str], list[str]]:
    """A checker of non-empty lists whose items are each one of ``choices`` (a typo
    would otherwise match nothing and silently turn a check off).

    Raises:
        BadInputError: (the checker) Anything else.
    """
    def check(v: Any, where: str) -> list[str]:
        items = text_list(v, where)
        for i, item in enumerate(items):
            choice(*choices)(item, f"{where}[{i}]")
        return items
    return check


def label(v: Any, where: str) -> str:
    """A check name or set label: a non-empty string of printable characters (it ends up
    in reports, JUnit XML and terminal tables), at most :data:`MAX_LABEL` long.

    Raises:
        BadInputError: (the checker) Not such a string.
    """
    value = text(v, where)
    if len(value) > MAX_LABEL or any(not c.isprintable() for c in value):
        raise bad(where, f"must be printable text of at most {MAX_LABEL} characters "
                  "(no control characters or line breaks)", v)
    return value


def path(v: Any, where: str) -> str:
    """A data file path as written (resolved and hashed by :mod:`gate.policy`).

    Raises:
        BadInputError: Not a non-empty string, or it holds a NUL (no file system takes one).
    """
    value = text(v, where)
    if "\x00" in value:
        raise bad(where, "must not contain a NUL character", v)
    return value


def path_map(v: Any, where: str) -> dict[str, str]:
    """A non-empty mapping of names to data file paths.

    Raises:
        BadInputError: Not such a mapping.
    """
    if not isinstance(v, dict) or not v:
        raise bad(where, "must be a non-empty mapping of parent name -> eval file", v)
    for key, value in v.items():
        label(key, f"{where} key")
        path(value, f"{where}.{key}")
    return dict(v)


def stop_list(v: Any, where: str) -> list[str]:
    """A (possibly empty) list of non-empty strings.

    Raises:
        BadInputError: Anything else.
    """
    if not is_string_list(v):
        raise bad(where, "must be a list of non-empty strings", v)
    return list(v)


