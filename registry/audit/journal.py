"""Write-ahead intents: every store mutation is either fully audited or invisible.

A mutation (push, alias move, promote, delete, gate record, signature, gc) goes
through :func:`run_mutation`, in this order, each step durable before the next:

1. an **intent marker** ``audit/pending/<id>`` (create-only) holding the entry to be
   logged and ``after_seq``, the log's tail when the intent was made;
2. the **audit entry** itself (with the marker's timestamp, so the two can be matched);
3. the **change** (binding created, alias or pointer moved by compare-and-swap);
4. the marker is removed.

So at no instant is a change visible that the log does not already record. A process
killed between steps leaves a marker behind; the next writer **settles** it
(:func:`recover`) before doing its own work: no entry yet -> the marker goes (nothing
happened); entry present and its change visible -> the marker goes (it completed);
entry present but no change -> a ``recover`` entry records that seq N was rolled back
(``new.outcome = "rolled_back"``), then the marker goes. A gc killed mid-way is recorded
as ``interrupted`` (deleted unreachable blobs cannot come back; the next gc finishes).
A change that fails after its entry (a lost compare-and-swap on S3, a full disk) is
rolled back the same way by the writer itself.

Who may settle a marker: on a local store every mutation holds ``refs.lock``, so any
marker found under it belongs to a dead process. On S3 there is no lock; a marker is
settled only once it is older than ``$ADAPTERS_RECOVER_AFTER`` seconds (default
:data:`RECOVER_AFTER_S3`), far longer than a live writer spends between its steps.
Until then :mod:`registry.audit.index` treats the entry as in flight.

Failpoints (:mod:`registry.storage.failpoints`) sit between the steps: ``<op>.before_intent``,
``<op>.after_marker``, ``<op>.after_entry``, ``<op>.after_apply``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from registry.digests import canonical_json
from registry.errors import AdapterkitError, IntegrityError
from registry.stamps import default_actor, utc_now_iso
from registry.storage.backends.base import ObjectMissing
from registry.storage.failpoints import failpoint
from registry.formats.strict_json import loads_json

if TYPE_CHECKING:
    from registry.storage.reader import StoreReader

PENDING = "audit/pending/"
RECOVER = "recover"
CHECKPOINT = "checkpoint"
"""The action of an ``audit checkpoint`` entry (it records a signed checkpoint, changes nothing)."""
RECOVER_AFTER_S3 = 300.0
ALIAS_ACTIONS = frozenset({"alias", "promote", "promote-forced"})


@dataclass(frozen=True)
class Intent:
    """A mutation about to be logged and applied (the content of a marker)."""

    id: str
    after_seq: int
    ts: str
    actor: str
    action: str
    subject: str
    old: Any
    new: Any

    @property
    def key(self) -> str:
        """The marker's object key."""
        return f"{PENDING}{self.id}"

    def matches(self, entry: dict[str, Any]) -> bool:
        """Whether ``entry`` is the audit entry this intent wrote."""
        return all(entry.get(k) == getattr(self, k)
                   for k in ("ts", "actor", "action", "subject", "old", "new"))

    def to_json(self) -> dict[str, Any]:
        """JSON form (the marker's content)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Settled:
    """What :func:`recover` did with one marker (``outcome``: ``vanished``,
    ``completed``, ``rolled_back`` or ``interrupted``)."""

    intent: Intent
    outcome: str
    seq: int | None


def recover_after(store: StoreReader) -> float:
    """Seconds a marker must age before another writer may settle it."""
    if store.backend.supports_locks:
        return 0.0
    return float(os.environ.get("ADAPTERS_RECOVER_AFTER", RECOVER_AFTER_S3))


_TEXT_FIELDS = ("id", "ts", "actor", "action", "subject")


def read_markers(store: StoreReader) -> tuple[list[Intent], list[str]]:
    """Every intent marker now in the store, and the keys of malformed ones.

    Markers are written whole (one atomic rename or PUT), so a marker that is not JSON or
    whose fields have the wrong types was written by hand: it is skipped (a writer
    stopped with exit 70 on ``"after_seq": "abc"``) and ``verify --all`` reports it.
    A marker that disappears while being read (settled meanwhile) is just gone.
    """
    out, malformed = [], []
    for key in store.backend.list(PENDING):
        try:
            data = loads_json(store.backend.get(key)[0])
            intent = Intent(**{k: data[k] for k in Intent.__dataclass_fields__})
        except ObjectMissing:
            continue
        except (ValueError, KeyError, TypeError):
            malformed.append(key)
            continue
        if type(intent.after_seq) is not int or not all(
                isinstance(getattr(intent, k), str) for k in _TEXT_FIELDS):
            malformed.append(key)
            continue
        out.append(intent)
    return out, malformed


def pending_intents(store: StoreReader) -> list[Intent]:
    """Every well-formed intent marker now in the store (:func:`read_markers`)."""
    return read_markers(store)[0]


def _age_seconds(ts: str) -> float:
    try:
        when = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        when = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")
    return time.time() - (when - datetime(1970, 1, 1)).total_seconds()


def run_mutation(store: StoreReader, action: str, subject: str, *, old: Any, new: Any,
                 apply: Callable[[], Any], actor: str | None = None,
                 notes: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """Log ``action`` as an intent, apply it, and return its audit entry.

    The caller holds ``refs.lock`` (a no-op on S3) and has already called
    :func:`recover`.

    Args:
        store: The store.
        action: The audit action (one of :data:`registry.storage.failpoints.OPERATIONS`).
        subject: What changes (``name@sha256:..``, ``name:alias``...).
        old: The value replaced (JSON-able).
        new: The value written (JSON-able).
        apply: Makes the change; any exception it raises rolls the entry back and is
            re-raised (so a lost compare-and-swap can be retried by the caller).
        actor: Who does it.
        notes: Extra ``(action, new)`` entries for the same subject, logged right after
            the intent's entry (a forced promotion's reason).

    Raises:
        Whatever ``apply`` raises (after the rollback is recorded), and OSError /
        IntegrityError from writing the marker or the log.
    """
    op = action.partition("-")[0]  # promote-forced crashes at the promote points
    failpoint(f"{op}.before_intent")
    log = store.audit()
    intent = Intent(id=f"{time.time_ns():020d}-{uuid.uuid4().hex}", after_seq=log.last_seq(),
                    ts=utc_now_iso(), actor=actor or default_actor(), action=action,
                    subject=subject, old=old, new=new)
    store.backend.put_if_absent(intent.key, canonical_json(intent.to_json()))
    failpoint(f"{op}.after_marker")
    try:
        entry = log.append(action, subject, old=old, new=new, actor=intent.actor, ts=intent.ts)
    except BaseException:
        # a line that failed mid-write was truncated away: drop the marker. One that was
        # committed before a later step failed (its head write) stays, and so does the
        # marker: the next writer rolls the entry back
        try:
            if not any(intent.matches(e) for e in log.entries_after(intent.after_seq)):
                store.backend.delete(intent.key)
        except (OSError, AdapterkitError):
            pass  # the next writer settles the marker either way
        raise
    for note_action, note in notes:
        log.append(note_action, subject, old=old, new=note, actor=intent.actor)
    failpoint(f"{op}.after_entry")
    try:
        apply()
    except BaseException as err:
        _roll_back(store, intent, entry, f"{type(err).__name__}: {err}"[:200])
        raise
    failpoint(f"{op}.after_apply")
    store.backend.delete(intent.key)
    return entry


def _roll_back(store: StoreReader, intent: Intent, entry: dict[str, Any], reason: str) -> None:
    """Record that ``entry`` was not applied, then drop its marker (best effort: if the
    log cannot be written now, the marker stays and the next writer settles it)."""
    try:
        store.audit().append(RECOVER, intent.subject, actor=intent.actor,
                             old={"seq": entry["seq"], "hash": entry["hash"]},
                             new={"outcome": "rolled_back", "reason": reason})
        failpoint("recover.after_entry")
        store.backend.delete(intent.key)
    except OSError:
        pass


def recover(store: StoreReader, *, actor: str | None = None) -> list[Settled]:
    """Settle the intents that dead writers left (see the module docstring).

    The caller holds ``refs.lock`` (local stores).

    Returns:
        One :class:`Settled` per marker handled.

    Raises:
        IntegrityError: The audit log cannot be read.
    """
    min_age = recover_after(store)
    done = []
    for intent in pending_intents(store):
        if min_age and _age_seconds(intent.ts) < min_age:
            continue
        done.append(_settle(store, intent, actor))
    return done


def written_after(store: StoreReader, entry: dict[str, Any], after: Sequence[dict[str, Any]]) -> bool:
    """Whether ``after`` (the entries that follow ``entry``, a pending intent's) proves the
    marker was not left by a dead writer.

    On a local store every mutation holds ``refs.lock`` and settles the markers it finds
    before writing its own entry, so a dead writer's entry is always the last one but for
    its own notes (same subject, actor and ``old``: a forced promotion's reason),
    ``recover`` entries and ``checkpoint`` entries (which change nothing); a marker whose entry other writes followed was written by hand (it
    would excuse a binding removed or an alias reverted behind the log's back). On S3
    markers are settled by age, and later writes are normal.
    """
    def same_mutation(e: dict[str, Any]) -> bool:
        # a checkpoint entry changes nothing in the store (older versions wrote it without
        # settling markers first), so it does not count as a later write either
        return e.get("action") in (RECOVER, CHECKPOINT) or all(
            e.get(k) == entry.get(k) for k in ("subject", "actor", "old"))

    return store.backend.supports_locks and not all(same_mutation(e) for e in after)


def _settle(store: StoreReader, intent: Intent, actor: str | None) -> Settled:
    log = store.audit()
    later = log.entries_after(intent.after_seq)
    found = next((e for e in later if intent.matches(e)), None)
    if found is None:  # died before logging: nothing was applied either
        store.backend.delete(intent.key)
        return Settled(intent, "vanished", None)
    after = [e for e in later if e["seq"] > found["seq"]]
    if written_after(store, found, after):
        raise IntegrityError(f"intent marker {intent.key} names audit entry {found['seq']}, which "
                             f"{len(after)} later entries follow: no dead writer leaves that, "
                             "it was written by hand",
                             fix="check the store with `adapters verify --all`, then remove the "
                                 "marker file")
    settled = any(e.get("action") == RECOVER and (e.get("old") or {}).get("seq") == found["seq"]
                  for e in after)
    outcome = "completed"
    if not settled:
        applied = effect_visible(store, found, after)
        if not applied:
            outcome = "interrupted" if found["action"] == "gc" else "rolled_back"
            log.append(RECOVER, intent.subject, actor=actor,
                       old={"seq": found["seq"], "hash": found["hash"]},
                       new={"outcome": outcome,
                            "reason": f"the writer ({intent.actor}) died before applying it"})
            failpoint("recover.after_entry")
    store.backend.delete(intent.key)
    return Settled(intent, outcome, found["seq"])


def effect_visible(store: StoreReader, entry: dict[str, Any],
                   later: Sequence[dict[str, Any]]) -> bool:
    """Whether the change ``entry`` records is in the store (now, or overtaken by a
    later entry that started from its result)."""
    action, subject, new = entry["action"], entry["subject"], entry["new"]
    same = [e for e in later if e.get("subject") == subject]
    if action == "push":
        name, _, digest = subject.rpartition("@")
        return store.is_bound(name, digest) or any(e["action"] == "delete" for e in same)
    if action == "delete":
        name, _, digest = subject.rpartition("@")
        return not store.is_bound(name, digest) or any(e["action"] == "push" for e in same)
    if action in ALIAS_ACTIONS:
        name, _, alias = subject.rpartition(":")
        return (store.aliases(name).get(alias) == new
                or any(e["action"] in ALIAS_ACTIONS and e["old"] == new for e in same))
    if action in ("gate", "sign"):
        key, value = gate_or_sign_key(store, entry)
        current = store.read_pointer(key) if key else None
        return current == value or any(
            e["action"] == action and gate_or_sign_key(store, e)[0] == key
            and e["old"] == value for e in same)
    return False  # gc: a marker left behind means it did not finish


def gate_or_sign_key(store: StoreReader, entry: dict[str, Any]) -> tuple[str, str]:
    """``(pointer key, pointer value)`` a ``gate`` or ``sign`` entry writes."""
    digest = str(entry.get("subject")).rpartition("@")[2]
    given = entry.get("new")
    new: dict[str, Any] = given if isinstance(given, dict) else {}
    try:
        if entry["action"] == "gate":
            return store.gate_key(digest, new.get("policy", "")), new.get("record", "")
        return store.signature_key(digest, new.get("keyid", "")), new.get("envelope", "")
    except AdapterkitError:  # a malformed entry names no pointer
        return "", ""


__all__ = ["ALIAS_ACTIONS", "Intent", "PENDING", "RECOVER", "Settled", "effect_visible",
           "gate_or_sign_key", "pending_intents", "read_markers", "recover", "recover_after", "run_mutation",
           "written_after"]
