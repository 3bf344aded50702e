"""Route tests of the web view (``adapters ui``) with Starlette's TestClient: fast, no browser.

One store per module (:mod:`tests.support.ui`: two adapters, a TIES merge with a gate
record and a promotion, an unloaded model, a hostile adapter, a signature). Checked:
every page and API route answers; the API returns exactly the CLI's ``--json``
documents; anything but GET/HEAD is 405; a token is required on every request when
set; the ``Host`` header is checked on loopback; ``adapters ui`` refuses a
non-loopback host without a token; store strings are escaped in HTML (text,
attributes, SVG); a damaged store renders its damage; no torch is imported.
"""

from __future__ import annotations

import html
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the ui extra (starlette) is not installed")
pytest.importorskip("jinja2", reason="the ui extra (jinja2) is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")

from starlette.testclient import TestClient  # noqa: E402

from cli.web.app import create_app  # noqa: E402
from cli.web.guard import LOOPBACK_HOSTS, UiConfig  # noqa: E402
from registry.storage.store import Store  # noqa: E402
from tests.support.cli import heavy_modules_after, run, run_json  # noqa: E402
from tests.support.ui import PAYLOADS, UiWorld, build_ui_store  # noqa: E402

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> UiWorld:
    return build_ui_store(tmp_path_factory.mktemp("ui"))


def client(world: UiWorld, **config: Any) -> TestClient:
    from registry.signing import load_trusted_keys

    config.setdefault("allowed_hosts", LOOPBACK_HOSTS)
    config.setdefault("trusted", load_trusted_keys([world.public_key]))
    app = create_app(Store.open(world.store), UiConfig(**config))
    return TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=True)


@pytest.fixture(scope="module")
def web(world: UiWorld) -> TestClient:
    return client(world)


def pages(world: UiWorld) -> list[str]:
    return ["/", "/?q=lora", "/?label=team=ads", "/?base=tiny", "/?page=1",
            f"/v/{world.a}", f"/v/{world.merge}", f"/v/{world.unloaded}", f"/v/{world.hostile}",
            "/v/ab-ties:release", f"/diff?a={world.a}&b={world.b}", "/diff", "/audit",
            "/audit?page=2", "/verify"]


def api_routes(world: UiWorld) -> list[str]:
    return ["/api/ls", f"/api/show/{world.merge}", f"/api/diff?a={world.a}&b={world.merge}",
            f"/api/lineage/{world.merge}", f"/api/lineage/{world.a}?direction=down",
            "/api/verify", f"/api/verify?ref={world.a}", "/api/audit/log?limit=5",
            "/api/audit/verify", "/api/alias/history/ab-ties:release",
            f"/api/gates/{world.merge}", "/api/names?label=team"]


def test_every_page_and_api_route_answers(web: TestClient, world: UiWorld) -> None:
    for url in pages(world) + api_routes(world) + ["/static/style.css"]:
        response = web.get(url)
        assert response.status_code == 200, (url, response.text[:500])
        assert web.head(url).status_code == 200, url
    assert "text/html" in web.get("/").headers["content-type"]
    assert web.get("/api/ls").headers["content-type"] == "application/json"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head(web: TestClient, world: UiWorld, method: str) -> None:
    for url in ["/", f"/v/{world.merge}", "/api/ls", "/audit", "/nowhere"]:
        response = web.request(method, url, content=b"{}")
        assert response.status_code == 405, (method, url)
        assert response.headers["allow"] == "GET, HEAD"


def test_api_documents_equal_the_cli_json(web: TestClient, world: UiWorld,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    s = ["--store", str(world.store)]
    sig = ["--signatures", "--trusted-keys", str(world.public_key)]  # the view trusts the key
    cases = [
        ("/api/ls", ["ls"]),
        (f"/api/show/{world.merge}", ["show", world.merge]),
        (f"/api/show/{world.unloaded}", ["show", world.unloaded]),
        (f"/api/diff?a={world.a}&b={world.merge}", ["diff", world.a, world.merge]),
        (f"/api/lineage/{world.merge}", ["lineage", world.merge]),
        (f"/api/lineage/{world.a}?direction=down", ["lineage", world.a, "--down"]),
        (f"/api/verify?ref={world.a}", ["verify", world.a, *sig]),
        ("/api/verify", ["verify", *sig]),  # every other version is unsigned: exit 3
        ("/api/audit/log?limit=5", ["audit", "log", "--limit", "5"]),
        ("/api/audit/log?limit=0", ["audit", "log", "--limit", "0"]),
        ("/api/audit/verify", ["audit", "verify"]),
        ("/api/alias/history/ab-ties:release", ["alias", "history", "ab-ties:release"]),
    ]
    for url, argv in cases:
        code, expected = run_json(capsys, *argv, *s)
        assert code == (3 if argv == ["verify", *sig] else 0), argv
        assert web.get(url).json() == json.loads(json.dumps(expected)), url
    gates = web.get(f"/api/gates/{world.merge}").json()
    assert [r["record"] for r in gates["records"]] == [world.gate_result]


def test_api_errors_are_the_cli_error_document(web: TestClient,
                                               capsys: pytest.CaptureFixture[str],
                                               world: UiWorld) -> None:
    response = web.get("/api/show/no-such-adapter")
    assert response.status_code == 404
    code, expected = run_json(capsys, "show", "no-such-adapter", "--store", str(world.store))
    assert code == 5 and response.json() == expected
    assert web.get("/api/show/a@@b").status_code == 400
    assert web.get("/api/lineage/lora-a?direction=sideways").status_code == 400
    page = web.get("/v/no-such-adapter")
    assert page.status_code == 404 and "no versions named" in page.text
    assert "Traceback" not in page.text
    assert web.get("/?page=0").status_code == 400


def test_version_page_shows_gate_values_lineage_and_signature(web: TestClient,
                                                              world: UiWorld) -> None:
    merge = web.get(f"/v/{world.merge}").text
    for check in world.gate_result["checks"]:
        assert f'data-check="{check["name"]}"' in merge
        for key, value in check["metrics"].items():
            assert f'data-metric="{html.escape(key)}">{json.dumps(value)}<' in merge
    assert 'class="alias release"' in merge and "promote" in merge
    assert "Per-module error" in merge and "self_attn.q_proj" in merge
    assert merge.count('class="node"') >= 3  # two parents and the unloaded model link out
    assert 'w=0.6' in merge and 'w=0.4' in merge and ">adapter<" in merge
    signed = web.get(f"/v/{world.a}").text
    assert ">valid<" in signed
    untrusted = client(world, trusted={}).get(f"/v/{world.a}").text
    assert "not checked" in untrusted


def test_store_strings_are_escaped(web: TestClient, world: UiWorld) -> None:
    for url in ["/", f"/v/{world.hostile}", f"/diff?a={world.a}&b={world.hostile}",
                "/audit?page=1", "/?label=xss"]:
        text = web.get(url).text
        for payload in PAYLOADS:
            assert payload not in text, (url, payload)
        assert "<script" not in text and "onmouseover=\"" not in text, url
    page = web.get(f"/v/{world.hostile}").text
    assert html.escape(PAYLOADS[0]) in page  # shown, as text
    csp = web.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_token_required_on_every_request(world: UiWorld) -> None:
    web = client(world, token=TOKEN, allowed_hosts=None)
    for url in ["/", f"/v/{world.merge}", "/api/ls", "/static/style.css", "/audit"]:
        assert web.get(url).status_code == 401, url
        assert web.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert web.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert web.post("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405
    redirect = web.get(f"/audit?page=1&token={TOKEN}", follow_redirects=False)
    assert redirect.status_code == 303 and redirect.headers["location"] == "/audit?page=1"
    assert web.get("/").status_code == 200  # the cookie set by the redirect
    web.cookies.clear()
    assert web.get("/?token=wrong").status_code == 401


def test_loopback_view_refuses_foreign_host_headers(world: UiWorld) -> None:
    web = client(world)
    assert web.get("/", headers={"host": "evil.example:8765"}).status_code == 400
    assert web.get("/", headers={"host": "localhost:8765"}).status_code == 200


def test_ui_refuses_non_loopback_without_token(capsys: pytest.CaptureFixture[str],
                                               world: UiWorld) -> None:
    code, _, err = run(capsys, "ui", "--host", "0.0.0.0", "--store", str(world.store))
    assert code == 2 and "not loopback" in err and "--token" in err
    code, _, err = run(capsys, "ui", "--host", "::", "--token", "short", "--store",
                       str(world.store))
    assert code == 2 and "16 characters" in err


def test_ui_off_loopback_says_token_required_and_checks_it(world: UiWorld) -> None:
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    pytest.importorskip("uvicorn", reason="the ui extra (uvicorn) is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ui", "--host", "0.0.0.0",
                             "--port", str(port), "--store", str(world.store), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ADAPTERS_UI_TOKEN": TOKEN})
    try:
        lines = [proc.stdout.readline()]
        while lines[-1] not in ("}\n", ""):  # the start document, up to its closing brace
            lines.append(proc.stdout.readline())
        started = json.loads("".join(lines))
        assert started["token_required"] is True and started["read_only"] is True
        deadline = time.monotonic() + 30  # bound before the document, served just after it
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/api/ls"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200 and "names" in json.loads(response.read())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_port_in_use_is_exit_6_before_anything_is_printed(tmp_path: Path, capsys) -> None:
    # found by a CLI contract pass: uvicorn printed its own error after the "serving" document
    # and exited 3, the code of an integrity failure
    import socket

    from cli.main import main

    pytest.importorskip("uvicorn", reason="the ui extra (uvicorn) is not installed")
    world = build_ui_store(tmp_path)
    capsys.readouterr()  # the build's own output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["ui", "--port", str(port), "--store", str(world.store), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 6 and out["exit_code"] == 6 and out["error"] == "EnvironmentFailure"
    assert f"cannot listen on '127.0.0.1':{port}" in out["message"]
    assert out["fix"] == "pick another --port, or stop what listens there"


def test_ctrl_c_stops_the_view_with_exit_0_and_one_json_document(tmp_path: Path) -> None:
    # found by a review: serving on a bound socket (Server.run) let Ctrl-C through as an
    # interruption: exit 130 and a second JSON document after the "serving" one
    import signal
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("uvicorn", reason="the ui extra (uvicorn) is not installed")
    world = build_ui_store(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ui", "--port", str(port),
                             "--store", str(world.store), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:  # serving once a connection is accepted
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out)["url"] == f"http://127.0.0.1:{port}/"  # one document, the start one
    assert "error:" not in err


def test_localhost_is_served_on_ipv4_as_uvicorn_did(monkeypatch: pytest.MonkeyPatch) -> None:
    # found by a review: the first getaddrinfo answer is ::1 where /etc/hosts lists it first
    import socket

    from cli.ui_cmds import listen_socket

    real = socket.getaddrinfo

    def ipv6_first(host, port, family=0, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "localhost" and family in (0, socket.AF_INET6):
            return real("::1", port, socket.AF_INET6, *args, **kwargs) + real("127.0.0.1", port, *args, **kwargs)
        return real("127.0.0.1" if host == "localhost" else host, port, family, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    sock = listen_socket("localhost", 0)
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_damaged_store_renders_the_damage(tmp_path: Path) -> None:
    world = build_ui_store(tmp_path)
    st = Store.open(world.store)
    file_digest = st.resolve(world.b).files[0]["digest"]
    manifest_digest = st.resolve(world.a).digest
    for digest in (file_digest, manifest_digest):
        path = st.blobs.path(digest)
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
        path.write_bytes(b"tampered")
    log = world.store / "audit" / "log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:2] + lines[3:]))
    web = client(world)
    index = web.get("/")
    assert index.status_code == 200 and "lora-a" in index.text and "problem" in index.text
    b_page = web.get(f"/v/{world.b}")
    assert b_page.status_code == 200 and "corrupt" in b_page.text
    a_page = web.get(f"/v/{world.a}")
    assert a_page.status_code == 500 and "Traceback" not in a_page.text
    assert manifest_digest.split(":")[1][:12] in a_page.text
    audit = web.get("/audit")
    assert audit.status_code == 200 and "seq_gap" in audit.text
    verify = web.get("/verify")
    assert verify.status_code == 200 and "corrupt" in verify.text
    assert web.get(f"/v/{world.merge}").status_code == 200  # its parent's manifest is bad


def test_web_view_imports_no_torch(world: UiWorld) -> None:
    code = (f"from starlette.testclient import TestClient\n"
            f"from cli.web.app import create_app\nfrom registry.storage.store import Store\n"
            f"c = TestClient(create_app(Store.open({str(world.store)!r})), "
            f"base_url='http://127.0.0.1')\n"
            f"for u in ['/', '/v/{world.merge}', '/audit', '/verify', '/api/ls']:\n"
            f"    assert c.get(u).status_code == 200, u\n")
    assert heavy_modules_after(code, Path.cwd(), env={"PYTHONPATH": os.getcwd()}) == []


def test_version_page_shows_a_child_pushed_while_the_server_runs(tmp_path: Path) -> None:
    """The server keeps the child edges between requests (registry.lineage_cache): a
    version pushed after the first view must still appear at once, on the page and in
    the lineage API, and disappear once deleted."""
    from registry.lineage import make_lineage, parent
    from tests.support.registry import (adapter_files, make_adapter_dir, new_store, push_adapter,
                                         sample_record)

    store = new_store(tmp_path)
    root = push_adapter(store, "root", make_adapter_dir(tmp_path / "root", seed=1)).version
    web = TestClient(create_app(Store.open(store.root), UiConfig(allowed_hosts=LOOPBACK_HOSTS)),
                     base_url="http://127.0.0.1:8765", raise_server_exceptions=True)
    assert "late-child" not in web.get(f"/v/{root.ref}").text
    directory = make_adapter_dir(tmp_path / "child", seed=2)
    child = store.push("late-child", adapter_files(directory), sample_record(directory),
                       lineage=make_lineage([parent(root)], method="linear")).version
    assert "late-child" in web.get(f"/v/{root.ref}").text
    down = web.get(f"/api/lineage/{root.ref}", params={"direction": "down"}).json()
    assert [c["digest"] for c in down["children"]] == [child.digest]
    store.delete_version(child.ref)
    assert "late-child" not in web.get(f"/v/{root.ref}").text


def test_a_deleted_parent_is_marked_not_linked_and_a_cut_graph_says_so(tmp_path) -> None:
    # found by a QA pass: a deleted parent was a normal link to a 404, and a graph cut at 100
    # generations said nothing
    from cli.web.pages import version_page
    from registry.lineage import make_lineage, parent
    from registry.storage.store import Store
    from tests.support.registry import adapter_files, make_adapter_dir, push_adapter, sample_record

    store = Store.open(tmp_path / "store", create=True)
    root = push_adapter(store, "root", make_adapter_dir(tmp_path / "r")).version
    source = make_adapter_dir(tmp_path / "c", seed=2)
    version = root
    for i in range(102):
        version = store.push("chain", adapter_files(source), sample_record(source),
                             lineage=make_lineage([parent(version, weight=1.0)], method="linear",
                                                  parameters={"i": i})).version
    first_child = next(v for v in store.versions("chain")
                       if v.lineage["parents"][0]["digest"] == root.digest)
    store.delete_version(root.ref)
    page = version_page(store, first_child.ref, trusted=None)
    assert page["parents"][0]["deleted"] and page["truncated"]
    box = next(b for b in page["graph"].boxes if b.digest == root.digest)
    assert box.missing and "deleted" in box.sub  # drawn, not a link
    top = version_page(store, version.ref, trusted=None)
    assert top["truncated"] and not top["parents"][0]["deleted"]
    app = create_app(store, UiConfig(allowed_hosts=LOOPBACK_HOSTS))
    html = TestClient(app, base_url="http://127.0.0.1:8765").get(f"/v/{first_child.ref}").text
    assert f"{root.ref} (deleted)" in html and "more exist" in html
    assert f'data-digest="{root.digest}" href=' not in html  # its box is drawn, not linked
    grandchild = next(v for v in store.versions("chain")
                      if v.lineage["parents"][0]["digest"] == first_child.digest)
    assert f'data-digest="{grandchild.digest}" href=' in html  # a bound one stays a link
