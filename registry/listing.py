"""A paginated, filterable listing of a store's names (what the web view's index shows).

:meth:`registry.storage.reader.StoreReader.versions` loads every manifest of the store,
which is what ``adapters ls`` wants and what a page of 50 names out of 10,000
versions cannot afford. :func:`list_names` reads only what one page needs, without
changing the store format:

1. one ``list("names/")`` gives every binding and alias key (keys only, no reads);
   names are sorted and filtered by the ``query`` substring right there;
2. one ``list("gates/")`` gives every gate pointer key, so gate records are read
   only for versions on the page;
3. for each name on the page: its bindings' times (the newest version), the newest
   manifest (re-hashed, as always), its aliases and its gate records.

A ``label`` or ``base_model`` filter needs each name's newest manifest, so the scan
goes on, in name order, until the page is full plus one more (``has_more``); the
total is then unknown (``total`` None). Without them ``total`` is exact.

A name whose newest manifest or gate record cannot be read is still listed, with
the failure in :attr:`NameSummary.error`: a damaged store renders, it does not crash.
Every read goes through the backend, so local and S3 stores list the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from registry.digests import DIGEST_PREFIX, HEX_RE
from registry.errors import AdapterkitError, BadInputError
from registry.storage.refs import SEGMENT_RE, is_valid_name
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from registry.storage.reader import StoreReader
    from registry.audit.index import AuditIndex, GateVouching

MAX_PAGE = 500
"""Largest page size :func:`list_names` accepts."""


@dataclass(frozen=True)
class GateSummary:
    """The newest gate record of a name (over all its versions).

    Attributes:
        candidate: Version digest the record is for.
        policy: Policy digest.
        passed: The verdict.
        date: When the gate ran (``meta.started``), or "" if the record has none.
        record: Digest of the gate-record blob.
    """

    candidate: str
    policy: str
    passed: bool
    date: str
    record: str

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class NameSummary:
    """One row of the index.

    Attributes:
        name: The name.
        digest: Its newest version's digest.
        created: When that version was bound.
        versions: How many versions the name has.
        aliases: ``alias -> digest`` (sorted).
        kind: ``adapter`` or ``model`` (None when the manifest is unreadable).
        base_model: The newest version's ``record.base_model.id``.
        labels: The newest version's labels.
        gate: The newest gate record of any of its versions, if any.
        error: Why part of the row could not be read ("" when all is well).
    """

    name: str
    digest: str
    created: str
    versions: int
    aliases: dict[str, str] = field(default_factory=dict)
    kind: str | None = None
    base_model: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    gate: GateSummary | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {**self.__dict__, "gate": self.gate.to_json() if self.gate else None}


@dataclass(frozen=True)
class NamePage:
    """One page of :func:`list_names`.

    Attributes:
        items: The rows.
        offset, limit: The window asked for.
        total: Matching names (None when a record filter stopped the scan early).
        has_more: Whether names match past this page.
    """

    items: list[NameSummary]
    offset: int
    limit: int
    total: int | None
    has_more: bool

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"items": [i.to_json() for i in self.items], "offset": self.offset,
                "limit": self.limit, "total": self.total, "has_more": self.has_more}


def _scan_names(store: StoreReader) -> dict[str, tuple[list[str], list[str]]]:
    """``name -> (version hexes, alias keys)`` from one listing of ``names/``."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for key in store.backend.list("names/"):
        parts = key.split("/")
        if len(parts) not in (4, 5) or parts[-2] not in ("versions", "aliases"):
            continue
        name = "/".join(parts[1:-2])
        hexes, aliases = out.setdefault(name, ([], []))
        if parts[-2] == "versions" and HEX_RE.match(parts[-1]):
            hexes.append(parts[-1])
        elif parts[-2] == "aliases" and SEGMENT_RE.match(parts[-1]):
            aliases.append(key)
    return {n: v for n, v in out.items() if v[0] and is_valid_name(n)}


def _gate_index(store: StoreReader) -> dict[str, list[str]]:
    """``candidate hex -> [gate pointer keys]`` from one listing of ``gates/``."""
    out: dict[str, list[str]] = {}
    for key in store.backend.list("gates/"):
        parts = key.split("/")
        if len(parts) == 3 and HEX_RE.match(parts[1]) and HEX_RE.match(parts[2]):
            out.setdefault(parts[1], []).append(key)
    return out


def _newest(store: StoreReader, name: str, hexes: list[str]) -> tuple[str, str]:
    """``(hex, created)`` of the newest binding (same order as ``versions()``)."""
    best = ("", "")
    for hexdigest in hexes:
        try:
            raw = store.backend.get(f"names/{name}/versions/{hexdigest}")[0]
        except Exception:  # noqa: BLE001 - a binding removed since the listing
            continue
        created = raw.decode("utf-8", errors="replace").strip()
        if (created, hexdigest) > (best[1], best[0]):
            best = (hexdigest, created)
    return best


def _gate_summary(store: StoreReader, hexes: list[str], gates: dict[str, list[str]],
                  vouching: GateVouching) -> tuple[GateSummary | None, list[str]]:
    """The newest trusted gate record of any of ``hexes``, and a note for each record left
    out because ``promote`` would not trust it either.

    Raises:
        IntegrityError: A gate record blob is missing or corrupt.
    """
    best: GateSummary | None = None
    notes: list[str] = []
    for hexdigest in hexes:
        for key in gates.get(hexdigest, []):
            record_digest = store.read_pointer(key)
            if record_digest is None:
                continue
            record = loads_json(store.blobs.read_verified(record_digest))
            candidate, policy = DIGEST_PREFIX + hexdigest, DIGEST_PREFIX + key.split("/")[2]
            problem = vouching.problem(candidate, policy, record, record_digest)
            if problem:
                notes.append(f"gate record of {hexdigest[:12]} under {policy[7:19]} ignored: {problem}")
                continue
            meta = record.get("meta")
            date = str(meta.get("started") or "") if isinstance(meta, dict) else ""
            found = GateSummary(candidate, policy, record.get("passed") is True, date, record_digest)
            if best is None or (found.date, found.record) > (best.date, best.record):
                best = found
    return best, notes


def _summary(store: StoreReader, name: str, hexes: list[str], alias_keys: list[str],
             gates: dict[str, list[str]] | None, vouching: GateVouching) -> NameSummary:
    """One row (gate records only when ``gates`` is given); a read failure goes into
    ``error`` instead of raising."""
    hexdigest, created = _newest(store, name, hexes)
    digest = DIGEST_PREFIX + hexdigest
    aliases = {}
    for key in sorted(alias_keys):
        target = store.read_pointer(key)
        if target is not None:
            aliases[key.rsplit("/", 1)[1]] = target
    row: dict[str, Any] = {"name": name, "digest": digest, "created": created,
                           "versions": len(hexes), "aliases": aliases}
    errors = []
    try:
        manifest = store.load_manifest(digest)
        record = manifest.get("record") or {}
        row["kind"] = record.get("kind")
        row["base_model"] = (record.get("base_model") or {}).get("id")
        row["labels"] = dict(record.get("labels") or {})
    except AdapterkitError as err:
        errors.append(err.message)
    if gates is not None:
        try:
            row["gate"], notes = _gate_summary(store, hexes, gates, vouching)
            errors += notes
        except (AdapterkitError, ValueError) as err:
            errors.append(getattr(err, "message", str(err)))
    return NameSummary(**row, error="; ".join(errors))


def _label_match(labels: dict[str, str], wanted: str) -> bool:
    """``key`` (present) or ``key=value`` (equal), case-sensitive."""
    key, sep, value = wanted.partition("=")
    return key in labels and (not sep or labels[key] == value)


def _record_match(row: NameSummary, label: str | None, base_model: str | None) -> bool:
    if label and not _label_match(row.labels, label):
        return False
    if base_model and base_model.lower() not in (row.base_model or "").lower():
        return False
    return True


def _vouching(store: StoreReader, audit: Callable[[], AuditIndex] | None) -> GateVouching:
    from registry.audit.index import GateVouching  # the audit package only when listing

    return GateVouching(store, audit)


def list_names(store: StoreReader, *, query: str | None = None, label: str | None = None,
               base_model: str | None = None, offset: int = 0, limit: int = 50,
               audit: Callable[[], AuditIndex] | None = None) -> NamePage:
    """One page of names with their newest version, aliases and newest gate verdict.

    Args:
        store: The store.
        query: Keep names containing this text (case-insensitive).
        label: Keep names whose newest version has this label (``key`` or ``key=value``).
        base_model: Keep names whose newest version's base model id contains this text
            (case-insensitive).
        offset: Matching names to skip.
        limit: Page size (1 to :data:`MAX_PAGE`).
        audit: Gives the store's audit index, if a long-running reader keeps one (gate
            verdicts count only for records it vouches for).

    Returns:
        A :class:`NamePage` (names sorted).

    Raises:
        BadInputError: A negative offset or a page size out of range.
    """
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise BadInputError(f"bad page window offset={offset} limit={limit}",
                            fix=f"use offset >= 0 and 1 <= limit <= {MAX_PAGE}")
    scanned = _scan_names(store)
    names = sorted(scanned)
    if query:
        names = [n for n in names if query.lower() in n.lower()]
    gates = _gate_index(store)
    vouching = _vouching(store, audit)

    def row(name: str, with_gate: bool = True) -> NameSummary:
        return _summary(store, name, scanned[name][0], scanned[name][1],
                        gates if with_gate else None, vouching)

    if not label and not base_model:
        items = [row(n) for n in names[offset:offset + limit]]
        return NamePage(items, offset, limit, len(names), offset + limit < len(names))
    matched: list[str] = []
    has_more = False
    for name in names:  # filter on the manifests first, read gate records for the page only
        if _record_match(row(name, with_gate=False), label, base_model):
            if len(matched) == offset + limit:
                has_more = True
                break
            matched.append(name)
    items = [row(n) for n in matched[offset:]]
    return NamePage(items, offset, limit, None if has_more else len(matched), has_more)
