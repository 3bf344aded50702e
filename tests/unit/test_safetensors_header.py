"""The pure-Python safetensors header reader agrees with safetensors and refuses bad files."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file

from registry.errors import BadInputError, NotFoundError
from registry.formats.fingerprint import hash_tensors, iter_tensor_chunks
from registry.formats.safetensors_header import (MAX_HEADER_BYTES, memoized_headers, parse_header_bytes,
                                         read_header)
from tests.support.ingest import small_valid_file
from tests.support.safetensors_files import raw_safetensors, safetensors_bytes, write_safetensors

F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def _reference_view(path):
    with safe_open(str(path), framework="numpy") as f:
        return (
            {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()},
            f.metadata(),
        )


def _ours(path):
    header = read_header(path)
    return {k: (v.dtype, v.shape) for k, v in header.tensors.items()}, header.metadata


def test_torch_saved_file_matches_safe_open(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 4),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "half": torch.randn(7).half(),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "ints": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "bools": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "f64": torch.randn(2, 2, 2, dtype=torch.float64),
        "näme/with unicode ✓": torch.ones(2),
    }
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(4).to(torch.float8_e4m3fn)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    assert _ours(path) == _reference_view(path)
    header = read_header(path)
    assert header.file_size == path.stat().st_size
    # tensor bytes located by our offsets are the tensor's bytes
    with open(path, "rb") as fh:
        for name, tensor in tensors.items():
            got = b"".join(iter_tensor_chunks(fh, header, header.tensors[name], chunk_size=7))
            want = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert got == want, name
    digests = hash_tensors(path, chunk_size=5)
    assert digests["model.layers.0.self_attn.q_proj.weight"] == hashlib.sha256(
        tensors["model.layers.0.self_attn.q_proj.weight"].numpy().tobytes()
    ).hexdigest()


def test_numpy_saved_file_matches_safe_open(tmp_path):
    path = tmp_path / "np.safetensors"
    np_save_file(
        {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros((2, 0, 3), np.int16)},
        str(path),
    )
    assert _ours(path) == _reference_view(path)


def test_hand_built_file_matches_safe_open(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", small_valid_file())
    assert _ours(path) == _reference_view(path)
    header = read_header(path)
    assert header.tensors["a.weight"].nbytes == 24
    assert header.tensors["a.weight"].numel == 6


def test_progress_reports_every_byte(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", small_valid_file())
    seen: list[int] = []
    hash_tensors(path, progress=seen.append, chunk_size=4)
    assert sum(seen) == 24 + 6 + 8


def _expect_bad(tmp_path, data: bytes, fragment: str, **kwargs):
    path = write_safetensors(tmp_path / "bad.safetensors", data)
    with pytest.raises(BadInputError) as info:
        read_header(path, **kwargs)
    message = info.value.message
    assert str(path) in message
    assert "\n" not in message
    assert fragment in message, message
    assert info.value.fix
    assert info.value.exit_code == 2
    return message


BAD_CASES = {
    "short": (b"\x01\x02", "shorter than the 8-byte"),
    "length_gt_file": (raw_safetensors(b"{}", length=1000), "exceeds the file size"),
    "length_gt_cap": (raw_safetensors(b"{}", length=MAX_HEADER_BYTES + 1), "limit"),
    "length_u64_max": (b"\xff" * 8 + b"{}", "limit"),
    "not_utf8": (raw_safetensors(b'{"\xff\xfe": 1}'), "not UTF-8"),
    "not_json": (raw_safetensors(b"{not json"), "not JSON"),
    "not_object": (raw_safetensors(b"[1, 2]"), "does not start with '{'"),
    "leading_space": (raw_safetensors(b" {}"), "does not start with '{'"),
    "trailing_garbage": (raw_safetensors(b"{}x"), "not JSON"),
    "nan": (raw_safetensors(b'{"__metadata__": {"a": NaN}}'), "NaN"),
    "float_shape": (raw_safetensors({"a": {**F32_1, "shape": [1.0]}}, b"\0" * 4), "integers only"),
    "negative_dim": (raw_safetensors({"a": {**F32_1, "shape": [-1]}}, b"\0" * 4), "negative"),
    "bool_dim": (raw_safetensors({"a": {**F32_1, "shape": [True]}}, b"\0" * 4), "shape is not a list"),
    "shape_not_list": (raw_safetensors({"a": {**F32_1, "shape": 4}}, b"\0" * 4), "shape is not a list"),
    "unknown_dtype": (raw_safetensors({"a": {**F32_1, "dtype": "F31"}}, b"\0" * 4), "unknown dtype"),
    "dtype_not_str": (raw_safetensors({"a": {**F32_1, "dtype": 32}}, b"\0" * 4), "unknown dtype"),
    "size_mismatch": (raw_safetensors({"a": {**F32_1, "shape": [2]}}, b"\0" * 4), "needs 8"),
    "out_of_range": (raw_safetensors({"a": {**F32_1, "data_offsets": [4, 8]}}, b"\0" * 4), "out of range"),
    "end_before_start": (raw_safetensors({"a": {**F32_1, "data_offsets": [4, 0]}}, b"\0" * 4), "out of range"),
    "offsets_triple": (raw_safetensors({"a": {**F32_1, "data_offsets": [0, 4, 4]}}, b"\0" * 4), "pair"),
    "overlap": (
        raw_safetensors({"a": F32_1, "b": {**F32_1, "data_offsets": [2, 6]}}, b"\0" * 8),
        "overlaps",
    ),
    "same_bytes_twice": (raw_safetensors({"a": F32_1, "b": F32_1}, b"\0" * 4), "overlaps"),
    "gap": (raw_safetensors({"a": {**F32_1, "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
    "trailing_bytes": (raw_safetensors({"a": F32_1}, b"\0" * 5), "trailing bytes"),
    "truncated_data": (raw_safetensors({"a": {**F32_1, "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "out of range"),
    "duplicate_key": (
        raw_safetensors(b'{"a": ' + json.dumps(F32_1).encode() + b', "a": ' + json.dumps(F32_1).encode() + b"}", b"\0" * 4),
        "duplicate key",
    ),
    "lone_surrogate_name": (raw_safetensors(b'{"\\ud800": ' + json.dumps(F32_1).encode() + b"}", b"\0" * 4), "not valid UTF-8"),
    "control_char_name": (raw_safetensors({"a\nb": F32_1}, b"\0" * 4), "control characters"),
    "empty_name": (raw_safetensors({"": F32_1}, b"\0" * 4), "empty tensor name"),
    "unknown_field": (raw_safetensors({"a": {**F32_1, "extra": 1}}, b"\0" * 4), "unknown field"),
    "missing_field": (raw_safetensors({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "missing field"),
    "entry_not_object": (raw_safetensors({"a": [1, 2]}, b""), "not an object"),
    "metadata_not_strings": (raw_safetensors({"__metadata__": {"a": 1}}), "__metadata__"),
    "metadata_not_object": (raw_safetensors({"__metadata__": "x"}), "__metadata__"),
    "huge_shape": (raw_safetensors({"a": {**F32_1, "shape": [2**40, 2**40]}}, b"\0" * 4), "overflows"),
    "huge_int": (raw_safetensors({"a": {**F32_1, "shape": [10**30]}}, b"\0" * 4), "too large"),
    "int_digits_bomb": (raw_safetensors(b'{"a": {"shape": [' + b"9" * 5000 + b"]}}"), "too large"),
    "sub_byte": (raw_safetensors({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, b"\0"), "whole number of bytes"),
    "deep_nesting": (raw_safetensors(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_files_are_refused_with_a_clear_message(tmp_path, case):
    data, fragment = BAD_CASES[case]
    _expect_bad(tmp_path, data, fragment)


def test_reference_reader_also_refuses_structural_errors(tmp_path):
    # sanity check of the fixtures themselves: safetensors refuses these too
    for case in ("overlap", "gap", "trailing_bytes", "size_mismatch", "huge_shape", "length_gt_file"):
        path = write_safetensors(tmp_path / f"{case}.safetensors", BAD_CASES[case][0])
        # safetensors' own error types differ by case (SafetensorError, OSError, ...): any will do
        with pytest.raises(Exception):  # noqa: B017
            _reference_view(path)


def test_too_many_tensors_is_refused_before_parsing(tmp_path):
    many = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(50)}
    _expect_bad(tmp_path, raw_safetensors(many), "more than 10", max_tensors=10)
    assert len(read_header(write_safetensors(tmp_path / "ok.safetensors", raw_safetensors(many))).tensors) == 50


def test_zero_sized_tensors_and_empty_file_are_valid(tmp_path):
    header = read_header(write_safetensors(tmp_path / "e.safetensors", raw_safetensors(b"{}")))
    assert header.tensors == {} and header.metadata is None
    data = raw_safetensors({"z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]}, "a": F32_1}, b"\0" * 4)
    path = write_safetensors(tmp_path / "z.safetensors", data)
    assert set(read_header(path).tensors) == {"z", "a"}
    assert _ours(path) == _reference_view(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(NotFoundError):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(BadInputError):
        read_header(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def attempt():
        try:
            read_header(fifo)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the stuck open() so the thread can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_header blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], BadInputError)
    assert "not a regular file" in outcome[0].message


def test_file_changed_after_header_is_caught(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors", small_valid_file())
    header = read_header(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(BadInputError, match="changed"):
        hash_tensors(path, header)


def test_padding_and_metadata_survive(tmp_path):
    data = safetensors_bytes({"a": ("F32", [1], b"\0" * 4)}, metadata={"k": "v"}, pad=True)
    header = read_header(write_safetensors(tmp_path / "p.safetensors", data))
    assert header.metadata == {"k": "v"}
    assert header.data_offset % 8 == 0


def test_memoized_headers_parse_each_file_once_until_it_changes(tmp_path, monkeypatch):
    import registry.formats.safetensors_header as module

    path = tmp_path / "m.safetensors"
    np_save_file({"w": np.zeros((2, 3), dtype=np.float32)}, str(path))
    parses = []

    def counting(*args, **kwargs):
        parses.append(1)
        return parse_header_bytes(*args, **kwargs)

    monkeypatch.setattr(module, "parse_header_bytes", counting)
    assert read_header(path) is not read_header(path) and len(parses) == 2  # no memo outside
    with memoized_headers():
        first = read_header(path)
        with memoized_headers():  # nested: the same memo
            assert read_header(path) is first
        assert len(parses) == 3
        np_save_file({"w": np.zeros((4, 3), dtype=np.float32)}, str(path))  # rewritten
        changed = read_header(path)
        assert changed is not first and changed.tensors["w"].shape == (4, 3)
        assert len(parses) == 4
    assert read_header(path) is not changed and len(parses) == 5


def test_an_unreadable_or_odd_file_maps_to_the_documented_exit_codes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # found by a CLI contract pass (run as an unprivileged user): permission denied exited 2,
    # though the README's table lists it under 6; a socket in place of the file had no fix
    import os
    import socket

    from registry.errors import BadInputError, EnvironmentFailure
    from registry.formats import safetensors_header

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")

    def denied(*_args: object, **_kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors_header.os, "open", denied)
        with pytest.raises(EnvironmentFailure, match="permission denied") as info:
            read_header(path)
    assert info.value.exit_code == 6 and info.value.fix
    odd = tmp_path / "socket.safetensors"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(odd))
        with pytest.raises(BadInputError, match="cannot read") as info:
            read_header(odd)
    assert info.value.fix == "replace it with a regular safetensors file"
    assert os.path.exists(odd)
