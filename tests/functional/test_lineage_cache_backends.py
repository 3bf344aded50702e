"""The web view's kept lineage edges on every backend: a child pushed after they were
read shows at once, also when an S3 writer could not advance the audit head (the head
is a hint there; the entries are the log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.audit.objects import ObjectAuditLog
from registry.lineage import descendants, make_lineage, parent
from registry.lineage_cache import LineageCache, log_tail
from registry.storage.store import Store
from tests.plugins.s3 import is_s3
from tests.support.registry import adapter_files, make_adapter_dir, push_adapter, sample_record


def test_a_push_shows_at_once_even_with_a_lagging_s3_head(
        store_location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(store_location, create=True)  # the writer (a push, in its own process)
    root = push_adapter(store, "root", make_adapter_dir(tmp_path / "root", seed=1)).version
    server = Store.open(store_location)  # the web view's store: it never appends
    cache = LineageCache()

    def children() -> list[str | None]:
        return [c.name for c in descendants(server, root.ref, edges=cache.edges(server)).children]

    assert children() == []
    before = server.audit().last_seq()
    if is_s3(store_location):  # the writer's head CAS gives up: entries land, the head stays
        monkeypatch.setattr(ObjectAuditLog, "_advance_head", lambda self, seq, digest: None)
    directory = make_adapter_dir(tmp_path / "child", seed=2)
    store.push("child", adapter_files(directory), sample_record(directory),
               lineage=make_lineage([parent(root)], method="linear"))
    if is_s3(store_location):
        assert Store.open(store_location).audit().last_seq() == before  # the head lags...
    assert log_tail(Store.open(store_location)) > before  # ...the log's tail does not
    assert children() == ["child"]
    assert cache.builds == 2
