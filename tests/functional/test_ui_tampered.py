"""The web view on a tampered store: what ``promote`` would not trust is not shown as trusted,
and an oddly shaped record never fails a page (found by a QA pass; each case was a bug)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the ui extra (starlette) is not installed")
pytest.importorskip("jinja2", reason="the ui extra (jinja2) is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")

from starlette.testclient import TestClient  # noqa: E402

from cli.web.app import create_app  # noqa: E402
from cli.web.guard import LOOPBACK_HOSTS, UiConfig  # noqa: E402
from registry.digests import canonical_json  # noqa: E402
from registry.storage.store import Store  # noqa: E402
from tests.support.ui import UiWorld, build_ui_store  # noqa: E402


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> UiWorld:
    return build_ui_store(tmp_path_factory.mktemp("ui-tampered"))


@pytest.fixture
def world(pristine: UiWorld, tmp_path: Path) -> UiWorld:
    """A copy of the store for each test to tamper with."""
    shutil.copytree(pristine.store, tmp_path / "store")
    return UiWorld(**{**pristine.__dict__, "store": tmp_path / "store"})


def web(world: UiWorld, **config: Any) -> TestClient:
    config.setdefault("allowed_hosts", LOOPBACK_HOSTS)
    return TestClient(create_app(Store.open(world.store), UiConfig(**config)),
                      base_url="http://127.0.0.1:8765")


def digest_of(ref: str) -> str:
    return ref.rpartition("@")[2]


def test_a_copied_gate_record_is_not_a_pass(world: UiWorld) -> None:
    store = Store.open(world.store)
    merge, b = digest_of(world.merge), digest_of(world.b)
    pointer = store.read_pointer(store.gate_key(merge, world.policy))
    store.backend.put(store.gate_key(b, world.policy), (pointer + "\n").encode())  # cp gates/M/P gates/B/P
    client = web(world)
    gates = client.get(f"/api/gates/{world.b}").json()["records"]
    assert [g["problem"] for g in gates] == ["the gate record names another version or policy (copied?)"]
    row = next(r for r in client.get("/api/names").json()["items"] if r["name"] == "lora-b")
    assert row["gate"] is None and "ignored" in row["error"]
    page = client.get(f"/v/{world.b}").text
    assert "untrusted record" in page and '<h3><span class="verdict untrusted">untrusted</span>' in page
    assert "unaudited" in page  # the version's own verification reports it
    # the merge's own record is still trusted
    assert [g["problem"] for g in client.get(f"/api/gates/{world.merge}").json()["records"]] == [None]


@pytest.mark.parametrize("change", [
    {"meta": "2026"}, {"checks": [{"kind": "structural", "status": "pass"}]},
    {"checks": [{"name": "x", "kind": "perplexity", "status": "pass", "metrics": [1, 2]}]},
    {"checks": "none"}, {"counts": [3]},
])
def test_oddly_shaped_gate_records_never_fail_a_page(world: UiWorld, change: dict) -> None:
    store = Store.open(world.store)
    merge = digest_of(world.merge)
    record = {**world.gate_result, **change}
    store.put_gate_record(merge, world.policy, record)  # audited: a legitimate, odd record
    client = web(world)
    for url in ("/", "/api/names", f"/v/{world.merge}", f"/api/gates/{world.merge}"):
        assert client.get(url).status_code == 200, url


def test_a_gate_record_that_is_not_an_object_is_listed_as_such(world: UiWorld) -> None:
    store = Store.open(world.store)
    blob = store.put_bytes(canonical_json([1]))
    store.backend.put(store.gate_key(digest_of(world.a), world.policy), (blob + "\n").encode())
    client = web(world)
    for url in ("/", "/api/names", f"/v/{world.a}"):
        assert client.get(url).status_code == 200, url
    row = next(r for r in client.get("/api/names").json()["items"] if r["name"] == "lora-a")
    assert row["gate"] is None and "not a JSON object" in row["error"]


def test_the_token_redirect_stays_on_the_view(world: UiWorld) -> None:
    client = web(world, token="correct-horse-battery-staple", allowed_hosts=None)
    for path in ("//evil.example/", "/%2F%2Fevil.example/", "///x"):
        answer = client.get(f"{path}?token=correct-horse-battery-staple", follow_redirects=False)
        location = answer.headers["location"]
        assert answer.status_code == 303 and location.startswith("/") and not location.startswith("//")


def test_a_hand_written_alias_and_a_broken_log_are_flagged_on_the_version_page(world: UiWorld) -> None:
    root = Path(world.store)
    (root / "names" / "lora-a" / "aliases").mkdir(exist_ok=True)
    (root / "names" / "lora-a" / "aliases" / "release").write_text(digest_of(world.a) + "\n")
    client = web(world)
    page = client.get(f"/v/{world.a}").text
    assert "unaudited" in page and "lora-a:release" in page
    log = root / "audit" / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "actor": "trusted-release-manager"}) + "\n"
    log.write_text("".join(lines))
    # a new server (a running one keeps its audit index up to 60 s while no seq moves:
    # registry/lineage_cache.py)
    page = web(world).get(f"/v/{world.merge}").text
    assert "fails its hash-chain check" in page
