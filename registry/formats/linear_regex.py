"""Python regular expressions run by RE2: parsed as Python does, matched in linear time.

Python parses, RE2 runs. PEFT matches with Python's ``re`` and its syntax differs from
RE2's in places (``a{,3}``, ``[[:alpha:]]``, ``\\Z``, ``\\u00e9``, ``(?x)``...), so a pattern
is never handed to RE2 as text: the expression PEFT would build (for example
``(.*\\.)?(KEY)$`` for a ``rank_pattern`` key, spliced exactly as PEFT splices it) is parsed
by Python's own parser (``re._parser``, the one ``re.compile`` uses) and the tree is
written out in unambiguous RE2 syntax: every character as ``\\x{..}``, Python's Unicode
``\\d``/``\\w``/``\\s`` as the exact code-point sets Python's predicates define
(``str.isdecimal``, ``isalnum() or "_"``, ``isspace``), ``^``/``$``/``.`` by the flags in
force, capture groups and lazy quantifiers kept (RE2 reports the same leftmost-first
groups as Python, which :func:`registry.formats.patterns.layer_index` relies on). The result equals PEFT's for every
name, with two documented approximations that only differ next to non-ASCII characters:
case-insensitive matching uses RE2's Unicode simple case folding, and ``\\b``/``\\B`` are
RE2's ASCII word boundaries (``tests/unit/test_patterns.py`` compares against PEFT's own
functions).

Constructs RE2 cannot run in linear time (lookahead/lookbehind, backreferences,
conditionals, atomic groups, possessive quantifiers, repeat counts over 1000) are refused
with a :class:`~registry.errors.BadInputError` naming the field and the (truncated)
pattern; ingest calls :func:`registry.formats.patterns.check_config_patterns` so such an adapter never enters a
store. Names containing control characters are refused too (safetensors names never do).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import re2

from registry.errors import BadInputError

if sys.version_info >= (3, 11):
    from re import _constants as _c  # type: ignore[attr-defined]  # private, not in typeshed
    from re import _parser  # type: ignore[attr-defined]  # private, not in typeshed
else:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _parser

MAX_PATTERN_CHARS = 1 << 16
"""Longest pattern accepted. Matching is linear whatever the length; the bound keeps
compiling cheap while leaving room for a merge's ``target_modules``, an alternation of
every merged module name (``merging/lora/peft_output.py``)."""
_SHOWN = 80
_MAX_CP = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
_UNSUPPORTED = {
    _c.ASSERT: "lookahead/lookbehind is", _c.ASSERT_NOT: "lookahead/lookbehind is",
    _c.GROUPREF: "a backreference is", _c.GROUPREF_EXISTS: "a conditional group is",
    getattr(_c, "ATOMIC_GROUP", None): "an atomic group is",
    getattr(_c, "POSSESSIVE_REPEAT", None): "a possessive quantifier is",
    getattr(_c, "FAILURE", None): "lookahead/lookbehind is",
}
_FIX = "rewrite the pattern without lookaround or backreferences (adapterkit matches with RE2)"

Ranges = list[tuple[int, int]]


class _Refused(Exception):
    """A construct RE2 cannot run; ``str(exc)`` names it."""


def show(pattern: str) -> str:
    """``repr`` of a pattern cut to 80 characters, for one-line messages."""
    return repr(pattern[:_SHOWN] + ("..." if len(pattern) > _SHOWN else ""))


# --- exact Unicode classes -----------------------------------------------------------------


@functools.cache
def _category(name: str) -> tuple[tuple[int, int], ...]:
    pred = {"digit": str.isdecimal, "space": str.isspace,
            "word": lambda ch: ch.isalnum() or ch == "_"}[name]
    out: Ranges = []
    start = None
    for cp in range(_MAX_CP + 1):
        if pred(chr(cp)):
            start = cp if start is None else start
        elif start is not None:
            out.append((start, cp - 1))
            start = None
    if start is not None:
        out.append((start, _MAX_CP))
    return tuple(out)


_ASCII_CATEGORY = {"digit": ((48, 57),), "space": ((9, 13), (32, 32)),
                   "word": ((48, 57), (65, 90), (95, 95), (97, 122))}


def _complement(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    nxt = 0
    for lo, hi in sorted(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = max(nxt, hi + 1)
    if nxt <= _MAX_CP:
        out.append((nxt, _MAX_CP))
    return out


def _class(ranges: Iterable[tuple[int, int]], negate: bool = False) -> str:
    parts = []
    for lo, hi in sorted(ranges):  # surrogates never occur in a (UTF-8) name: drop them
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a <= b:
                parts.append(f"\\x{{{a:x}}}" + (f"-\\x{{{b:x}}}" if b > a else ""))
    if not parts:
        return "(?s:.)" if negate else "[^\\x{0}-\\x{10ffff}]"
    return ("[^" if negate else "[") + "".join(parts) + "]"


# --- Python parse tree -> RE2 syntax -------------------------------------------------------


def _category_ranges(code: Any, flags: int) -> Ranges:
    name = str(code).lower()  # CATEGORY_NOT_DIGIT ...
    kind = next(k for k in ("digit", "space", "word") if k in name)
    ranges = list(_ASCII_CATEGORY[kind] if flags & _c.SRE_FLAG_ASCII else _category(kind))
    return _complement(ranges) if "not_" in name else ranges


def _ascii_fold(ranges: Ranges) -> Ranges:
    out = list(ranges)
    for lo, hi in ranges:
        for a, b, shift in ((65, 90, 32), (97, 122, -32)):
            if max(lo, a) <= min(hi, b):
                out.append((max(lo, a) + shift, min(hi, b) + shift))
    return out


def _set(ranges: Ranges, flags: int, negate: bool = False) -> str:
    """A character class; under IGNORECASE it is case-folded before it is negated, as in
    Python (ASCII folding under the ASCII flag, else RE2's Unicode simple folding)."""
    if flags & _c.SRE_FLAG_IGNORECASE:
        if flags & _c.SRE_FLAG_ASCII:
            return _class(_ascii_fold(ranges), negate)
        return "(?i:" + _class(ranges, negate) + ")"
    return _class(ranges, negate)


def _in(items: list[tuple[Any, Any]], flags: int) -> str:
    ranges: Ranges = []
    negate = False
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            ranges.append((av, av))
        elif op is _c.RANGE:
            ranges.append(av)
        elif op is _c.CATEGORY:
            ranges.extend(_category_ranges(av, flags))
        else:
            raise _Refused(f"set item {str(op).lower()} is not supported")
    return _set(ranges, flags, negate)


def _literal(cp: int, flags: int) -> str:
    if flags & _c.SRE_FLAG_IGNORECASE and chr(cp).lower() != chr(cp).upper():
        return _set([(cp, cp)], flags)
    char = chr(cp)
    return char if char.isascii() and (char.isalnum() or char == "_") else _class([(cp, cp)])


def _at(code: Any, flags: int) -> str:
    multi = flags & _c.SRE_FLAG_MULTILINE
    return {
        _c.AT_BEGINNING: "(?m:^)" if multi else "\\A",
        _c.AT_BEGINNING_STRING: "\\A",
        # Python's "$" also matches before a final newline; names hold no newline
        _c.AT_END: "(?m:$)" if multi else "\\z",
        _c.AT_END_STRING: "\\z",
        _c.AT_BOUNDARY: "\\b",
        _c.AT_NON_BOUNDARY: "\\B",
    }[code]


def _emit(items: Iterable[tuple[Any, Any]], flags: int) -> str:
    out = []
    for op, av in items:
        if op in _UNSUPPORTED:
            raise _Refused(f"{_UNSUPPORTED[op]} not supported")
        if op is _c.LITERAL:
            out.append(_literal(av, flags))
        elif op is _c.NOT_LITERAL:
            out.append(_in([(_c.NEGATE, None), (_c.LITERAL, av)], flags))
        elif op is _c.ANY:
            out.append("(?s:.)" if flags & _c.SRE_FLAG_DOTALL else "[^\\n]")
        elif op is _c.IN:
            out.append(_in(av, flags))
        elif op is _c.AT:
            out.append(_at(av, flags))
        elif op is _c.BRANCH:
            out.append("(?:" + "|".join(_emit(alt, flags) for alt in av[1]) + ")")
        elif op is _c.SUBPATTERN:
            group, add, delete, sub = av
            inner = _emit(sub, (flags | add) & ~delete)
            out.append(f"({inner})" if group is not None else f"(?:{inner})")
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, sub = av
            count = f"{{{lo},}}" if hi == _c.MAXREPEAT else f"{{{lo},{hi}}}"
            lazy = "?" if op is _c.MIN_REPEAT else ""
            out.append(f"(?:{_emit(sub, flags)}){count}{lazy}")
        else:
            raise _Refused(f"{str(op).lower()} is not supported")
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _compile(expression: str) -> tuple[Any, dict[str, int]]:
    """Parse ``expression`` as Python does and compile it with RE2.

    Raises:
        _Refused: a construct RE2 cannot run (message says which).
        re.error / RecursionError / OverflowError: not a valid Python expression.
    """
    with warnings.catch_warnings():  # "Possible nested set": no warning lines on the CLI
        warnings.simplefilter("ignore")
        parsed = _parser.parse(expression, 0)
    text = _emit(parsed.data, parsed.state.flags)
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 64 << 20
    try:
        return re2.compile(text, options), dict(parsed.state.groupdict)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else ""
        detail = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
        raise _Refused(f"RE2 refuses it: {detail[:_SHOWN]}") from None


def linear_regex(expression: str, pattern: str, field: str,
                 source: str = "adapter_config.json: ") -> tuple[Any, dict[str, int]]:
    """Compile ``expression`` (built from the untrusted ``pattern``) for linear-time matching.

    Args:
        expression: The full expression PEFT would match with (``pattern`` spliced in).
        pattern: The untrusted part, quoted (cut) in messages.
        field: The config field it came from, for messages.
        source: Message prefix naming the file.

    Returns:
        ``(compiled RE2 regex, {group name: group index})``.

    Raises:
        BadInputError: Too long, not a valid Python pattern, or not runnable in linear time.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        raise BadInputError(
            f"{source}{field} pattern {show(pattern)} is longer than "
            f"{MAX_PATTERN_CHARS} characters", fix=_FIX)
    try:
        return _compile(expression)
    except _Refused as exc:
        raise BadInputError(
            f"{source}{field} pattern {show(pattern)} cannot be matched in "
            f"linear time ({exc})", fix=_FIX) from None
    except (_c.error, RecursionError, OverflowError, ValueError) as exc:
        raise BadInputError(
            f"{source}{field} pattern {show(pattern)} is not a valid pattern "
            f"({str(exc)[:_SHOWN]})", fix=f"fix {field} in adapter_config.json") from None


def check_module_name(name: str) -> str:
    """Return ``name`` if it holds no control characters or lone surrogates.

    Raises:
        BadInputError: It does.
    """
    if any(ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        raise BadInputError(f"module name {show(name)} contains control characters",
                            fix="save the adapter with PeftModel.save_pretrained")
    return name
