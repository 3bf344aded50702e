"""The web view in a real browser: Playwright for Python driving Debian's Chromium.

The module starts ``adapters ui`` (a real process, real uvicorn) on a free loopback
port against the :mod:`tests.support.ui` store and, in headless Chromium: opens the
index, clicks through to the TIES merge, follows the lineage graph (an SVG link) to a
parent, checks the gate table's values against the gate's JSON and the record against
``adapters show --json``, and opens the hostile adapter, whose labels and base-model
name hold ``<script>`` and ``" onmouseover=`` payloads, hovering and focusing what it
can: ``window.__pwned`` must stay unset and no dialog may open. Screenshots go to
``$ADAPTERS_UI_SCREENSHOTS`` (default: the test's temporary directory); with
``ADAPTERS_UI_DOCS=1`` the index screenshot also replaces ``docs/ui-index.png``.

Playwright cannot download its own browser here: the test uses ``/usr/bin/chromium``
(``apt-get install -y chromium``; ``$ADAPTERS_CHROMIUM`` overrides the path) and skips,
saying why, when Playwright or Chromium is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_json
from tests.support.ui import UiWorld, build_ui_store

CHROMIUM = os.environ.get("ADAPTERS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install playwright)")
pytest.importorskip("starlette", reason="the ui extra (starlette) is not installed")
pytest.importorskip("uvicorn", reason="the ui extra (uvicorn) is not installed")
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> UiWorld:
    return build_ui_store(tmp_path_factory.mktemp("ui-browser"))


@pytest.fixture(scope="module")
def server(world: UiWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``adapters ui`` on a free loopback port; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui-server") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ui", "--store",
                                 str(world.store), "--port", str(port), "--trusted-keys",
                                 str(world.public_key)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"adapters ui did not start:\n{log.read_text()}")
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "serving a read-only view" in log.read_text()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("ADAPTERS_UI_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as err:  # noqa: BLE001 - a browser that cannot start: skip, say why
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(err)[:300]}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.dialogs = []  # type: ignore[attr-defined]
    tab.on("dialog", lambda d: (tab.dialogs.append(d.message), d.dismiss()))
    yield tab
    context.close()


def test_click_through_merge_lineage_and_gate(page: Any, server: str, world: UiWorld,
                                              shots: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    page.goto(server + "/")
    rows = page.locator("#names tbody tr")
    assert rows.count() == 5
    assert page.locator("#names a.alias.release").inner_text().startswith("release")
    page.screenshot(path=str(shots / "index.png"), full_page=True)
    if os.environ.get("ADAPTERS_UI_DOCS") == "1":  # refresh the README's screenshot
        shutil.copyfile(shots / "index.png", Path(__file__).resolve().parents[2] / "docs"
                        / "ui-index.png")

    page.locator("#names a.name", has_text="ab-ties").first.click()
    page.wait_for_url("**/v/ab-ties@sha256:*")
    assert page.locator("#version-digest").inner_text() == world.merge.split("@", 1)[1]
    assert page.locator("#recipe h2").inner_text() == "Recipe: ties"
    assert page.locator("#module-errors tbody tr").count() == 4
    page.screenshot(path=str(shots / "merge.png"), full_page=True)

    code, shown = run_json(capsys, "show", world.merge, "--store", str(world.store))
    assert code == 0
    for field in ("kind", "peft.r", "tensors.count"):
        cell = page.locator(f'#record td[data-field="{field}"]').inner_text()
        key, _, sub = field.partition(".")
        expected = shown["record"][key][sub] if sub else shown["record"][key]
        assert cell == (expected if isinstance(expected, str) else json.dumps(expected))
    files = page.locator("#files td.digest").all_inner_texts()
    assert files == [f["digest"] for f in shown["files"]]

    gate = world.gate_result  # what `adapters gate --json` prints and the store keeps
    assert page.locator(".gate h3 .verdict").inner_text() == "pass"
    for check in gate["checks"]:
        row = page.locator(f'tr.check[data-check="{check["name"]}"]')
        assert row.locator("td").nth(2).inner_text() == check["status"]
        for key, value in check["metrics"].items():
            text = row.locator(f'td.metric[data-metric="{key}"]').inner_text()
            assert json.loads(text) == value, (check["name"], key)

    edge_labels = page.locator("#lineage .edge text").all_text_contents()  # SVG: no innerText
    assert "input w=0.6" in edge_labels and "input w=0.4" in edge_labels
    assert "adapter" in edge_labels
    parent = page.locator(f'#lineage a.node[data-digest="{world.a.split("@", 1)[1]}"]')
    parent.click()
    page.wait_for_url("**/v/lora-a@sha256:*")
    assert page.locator("#version-name").inner_text() == "lora-a"
    assert page.locator("#signatures .verdict").inner_text() == "valid"
    page.screenshot(path=str(shots / "parent.png"), full_page=True)

    child = page.locator(f'#lineage a.node[data-digest="{world.merge.split("@", 1)[1]}"]')
    child.click()
    page.wait_for_url("**/v/ab-ties@sha256:*")
    page.locator(f'#lineage a.node[data-digest="{world.unloaded.split("@", 1)[1]}"]').click()
    page.wait_for_url("**/v/ab-ties-unloaded@sha256:*")
    assert "unload" in page.locator("#recipe h2").inner_text()
    assert page.dialogs == []


def test_hostile_strings_run_nothing(page: Any, server: str, world: UiWorld,
                                     shots: Path) -> None:
    for url in ["/", "/?label=xss", f"/v/{world.hostile}",
                f"/diff?a={world.a}&b={world.hostile}"]:
        page.goto(server + url)
        page.wait_for_load_state("load")
        for cell in page.locator("td, span.label").all()[:80]:
            cell.hover()  # fires any injected onmouseover
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        assert page.evaluate("window.__pwned") is None, url
        assert page.locator("script").count() == 0, url
    page.goto(server + f"/v/{world.hostile}")
    text = page.content()
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text
    assert page.locator('td[data-field="labels.xss"]').inner_text() == \
        "<script>window.__pwned = 1</script>"
    page.screenshot(path=str(shots / "hostile.png"), full_page=True)
    assert page.dialogs == []


def test_audit_page_and_diff(page: Any, server: str, world: UiWorld, shots: Path) -> None:
    page.goto(server + "/audit")
    assert "audit verify: ok" in page.locator("#audit-verify").inner_text()
    first = page.locator("#audit tbody tr").first.locator("td").first.inner_text()
    seqs = [int(s) for s in page.locator("#audit tbody tr td:first-child").all_inner_texts()]
    assert seqs == sorted(seqs, reverse=True) and int(first) == max(seqs)
    page.screenshot(path=str(shots / "audit.png"), full_page=True)
    page.goto(server + "/diff")
    page.fill("input[name=a]", world.a)
    page.fill("input[name=b]", world.b)
    page.click("form.filters button")
    page.wait_for_url("**/diff?*")
    assert page.locator("#diff-record tr.changed").count() >= 3
    assert page.dialogs == []

