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
        """The format's suffix (``.jsonl`` or not), from the path **as written**: the digest
        binds that path, not where a symlink happens to point."""
        return PurePath(self.written).suffix if self.written else self.path.suffix

    def read_text(self, encoding: str = "utf-8") -> str:
        """The bytes decoded (``UnicodeDecodeError`` as ``Path.read_text`` raises it)."""
        return self.data.decode(encoding)

    def __str__(self) -> str:
        return str(self.path)


def _source(path: Path | DataFile) -> Path | DataFile:
    return path if isinstance(path, DataFile) else Path(path)


def read_texts(path: Path | DataFile, *, field: str = "text", limit: int | None = None) -> list[str]:
    """Documents of a held-out file: JSONL ``{field: str}`` lines, or blank-line separated text.

    Args:
        path: A file, or a policy's :class:`gate.policy.DataFile` (its hashed bytes).
        field: The JSONL field holding the text.
        limit: Keep the first ``limit`` documents.

    Raises:
        BadInputError: Unreadable file, a bad JSONL line, or no documents.
    """
    source = _source(path)
    try:
        raw = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"cannot read {path}: {err}", fix="pass a UTF-8 text or JSONL file") from None
    if source.suffix == ".jsonl":
        texts = [_jsonl_row(line, n, path, (field,))[field]
                 for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    else:
        texts = [block.strip() for block in raw.split("\n\n") if block.strip()]
    if not texts:
        raise BadInputError(f"{path} holds no text", fix="add at least one document")
    return texts[:limit] if limit else texts


def read_pairs(path: Path | DataFile, *, limit: int | None = None) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs of a JSONL eval set (a file or a policy's :class:`DataFile`).

    Raises:
        BadInputError: Unreadable file, a line without string prompt/answer, or no rows.
    """
    try:
        lines = _source(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"cannot read {path}: {err}", fix="pass a UTF-8 JSONL file") from None
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
