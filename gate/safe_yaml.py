"""Load an untrusted YAML file in bounded time and memory.

``yaml.safe_load`` refuses arbitrary Python objects but not resource exhaustion: a
470-byte "billion laughs" document (anchors whose aliases reference each other nine
levels deep) expands into ~10^9 nodes, which took 38 s and 3.1 GB before a
``MemoryError`` (issue 11 item 8). This loader bounds all three ways a document can
grow:

* size: at most ``max_bytes`` are read (one byte more is read to tell), before parsing;
* expansion: PyYAML's composer shares an anchored node between its aliases, but every
  consumer (validation, ``repr``, canonical JSON) walks it once per reference. The loader
  counts nodes as a consumer would see them, an alias costing the expanded size of what
  it names, and refuses the document past ``max_nodes`` (100 000; a policy has a few
  dozen). Ordinary aliases still load: ``yaml.safe_dump`` writes them for a list used
  twice. The bomb is refused at its sixth level, after composing a few hundred nodes;
* depth: collections nested deeper than ``max_depth`` are refused while composing (so
  PyYAML's recursive composer and constructor cannot overflow the stack), and so is a
  tree that gets deeper than that through aliases.

Numbers in scientific notation without a dot (``1e-3``) are numbers, as in YAML 1.2
(PyYAML would make them strings). A mapping that gives one key twice is refused too (PyYAML keeps the last silently, so
the value a reviewer reads first would not be the one used).

Every failure is a one-line :class:`~registry.errors.BadInputError` (exit 2) whose text
is cut to 200 characters; nothing of the document is ``repr``-ed unbounded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from registry.errors import BadInputError

_SHOWN = 200


class _Refused(Exception):
    """The document breaks a bound; ``str(exc)`` says which, ``fix`` (if set) how to mend it."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that bounds the expanded size and height of the document.

    Every composed node costs 1, and an alias costs the expanded size of the node it
    names (computed when that node was composed), so the total is the size of the tree
    a consumer walking the document would see; the same for the height.
    """

    def __init__(self, stream: str, max_depth: int, max_nodes: int) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._max_depth = max_depth
        self._max_nodes = max_nodes
        self._size: dict[int, int] = {}
        self._height: dict[int, int] = {}

    def _charge(self, cost: int) -> None:
        self._nodes += cost
        if self._nodes > self._max_nodes:
            line = self.peek_event().start_mark.line + 1 if self.peek_event() else "?"
            raise _Refused(f"expands to more than {self._max_nodes} nodes (through YAML "
                           f"aliases or plain size) at line {line}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            line = self.peek_event().start_mark.line + 1
            node = super().compose_node(parent, index)
            if id(node) not in self._size:  # `&a [*a]`: a cycle every consumer loops on
                raise _Refused(f"has a recursive YAML alias at line {line}")
            self._charge(self._size[id(node)])
            return node
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise _Refused(f"nests deeper than {self._max_depth} levels at line "
                               f"{self.peek_event().start_mark.line + 1}")
            before = self._nodes
            self._charge(1)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        height = 1 + max((self._height.get(id(c), 1) for c in children), default=0)
        if height > self._max_depth:
            raise _Refused(f"nests deeper than {self._max_depth} levels through YAML aliases "
                           f"(line {node.start_mark.line + 1})")
        self._size[id(node)] = self._nodes - before
        self._height[id(node)] = height
        return node


    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # PyYAML keeps the last of two equal keys: a reviewer reading `max: 2` at the top
        # of a check would not see the `max: 1e9` below it
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` then an explicit key is YAML's own override
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the base constructor refuses it
                    continue
                if duplicate:
                    raise _Refused(f"has the key {_cut(repr(key))} twice in one mapping "
                                   f"(line {key_node.start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 reads `1e-3` as a number; PyYAML (YAML 1.1) as the string "1e-3" unless it has a
# dot and a signed exponent. Policies and search spaces are written by people: take both.
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _encodable(document: Any) -> Any:
    """``document``, after checking every string in it (keys too) encodes as UTF-8.

    YAML's ``"\\ud800"`` escape makes a lone UTF-16 surrogate: no tokenizer, file name or
    digest can take it, so it is refused here, once for every field.

    Raises:
        _Refused: A string holds a lone surrogate.
    """
    todo = [document]
    while todo:  # iterative: depth is bounded already, but no recursion is simpler still
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused("holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                               f"without its pair) in {_cut(repr(item))}",
                               fix="write the character itself, or its full surrogate pair") from None
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return document


def _cut(text: str) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= _SHOWN else line[: _SHOWN - 3] + "..."


def _read(path: Path, what: str, max_bytes: int) -> str:
    if not path.is_file():
        state = "is not a regular file" if path.exists() else "not found"
        raise BadInputError(f"{what} file {_cut(str(path))} {state}",
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


def load_yaml(path: str | os.PathLike[str], *, what: str = "policy", max_bytes: int = 1 << 20,
              max_depth: int = 32, max_nodes: int = 100_000, fix: str | None = None) -> Any:
    """Parse a YAML (or JSON) file with the bounds in the module docstring.

    Args:
        path: The file.
        what: What the file is, for messages (``policy``).
        max_bytes: Largest file accepted.
        max_depth: Deepest nesting of collections accepted (aliases expanded).
        max_nodes: Most nodes accepted, aliases counted as the nodes they expand to.
        fix: The fix line for a document that does not parse.

    Returns:
        The parsed document (plain dicts, lists and scalars).

    Raises:
        BadInputError: missing or not a regular file, too large, not UTF-8, not valid
            YAML (a control character included), expands to too many nodes, nests too
            deeply, or holds a string with a lone UTF-16 surrogate.
    """
    path = Path(path)
    text = _read(path, what, max_bytes)
    loader = None
    try:
        # the reader refuses control characters as it is built: inside the try
        loader = _BoundedLoader(text, max_depth, max_nodes)
        return _encodable(loader.get_single_data())
    except _Refused as err:
        raise BadInputError(_cut(f"{what} {path} {err}"),
                            fix=err.fix or f"a {what} has at most {max_nodes} nodes and {max_depth} "
                                f"levels of nesting, aliases (*name) expanded") from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:
        raise BadInputError(_cut(f"{what} {path} is not valid YAML: {_cut(str(err))}"),
                            fix=fix) from None
    finally:
        if loader is not None:
            loader.dispose()
