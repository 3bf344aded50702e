"""Load an untrusted YAML file in bounded time and memory.

``yaml.safe_load`` refuses arbitrary Python objects but not resource exhaustion: a
470-byte "billion laughs" document (anchors whose aliases reference each other nine
levels deep) expands into ~10^9 nodes, which took 38 s and 3.1 GB before a
``MemoryError`` (issue 11 item 8). This loader bounds all three ways a document can
grow:

* size: at most ``max_bytes`` are read (one byte more is read to tell), before parsing;
* aliases: refused outright, at the first ``*name`` (PyYAML's composer would share the
  anchored node, but the constructor and every consumer walk it once per reference);
  a gate policy never needs them;
* depth: collections nested deeper than ``max_depth`` are refused while composing, so
  PyYAML's recursive composer and constructor cannot overflow the stack.

Every failure is a one-line :class:`~registry.errors.BadInputError` (exit 2) whose text
is cut to 200 characters; nothing of the document is ``repr``-ed unbounded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from registry.errors import BadInputError

_SHOWN = 200


class _Refused(Exception):
    """The document breaks a bound; ``str(exc)`` says which."""


class _BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]
    """``SafeLoader`` that refuses aliases and nesting deeper than ``max_depth``."""

    def __init__(self, stream: str, max_depth: int) -> None:
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"uses a YAML alias (*{str(event.anchor)[:40]}) at line "
                           f"{event.start_mark.line + 1}; aliases are not allowed")
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                mark = self.peek_event().start_mark
                raise _Refused(f"nests deeper than {self._max_depth} levels at line "
                               f"{mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _cut(text: str) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= _SHOWN else line[: _SHOWN - 3] + "..."


def _read(path: Path, what: str, max_bytes: int) -> str:
    if not path.is_file():
        raise BadInputError(f"{what} file {_cut(str(path))} not found",
                            fix=f"pass --{what} FILE naming a regular file")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadInputError(f"{what} {_cut(str(path))} is larger than {max_bytes} bytes",
                            fix=f"a {what} is a short YAML file; check you passed the right one")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(f"{what} {_cut(str(path))} is not UTF-8 text ({_cut(str(err))})",
                            fix=f"save the {what} as UTF-8") from None


def load_yaml(path: str | os.PathLike[str], *, what: str = "policy",
              max_bytes: int = 1 << 20, max_depth: int = 32, fix: str | None = None) -> Any:
    """Parse a YAML (or JSON) file with the bounds in the module docstring.

    Args:
        path: The file.
        what: What the file is, for messages (``policy``).
        max_bytes: Largest file accepted.
        max_depth: Deepest nesting of collections accepted.
        fix: The fix line for a document that does not parse.

    Returns:
        The parsed document (plain dicts, lists and scalars).

    Raises:
        BadInputError: missing or not a regular file, too large, not UTF-8, not valid
            YAML, uses an alias, or nests too deeply.
    """
    path = Path(path)
    text = _read(path, what, max_bytes)
    loader = _BoundedLoader(text, max_depth)
    try:
        return loader.get_single_data()
    except _Refused as err:
        raise BadInputError(_cut(f"{what} {path} {err}"),
                            fix=f"write the {what} out in full: no YAML aliases (*name), "
                                f"at most {max_depth} levels of nesting") from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:
        raise BadInputError(_cut(f"{what} {path} is not valid YAML: {_cut(str(err))}"),
                            fix=fix) from None
    finally:
        loader.dispose()
