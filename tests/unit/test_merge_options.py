"""The merge's option parsing (merging.lora.options) and request (merging.lora.merge_versions).

Both are torch-free: ``adapters merge`` builds its request before anything heavy loads.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from merging.lora.merge_versions import MergeRequest
from merging.lora.options import parse_rank, parse_weights
from registry.errors import BadInputError


def test_weights_from_text_and_numbers_agree() -> None:
    assert parse_weights("0.7,0.3", 2) == parse_weights([0.7, 0.3], 2) == [0.7, 0.3]
    assert parse_weights(None, 3) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("value,message", [
    ("1,2,3", "--weights needs 2 finite numbers"),
    ("a,b", "--weights expects comma-separated numbers"),
    ("1,nan", "--weights needs 2 finite numbers"),
    ([1.0], "1 weights for 2 adapters"),
    ([1.0, float("inf")], "is not a finite number"),
    ([True, 1.0], "is not a finite number"),
])
def test_bad_weights_are_refused(value: object, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        parse_weights(value, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("value,expected", [
    (None, None), ("full", "full"), ("16", 16), (16, 16),
])
def test_ranks(value: object, expected: object) -> None:
    assert parse_rank(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["zero", "0", "-3", 0, -1, True, "16.5"])
def test_bad_ranks_are_refused(value: object) -> None:
    with pytest.raises(BadInputError, match="--rank must be a positive integer or 'full'"):
        parse_rank(value)  # type: ignore[arg-type]


def test_request_parses_options_and_names_the_output() -> None:
    request = MergeRequest.parse(["a", "b"], method="ties", weights="0.5,0.5", rank="8",
                                 params={"density": 0.3, "lambda": None, "align": "knots"})
    assert request.weights == (0.5, 0.5) and request.rank == 8
    assert dict(request.params) == {"density": 0.3, "align": "knots"}
    assert request.target("a") == "a-ties-knots"
    assert MergeRequest.parse(["a", "b"], name="out").target("a") == "out"


def test_request_needs_two_refs() -> None:
    with pytest.raises(BadInputError, match="at least two adapters"):
        MergeRequest.parse(["a"])


def test_request_imports_no_torch() -> None:
    code = ("import sys, merging.lora.merge_versions, merging.lora.options; "
            "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
