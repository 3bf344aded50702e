"""``merging.model.layout.paused_gc``: the collector is off inside and back as it was after."""

from __future__ import annotations

import gc

import pytest

from merging.model.layout import paused_gc


@pytest.mark.parametrize("enabled_before", [True, False])
def test_paused_gc_restores_the_previous_state(enabled_before: bool) -> None:
    (gc.enable if enabled_before else gc.disable)()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled_before
        with pytest.raises(RuntimeError), paused_gc():
            raise RuntimeError("a failing rewrite")
        assert gc.isenabled() is enabled_before
    finally:
        gc.enable()
