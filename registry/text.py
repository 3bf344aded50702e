"""Showing untrusted text safely: control characters escaped, values bounded.

Shared by the CLI's output sink (:mod:`cli.output`) and the gate's reports
(:mod:`gate.report`), which must not import the CLI. A label, a path or a message may
hold ESC sequences (repaint a terminal), CR or LF (forge a second ``fix:`` line) or
bidi overrides (reorder what is shown); :func:`escape_control` shows each as an escape
(``\\x1b``, ``\\n``, ``\\u202e``), so one value is always one visible line.
"""

from __future__ import annotations

import re

# C0, DEL, C1, the Unicode line/paragraph separators and the bidi overrides/isolates
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e"
                                  "\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with control characters shown as escapes (ESC -> ``\\x1b``, LF -> ``\\n``).

    Args:
        text: Any string (a label, a path, an error message).
        keep_newlines: Leave ``\\n`` alone (for the command's own multi-line templates).
    """
    pattern = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(_escaped, text)


__all__ = ["escape_control"]
