"""The web view's kept child edges (registry.lineage_cache): reused while the store is
unchanged, never stale after an audited change, and never kept mid-mutation."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.audit import journal
from registry.lineage import descendants, make_lineage, parent, to_json
from registry.lineage_cache import LineageCache
from registry.storage.manifest import Version
from registry.storage.store import Store
from tests.support.registry import (adapter_files, make_adapter_dir, new_store, push_adapter,
                                     sample_record)


def push_child(store: Store, tmp_path: Path, of: Version, name: str, seed: int) -> Version:
    directory = make_adapter_dir(tmp_path / name, seed=seed)
    return store.push(name, adapter_files(directory), sample_record(directory),
                      lineage=make_lineage([parent(of)], method="linear")).version


def child_names(store: Store, of: Version, cache: LineageCache) -> list[str | None]:
    return [c.name for c in descendants(store, of.ref, edges=cache.edges(store)).children]


@pytest.fixture()
def store_and_root(tmp_path: Path) -> tuple[Store, Version]:
    store = new_store(tmp_path)
    root = push_adapter(store, "root", make_adapter_dir(tmp_path / "root", seed=1)).version
    push_child(store, tmp_path, root, "first", 2)
    return store, root


def test_kept_edges_are_reused_and_equal_a_fresh_read(store_and_root: tuple[Store, Version]) -> None:
    store, root = store_and_root
    cache = LineageCache()
    kept = descendants(store, root.ref, edges=cache.edges(store))
    again = descendants(store, root.ref, edges=cache.edges(store))
    assert cache.builds == 1
    assert to_json(kept) == to_json(again) == to_json(descendants(store, root.ref))
    assert [c.name for c in kept.children] == ["first"]


def test_an_audited_push_or_delete_is_seen_at_once(store_and_root: tuple[Store, Version],
                                                   tmp_path: Path) -> None:
    store, root = store_and_root
    cache = LineageCache()
    assert child_names(store, root, cache) == ["first"]
    second = push_child(store, tmp_path, root, "second", 3)
    assert child_names(store, root, cache) == ["first", "second"]
    store.delete_version(second.ref)
    assert child_names(store, root, cache) == ["first"]
    assert cache.builds == 3


def test_edges_read_between_a_pushs_entry_and_its_binding_are_not_kept(
        store_and_root: tuple[Store, Version], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that runs after the push's audit entry, before its binding: the log's seq
    has already moved, so edges kept under it would miss the child for good."""
    store, root = store_and_root
    cache = LineageCache()
    seen_mid_push: list[list[str | None]] = []

    def reader_at(point: str) -> None:
        if point == "push.after_entry":
            seen_mid_push.append(child_names(store, root, cache))

    monkeypatch.setattr(journal, "failpoint", reader_at)
    push_child(store, tmp_path, root, "second", 3)
    assert seen_mid_push == [["first"]]  # the binding was not there yet
    assert child_names(store, root, cache) == ["first", "second"]


def test_kept_edges_expire(store_and_root: tuple[Store, Version]) -> None:
    store, root = store_and_root
    cache = LineageCache(max_age_s=0.0)
    child_names(store, root, cache)
    child_names(store, root, cache)
    assert cache.builds == 2


def test_an_unreadable_intent_marker_still_keeps_edges_from_being_kept(
        store_and_root: tuple[Store, Version]) -> None:
    store, root = store_and_root
    store.backend.put_if_absent(journal.PENDING + "garbage", b"not json")
    cache = LineageCache()
    child_names(store, root, cache)
    child_names(store, root, cache)
    assert cache.builds == 2


def test_the_audit_index_is_kept_by_the_same_rules(store_and_root: tuple[Store, Version],
                                                   tmp_path: Path) -> None:
    from registry.audit.index import AuditIndex

    store, root = store_and_root
    cache = LineageCache()
    kept = cache.audit_index(store)
    assert cache.audit_index(store) is kept and cache.audit_builds == 1 and cache.builds == 0
    assert kept.pushes == AuditIndex.build(store).pushes
    second = push_child(store, tmp_path, root, "second", 3)  # an audited change: read afresh
    assert f"second@{second.digest}" in cache.audit_index(store).pushes
    assert cache.audit_builds == 2
    expired = LineageCache(max_age_s=0.0)
    expired.audit_index(store)
    expired.audit_index(store)
    assert expired.audit_builds == 2
