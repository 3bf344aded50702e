"""A policy's eval data: the bytes hashed into its digest, and how checks read them.

:class:`DataFile` is a data file as it was read once, when the policy was loaded
(:func:`gate.policy.load_policy`): the digest covers these bytes, the checks read these
bytes, and the file is never read by path again. :func:`read_texts` (held-out text: JSONL
``{field: str}`` lines or blank-line separated documents) and :func:`read_pairs` (JSONL
``{"prompt", "answer"}``) parse a ``DataFile`` or a path; a malformed line raises
BadInputError naming the file and line, so the policy loader refuses a bad data file
before anything is evaluated (exit 2), not as a check error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from registry.errors import BadInputError
from registry.formats.strict_json import loads_json


@dataclass(frozen=True)
class DataFile:
    """A data file of a policy as it was hashed: where it was read, and its bytes.

    The policy digest covers these bytes, and the checks evaluate these bytes; the file
    is never read again by path, so a file swapped while a gate runs (after the policy
    was loaded, before a check reads its data) cannot be evaluated under the digest of
    the original.
    """

    path: Path
    data: bytes = field(repr=False)
    written: str = ""
    """The path as the policy writes it (hashed into the policy digest)."""

    @property
    def suffix(self) -> str:
        """The format's suffix (``.jsonl``, ``.ndjson`` or not), from the path **as written**:
        the digest binds that path, not where a symlink happens to point."""
        return PurePath(self.written).suffix if self.written else self.path.suffix

    def read_text(self, encoding: str = "utf-8") -> str:
        """The bytes decoded (``UnicodeDecodeError`` as ``Path.read_text`` raises it)."""
        return self.data.decode(encoding)

    def __str__(self) -> str:
        return str(self.path)


JSONL_SUFFIXES = (".jsonl", ".ndjson")
"""Suffixes (any case) of JSONL files; any other file of held-out text is plain text."""


def _source(path: Path | DataFile) -> Path | DataFile:
    return path if isinstance(path, DataFile) else Path(path)


def is_jsonl(path: Path | DataFile) -> bool:
    """Whether ``path`` is read as JSONL (its suffix as written, any case: ``.jsonl``, ``.ndjson``)."""
    return _source(path).suffix.lower() in JSONL_SUFFIXES


def _lines(path: Path | DataFile, fix: str) -> list[str]:
    r"""The file's text split into lines on ``\n``, ``\r\n`` or ``\r`` only, a leading BOM dropped.

    ``str.splitlines`` would also split inside a JSON string at U+2028, U+0085 or a form
    feed (valid unescaped in JSON), and a CRLF file's blank line is ``\r\n\r\n``, which
    a split on ``\n\n`` does not see (one document instead of many).

    Raises:
        BadInputError: Unreadable or not UTF-8.
    """
    try:
        raw = _source(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"cannot read {path}: {err}", fix=fix) from None
    return raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_texts(path: Path | DataFile, *, field: str = "text", limit: int | None = None) -> list[str]:
    """Documents of a held-out file: JSONL ``{field: str}`` lines (``.jsonl``/``.ndjson``),
    or plain text whose documents are separated by blank lines.

    Blank documents (and JSONL rows whose text is blank) are skipped, in both formats.

    Args:
        path: A file, or a policy's :class:`gate.policy.DataFile` (its hashed bytes).
        field: The JSONL field holding the text.
        limit: Keep the first ``limit`` documents.

    Raises:
        BadInputError: Unreadable file, a ``.json`` file (one JSON document is neither
            format), a bad JSONL line, or no documents.
    """
    if _source(path).suffix.lower() == ".json":
        raise BadInputError(f"{path} is a .json file: held-out text is JSONL (one object per "
                            "line, .jsonl) or plain text", fix="rename it .jsonl if it is JSONL")
    lines = _lines(path, "pass a UTF-8 text or JSONL file")
    if is_jsonl(path):
        texts = [_jsonl_row(line, n, path, (field,))[field]
                 for n, line in enumerate(lines, 1) if line.strip()]
        texts = [text for text in texts if text.strip()]
    else:  # documents are separated by an empty line, as before CRLF was normalised
        texts = [block.strip() for block in "\n".join(lines).split("\n\n") if block.strip()]
    if not texts:
        raise BadInputError(f"{path} holds no text", fix="add at least one document")
    return texts[:limit] if limit else texts


def read_pairs(path: Path | DataFile, *, limit: int | None = None) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs of a JSONL eval set (a file or a policy's :class:`DataFile`).

    Raises:
        BadInputError: Unreadable file, a line without string prompt/answer, or no rows.
    """
    lines = _lines(path, "pass a UTF-8 JSONL file")
    rows = [_jsonl_row(line, n, path, ("prompt", "answer"))
            for n, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise BadInputError(f"{path} holds no prompt/answer pairs", fix="add JSONL rows")
    pairs = [(r["prompt"], r["answer"]) for r in rows]
    return pairs[:limit] if limit else pairs


def _jsonl_row(line: str, number: int, path: Path | DataFile, keys: Sequence[str]) -> dict[str, Any]:
    try:
        row = loads_json(line)
    except ValueError:
        raise BadInputError(f"{path}:{number}: not valid JSON", fix="one JSON object per line") from None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in keys):
        raise BadInputError(f"{path}:{number}: needs string field(s) {', '.join(keys)}",
                            fix="one JSON object per line, e.g. " + json.dumps({k: "..." for k in keys}))
    for key in keys:  # JSON's "\ud800" escape makes a string no tokenizer can encode
        try:
            row[key].encode("utf-8")
        except UnicodeEncodeError:
            raise BadInputError(f"{path}:{number}: field {key} holds a lone UTF-16 surrogate "
                                "(a \\ud800-\\udfff escape without its pair)",
                                fix="write the character itself, or its full surrogate pair") from None
    return row
