"""The quantize logits probe works when a row is not a whole number of 4-bit blocks.

bitsandbytes' AVX512-BF16 CPU kernel repacks ``absmax`` per row; with hidden 96 and
block size 64 that reshape fails (``shape '[96, 1]' is invalid for input of size 144``)
and the probe used to be skipped. The probe now loads the quantized model as the gate
does (that path off) and must report a drift measurement.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_llama import save_tiny_llama

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")


def test_probe_measures_drift_on_rows_that_are_not_whole_blocks(tmp_path: Path) -> None:
    from merging.model.quantize import quantize

    save_tiny_llama(tmp_path / "base", seed=0, hidden_size=96, intermediate_size=160,
                    num_hidden_layers=1)
    result = quantize(tmp_path / "base", "nf4", out=tmp_path / "nf4", probe=True)
    probe = result.probe or {}
    assert "skipped" not in probe, probe
    assert 0.0 <= probe["top1_agreement"] <= 1.0 and probe["max_abs"] > 0.0
