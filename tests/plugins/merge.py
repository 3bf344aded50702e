"""Fixtures of the merge tests: a pair of hand-made adapters, the merge CLI's store.

A pytest plugin (listed in ``tests/conftest.py``): ``adapter_pair`` serves the method
tests of ``tests/unit`` (``test_merge_methods_more``, ``test_knots``); ``merge_bases``
and ``merge_store`` serve ``test_merge_cli`` and ``test_merge_cli_more``. Each module
that asks for ``merge_bases`` saves its own two bases (module scope), so the modules
pass alone, in any order and on any worker. :mod:`tests.support.merge` (torch) is imported
when a fixture is first used, not when pytest loads the plugin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_llama import save_tiny_llama


@pytest.fixture()
def adapter_pair(tmp_path: Path) -> tuple[Path, Path]:
    """:func:`tests.support.merge.adapter_pair` under ``tmp_path``."""
    from tests.support.merge import adapter_pair as make_pair

    return make_pair(tmp_path)


@pytest.fixture(scope="module")
def merge_bases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two saved tiny Llamas of one structure: seed 0 and seed 1 (other weights)."""
    from tests.support.merge import MERGE_LLAMA

    root = tmp_path_factory.mktemp("merge-cli-bases")
    same = save_tiny_llama(root / "base", MERGE_LLAMA, seed=0)
    other_weights = save_tiny_llama(root / "base-other-weights", MERGE_LLAMA, seed=1)
    return same, other_weights


@pytest.fixture()
def merge_store(tmp_path: Path, merge_bases: tuple[Path, Path],
                capsys: pytest.CaptureFixture[str]) -> Path:
    """A store with ``math`` (r 4) and ``code`` (r 8) on the seed-0 base and ``drift``
    (r 4) on the seed-1 base, pushed with ``--base``."""
    from tests.support.merge import CLI_SHAPES, merge_cli, random_adapter

    base, other = merge_bases
    st = tmp_path / "store"
    assert merge_cli(["init", "--store", str(st)], capsys)[0] == 0
    for name, seed, r, b in (("math", 1, 4, base), ("code", 2, 8, base), ("drift", 3, 4, other)):
        adapter = random_adapter(tmp_path / name, CLI_SHAPES, r, seed=seed)
        code, _, err = merge_cli(["push", str(adapter), "--name", name, "--base", str(b),
                                  "--store", str(st)], capsys)
        assert code == 0, err
    return st
