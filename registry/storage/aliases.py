"""Moving and removing aliases, and unbinding versions: compare-and-swap, audited.

Every change here happens under ``refs.lock`` through
:func:`registry.audit.journal.run_mutation` (intent marker, audit entry, change, marker
removed), and every pointer moves with :func:`registry.storage.refwrite.cas_ref`, so on
S3 (no lock) a writer that lost a race re-reads instead of overwriting, and the audited
``old`` value is exactly the one replaced.

Protected aliases (``config.json`` ``protected_aliases``, default ``["release"]``)
can only be moved with ``protected_ok=True``, which the gate's ``promote`` passes
after it has checked a passing gate record. :class:`registry.storage.store.Store`
exposes these as methods.

Commands that store a version can also point an alias at it (``push --alias``, ``pull
--alias``): :func:`check_new_alias` refuses a bad or protected alias before any work is
done, and :func:`point_new_alias` moves it once the version exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from registry.audit.journal import recover, run_mutation
from registry.digests import digest_hex, is_digest
from registry.errors import BadInputError, ConflictError, GateFailedError, NotFoundError
from registry.storage.manifest import Version, content_key
from registry.storage.reader import StoreReader
from registry.storage.refs import validate_alias, validate_name
from registry.storage.refwrite import ANY, cas_ref, release_claim


def _expect_digest(store: StoreReader, name: str, expect: Any) -> Any:
    if expect is ANY or expect is None or is_digest(expect):
        return expect
    if isinstance(expect, str):
        return store.resolve(f"{name}@{expect}").digest
    raise BadInputError(f"expect must be a digest, None or ANY, got {expect!r}",
                        fix="pass the alias's current digest")


def set_alias(store: StoreReader, name: str, alias: str, digest: str, *, expect: Any = ANY,
              actor: str | None = None, action: str = "alias",
              protected_ok: bool = False,
              notes: Sequence[tuple[str, Any]] = (),
              still_valid: Callable[[], None] | None = None) -> str | None:
    """Point ``name:alias`` at a version of ``name`` by compare-and-swap.

    Args:
        name: The name.
        alias: Alias to move (e.g. ``candidate``).
        digest: Target version: full digest, digest prefix or a ref of the same name.
        expect: :data:`ANY` (no check), None (alias must not exist yet) or the digest
            (or unique prefix) the alias must currently point to.
        actor: Who moves it.
        action: Audit action (``alias``; the gate's promote passes ``promote``).
        protected_ok: Allow moving a protected alias (only the gate's promote does).
        notes: Extra ``(action, value)`` audit entries logged with the move (a forced
            promotion's reason), before the alias is written.
        still_valid: Called under the refs lock just before the move; raises if what the
            caller checked beforehand no longer holds (promote: the gate record it read
            is still the stored one, since gate records change under the same lock).

    Returns:
        The previous digest, or None if the alias did not exist. Moving an alias to
        where it already points is a no-op (not audited).

    Raises:
        GateFailedError: ``alias`` is protected and ``protected_ok`` is False.
        ConflictError: ``expect`` does not match the current value (the message and
            fix say what it is now).
        NotFoundError: The target is not a version of ``name``.
        BadInputError: Bad name, alias or digest.
    """
    validate_name(name)
    validate_alias(alias)
    if alias in store.protected_aliases and not protected_ok:
        raise GateFailedError(f"alias {alias!r} is protected; only a passing gate moves it",
                              fix=f"run `adapters promote {name}@<digest> --to {alias}`")
    target = _target_digest(store, name, digest)
    expect = _expect_digest(store, name, expect)
    key = store.alias_key(name, alias)

    def conflict(current: str | None) -> ConflictError:
        return ConflictError(
            f"alias {name}:{alias} points to {current or 'nothing'}, "
            f"expected {expect or 'nothing (new alias)'}",
            fix=f"re-read the alias and retry with --expect {current or 'none'}")

    def audited(old: str | None, write: Callable[[], None]) -> None:
        run_mutation(store, action, f"{name}:{alias}", old=old, new=target, apply=write,
                     actor=actor, notes=notes)

    with store.lock("refs"):
        recover(store, actor=actor)
        if not store.is_bound(name, target):
            raise NotFoundError(f"{target} is not a version of {name}",
                                fix=f"list versions with `adapters ls {name}`")
        if still_valid is not None:
            still_valid()
        current, _ = cas_ref(store.backend, key, expect, target, conflict, around=audited)
    return current


def _target_digest(store: StoreReader, name: str, digest: str) -> str:
    if is_digest(digest):
        return digest
    text = str(digest)
    version = store.resolve(text if ("@" in text or ":" in text) and not
                           text.startswith("sha256:") else f"{name}@{text}")
    if version.name != name:
        raise BadInputError(f"{version.ref} is not a version of {name}",
                            fix="aliases can only point at versions of their own name")
    return version.digest


def delete_alias(store: StoreReader, name: str, alias: str, *, expect: Any = ANY,
                 actor: str | None = None, protected_ok: bool = False) -> str | None:
    """Remove an alias (compare-and-swap like :meth:`set_alias`), audited ``alias``.

    Returns:
        The digest it pointed to, or None if it did not exist.

    Raises:
        GateFailedError: Protected alias without ``protected_ok``.
        ConflictError: ``expect`` does not match.
    """
    validate_name(name)
    validate_alias(alias)
    if alias in store.protected_aliases and not protected_ok:
        raise GateFailedError(f"alias {alias!r} is protected",
                              fix="protected aliases are moved by `adapters promote`")
    expect = _expect_digest(store, name, expect)
    def conflict(current: str | None) -> ConflictError:
        return ConflictError(f"alias {name}:{alias} points to {current or 'nothing'}, "
                             f"expected {expect or 'nothing'}",
                             fix=f"re-read the alias and retry with --expect {current}")

    def audited(old: str | None, write: Callable[[], None]) -> None:
        run_mutation(store, "alias", f"{name}:{alias}", old=old, new=None, apply=write,
                     actor=actor)

    with store.lock("refs"):
        recover(store, actor=actor)
        current, _ = cas_ref(store.backend, store.alias_key(name, alias), expect,
                             None, conflict, around=audited)
    return current


def delete_version(store: StoreReader, ref: str, *, actor: str | None = None) -> Version:
    """Unbind a version from its name (its blobs become garbage for gc), audited.

    Manifests of versions still named as lineage parents are kept by gc.

    Raises:
        ConflictError: An alias still points at it.
        NotFoundError: No such version.
    """
    version = store.resolve(ref)
    with store.lock("refs"):
        recover(store, actor=actor)
        holders = [a for a, d in store.aliases(version.name).items() if d == version.digest]
        if holders:
            raise ConflictError(f"{version.ref} is still the target of alias(es) "
                                f"{', '.join(holders)}",
                                fix="move or delete those aliases first")

        def unbind() -> None:
            # claim first: an identical push racing us then re-creates the version cleanly
            release_claim(store.backend, version.name, content_key(version.manifest),
                          version.digest)
            store.backend.delete(store.binding_key(version.name, digest_hex(version.digest)))
        run_mutation(store, "delete", version.ref, old=version.digest, new=None,
                     apply=unbind, actor=actor)
    return version


@dataclass(frozen=True)
class AliasMove:
    """An alias pointed at a just-stored version.

    Attributes:
        alias: The alias.
        old: The digest it pointed to before (None: it is new).
        new: The version's digest.
    """

    alias: str
    old: str | None
    new: str

    def to_json(self) -> dict[str, Any]:
        """``{"alias", "old", "new"}``."""
        return {"alias": self.alias, "old": self.old, "new": self.new}


def check_new_alias(store: StoreReader, alias: str | None, *, command: str, name: str) -> None:
    """Check the alias a command will point at the version it stores, before any work.

    Args:
        store: The store (its protected aliases).
        alias: The alias (None: nothing to check).
        command: The command, for the fix (``push``, ``pull``).
        name: The name to show in the fix's ``promote`` example.

    Raises:
        BadInputError: An invalid alias.
        GateFailedError: A protected alias (only ``promote`` moves it).
    """
    if alias is None:
        return
    validate_alias(alias)
    if alias in store.protected_aliases:
        raise GateFailedError(
            f"alias {alias!r} is protected; only a passing gate moves it",
            fix=f"{command} without --alias, then `adapters promote {name}@<digest> --to {alias}`",
        )


def point_new_alias(store: StoreReader, version: Version, alias: str | None) -> AliasMove | None:
    """Point ``alias`` (if any) at a just-stored ``version`` (audited ``alias``).

    Returns:
        The move, or None without ``alias``.

    Raises:
        GateFailedError: ``alias`` is protected (:func:`check_new_alias` refuses it first).
        BadInputError: An invalid alias.
    """
    if not alias:
        return None
    old = set_alias(store, version.name, alias, version.digest)
    return AliasMove(alias, old, version.digest)
