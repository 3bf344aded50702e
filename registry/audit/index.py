"""The audit log read back as an index: which entry vouches for what the store holds.

The write protocol (:mod:`registry.audit.journal`) logs every change before making it, so
everything visible in the store must be explained by an *effective* audit entry (one
that no ``recover`` entry rolled back):

* every name binding ``names/<n>/versions/<hex>`` by a ``push`` of ``n@sha256:<hex>``;
* every alias's current target by the newest ``alias``/``promote``/``promote-forced``
  entry of ``n:alias`` (its ``new``), or, while that entry's intent marker is still
  pending, by its ``old`` (written but not yet applied);
* every gate pointer ``gates/<c>/<p>`` by the newest ``gate`` entry of candidate ``c``
  under policy ``p`` (its ``new.record``), likewise for signature pointers.

:func:`cross_check` lists whatever is not explained (``adapters verify --all`` reports
each as ``unaudited``, exit 3): a binding added by hand, an alias file edited, a gate
record copied from another version, a binding whose time contradicts the log
(:mod:`registry.audit.binding_times`). :func:`missing_from_store` is the reverse: what the
log records and the store no longer holds (``removed``: a binding, alias, gate record or
signature deleted by hand). :func:`gate_record_problem` is what ``promote`` and the web view ask of a
stored gate record: is it bound to its candidate and policy, and vouched for by the log?
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from registry.audit.binding_times import binding_time_problems
from registry.audit.journal import ALIAS_ACTIONS, RECOVER, read_markers, written_after
from registry.audit.report import AUDIT_FIX
from registry.errors import AdapterkitError, IntegrityError

if TYPE_CHECKING:
    from registry.storage.reader import StoreReader


@dataclass(frozen=True)
class Unexplained:
    """Something the store holds that no effective audit entry explains."""

    what: str
    key: str
    digest: str
    detail: str


@dataclass
class AuditIndex:
    """Effective entries of one audit log, keyed by what they changed.

    Attributes:
        pushes: ``name@digest`` subjects with an effective push.
        push_seqs: Each of those subjects -> the seq of its newest push entry.
        push_entries: Each of those subjects -> its newest push entry.
        aliases: ``name:alias`` -> its newest effective move entry.
        gates: ``(candidate, policy)`` -> newest effective gate entry.
        signatures: ``(version, keyid)`` -> newest effective sign entry.
        pending: Seqs of entries whose intent marker is still present.
        pending_deletes: ``name@digest`` subjects of such entries that delete (maybe applied).
        forged_markers: Keys of markers no dead writer can have left (local stores: their
            entry is followed by later writes); they excuse nothing.
        malformed_markers: Keys of markers that are not well-formed intents (written by
            hand); skipped by every writer.
    """

    pushes: set[str] = field(default_factory=set)
    push_seqs: dict[str, int] = field(default_factory=dict)
    push_entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, dict[str, Any]] = field(default_factory=dict)
    gates: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    signatures: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)
    pending_deletes: set[str] = field(default_factory=set)
    forged_markers: list[str] = field(default_factory=list)
    malformed_markers: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, store: StoreReader) -> AuditIndex:
        """Read the whole log (and the pending markers) of ``store``, once its chain verifies.

        An entry vouches for something only inside an intact chain: a line inserted or
        edited mid-log (with any hash) must not vouch for a gate record, so a log that
        ``adapters audit verify`` rejects vouches for nothing.

        Raises:
            IntegrityError: The log fails its hash-chain check or cannot be parsed
                (``adapters audit verify`` lists every problem).
        """
        trail = store.audit()
        report = trail.verify()
        if not report.ok:
            first = report.problems[0]
            where = f"log line {first.line}" if first.line else "head.json"
            raise IntegrityError(f"the audit log fails its hash-chain check ({where}: "
                                 f"{first.message}), so no entry of it is trusted",
                                 fix="run `adapters audit verify`; " + AUDIT_FIX)
        entries = [e for e in trail.entries() if isinstance(e, dict)]
        rolled_back = {(e.get("old") or {}).get("seq") for e in entries
                       if e.get("action") == RECOVER and isinstance(e.get("old"), dict)
                       and (e.get("new") or {}).get("outcome") == "rolled_back"}
        index = cls()
        intents, index.malformed_markers = read_markers(store)
        for at, entry in enumerate(entries):
            if entry.get("seq") in rolled_back:
                continue
            marker = next((i for i in intents if i.matches(entry)), None)
            if marker is not None and written_after(store, entry, entries[at + 1:]):
                index.forged_markers.append(marker.key)  # excuses nothing (journal.written_after)
                marker = None
            if marker is not None:
                index.pending.add(entry["seq"])
                if entry.get("action") == "delete":
                    index.pending_deletes.add(str(entry.get("subject")))
                    continue  # logged, maybe not applied: the push still explains the binding
            index._add(entry)
        return index

    def _add(self, entry: dict[str, Any]) -> None:
        action, subject, new = entry.get("action"), str(entry.get("subject")), entry.get("new")
        if action == "push":
            self.pushes.add(subject)
            self.push_seqs[subject] = entry.get("seq", -1)
            self.push_entries[subject] = entry
        elif action == "delete":
            self.pushes.discard(subject)
        elif action in ALIAS_ACTIONS:
            self.aliases[subject] = entry
        elif action in ("gate", "sign") and isinstance(new, dict):
            digest = subject.rpartition("@")[2]
            if action == "gate":
                self.gates[(digest, str(new.get("policy")))] = entry
            else:
                self.signatures[(digest, str(new.get("keyid")))] = entry

    def explains(self, entry: dict[str, Any] | None, value: str | None, target: str) -> bool:
        """Whether ``entry`` (newest for a ref) explains the ref holding ``value``;
        ``target`` is the key of ``entry["new"]`` that holds the value ('' = new itself)."""
        if entry is None:
            return False
        new = entry.get("new")
        written = new.get(target) if target and isinstance(new, dict) else new
        if written == value:
            return True
        old = entry.get("old")
        return entry.get("seq") in self.pending and old == value


def cross_check(store: StoreReader, index: AuditIndex | None = None, *,
                version: tuple[str, str] | None = None, times: bool = True) -> list[Unexplained]:
    """Everything in ``store`` that its audit log does not explain (see module docstring).

    Args:
        store: The store.
        index: Its :class:`AuditIndex`, if already built.
        version: ``(name, digest)``: only what concerns that version (its binding, the
            aliases of its name that point at it, its gate records and signatures).
        times: Also check binding times against the log
            (:mod:`registry.audit.binding_times`; not what gc's reachability needs).

    Raises:
        IntegrityError: The log cannot be parsed or fails its chain check.
    """
    index = index or AuditIndex.build(store)
    name_of, digest_of = version or (None, None)
    out = []
    for name, digest in [version] if version else store.bindings():
        if f"{name}@{digest}" not in index.pushes:
            out.append(Unexplained("version", f"names/{name}/versions/{digest[7:]}", digest,
                                   "no audit entry records the push of this version"))
    for name in [name_of] if name_of else store.names():
        for alias, digest in store.aliases(name).items():
            if digest_of and digest != digest_of:
                continue
            if not index.explains(index.aliases.get(f"{name}:{alias}"), digest, ""):
                out.append(Unexplained("alias", f"{name}:{alias}", digest,
                                       "the audit log does not record a move of the alias "
                                       "to this version"))
    for cand, policy, record in store.gate_pointers():
        if digest_of and cand != digest_of:
            continue
        if not index.explains(index.gates.get((cand, policy)), record, "record"):
            out.append(Unexplained("gate", f"gates/{cand[7:19]}../{policy[7:19]}..", record,
                                   "no audit entry vouches for this gate record"))
    for signed, keyid, envelope in store.signature_pointers(digest_of):
        if not index.explains(index.signatures.get((signed, keyid)), envelope, "envelope"):
            out.append(Unexplained("signature", f"signatures/{signed[7:19]}../{keyid[7:19]}..",
                                   envelope, "no audit entry records this signature"))
    if times:
        out += [Unexplained("version", key, digest, detail) for key, digest, detail in
                binding_time_problems(store, index.push_entries,
                                      [name_of] if name_of else store.names())
                if not digest_of or digest == digest_of]
    if version is None:
        out += [Unexplained("marker", key, "", "this intent marker names an audit entry that later "
                            "writes followed: no dead writer leaves that") for key in index.forged_markers]
        out += [Unexplained("marker", key, "", "this intent marker is not a well-formed intent "
                            "(writers write them whole): written by hand?")
                for key in index.malformed_markers]
    return out


def missing_from_store(store: StoreReader, index: AuditIndex | None = None, *,
                       version: tuple[str, str] | None = None) -> list[Unexplained]:
    """What the audit log says the store holds and it does not: the reverse of
    :func:`cross_check`. A file removed by hand is as much a change behind the log's back
    as one added by hand.

    * a version whose push is effective and never deleted must be bound;
    * an alias whose newest effective move set a target must exist (``alias rm`` logs a
      move to nothing);
    * a gate record or signature pointer whose newest effective entry set it must exist,
      while its version is bound (gc keeps pointers; a deleted version's may go).

    Entries whose intent marker is still pending are skipped (logged, maybe not applied).
    ``version``: ``(name, digest)``, only what concerns that version.

    Raises:
        IntegrityError: The log cannot be parsed or fails its chain check.
    """
    index = index or AuditIndex.build(store)
    name_of, digest_of = version or (None, None)
    out = []
    bound = set(store.bindings())
    for subject in sorted(index.pushes):
        name, _, digest = subject.rpartition("@")
        if digest_of and digest != digest_of:
            continue
        if (name, digest) not in bound and index.push_seqs.get(subject) not in index.pending \
                and subject not in index.pending_deletes:
            out.append(Unexplained("version", f"names/{name}/versions/{digest[7:]}", digest,
                                   "the audit log records the push of this version, but it is "
                                   "not bound (removed behind the log's back?)"))
    named = {name for name, _ in bound}
    held_aliases: dict[str, dict[str, str]] = {}  # one listing per name, not per entry
    for subject, entry in sorted(index.aliases.items()):
        new, name, _, alias = entry.get("new"), *subject.rpartition(":")
        if entry.get("seq") in index.pending or not isinstance(new, str) or (
                digest_of and (name != name_of or new != digest_of)):
            continue
        if name not in held_aliases:
            held_aliases[name] = store.aliases(name) if name in named else {}
        if alias not in held_aliases[name]:
            out.append(Unexplained("alias", subject, new, "the audit log records this alias's "
                                   "move here, but the alias is gone (removed behind the log's "
                                   "back?)"))
    live = {digest for _, digest in bound}
    held = {(c, p) for c, p, _ in store.gate_pointers()} | {
        (v, k) for v, k, _ in store.signature_pointers()}
    for kind, entries, field_name in (("gate", index.gates, "record"),
                                      ("signature", index.signatures, "envelope")):
        for (digest, other), entry in sorted(entries.items()):
            value = (entry.get("new") or {}).get(field_name)
            if entry.get("seq") in index.pending or digest not in live or not value or (
                    digest_of and digest != digest_of):
                continue
            if (digest, other) not in held:
                out.append(Unexplained(kind, f"{kind}s/{digest[7:19]}../{other[7:19]}..", value,
                                       f"the audit log records this {kind}, but it is gone "
                                       "(removed behind the log's back?)"))
    return out


def gate_record_problem(index: AuditIndex, candidate: str, policy: str, record: object,
                        pointer: str | None) -> str | None:
    """Why the gate record stored under ``gates/<candidate>/<policy>`` is not to be trusted
    (None: it is). ``record`` is the parsed blob, ``pointer`` its digest.

    Returns:
        ``"unreadable"`` (not a JSON object), ``"copied"`` (it names another candidate or
        policy), ``"unvouched"`` (no effective, applied audit entry names this record), or
        None.
    """
    if not isinstance(record, dict):
        return "unreadable"
    if record.get("candidate_digest") != candidate or record.get("policy_digest") != policy:
        return "copied"
    entry = index.gates.get((candidate, policy))
    if entry is None or entry.get("seq") in index.pending or \
            (entry.get("new") or {}).get("record") != pointer:
        return "unvouched"
    return None


class GateVouching:
    """The audit log's word on gate records for one reader: the index is read once, and
    only when a record is asked about (a store without gate records reads no log).

    Args:
        store: The store.
        provide: Gives an already kept index (a long-running reader's), else the log is
            read here.
    """

    def __init__(self, store: StoreReader,
                 provide: Callable[[], AuditIndex] | None = None) -> None:
        self.store, self.provide = store, provide
        self.index: AuditIndex | None = None
        self.broken = ""

    def problem(self, candidate: str, policy: str, record: object,
                pointer: str | None) -> str | None:
        """Why the record is not to be trusted, as a sentence (None: it is): it is
        unreadable, copied, not vouched for, or the log fails its chain check."""
        if self.index is None and not self.broken:
            try:
                self.index = self.provide() if self.provide else AuditIndex.build(self.store)
            except AdapterkitError as err:
                self.broken = err.message
        if self.index is None:
            return self.broken
        kind = gate_record_problem(self.index, candidate, policy, record, pointer)
        return GATE_PROBLEMS[kind] if kind else None


GATE_PROBLEMS = {
    "unreadable": "the gate record is not a JSON object",
    "copied": "the gate record names another version or policy (copied?)",
    "unvouched": "no audit entry vouches for this gate record (written outside adapterkit?)",
}
"""A sentence for each :func:`gate_record_problem` answer."""


__all__ = ["GATE_PROBLEMS", "AuditIndex", "GateVouching", "Unexplained", "cross_check",
           "gate_record_problem"]
