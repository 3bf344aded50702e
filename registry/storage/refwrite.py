"""Conditional writes of the store's small ref objects: alias/gate CAS and content claims.

Both work on any backend (:mod:`registry.storage.backends`) without relying on a lock, because
S3 has none; on a local store the callers also hold ``refs.lock``, so the retries
below never fire there.

* :func:`cas_ref` reads a ref object with its ETag, checks the caller's expectation,
  and writes with ``put_if_match`` (``put_if_absent`` for a new ref, a conditional
  delete for removal). Losing the race (:class:`PreconditionFailed`) means someone moved
  it in between: re-read and check again, so an ``expect`` that no longer holds becomes
  a ConflictError and an unconditional move is applied on top of the newer value --
  never silently lost.
* :func:`claim_content` makes concurrent pushes of identical content (same manifest
  apart from ``record.created``) agree on one version: the first create-only write of
  ``content/<name>/<content key hex>`` wins; the others wait for the winner's binding
  and return it. A claim whose version never got bound (its pusher died) is taken
  over after :data:`CLAIM_WAIT` seconds (``$ADAPTERS_CLAIM_WAIT``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from registry.digests import digest_hex, is_digest
from registry.errors import ConflictError, IntegrityError
from registry.storage.backends.base import Backend, ObjectMissing, PreconditionFailed

CAS_ATTEMPTS = 200
CLAIM_WAIT = 30.0


class _AnyType:
    """Sentinel type of :data:`ANY` (``expect`` not checked)."""

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _AnyType()
"""``set_alias(expect=ANY)``: move unconditionally (still atomic, still audited)."""


def read_ref(backend: Backend, key: str) -> tuple[str | None, str | None]:
    """``(digest, etag)`` held by a ref object, ``(None, None)`` if absent.

    Raises:
        IntegrityError: The object does not hold a digest.
    """
    try:
        data, etag = backend.get(key)
    except ObjectMissing:
        return None, None
    value = data.decode("utf-8", errors="replace").strip()
    if not is_digest(value):
        raise IntegrityError(f"{key} does not hold a digest", fix="run `adapters verify`")
    return value, etag


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 25)))


def cas_ref(backend: Backend, key: str, expect: Any, new: str | None,
            conflict: Callable[[str | None], ConflictError],
            around: Callable[[str | None, Callable[[], None]], Any] | None = None,
            ) -> tuple[str | None, bool]:
    """Set (``new`` digest) or delete (``new`` None) a ref object by compare-and-swap.

    Args:
        backend: The store's backend.
        key: The ref object (alias or gate pointer).
        expect: :data:`ANY`, or the digest (None: absent) the ref must hold now.
        new: Digest to store, or None to delete.
        conflict: Builds the error raised when ``expect`` does not hold (gets the current value).
        around: Runs the write: called with the value being replaced and a function
            that performs the conditional write (the store passes
            :func:`registry.audit.journal.run_mutation`, which logs the change first and
            rolls the entry back if the write loses the race).

    Returns:
        ``(previous value, changed)``; ``changed`` is False when it already held ``new``.

    Raises:
        ConflictError: ``expect`` does not hold, or the ref kept changing for
            :data:`CAS_ATTEMPTS` attempts.
    """
    for attempt in range(CAS_ATTEMPTS):
        current, etag = read_ref(backend, key)
        if expect is not ANY and current != expect:
            raise conflict(current)
        if current == new:
            return current, False

        def write(etag: str | None = etag) -> None:
            if new is None:
                # gone since it was read: another remover won, and this one must not count
                # (found by a QA pass on S3, where every racing `alias rm` "won")
                if not backend.delete(key, etag):
                    raise PreconditionFailed(f"{key} was deleted", fix="re-read it and retry")
            elif etag is None:
                backend.put_if_absent(key, (new + "\n").encode())
            else:
                backend.put_if_match(key, (new + "\n").encode(), etag)
        try:
            if around is None:
                write()
            else:
                around(current, write)
            return current, True
        except PreconditionFailed:
            _backoff(attempt)
    raise ConflictError(f"{key} kept changing; gave up after {CAS_ATTEMPTS} attempts",
                        fix="retry when fewer writers are moving it")


def claim_key(name: str, content_key: str) -> str:
    """The claim object of ``(name, content key)``."""
    return f"content/{name}/{digest_hex(content_key)}"


def claim_wait() -> float:
    """Seconds to wait for another claimant's binding: ``$ADAPTERS_CLAIM_WAIT`` or
    :data:`CLAIM_WAIT` (a claimant that does not bind within it is taken for dead)."""
    return float(os.environ.get("ADAPTERS_CLAIM_WAIT", CLAIM_WAIT))


def claim_content(backend: Backend, name: str, content_key: str, digest: str,
                  is_bound: Callable[[str], bool], *, wait: float | None = None) -> str | None:
    """Claim ``content_key`` of ``name`` for version ``digest`` before binding it.

    Args:
        wait: Seconds to wait for another claimant's binding (0 where the caller holds
            the refs lock, so no claimant can be in flight).

    Returns:
        None when the caller owns the claim (go on and bind ``digest``), else the digest of
        the already-bound version with the same content (bind nothing, return that one).

    Raises:
        ConflictError: The claim kept changing (extreme contention).
    """
    key = claim_key(name, content_key)
    wait = claim_wait() if wait is None else wait
    for attempt in range(CAS_ATTEMPTS):
        current, etag = read_ref(backend, key)
        try:
            if current is None:
                backend.put_if_absent(key, (digest + "\n").encode())
                return None
            if current == digest:
                return None
            deadline = time.monotonic() + wait
            while not is_bound(current) and time.monotonic() < deadline:
                time.sleep(0.02)  # the winner is between its claim and its binding
            if is_bound(current):
                return current
            assert etag is not None
            backend.put_if_match(key, (digest + "\n").encode(), etag)  # claimant died
            return None
        except PreconditionFailed:
            _backoff(attempt)
    raise ConflictError(f"{key} kept changing; gave up after {CAS_ATTEMPTS} attempts",
                        fix="retry the push")


def release_claim(backend: Backend, name: str, content_key: str, digest: str) -> None:
    """Drop the content claim of a version being unbound, if it still names ``digest``."""
    try:
        cas_ref(backend, claim_key(name, content_key), digest, None,
                lambda _: ConflictError("claim moved on"))
    except ConflictError:
        pass  # absent (a store from before claims) or already re-claimed: leave it
