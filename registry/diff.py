"""What differs between two versions: their records, field by field, and their files.

One use case behind ``adapters diff`` and the web view's diff page (and ``/api/diff``),
so both show the same document. Records are compared flattened (``{"a": {"b": 1}}`` ->
``{"a.b": 1}``, lists kept as values, empty objects dropped); files by path and digest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.storage.reader import StoreReader


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1}``; lists stay values, empty objects go."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def diff_versions(store: StoreReader, ref_a: str, ref_b: str) -> dict[str, Any]:
    """The ``adapters diff REF1 REF2 --json`` document.

    Returns:
        ``{"a", "b"}`` (refs), ``same`` (equal digests), ``record`` (one
        ``{"key", "a", "b"}`` per differing flattened field, sorted) and ``files`` (one
        ``{"path", "status": added|removed|same|changed, "a", "b"}`` per path, sorted).

    Raises:
        NotFoundError / BadInputError / IntegrityError: As :meth:`Store.resolve`.
    """
    a, b = store.resolve(ref_a), store.resolve(ref_b)
    rec_a, rec_b = flatten(a.record), flatten(b.record)
    record = [{"key": k, "a": rec_a.get(k), "b": rec_b.get(k)}
              for k in sorted(rec_a.keys() | rec_b.keys()) if rec_a.get(k) != rec_b.get(k)]
    files_a = {f["path"]: f for f in a.files}
    files_b = {f["path"]: f for f in b.files}
    files = []
    for path in sorted(files_a.keys() | files_b.keys()):
        fa, fb = files_a.get(path), files_b.get(path)
        status = ("added" if fa is None else "removed" if fb is None
                  else "same" if fa["digest"] == fb["digest"] else "changed")
        files.append({"path": path, "status": status,
                      "a": fa and fa["digest"], "b": fb and fb["digest"]})
    return {"a": a.ref, "b": b.ref, "same": a.digest == b.digest, "record": record,
            "files": files}


__all__ = ["diff_versions", "flatten"]
