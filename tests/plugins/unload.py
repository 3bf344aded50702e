"""Module-scoped fixtures of the merge-and-unload and requantization tests.

A pytest plugin (``tests/conftest.py`` lists it in ``pytest_plugins``): a test module
asks for ``work`` or ``base`` by name. Both are module-scoped, so each module that uses
them saves its own default base once (``--dist loadscope`` keeps a module on one worker),
and no module depends on another having run first. torch is imported when ``base`` is
first used, not when pytest loads the plugin: a run of torch-free tests never pays for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A scratch directory shared by one test module (``test_unload`` -> ``unload0``)."""
    return tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2].removeprefix("test_"))


@pytest.fixture(scope="module")
def base(work: Path) -> Path:
    """The default tiny float32 Llama, saved once per test module."""
    from tests.support.unload import make_base

    return make_base(work / "base")
